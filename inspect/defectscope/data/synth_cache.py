"""The synthetic set on disk: generated once per parameter set, atomically, and shared by processes
that start together (DDP ranks, parallel runs); :func:`~.sources.synthetic_source` reads it as a folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..synth import synth_params
from ..synth_output import check_replaceable, exclusive, read_marker
from .errors import SourceError

log = logging.getLogger(__name__)


def _refuse_foreign(root: Path) -> None:
    """One line for a ``root`` the generator may not replace: a folder only its own files are in
    (:func:`~defectscope.synth_output.check_replaceable`), or an empty one."""
    if not root.is_dir():
        raise SourceError(f"data.source.root: {root} exists but is not a folder")
    try:
        check_replaceable(root)
    except ValueError as exc:
        raise SourceError(f"data.source.root: {exc}; for your own images use data=folder") from None


def check_synthetic_request(
    n: Any, seed: Any, channels: Any, min_size: Any, max_size: Any, classes: Sequence[str], region: str
) -> None:
    """The generator's numbers and names as ``data.source.*``, by the generator's own rule; one line each."""
    from ..synth import check_request

    numbers = {"n": n, "seed": seed, "channels": channels, "min_size": min_size, "max_size": max_size}
    for key, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SourceError(f"data.source.{key} must be a whole number, got {value!r}")
    try:
        check_request(n, channels, (min_size, max_size), classes, region, seed, prefix="data.source.")
    except ValueError as exc:
        raise SourceError(str(exc)) from None


def ensure_synthetic(
    root: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    channels: int = 1,
    min_size: int = 96,
    max_size: int = 512,
    classes: Sequence[str] = ("good", "scratch", "spot", "crack"),
    region: str = "anywhere",
) -> Path:
    """Generate the synthetic set into ``root`` unless a complete one with these parameters is there.

    Generation goes to a hidden folder inside ``root`` whose entries move in at the end, the completion
    marker last (:mod:`defectscope.synth_output`), so a killed run never leaves a half dataset at ``root``;
    a ``root`` is replaced only when empty or holding nothing but a generated set.  A lock
    file serialises processes that start together (DDP ranks, parallel runs): one generates, the
    others wait and reuse its result.
    """
    from ..synth import generate

    check_synthetic_request(
        n, seed, channels, min_size, max_size, classes, region
    )  # before the cache is touched
    base = Path(root).expanduser()
    params = synth_params(n, seed, channels, min_size, max_size, classes, region)
    if read_marker(base) == params:
        return base
    if base.exists():
        _refuse_foreign(base)  # before the lock file: a refused folder's parent is left as it was
    base.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(base.resolve().with_name(f".{base.resolve().name}.lock")):
        if read_marker(base) == params:  # another process finished while we waited
            return base
        if base.exists():
            _refuse_foreign(base)
            log.warning(
                "synthetic dataset %s is incomplete or was made with other settings; regenerating", base
            )
        try:  # into a hidden folder moved in at the end: a killed run leaves no half set at base
            generate(base, n, seed, channels, (min_size, max_size), classes, region=region, log=log.info)
        except ValueError as exc:  # a file put into the old set meanwhile
            raise SourceError(f"data.source.root: {str(exc).removeprefix('synth: ')}") from None
    return base
