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
this host. One killed in the few renames at the end left a set without its marker: the next run on this host
finishes those renames (its hidden folder holds the marker, so the set in it is complete). The renames
hold a lock file in ``root``, so two runs into one folder replace each other's set whole, one after the other.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .runtime.files import PARTIAL_PREFIX, PROBE_PREFIX

MANIFEST = "manifest.csv"
#: written last by the generator: a folder with it is complete; holds the generation parameters (JSON)
SYNTH_MARKER = ".defectscope-synth.json"
#: the lock file inside a root that serialises the renames of :func:`replace_with`
LOCK = f"{PARTIAL_PREFIX}lock"


def _transient(name: str) -> bool:
    """A name in a root that another run of ours is using for a moment: its generation folder, the lock,
    an output check's probe file. Not content, and never the user's."""
    return name.startswith((PARTIAL_PREFIX, PROBE_PREFIX))


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
        top = folder == str(root)
        dirs[:] = sorted(d for d in dirs if not (top and _transient(d)))
        for name in sorted(f for f in files if not (top and _transient(f))):
            path = Path(folder, name)
            if path.is_symlink() or path.resolve() not in own:
                return path
    return None


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds a finished synth output to replace (False: nothing there). Anything else
    that is not empty raises ``ValueError`` (one line, no prefix: the caller names its key or command),
    so a caller can ask before its own long steps."""
    if not root.is_dir():
        return False
    _finish_interrupted(root)
    if not any(not _transient(e.name) for e in root.iterdir()):
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


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock (POSIX ``flock``), released by the OS if the holder dies. The lock
    file is removed on release, so none is left in a user's folder: a waiter that then holds a removed
    file's lock opens the path again."""
    try:
        import fcntl
    except ImportError:  # Windows: training is not supported there; no lock
        yield
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            held, now = os.fstat(fd), os.stat(lock_path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        Path(lock_path).unlink(missing_ok=True)  # while still held: a waiter sees it gone and tries again
        os.close(fd)


def _dead_partials(root: Path) -> list[Path]:
    """The generation folders in ``root`` of processes on this host that are gone."""
    prefix = f"{PARTIAL_PREFIX}{socket.gethostname()}-"
    dead = []
    for p in sorted(root.glob(f"{PARTIAL_PREFIX}*")):
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        try:
            os.kill(int(p.name[len(prefix) :]), 0)
        except (ValueError, ProcessLookupError):
            dead.append(p)
        except PermissionError:
            pass  # alive, another user's
    return dead


def _finish_interrupted(root: Path) -> None:
    """Finish the renames of a run that died in :func:`replace_with`: a dead process's folder that holds
    the marker is a complete set, and ``root`` without a marker is one half moved in. A run that died
    before the renames leaves the earlier set whole; its folder is removed by :func:`partial_folder`."""
    if (root / SYNTH_MARKER).is_file():
        return
    for partial in _dead_partials(root):
        if (partial / SYNTH_MARKER).is_file():
            with exclusive(root / LOCK):
                if partial.is_dir() and not (root / SYNTH_MARKER).is_file():
                    _move_in(root, partial)
            return


def partial_folder(root: Path) -> Path:
    """This process's folder to generate into, inside ``root`` (made if missing); stale ones of dead
    processes on this host are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for p in _dead_partials(root):
        shutil.rmtree(p, ignore_errors=True)
    partial = root / f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def _move_in(root: Path, partial: Path) -> None:
    """Rename the entries of ``partial`` into ``root``, the marker last, then remove ``partial``."""
    for entry in sorted(partial.iterdir(), key=lambda e: (e.name == SYNTH_MARKER, e.name)):
        dest = root / entry.name
        if dest.is_dir() and not dest.is_symlink():
            dest.rmdir()  # an emptied class folder; refuses one a file landed in meanwhile
        os.replace(entry, dest)
    partial.rmdir()


def replace_with(root: Path, partial: Path) -> int:
    """Move the finished set in ``partial`` into ``root``, its marker last; returns how many images an
    earlier output there had. ``root`` is checked again first (:func:`check_replaceable`): only the
    generator's own files go, and a class folder that is not empty by then stops the move (``OSError``).
    Under ``root``'s lock: another run's renames into the same folder are never interleaved with these."""
    with exclusive(root / LOCK):
        replaced = clear_previous(root)
        _move_in(root, partial)
    return replaced
