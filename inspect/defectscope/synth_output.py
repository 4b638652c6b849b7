"""The synthetic generator's output folder: which folder it may replace, stated once for
``defectscope synth``, the demo and training's synthetic cache (:mod:`defectscope.data.synth_cache`).

A folder is replaced only when everything in it is the generator's own: its completion marker, its
``manifest.csv`` and the PNGs that manifest lists. A user's file in it (an image dropped into
``good/``, notes) stops the replacement with one line naming the file; deleting it, or training on it
beside generated images, would both be wrong.

Generation writes into a sibling ``<root>.partial-<host>-<pid>`` folder that gets the marker last and is then
renamed to ``root`` (:func:`replace_with`), so a killed run leaves no half set at ``root`` (the next run
would have refused it as not finished) and its leftovers are removed by the next run on this host.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
from pathlib import Path

MANIFEST = "manifest.csv"
#: written last by the generator: a folder with it is complete; holds the generation parameters (JSON)
SYNTH_MARKER = ".defectscope-synth.json"


def _listed(root: Path) -> set[Path]:
    """The PNGs inside ``root`` that its manifest lists (resolved); anything else named there is ignored."""
    base = root.resolve()
    listed: set[Path] = set()
    try:
        with open(root / MANIFEST, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                p = (root / (row.get("path") or "")).resolve()
                if p.suffix == ".png" and p.is_relative_to(base):
                    listed.add(p)
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    return listed


def foreign_file(root: Path) -> Path | None:
    """The first file under ``root`` the generator did not write (its marker, manifest or a listed PNG)."""
    own = _listed(root) | {(root / MANIFEST).resolve(), (root / SYNTH_MARKER).resolve()}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_symlink() or path.resolve() not in own:
                return path
    return None


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds a finished synth output to replace (False: nothing there). Anything else
    that is not empty raises ``ValueError`` (one line, no prefix: the caller names its key or command),
    so a caller can ask before its own long steps."""
    if not root.is_dir() or not any(root.iterdir()):
        return False
    if not (root / SYNTH_MARKER).is_file() or not (root / MANIFEST).is_file():
        raise ValueError(
            f"{root} is not empty and is not a finished synth output (no {SYNTH_MARKER} or {MANIFEST}); "
            "choose a new or empty folder"
        )
    stranger = foreign_file(root)
    if stranger is not None:
        raise ValueError(
            f"{root} holds {stranger}, which the synthetic generator did not write; move it out or choose "
            "a new or empty folder"
        )
    return True


def clear_previous(root: Path) -> int:
    """Remove an earlier synth output in ``root`` (:func:`check_replaceable` first) so no stale images
    outlive a smaller rerun; return how many images went. Empty class folders stay."""
    if not check_replaceable(root):
        return 0
    listed = _listed(root)
    for path in listed:
        path.unlink(missing_ok=True)
    (root / MANIFEST).unlink()
    (root / SYNTH_MARKER).unlink()
    return len(listed)


def partial_folder(root: Path) -> Path:
    """This process's folder to generate into; stale ones of dead processes on this host are removed."""
    prefix = f"{root.name}.partial-{socket.gethostname()}-"
    for p in root.parent.glob(f"{root.name}.partial-*"):
        if not p.name.startswith(prefix):
            continue
        try:
            os.kill(int(p.name[len(prefix) :]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
    partial = root.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def replace_with(root: Path, partial: Path) -> int:
    """Put the finished ``partial`` in ``root``'s place; returns how many images an earlier output there
    had. ``root`` is checked again first (:func:`check_replaceable`): only the generator's own files go."""
    replaced = clear_previous(root)
    if root.is_dir():
        shutil.rmtree(root)  # nothing but empty class folders is left
    os.replace(partial, root)
    return replaced
