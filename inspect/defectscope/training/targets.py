"""A config's ``_target_`` checked as a class of the expected kind before Hydra calls it: a function named
there (``os.makedirs``, ``builtins.print``) would otherwise run with the config's arguments."""

from __future__ import annotations

from typing import Any

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
