"""A config's ``_target_`` checked as a class of the expected kind before Hydra calls it: a function named
there (``os.makedirs``, ``builtins.print``) would otherwise run with the config's arguments."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import TrainingConfigError


def check_target_class(target: Any, key: str, bases: tuple[type, ...], what: str) -> None:
    """``KEY._target_`` (``target``) imports and names a subclass of ``bases``; else one line naming ``key``."""
    from hydra.utils import get_object

    try:
        found = get_object(str(target))
    except Exception as exc:  # an import error of any kind: the name is what the user can fix
        reason = " ".join(str(exc.__cause__ or exc).split())
        raise TrainingConfigError(f"{key}._target_ {target!r} cannot be imported ({reason})") from None
    if not (isinstance(found, type) and issubclass(found, bases)):
        raise TrainingConfigError(f"{key}._target_ {target!r} is not {what}")


def build_error(key: str, exc: Exception) -> TrainingConfigError:
    """A class's refusal of its arguments (Hydra wraps its ``TypeError``/``ValueError``) as one line naming ``key``."""
    cause = exc.__cause__ or exc
    return TrainingConfigError(f"{key}: {' '.join(str(cause).split())}")


def check_component_targets(cfg: Any, keys: tuple[str, ...] = ("data", "logger", "trainer")) -> None:
    """The ``_target_`` of ``data``, ``logger`` and ``trainer`` (and of a strategy or accelerator given as an
    object) name classes of their kind before Hydra builds them: with the other keys removed (``~data.loader``)
    a function there ran with the config's arguments (attack)."""
    import pytorch_lightning as pl
    from pytorch_lightning.accelerators import Accelerator
    from pytorch_lightning.strategies import Strategy

    from .tracking import MLflowTracker

    kinds: dict[str, tuple[tuple[type, ...], str]] = {
        "data": ((pl.LightningDataModule,), "a Lightning data module class"),
        "logger": ((MLflowTracker,), "defectscope.training.tracking.MLflowTracker"),
        "trainer": ((pl.Trainer,), "a Lightning Trainer class"),
        "trainer.strategy": ((Strategy,), "a Lightning strategy class"),
        "trainer.accelerator": ((Accelerator,), "a Lightning accelerator class"),
    }
    for key, (bases, what) in kinds.items():
        if key.split(".")[0] not in keys:
            continue
        spec = OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else None
        target = spec.get("_target_") if isinstance(spec, DictConfig | dict) else None
        if target is not None:
            check_target_class(target, key, bases, what)
