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
this host. The replacement itself (the old set's files removed, the new entries renamed in) runs under a
lock file in ``root`` and is journalled in the hidden folder (:data:`CLEARING`, then :data:`MOVING`): a run
killed in it is finished by the next run on this host, and only such a journalled one, so two runs into one
folder replace each other's set whole, one after the other, and a user's files are never moved over.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .runtime.files import PARTIAL_PREFIX, PROBE_PREFIX, os_error_reason

MANIFEST = "manifest.csv"
#: written last by the generator: a folder with it is complete; holds the generation parameters (JSON)
SYNTH_MARKER = ".defectscope-synth.json"
#: the lock file inside a root that serialises replacements (:func:`replace_with`); it stays, hidden and empty
LOCK = ".defectscope-synth.lock"
#: journal, in a generation folder: its run is removing the old set whose manifest has this digest
CLEARING = ".clearing"
#: journal: the old set is gone and this folder's entries are being renamed into the root
MOVING = ".moving"


def _transient(name: str) -> bool:
    """A name in a root that another run of ours is using for a moment: its generation folder, the lock,
    an output check's probe file. Not content, and never the user's."""
    return name.startswith((PARTIAL_PREFIX, PROBE_PREFIX)) or name == LOCK


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
    so a caller can ask before its own long steps. A replacement a killed run left half done is finished
    first (:func:`_finish_interrupted`)."""
    if not root.is_dir():
        return False
    if any(_journal(p) for p in _dead_partials(root)):
        with exclusive(root / LOCK):
            _finish_interrupted(root)
    return _replaceable(root)


def _replaceable(root: Path) -> bool:
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


def _manifest_digest(root: Path) -> str:
    try:
        return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    except FileNotFoundError:
        return ""


def _clear(root: Path, digest: str) -> int:
    """Remove the old set (marker first: from then on ``root`` reads as being replaced) if its manifest
    is still the one of ``digest``; how many images went. Empty class folders stay. Safe to repeat."""
    if _manifest_digest(root) != digest:
        return 0  # removed already, or not the manifest the journal names: nothing of it is deleted
    (root / SYNTH_MARKER).unlink(missing_ok=True)
    listed = _listed(root)
    for path in listed:
        path.unlink(missing_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    return len(listed)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock (POSIX ``flock``), released by the OS if the holder dies."""
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


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: never take another's folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


def _dead_partials(root: Path) -> list[Path]:
    """The generation folders in ``root`` of processes on this host that are gone."""
    prefix = f"{PARTIAL_PREFIX}{socket.gethostname()}-"
    found = [p for p in root.glob(f"{PARTIAL_PREFIX}*") if p.name.startswith(prefix) and p.is_dir()]
    return [p for p in found if not p.name[len(prefix) :].isdigit() or not _alive(int(p.name[len(prefix) :]))]


def _journal(partial: Path) -> bool:
    return (partial / CLEARING).is_file() or (partial / MOVING).is_file()


def _finish_interrupted(root: Path) -> None:
    """Under ``root``'s lock: finish the replacement a dead run journalled (at most one: each holder of
    the lock finishes it before its own). Folders of runs that died before replacing are not touched."""
    for partial in (p for p in _dead_partials(root) if _journal(p)):
        try:
            _replace(root, partial)
        except OSError as exc:
            where = f"{exc.filename}: {os_error_reason(exc)}" if exc.filename else str(exc)
            raise ValueError(
                f"{root}: a killed synth run's replacement could not be finished ({where}); move that out, "
                "or choose a new or empty folder"
            ) from None


def _replace(root: Path, partial: Path) -> int:
    """The journalled replacement, from wherever it stands: clear the old set, then rename ``partial``'s
    entries in, the marker last; a file or a non-empty folder in the way stops it (``OSError``)."""
    replaced = 0
    if (partial / CLEARING).is_file():
        replaced = _clear(root, (partial / CLEARING).read_text(encoding="ascii").strip())
        os.replace(partial / CLEARING, partial / MOVING)
    entries = [e for e in partial.iterdir() if e.name not in (CLEARING, MOVING)]
    for entry in sorted(entries, key=lambda e: (e.name == SYNTH_MARKER, e.name)):
        dest = root / entry.name
        if dest.is_dir() and not dest.is_symlink():
            dest.rmdir()  # an emptied class folder; refuses one a file landed in meanwhile
        elif dest.exists() or dest.is_symlink():
            raise FileExistsError(errno.EEXIST, "a file is in the way", str(dest))
        os.replace(entry, dest)
    (partial / MOVING).unlink(missing_ok=True)
    partial.rmdir()
    return replaced


def partial_folder(root: Path) -> Path:
    """This process's folder to generate into, inside ``root`` (made if missing); stale ones of dead
    processes on this host are removed, except one whose replacement :func:`check_replaceable` finishes."""
    root.mkdir(parents=True, exist_ok=True)
    for p in _dead_partials(root):
        if not _journal(p):
            shutil.rmtree(p, ignore_errors=True)
    partial = root / f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def abandon(partial: Path) -> None:
    """Remove a generation folder after a failed replacement, unless its journal says the replacement
    began: then the next run finishes it (a half-replaced ``root`` is never left without the rest)."""
    if not _journal(partial):
        shutil.rmtree(partial, ignore_errors=True)


def replace_with(root: Path, partial: Path) -> int:
    """Replace ``root``'s set with the finished one in ``partial``; returns how many images the earlier
    set had. Under ``root``'s lock, journalled (:data:`CLEARING`, :data:`MOVING`). ``root`` is checked
    again first: only the generator's own files go (``ValueError``); a file that lands in the way stops
    the renames (``OSError``), and the next run finishes them once it is moved out."""
    with exclusive(root / LOCK):
        _finish_interrupted(root)
        digest = _manifest_digest(root) if _replaceable(root) else ""
        (partial / CLEARING).write_text(digest + "\n", encoding="ascii")
        return _replace(root, partial)
