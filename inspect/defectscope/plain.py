"""Plain-data checks for values read from files that may come from anyone (checkpoints).

A checkpoint is data: what it holds may choose *values* (class names, a model's width, a data
folder) but never *code*.  Values are therefore checked for type, size and depth before use, and
Hydra's instantiation keys (``_target_``, ``_partial_``, ``_args_``, ``_recursive_``,
``_convert_``) are refused wherever they appear: nothing read from a file is ever handed to
``hydra.utils.instantiate`` or imported by name.  Torch-free.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

#: Hydra's instantiation keys; a value read from a file must never carry one
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
MAX_DEPTH = 16
MAX_STRING = 4096
MAX_ITEMS = 100_000


class PlainDataError(ValueError):
    """A value read from a file is not plain data of the expected shape; the message names its key."""


def _is_hydra_key(key: str) -> bool:
    return key in HYDRA_KEYS or (len(key) > 2 and key.startswith("_") and key.endswith("_"))


def check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Raise unless ``value`` is None/bool/int/finite float/str, or lists and str-keyed dicts of them.

    Caps: ``MAX_DEPTH`` levels, strings of ``MAX_STRING`` characters, ``MAX_ITEMS`` items per
    container.  Keys that Hydra would act on (``_target_`` and friends) are refused.
    """
    if depth > MAX_DEPTH:
        raise PlainDataError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PlainDataError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise PlainDataError(f"{where}: a string of {len(value)} characters (at most {MAX_STRING})")
        return
    if isinstance(value, list | tuple):
        if len(value) > MAX_ITEMS:
            raise PlainDataError(f"{where}: a list of {len(value)} items (at most {MAX_ITEMS})")
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise PlainDataError(f"{where}: a mapping of {len(value)} keys (at most {MAX_ITEMS})")
        for key, item in value.items():
            if not isinstance(key, str):
                raise PlainDataError(f"{where}: key {key!r} is a {type(key).__name__}, expected a string")
            if _is_hydra_key(key):
                raise PlainDataError(
                    f"{where}.{key}: {key} is refused in a file (a checkpoint is data; nothing in it may "
                    "name code to run)"
                )
            check_plain(item, f"{where}.{key}", depth + 1)
        return
    raise PlainDataError(f"{where}: a {type(value).__name__}, expected plain data (numbers, strings, lists)")


def to_plain(value: Any, *, strict: bool = False) -> Any:
    """Config containers -> plain dicts (string keys) and lists, recursively; anything else as it is.

    OmegaConf containers are resolved; a missing value (``???``) raises with ``strict`` (what a model or a
    data source is built from must be complete) and otherwise stays ``"???"`` (logging a whole config).
    omegaconf is looked at only when already imported, so the torch-free callers stay free of it.
    Tuples, ranges and arrays become lists; classes and factories handed over from Python (a norm
    layer, say) pass through.
    """
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, omegaconf.Container):
        plain = omegaconf.OmegaConf.to_container(value, resolve=True, throw_on_missing=strict)
        return to_plain(plain)  # string keys, as for any mapping
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, strict=strict) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [to_plain(v, strict=strict) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, type):  # numpy arrays and scalars, tensors
        return value.tolist()
    return value


def expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` if it is an instance of ``kind`` (bool never counts as a number), else a clear error."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    numeric = any(k in (int, float) for k in kinds)
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool) and bool not in kinds):
        raise PlainDataError(f"{where}: expected {what}, got {type(value).__name__} {_short(value)}")
    return value


def as_class_name(value: Any) -> Any:
    """A class name Hydra read as a number (a folder named ``0`` or ``0.5``) back as that name; anything
    else as given: the one rule for ``data.source.classes``/``good_class`` and ``threshold.ng_classes``."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def whole_number(
    value: Any, where: str, least: int, allow_none: bool = False, most: int | None = None
) -> int | None:
    """A whole number >= ``least`` (and <= ``most``; None where allowed); a bool or a word is refused, not
    converted."""
    if value is None and allow_none:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < least
        or (most is not None and value > most)
    ):
        also = " or null" if allow_none else ""
        bound = f">= {least}" if most is None else f"in [{least}, {most}]"
        raise PlainDataError(f"{where} must be a whole number {bound}{also}, got {value!r}")
    return value


def number(value: Any, where: str, low: float, high: float) -> float:
    """A finite number in ``[low, high]``."""
    checked = expect(value, (int, float), where, f"a number in [{low:g}, {high:g}]")
    try:
        v = float(checked)
    except OverflowError:  # an integer too large for a float
        raise PlainDataError(
            f"{where}: expected a number in [{low:g}, {high:g}], got {_short(checked)}"
        ) from None
    if not (math.isfinite(v) and low <= v <= high):
        raise PlainDataError(f"{where}: expected a number in [{low:g}, {high:g}], got {v!r}")
    return v


def string_list(value: Any, where: str, max_items: int = MAX_ITEMS, max_len: int = MAX_STRING) -> list[str]:
    """A list of strings with at most ``max_items`` entries of at most ``max_len`` characters."""
    items = expect(value, (list, tuple), where, "a list of strings")
    if len(items) > max_items:
        raise PlainDataError(f"{where}: {len(items)} entries (at most {max_items})")
    for i, item in enumerate(items):
        expect(item, str, f"{where}[{i}]", "a string")
        if len(item) > max_len:
            raise PlainDataError(f"{where}[{i}]: a string of {len(item)} characters (at most {max_len})")
    return [str(i) for i in items]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
