"""Turn `defectscope inspect` INPUT arguments into a stream of image paths.

Everything is a generator so a run over millions of files never holds the whole list: folders
are listed one directory at a time, globs with :func:`glob.iglob`, list files line by line.

Rules: a folder yields its image files (by extension; sub-folders with ``--recursive``); a glob
yields its matches (matched folders are expanded like folder arguments); ``@list.txt`` yields
each line that is not blank or a comment (relative lines joined to the list's folder, see
:func:`~defectscope.runtime.files.read_path_list`), so every listed path gets exactly one result
row, even a missing file or a folder (they become error rows); an argument that names an existing
file as written is that file, even one starting with ``@``.  Arguments are checked before any
work (:func:`check_specs`): a plain path that does not exist is a misspelt argument, and a
folder whose images all sit in sub-folders needs ``--recursive``.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from .files import (
    is_image_name,
    list_file_problem,
    os_error_reason,
    read_path_list,
    unusable_name,
    walk_files,
)

_GLOB_CHARS = frozenset("*?[")


class InputSpecError(ValueError):
    """An INPUT argument is unusable as a whole (missing, an unreadable @list file, ...)."""


def _is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec) and not os.path.lexists(spec)


def _has_image(folder: str) -> bool:
    """Whether ``folder`` holds an image file directly (stops at the first one)."""
    try:
        with os.scandir(folder) as it:
            return any(is_image_name(e.name) and not e.is_dir() for e in it)
    except OSError:
        return False


def _image_subfolders(folder: str, limit: int = 4) -> list[str]:
    """Up to ``limit`` sub-folders of ``folder`` that hold images directly."""
    try:
        with os.scandir(folder) as it:
            subs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []
    return [s for s in subs if _has_image(os.path.join(folder, s))][:limit]


def is_list_spec(spec: str) -> bool:
    """``@list.txt`` names a list file, unless a file is called exactly that (a shell glob such as
    ``*.png`` may hand over an image named ``@a.png``: it is an image, not a list)."""
    return spec.startswith("@") and not os.path.lexists(spec)


def check_specs(specs: Iterable[str], *, recursive: bool = False) -> None:
    """Fail fast, before any work, on arguments that can never produce the rows meant."""
    for spec in specs:
        if is_list_spec(spec):
            name = spec[1:]
            if not os.path.isfile(name):
                raise InputSpecError(f"list file {name!r} (from {spec!r}) does not exist or is not a file")
            problem = list_file_problem(name)
            if problem:
                raise InputSpecError(f"list file {name!r} {problem} (one image path per line)")
        elif os.path.isdir(spec):
            if not recursive and not _has_image(spec):
                subs = _image_subfolders(spec)
                if subs:
                    shown = ", ".join(f"{s}/" for s in subs)
                    raise InputSpecError(
                        f"folder {spec!r} has no images directly inside, but its sub-folders ({shown}) "
                        "do: add --recursive"
                    )
        elif not _is_glob(spec) and not os.path.lexists(spec):
            why = unusable_name(spec) or "no such file or folder"  # a name too long cannot exist either
            raise InputSpecError(f"input not found: {spec!r} ({why})")


def overlapping_inputs(specs: Sequence[str], *, recursive: bool = False) -> str | None:
    """Two folder or file arguments that name the same images (``lot lot/good --recursive``, a folder given
    twice): each mention gets its rows, so those images would have two.  Said before the work; globs and list
    files are left alone (a path listed k times gets k rows on purpose)."""
    plain = [
        (s, os.path.realpath(s))
        for s in specs
        if not is_list_spec(s) and not _is_glob(s) and os.path.exists(s)
    ]

    def covers(folder: str, other: str) -> bool:
        inside = other.startswith(folder + os.sep) and (recursive or os.path.dirname(other) == folder)
        return os.path.isdir(folder) and (other == folder or inside)

    for (a, ra), (b, rb) in itertools.combinations(plain, 2):
        if covers(ra, rb) or covers(rb, ra):
            outer, inner = (a, b) if covers(ra, rb) else (b, a)
            where = "the same folder as" if ra == rb else "inside"
            return f"{inner} is {where} {outer}: an image named by both gets a row from each"
    return None


def walk_folder(folder: str, recursive: bool, warn: Callable[[str], None] | None = None) -> Iterator[str]:
    """Image files under ``folder``, in :func:`walk_files`' order and by its rule; a folder that cannot be
    read is told through ``warn`` (its images cannot get rows: nobody can name them)."""

    def unreadable(path: str, exc: OSError) -> None:
        if warn is not None:
            warn(f"folder {path!r} cannot be read ({os_error_reason(exc)}); its images are not inspected")

    return (path for path in walk_files(folder, recursive, unreadable) if is_image_name(path))


def expand_inputs(
    specs: Iterable[str], *, recursive: bool = False, warn: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Yield one path per input image, lazily, in argument order."""
    for spec in specs:
        count = 0
        if is_list_spec(spec):
            source: Iterator[str] = read_path_list(spec[1:])
            what = f"list file {spec[1:]!r}"
        elif os.path.isdir(spec):
            source = walk_folder(spec, recursive, warn)
            what = f"folder {spec!r}"
        elif _is_glob(spec):
            source = _glob(spec, recursive, warn)
            what = f"pattern {spec!r}"
        else:
            source = iter([spec])
            what = spec
        for path in source:
            count += 1
            yield path
        if count == 0 and warn is not None:
            warn(f"{what} yielded no images")


def _through_linked_folder(match: str, root: str) -> bool:
    """Whether ``match`` lies below a symlinked folder under the pattern's fixed ``root`` (``**``
    follows such links, and one that points up the tree repeats every image below it)."""
    parent = os.path.dirname(match)
    while parent and len(parent) > len(root):
        if os.path.islink(parent):
            return True
        parent = os.path.dirname(parent)
    return False


def _glob(pattern: str, recursive: bool, warn: Callable[[str], None] | None = None) -> Iterator[str]:
    """A pattern's matches (folders walked as folders); symlinked folders are not followed, as in
    :func:`walk_folder`, below the part of the pattern that has no wildcard."""
    parts = pattern.split(os.sep)
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = os.sep.join(parts[:fixed])
    for match in glob.iglob(pattern, recursive=recursive):
        if _through_linked_folder(match, root):
            continue
        if os.path.isdir(match):
            yield from walk_folder(match, recursive, warn)
        else:
            yield match
