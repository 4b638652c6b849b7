"""``trainer.*`` checked by Lightning itself before the data scan: its accelerator, device, precision and
strategy rules live in Lightning, so a throwaway Trainer with only those settings asks it (milliseconds),
and a key Lightning's Trainer has no argument for is named with the close ones.  Without this a GPU asked
for on a machine without one was told only after every image had been decoded."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..plain import to_plain
from .app_errors import did_you_mean
from .config import TrainingConfigError

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
