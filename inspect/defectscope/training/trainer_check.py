"""``trainer.*`` checked before the data scan.  Counts and batch limits are checked here without torch.  The
accelerator, device, precision and strategy rules live in Lightning, so a throwaway Trainer with only those
settings asks it (milliseconds), and a key Lightning's Trainer has no argument for is named with the close
ones.  Without this a GPU asked for on a machine without one was told only after every image was decoded."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..hints import did_you_mean
from ..plain import to_plain
from .config import TrainingConfigError, check_seed, config_number

HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy", "sync_batchnorm")
LIGHTNING_TRAINERS = ("pytorch_lightning.Trainer", "pytorch_lightning.trainer.trainer.Trainer")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """The throwaway Trainer's device lines and warnings stay unsaid: the real one says them again."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _built(settings: dict[str, Any]) -> dict[str, Any]:
    """Values given as objects (``strategy: {_target_: ...DDPStrategy, timeout: ...}``) built as the real
    Trainer's instantiate builds them: Lightning refused the plain mapping ("invalid strategy name")."""
    from hydra.utils import instantiate

    return {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in settings.items()}


def check_trainer(trainer: Any, overrides: Mapping[str, Any] | None = None) -> None:
    """Refuse ``trainer.*`` the Trainer would refuse, before any data is read: an unknown key, then the
    hardware settings (with ``overrides``, what the run adds to them, e.g. a DDP strategy)."""
    spec = to_plain(trainer) or {}
    if not isinstance(spec, dict) or spec.get("_target_") not in LIGHTNING_TRAINERS:
        return  # a Trainer of the user's own: its rules are not Lightning's
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for key in spec:
        if not key.startswith("_") and key not in accepted:
            hint = did_you_mean(key, accepted, "trainer.")
            raise TrainingConfigError(f"trainer.{key}: not an argument of Lightning's Trainer{hint}")
    hardware = {key: spec[key] for key in HARDWARE_KEYS if key in spec} | dict(overrides or {})
    given = ", ".join(f"trainer.{key}={value}" for key, value in hardware.items())
    try:
        with _quiet_lightning():
            pl.Trainer(
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                **_built(hardware),
            )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as exc:
        reason = " ".join(str(exc).split())
        raise TrainingConfigError(f"trainer: {reason} (with {given})") from None


def check_run_numbers(cfg: Mapping[str, Any]) -> None:
    """``seed`` and the trainer's counts are whole numbers: Lightning would fail on them mid-setup."""
    check_seed(cfg)
    trainer = cfg.get("trainer") or {}
    rules = {
        "max_epochs": ("a whole number >= 1, or -1 for no limit", lambda x: x >= 1 or x == -1),
        "max_steps": ("a whole number >= 1, or -1 for no limit", lambda x: x >= 1 or x == -1),
        "min_epochs": ("a whole number >= 0", lambda x: x >= 0),
        "accumulate_grad_batches": ("a whole number >= 1", lambda x: x >= 1),
        "check_val_every_n_epoch": ("a whole number >= 1", lambda x: x >= 1),
        "log_every_n_steps": ("a whole number >= 1", lambda x: x >= 1),
        "num_sanity_val_steps": ("a whole number >= -1 (-1: the whole validation set)", lambda x: x >= -1),
    }
    for key, (expected, ok) in rules.items():
        if trainer.get(key) is not None:
            config_number(trainer[key], f"trainer.{key}", expected, ok, whole=True)
    check_batch_limits(trainer)
    schedule = cfg.get("scheduler") or {}
    if trainer.get("max_epochs") == -1 and "_target_" in schedule:  # the schedule's length is the run's
        by_steps = trainer.get("max_steps") not in (None, -1) and schedule.get("interval", "step") == "step"
        if not by_steps:
            raise TrainingConfigError(
                "trainer.max_epochs=-1 (no limit) leaves the learning-rate schedule no length: set "
                "trainer.max_steps (with scheduler.interval=step), or use scheduler=constant"
            )
    if (cfg.get("optim") or {}).get("sam_rho"):
        if (trainer.get("accumulate_grad_batches") or 1) > 1:
            raise TrainingConfigError(
                "optim.sam_rho needs trainer.accumulate_grad_batches=1: SAM re-takes the gradient of one batch"
            )
        if str(trainer.get("precision")) in ("16", "16-mixed"):
            raise TrainingConfigError(
                f"optim.sam_rho does not work with trainer.precision={trainer.get('precision')} (its gradient "
                "scaler steps without the loss closure SAM needs): use bf16-mixed or 32-true"
            )


#: Lightning reads a float as a share of the batches and an int as a count of them (``val_check_interval`` also
#: takes a time: "DD:HH:MM:SS" or a mapping of timedelta's keywords)
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "overfit_batches", "val_check_interval")  # fmt: skip


def check_batch_limits(trainer: Mapping[str, Any]) -> None:
    """``trainer.limit_*_batches`` and kin: a share in [0, 1] or a whole number of batches (Lightning compared
    a word with a number and said only that)."""
    for key in BATCH_LIMITS:
        value = trainer.get(key)
        if value is None:
            continue
        if key == "val_check_interval" and isinstance(value, str | Mapping):
            _check_time_interval(value)
            continue
        least = 1 if key == "val_check_interval" else 0
        whole = isinstance(value, int) and not isinstance(value, bool) and value >= least
        share = isinstance(value, float) and 0.0 <= value <= 1.0 and (value > 0 or least == 0)
        if not (whole or share):
            what = "(0, 1]" if least else "[0, 1]"
            raise TrainingConfigError(
                f"trainer.{key} must be a share of the batches in {what} or a whole number of batches >= {least}, "
                f"got {value!r}"
            )


def _check_time_interval(value: str | Mapping[str, Any]) -> None:
    """``trainer.val_check_interval`` given as a time, in the forms Lightning takes."""
    import datetime
    import re

    try:
        if isinstance(value, str):
            if not re.fullmatch(r"\d+:\d+:\d+:\d+", value.strip()):
                raise ValueError("expected DD:HH:MM:SS")
            seconds = float(
                sum(int(n) * m for n, m in zip(value.split(":"), (86400, 3600, 60, 1), strict=True))
            )
        else:
            seconds = datetime.timedelta(**{str(k): float(v) for k, v in value.items()}).total_seconds()
    except (TypeError, ValueError) as exc:
        raise TrainingConfigError(
            f"trainer.val_check_interval as a time must be 'DD:HH:MM:SS' or a mapping such as {{minutes: 30}}, "
            f"got {value!r} ({exc})"
        ) from None
    if seconds <= 0:
        raise TrainingConfigError(f"trainer.val_check_interval must be a time > 0, got {value!r}")
