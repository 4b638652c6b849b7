"""Turn `defectscope inspect` INPUT arguments into a stream of image paths.

Everything is a generator so a run over millions of files never holds the whole list: folders
are listed one directory at a time, globs with :func:`glob.iglob`, list files line by line.

Rules: a folder yields its image files (by extension; sub-folders with ``--recursive``); a glob
yields its matches (matched folders are expanded like folder arguments); ``@list.txt`` yields
each non-empty, non-``#`` line verbatim, so every listed line gets exactly one result row, even a
missing file or a folder (they become error rows).  A plain path that does not exist is yielded
too: it gets a ``vanished`` error row instead of stopping the run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
_GLOB_CHARS = frozenset("*?[")


class InputSpecError(ValueError):
    """An INPUT argument is unusable as a whole (e.g. an unreadable @list file)."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec) and not os.path.lexists(spec)


def check_specs(specs: Iterable[str]) -> None:
    """Fail fast, before any work, on arguments that can never produce rows."""
    for spec in specs:
        if spec.startswith("@"):
            name = spec[1:]
            if not os.path.isfile(name):
                raise InputSpecError(f"list file {name!r} (from {spec!r}) does not exist or is not a file")
            if not os.access(name, os.R_OK):
                raise InputSpecError(f"list file {name!r} is not readable")


def walk_folder(folder: str, recursive: bool) -> Iterator[str]:
    """Image files under ``folder``, sorted per directory; symlinked folders are not followed."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    except OSError:
        return
    subdirs = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
        elif is_image_name(name) and not name.startswith("."):
            yield os.path.join(folder, name)
    if recursive:
        for name in subdirs:
            if not name.startswith("."):
                yield from walk_folder(os.path.join(folder, name), recursive)


def read_list(list_path: str) -> Iterator[str]:
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            entry = line.rstrip("\r\n")
            if entry.strip() and not entry.lstrip().startswith("#"):
                yield entry


def expand_inputs(
    specs: Iterable[str], *, recursive: bool = False, warn: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Yield one path per input image, lazily, in argument order."""
    for spec in specs:
        count = 0
        if spec.startswith("@"):
            source: Iterator[str] = read_list(spec[1:])
            what = f"list file {spec[1:]!r}"
        elif os.path.isdir(spec):
            source = walk_folder(spec, recursive)
            what = f"folder {spec!r}"
        elif _is_glob(spec):
            source = _glob(spec, recursive)
            what = f"pattern {spec!r}"
        else:
            source = iter([spec])
            what = spec
        for path in source:
            count += 1
            yield path
        if count == 0 and warn is not None:
            warn(f"{what} yielded no images")


def _glob(pattern: str, recursive: bool) -> Iterator[str]:
    for match in glob.iglob(pattern, recursive=recursive):
        if os.path.isdir(match):
            yield from walk_folder(match, recursive)
        else:
            yield match
