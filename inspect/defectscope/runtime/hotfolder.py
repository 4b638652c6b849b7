"""Hot-folder rules for `defectscope watch`: when a file is complete, and how it leaves the folder.

A file is *ready* once its (size, mtime) held still over ``stable_polls`` polls.  A slow writer
(network share, camera pausing mid-file) can hold still longer than that and resume; so a ready
file that reads as incomplete (:data:`INCOMPLETE_KINDS`) is not called bad at once: it is watched
for ``grace_s`` seconds after its last change and decoded again whenever it stopped changing, and
only a file that stayed the same for the whole grace period gets its error row.
"""

from __future__ import annotations

import datetime as _dt
import errno
import filecmp
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import PARTIAL_PREFIX, temp_name
from .image_file import ImageLoadError, read_image_bytes
from .results import fsync_dir

#: every write (and chmod) changes a file's ctime; on Windows ``st_ctime`` is the creation time instead
CTIME_TRACKS_WRITES = os.name != "nt"
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
#: loader error kinds a file still being written can show (cut short, empty, header missing, locked)
INCOMPLETE_KINDS = ("zero_bytes", "truncated", "not_an_image", "unreadable")


def is_ignored(name: str) -> bool:
    """Names a writer uses while a file is incomplete, plus hidden files."""
    low = name.lower()
    return name.startswith(".") or low.endswith(TEMP_SUFFIXES)


@dataclass
class Observation:
    """What the watcher last saw of one file."""

    size: int
    mtime_ns: int
    changed_at: float  # time.monotonic() when (size, mtime) last changed or the file appeared
    stable: int = 0  # polls since then without a change
    hold_until: float = 0.0  # read as incomplete: not ready again before this (unless it changes)
    #: the file as it was read (its open file's status and the digest of the bytes): what its row records
    record: Recorded | None = None

    def same(self, st: os.stat_result) -> bool:
        return (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)

    @classmethod
    def of(cls, st: os.stat_result) -> Observation:
        return cls(st.st_size, st.st_mtime_ns, time.monotonic())

    def ready(self, stable_polls: int) -> bool:
        return self.stable >= stable_polls and time.monotonic() >= self.hold_until

    def wait_for_writer(self, grace_s: float) -> bool:
        """After an incomplete-looking read: hold the file until ``grace_s`` after its last change;
        ``False`` when that time is already over (the error is final)."""
        until = self.changed_at + grace_s
        if time.monotonic() >= until:
            return False
        self.stable, self.hold_until = 0, until
        return True


@dataclass(frozen=True)
class Recorded:
    """A file as its row recorded it: what tells it apart from a new delivery under the same name."""

    size: int
    mtime_ns: int
    ctime_ns: int | None = None  # rows of earlier versions lack it
    sha256: str | None = None  # of the bytes judged; None for older rows and for files never read
    inode: tuple[int, int] | None = None  # (st_dev, st_ino); None for older rows and where the OS gives none

    @classmethod
    def of_stat(cls, st: os.stat_result, sha256: str | None) -> Recorded:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256, inode_of(st))

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> Recorded | None:
        """The row's record of its file; None for a row that names no file state (it matches no file)."""
        size, mtime, ctime = (row.get(f"source_{k}") for k in ("size", "mtime_ns", "ctime_ns"))
        if not (
            isinstance(size, int) and isinstance(mtime, int) and (ctime is None or isinstance(ctime, int))
        ):
            return None  # (JSON has no other integers: a bool here came from a hand-edited row)
        digest, inode = row.get("source_sha256"), row.get("source_inode")
        pair = None
        if isinstance(inode, list) and len(inode) == 2 and all(isinstance(v, int) for v in inode):
            pair = (inode[0], inode[1])
        return cls(size, mtime, ctime, digest if isinstance(digest, str) else None, pair)

    def to_row(self) -> dict[str, Any]:
        return {
            "source_size": self.size,
            "source_mtime_ns": self.mtime_ns,
            "source_ctime_ns": self.ctime_ns,
            "source_inode": list(self.inode) if self.inode else None,
            "source_sha256": self.sha256,
        }


def inode_of(st: os.stat_result) -> tuple[int, int] | None:
    """(device, inode); None where the file system reports no inode number (0, some network shares)."""
    return (st.st_dev, st.st_ino) if st.st_ino else None


def is_recorded_file(rec: Recorded, path: Path, st: os.stat_result, *, trust_stat: bool) -> bool | None:
    """Whether the file at ``path`` (status ``st``) is the one ``rec`` recorded, not a new delivery;
    None when that cannot be told now (its bytes are needed and cannot be read: try again later).

    A new delivery is a new file (another inode) or a new write (another size or mtime). What the digest
    of the bytes judged decides is the rest: the same file with a new ctime (a chmod or attribute change:
    still the file judged) or rewritten in place with its size and mtime put back (on Windows, where
    ``st_ctime`` is the creation time, only the bytes tell). ``trust_stat``: an unchanged ctime as well
    is taken as the same file without reading it (on POSIX every write changes the ctime).
    """
    if (rec.size, rec.mtime_ns) != (st.st_size, st.st_mtime_ns):
        return False
    now = inode_of(st)
    if rec.inode is not None and now is not None and rec.inode[0] == now[0] and rec.inode[1] != now[1]:
        return False  # (another device number: remounted after a reboot, where NFS or btrfs renumber it)
    ctime_same = rec.ctime_ns in (None, st.st_ctime_ns)
    if rec.sha256 is None:  # a row of an earlier version, or a file that was never read
        return ctime_same
    if ctime_same and trust_stat:
        return True
    digest = image_bytes_sha256(path, st.st_size)
    return None if digest is None else digest == rec.sha256


def image_bytes_sha256(path: Path, size: int) -> str | None:
    """The sha256 of a regular file of at most ``size`` bytes, read as the loader reads images (never
    blocking on a pipe, unlike :func:`.files.file_sha256`, which hashes model files); None when it cannot
    be read (locked, gone, replaced by a pipe)."""
    try:
        return hashlib.sha256(read_image_bytes(path, size)).hexdigest()
    except ImageLoadError:
        return None


def same_content(a: Path, b: Path) -> bool:
    """Byte-for-byte equal files (a crashed cross-device move that had already placed its copy; its mtime
    may be rounded by the destination's file system, so only the bytes count)."""
    try:
        filecmp.clear_cache()  # its cache keys on size and mtime, which a `cp -p` replacement keeps
        return filecmp.cmp(a, b, shallow=False)  # different sizes are unequal without a read
    except OSError:  # a link that cannot be followed is not a copy of anything
        return False


def _absolute_link_in_place(src: Path, target: str) -> None:
    """Replace the relative link ``src`` by one naming the same file by an absolute path, atomically under the
    same name: renamed as it was, it would dangle from OK/NG/error (review: the part it filed was lost). A crash
    before the rename leaves the name resolving to the same file, which a restart files under its row."""
    tmp = src.with_name(temp_name(src.name, PARTIAL_PREFIX, ""))
    os.symlink(
        os.path.join(src.parent.absolute(), target), tmp
    )  # no normpath: '..' is resolved through links
    try:
        os.replace(tmp, src)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_no_overwrite(src: Path, dst: Path) -> None:
    """Rename within a file system; across file systems copy to a dot-temp, fsync, rename, unlink.  A link
    whose relative target resolves is first made absolute in place (:func:`_absolute_link_in_place`)."""
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    mode = os.lstat(src).st_mode
    if stat.S_ISLNK(mode) and not os.path.isabs(target := os.readlink(src)) and os.path.exists(src):
        _absolute_link_in_place(src, target)
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # a pipe or device: copying would block or never end
        raise OSError(errno.EINVAL, "not a regular file, so it cannot be copied to another file system")
    tmp = dst.with_name(temp_name(dst.name, PARTIAL_PREFIX, ""))
    try:
        if stat.S_ISLNK(mode):  # the link moves, as a rename would move it (a dangling one too)
            os.symlink(os.readlink(src), tmp)
        else:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            shutil.copystat(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the partial copy's space taken
        raise
    fsync_dir(dst.parent)
    os.unlink(src)


def recorded_rows(results: Path, wanted: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Rows whose path is in ``wanted``; decodes only the leading path field of other rows."""
    dec = json.JSONDecoder()
    prefix = '{"path":'
    with open(results, encoding="utf-8") as f:
        for line in f:
            if line.startswith(prefix):
                try:
                    path, _ = dec.raw_decode(line, len(prefix))
                    if not isinstance(path, str) or path not in wanted:
                        continue
                except (
                    json.JSONDecodeError
                ):  # not spaced as the writer spaces it (a hand edit): read it whole
                    pass
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("path") in wanted and "moved_to" in row:
                yield row


def is_dir_entry(entry: os.DirEntry[str]) -> bool:
    """A sub-folder (or a link to one); a link that cannot be followed (a loop) is taken as a file, so
    it gets an error row instead of failing the whole listing."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def file_status(path: Path) -> os.stat_result | None:
    """The file's status; a dangling or looping link's own (it then gets an error row and goes to
    error/, one row per input); None when the name is gone."""
    try:
        return os.stat(path)
    except OSError:
        try:
            return os.lstat(path)
        except OSError:
            return None


def same_device(st: os.stat_result, folder: Path) -> bool:
    try:
        return st.st_dev == os.stat(folder).st_dev
    except OSError:
        return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def log(msg: str) -> None:
    """One log line; control characters (a newline or escape sequence in a file name) are shown escaped,
    so a name can neither forge a line nor recolour the terminal."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    safe = _CONTROL.sub(lambda m: repr(m.group())[1:-1], msg)
    print(f"{stamp} {safe}", file=sys.stderr, flush=True)


def verdict_text(row: dict[str, Any]) -> str:
    """One row in a few words, for the log line of its move."""
    if row.get("status") != "ok":
        return f"error ({row.get('error')})"
    return f"{row.get('verdict')} (P(defect) {float(row.get('defect_prob') or 0):.3f}, most likely {row.get('top_class')})"
