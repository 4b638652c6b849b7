"""The synthetic generator's output folder: which folder it may replace, stated once for
``defectscope synth``, the demo and training's synthetic cache (:mod:`defectscope.data.synth_cache`).

A folder is replaced only when everything in it is the generator's own: its completion marker, its
``manifest.csv`` and the PNGs that manifest lists. A user's file in it (an image dropped into
``good/``, notes) stops the replacement with one line naming the file; deleting it, or training on it
beside generated images, would both be wrong.

Generation writes into a hidden ``root/.defectscope-partial-<host>-<pid>`` folder that gets the marker last;
its entries are then renamed into ``root``, the marker last (:func:`replace_with`). Inside ``root``, so the
renames stay on its file system whatever ``root`` is (a link, a mount point, ``.``, under a read-only folder).
A run killed while generating leaves ``root`` as it was, and its leftovers are removed by the next run on
this host; one killed in the few renames at the end leaves a set without its marker, which is refused.
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
#: a generation's own folder inside its root (:func:`partial_folder`)
PARTIAL_PREFIX = ".defectscope-partial-"


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
        dirs[:] = sorted(d for d in dirs if not (folder == str(root) and d.startswith(PARTIAL_PREFIX)))
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_symlink() or path.resolve() not in own:
                return path
    return None


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds a finished synth output to replace (False: nothing there). Anything else
    that is not empty raises ``ValueError`` (one line, no prefix: the caller names its key or command),
    so a caller can ask before its own long steps."""
    if not root.is_dir() or not any(not e.name.startswith(PARTIAL_PREFIX) for e in root.iterdir()):
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
    """This process's folder to generate into, inside ``root`` (made if missing); stale ones of dead
    processes on this host are removed."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"{PARTIAL_PREFIX}{socket.gethostname()}-"
    for p in root.glob(f"{PARTIAL_PREFIX}*"):
        if not p.name.startswith(prefix):
            continue
        try:
            os.kill(int(p.name[len(prefix) :]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
    partial = root / f"{prefix}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def replace_with(root: Path, partial: Path) -> int:
    """Move the finished set in ``partial`` into ``root``, its marker last; returns how many images an
    earlier output there had. ``root`` is checked again first (:func:`check_replaceable`): only the
    generator's own files go, and a class folder that is not empty by then stops the move (``OSError``)."""
    replaced = clear_previous(root)
    for entry in sorted(partial.iterdir(), key=lambda e: (e.name == SYNTH_MARKER, e.name)):
        dest = root / entry.name
        if dest.is_dir() and not dest.is_symlink():
            dest.rmdir()  # an emptied class folder; refuses one a file landed in meanwhile
        os.replace(entry, dest)
    partial.rmdir()
    return replaced
