"""The synthetic set on disk: generated once per parameter set, atomically, and shared by processes
that start together (DDP ranks, parallel runs); :func:`~.sources.synthetic_source` reads it as a folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SourceError

SYNTH_MARKER = ".defectscope-synth.json"

log = logging.getLogger(__name__)


def _synth_params(
    n: int, seed: int, channels: int, min_size: int, max_size: int, classes: Sequence[str], region: str
) -> dict[str, Any]:
    from .. import __version__

    params = {
        "n": n,
        "seed": seed,
        "channels": channels,
        "min_size": min_size,
        "max_size": max_size,
        "classes": list(classes),
        "generator_version": __version__,
    }
    if region != "anywhere":  # absent for the default, so sets generated before regions existed stay valid
        params["region"] = region
    return params


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / SYNTH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _looks_generated(root: Path) -> bool:
    """A folder we may delete: has our marker, or holds only a synth manifest and class folders."""
    if (root / SYNTH_MARKER).exists():
        return True
    for entry in root.iterdir():
        if entry.name == "manifest.csv":
            continue
        if not entry.is_dir() or not all(f.is_file() and f.suffix == ".png" for f in entry.iterdir()):
            return False
    return True


def _remove_stale_partials(root: Path) -> None:
    """Delete half-written folders left by killed generations on this host."""
    prefix = f"{root.name}.partial-{socket.gethostname()}-"
    for p in root.parent.glob(f"{root.name}.partial-*"):
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix) :])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


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

    Generation goes to a sibling ``<root>.partial-<host>-<pid>`` folder which gets the completion
    marker and is then renamed, so a killed run never leaves a half dataset at ``root``.  A lock
    file serialises processes that start together (DDP ranks, parallel runs): one generates, the
    others wait and reuse its result.
    """
    from ..synth import REGIONS, generate

    if region not in REGIONS:
        raise SourceError(f"data.source.region must be one of {', '.join(REGIONS)}, got {region!r}")
    numbers = {"n": n, "seed": seed, "channels": channels, "min_size": min_size, "max_size": max_size}
    for key, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool):  # before the cache is looked at or rebuilt
            raise SourceError(f"data.source.{key} must be a whole number, got {value!r}")
    base = Path(root).expanduser()
    params = _synth_params(n, seed, channels, min_size, max_size, classes, region)
    if _read_marker(base) == params:
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(base.with_name(f".{base.name}.lock")):
        if _read_marker(base) == params:  # another process finished while we waited
            return base
        if base.exists():
            if not base.is_dir() or not _looks_generated(base):
                raise SourceError(
                    f"data.source.root: {base} exists but is not a defectscope synthetic dataset; "
                    "choose another root for kind=synthetic"
                )
            log.warning(
                "synthetic dataset %s is incomplete or was made with other settings; regenerating", base
            )
        _remove_stale_partials(base)
        partial = base.with_name(f"{base.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        generate(partial, n, seed, channels, (min_size, max_size), classes, region=region)
        (partial / SYNTH_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
        if base.exists():
            shutil.rmtree(base)
        os.replace(partial, base)
    return base


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock (POSIX ``flock``); released by the OS if the holder dies."""
    try:
        import fcntl
    except ImportError:  # Windows: training is not supported there; no lock
        yield
        return
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
