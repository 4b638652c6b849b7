"""The synthetic generator's output folder: which folder it may replace, stated once for
``defectscope synth``, the demo and training's synthetic cache (:mod:`defectscope.data.synth_cache`).

A folder is replaced only when everything in it is the generator's own: its completion marker, the
``manifest.csv`` whose digest the marker records, the PNGs that manifest lists and the class folders the
marker names. A user's file or folder in it (an image dropped into ``good/``, a row added to the manifest,
notes) stops the replacement with one line naming it; deleting it, or training on it beside generated
images, would both be wrong.

Generation writes into a hidden ``root/.defectscope-partial-<host>-<pid>`` folder that gets the marker last.
Inside ``root``, so the final renames stay on its file system whatever ``root`` is (a link, a mount point,
``.``, under a read-only folder). A run killed while generating leaves ``root`` as it was, and its leftovers
are removed by the next run on this host. The swap itself (the old set's files removed, the new entries
renamed in, the marker last) runs under a lock file in ``root`` and is journalled in the hidden folder
(:data:`CLEARING`, then :data:`MOVING`): a swap that a killed or failed run began is finished by the next run
on this host, and only such a journalled one, so two runs into one folder replace each other's set whole,
one after the other, and a user's files are never moved over or deleted.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .runtime.files import PARTIAL_PREFIX, PROBE_PREFIX, os_error_reason

MANIFEST = "manifest.csv"
#: written last by the generator: a folder with it is complete; holds the generation parameters (JSON)
SYNTH_MARKER = ".defectscope-synth.json"
#: the marker's record of the manifest it completes: a manifest edited since is not the generator's
MANIFEST_DIGEST = "manifest_sha256"
#: the lock file inside a root that serialises swaps (:func:`replace_with`); it stays, hidden and empty
LOCK = ".defectscope-synth.lock"
#: journal, in a generation folder: its run is removing the old set whose manifest has this digest
CLEARING = ".clearing"
#: journal: the old set is gone and this folder's entries are being renamed into the root
MOVING = ".moving"
#: a generation folder's last name part once its run gave it up (:func:`abandon`): the next run finishes it
STOPPED = "stopped"


def _transient(name: str) -> bool:
    """A name in a root that another run of ours is using for a moment: its generation folder, the lock,
    an output check's probe file. Not content, and never the user's."""
    return name.startswith((PARTIAL_PREFIX, PROBE_PREFIX)) or name == LOCK


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return ""


def write_marker(folder: Path, params: dict[str, Any]) -> None:
    """Complete a generated set: its marker, with the digest of the manifest already written beside it."""
    doc = {**params, MANIFEST_DIGEST: _digest(folder / MANIFEST)}
    (folder / SYNTH_MARKER).write_text(json.dumps(doc, sort_keys=True) + "\n", encoding="utf-8")


def read_marker(root: Path) -> dict[str, Any] | None:
    """The parameters of the finished set in ``root``; None when there is none, or when its manifest is not
    the one the marker completed (edited since). Markers of versions before the digest are taken as they are."""
    try:
        doc = json.loads((root / SYNTH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    recorded = doc.pop(MANIFEST_DIGEST, None)
    return doc if recorded is None or recorded == _digest(root / MANIFEST) else None


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
    """The first file or folder under ``root`` the generator did not write: anything but its marker, the
    manifest the marker completed, the PNGs listed there and the marker's class folders (links never)."""
    marker = read_marker(root)
    if marker is None:
        return root / MANIFEST if (root / SYNTH_MARKER).is_file() else root / SYNTH_MARKER
    own = _listed(root) | {(root / MANIFEST).resolve(), (root / SYNTH_MARKER).resolve()}
    classes = {str(c) for c in marker.get("classes") or []}
    for folder, dirs, files in os.walk(root):
        top = folder == str(root)
        dirs[:] = sorted(d for d in dirs if not (top and _transient(d)))
        for name in dirs:
            path = Path(folder, name)
            if not top or name not in classes or path.is_symlink():
                return path
        for name in sorted(f for f in files if not (top and _transient(f))):
            path = Path(folder, name)
            if path.is_symlink() or path.resolve() not in own:
                return path
    return None


def check_replaceable(root: Path) -> bool:
    """Whether ``root`` holds a finished synth output to replace (False: nothing there). Anything else
    that is not empty raises ``ValueError`` (one line, no prefix: the caller names its key or command),
    so a caller can ask before its own long steps. While a swap is journalled in ``root`` this waits for
    the lock: a live run's swap ends first, a dead or stopped run's is finished (:func:`_finish_interrupted`)."""
    if not root.is_dir():
        return False
    if any(_journal(p) for p in root.glob(f"{PARTIAL_PREFIX}*") if p.is_dir()):  # any host's: wait for it
        with exclusive(root / LOCK):
            _finish_interrupted(root)
            return _replaceable(root)
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
            f"{root} holds {stranger}, which the synthetic generator did not write (or not like this); move "
            "it out or choose a new or empty folder"
        )
    return True


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


def _generation_folders(root: Path) -> list[Path]:
    """The generation folders in ``root`` of runs on this host (the host part of the name matched whole)."""
    host = socket.gethostname()
    found = []
    for p in root.glob(f"{PARTIAL_PREFIX}*"):
        owner, _, tag = p.name[len(PARTIAL_PREFIX) :].rpartition("-")
        if owner == host and (tag.isdigit() or tag.startswith(STOPPED)) and p.is_dir():
            found.append(p)
    return sorted(found)


def _is_dead(folder: Path) -> bool:
    """A generation folder whose run is gone: stopped (:func:`abandon`), its pid not running, or the pid
    of this process (a container's earlier run had it; this one's own folder is made new)."""
    tag = folder.name.rpartition("-")[2]
    if tag.startswith(STOPPED):
        return True
    if int(tag) == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: never take another's folder
        return False
    try:
        os.kill(int(tag), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's, running
    return False


def _journal(folder: Path) -> bool:
    return (folder / CLEARING).is_file() or (folder / MOVING).is_file()


def _finish_interrupted(root: Path) -> None:
    """Under ``root``'s lock: finish the swap a dead run journalled (at most one: every holder of the lock
    finishes it before its own), or drop it when ``root`` has a finished set the journal does not name."""
    for folder in (f for f in _generation_folders(root) if _is_dead(f) and _journal(f)):
        _swap(root, folder)


def _clear(root: Path, digest: str) -> int:
    """Remove the old set if its manifest is still the journalled one (marker first: from then on ``root``
    reads as being replaced); how many images went. Empty class folders stay. Safe to repeat."""
    if _digest(root / MANIFEST) != digest:
        return 0  # removed already, or not the manifest the journal names: nothing of it is deleted
    (root / SYNTH_MARKER).unlink(missing_ok=True)
    listed = _listed(root)
    for path in listed:
        path.unlink(missing_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    return len(listed)


def _swap(root: Path, folder: Path) -> int:
    """The journalled swap, from wherever it stands: clear the old set, then rename ``folder``'s entries
    in, the marker last. A journal that a finished set in ``root`` outdates is dropped. Something in the way
    stops it with one line (``ValueError``) that says how to finish it."""
    clearing = (
        (folder / CLEARING).read_text(encoding="ascii").strip() if (folder / CLEARING).is_file() else None
    )
    if (root / SYNTH_MARKER).is_file() and (clearing is None or clearing != _digest(root / MANIFEST)):
        shutil.rmtree(folder, ignore_errors=True)  # another run's set took its place: nothing to finish
        return 0
    replaced = 0
    try:
        if clearing is not None:
            replaced = _clear(root, clearing)
            os.replace(folder / CLEARING, folder / MOVING)
        entries = [e for e in folder.iterdir() if e.name not in (CLEARING, MOVING)]
        for entry in sorted(entries, key=lambda e: (e.name == SYNTH_MARKER, e.name)):
            dest = root / entry.name
            if dest.is_dir() and not dest.is_symlink():
                dest.rmdir()  # an emptied class folder; refuses one a file landed in meanwhile
            elif dest.exists() or dest.is_symlink():
                raise FileExistsError(errno.EEXIST, "in the way", str(dest))
            os.replace(entry, dest)
        (folder / MOVING).unlink(missing_ok=True)
        folder.rmdir()
    except OSError as exc:
        where = exc.filename or root
        raise ValueError(
            f"{root}: the swap to the new synthetic set stopped at {where} ({os_error_reason(exc)}); the old set "
            f"is gone: move {where} out and run again to finish it"
        ) from None
    return replaced


def partial_folder(root: Path) -> Path:
    """This process's folder to generate into, inside ``root`` (made if missing); folders of dead runs on
    this host are removed, except a journalled one, which :func:`check_replaceable` finishes."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in _generation_folders(root):
        if _is_dead(folder) and not _journal(folder):
            shutil.rmtree(folder, ignore_errors=True)
    own = root / f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}"
    if own.exists():  # an earlier run's with this pid (a container's), its swap begun: left to be finished
        abandon(own)
    return own


def abandon(folder: Path) -> None:
    """Give up a generation folder after a failed swap: removed when the swap had not begun; renamed as
    stopped when it had, so that the next run, in this process or another, finishes it."""
    if not _journal(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    stopped = folder.with_name(f"{folder.name.rpartition('-')[0]}-{STOPPED}{os.getpid()}")
    shutil.rmtree(stopped, ignore_errors=True)
    os.replace(folder, stopped)


def replace_with(root: Path, folder: Path) -> int:
    """Replace ``root``'s set with the finished one in ``folder``; returns how many images the earlier
    set had. Under ``root``'s lock and journalled (:data:`CLEARING`, :data:`MOVING`). ``root`` is checked
    again first: only the generator's own files go (``ValueError``, nothing changed); something that lands in
    the way during the swap stops it (``ValueError``), and the next run finishes it once that is moved out."""
    with exclusive(root / LOCK):
        _finish_interrupted(root)
        digest = _digest(root / MANIFEST) if _replaceable(root) else ""
        (folder / CLEARING).write_text(digest + "\n", encoding="ascii")
        return _swap(root, folder)
