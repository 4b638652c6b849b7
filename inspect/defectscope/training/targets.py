"""A config's ``_target_`` checked as a class of the expected kind before Hydra calls it: a function named
there (``os.makedirs``, ``builtins.print``) would otherwise run with the config's arguments."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..plain import to_plain
from .config import TrainingConfigError

#: where an object nested in a component's arguments (a DDP strategy's timeout, its cluster environment) may
#: come from: Hydra builds those too, before the component, so a function there would run
NESTED_PACKAGES = (
    "torch", "pytorch_lightning", "lightning_fabric", "lightning", "defectscope", "datetime", "albumentations",
)  # fmt: skip


def _imported(target: Any, key: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(str(target))
    except Exception as exc:  # an import error of any kind: the name is what the user can fix
        reason = " ".join(str(exc.__cause__ or exc).split())
        raise TrainingConfigError(f"{key}._target_ {target!r} cannot be imported ({reason})") from None


def check_target_class(target: Any, key: str, bases: tuple[type, ...], what: str, spec: Any = None) -> None:
    """``KEY._target_`` (``target``) imports and names a subclass of ``bases``; else one line naming ``key``.
    With ``spec`` (the mapping that holds it), every ``_target_`` nested in its arguments is checked too."""
    found = _imported(target, key)
    if not (isinstance(found, type) and issubclass(found, bases)):
        raise TrainingConfigError(f"{key}._target_ {target!r} is not {what}")
    if spec is not None:
        check_targets_within(spec, key)


def check_targets_within(spec: Any, key: str) -> None:
    """Each ``_target_`` nested in ``spec``'s arguments names a class of :data:`NESTED_PACKAGES` (a strategy's
    ``timeout: {_target_: datetime.timedelta}``, the data config's transforms); one line naming its key otherwise."""
    plain = to_plain(spec)
    items = plain.items() if isinstance(plain, dict) else enumerate(plain) if isinstance(plain, list) else ()
    for name, value in items:
        if not isinstance(value, dict | list):
            continue
        where = f"{key}.{name}" if isinstance(name, str) else f"{key}[{name}]"
        target = value.get("_target_") if isinstance(value, dict) else None
        if target is not None:
            found = _imported(target, where)
            package = str(getattr(found, "__module__", "")).split(".")[0]
            if not isinstance(found, type) or package not in NESTED_PACKAGES:
                raise TrainingConfigError(
                    f"{where}._target_ {target!r} is not a class of {', '.join(NESTED_PACKAGES)} (an object "
                    "in a component's arguments)"
                )
        check_targets_within(value, where)


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
        if target is not None:  # a strategy's or accelerator's own arguments were walked with the trainer's
            check_target_class(target, key, bases, what, None if "." in key else spec)
