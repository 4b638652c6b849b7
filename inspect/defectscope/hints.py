"""Close-match hints for a misspelt name (a config key, a class label, an augmentation argument): one rule,
used wherever a name typed by a person is refused. Torch-free."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_names(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The names of ``known`` closest to ``name``, best first; case is ignored (``LR`` finds ``lr``)."""
    by_folded = {str(k).lower(): str(k) for k in sorted(str(k) for k in known)}
    return [by_folded[k] for k in difflib.get_close_matches(name.lower(), list(by_folded), n=n)]


def did_you_mean(key: str, known: Iterable[str], prefix: str = "") -> str:
    """``; did you mean PREFIX.A, PREFIX.B?`` for the names of ``known`` close to ``key`` ("" if none is)."""
    near = close_names(key, known)
    return f"; did you mean {', '.join(f'{prefix}{k}' for k in near)}?" if near else ""
