"""Output paths checked before the first image, and written so that nothing is lost after it.

Every output a command will write is checked up front (:func:`check_output_file`,
:func:`check_output_folder`): right kind (file or folder), not under ``/proc`` or ``/sys``, and
really creatable — by creating and removing a probe file, since ``os.access`` says yes to root
for read-only and kernel file systems.  A problem is one :class:`OutputError` line naming the
option and the path; the command exits 2 before any work.

Writing (:func:`write_text`): a regular file is replaced through a temporary file and a rename
(a reader never sees half a report); a special file (``/dev/stdout``, a FIFO) is written directly,
never replaced.  A write that fails (disk full) removes its temporary file and raises
:class:`OutputError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .files import PROBE_PREFIX, file_kind, os_error_reason, temp_name, unusable_name

KERNEL_FILESYSTEMS = ("/proc", "/sys")


class OutputError(RuntimeError):
    """An output path cannot be written; the message names the option, the path and the reason."""


@dataclass(frozen=True)
class Written:
    """What an option writes, as its first bytes tell: an existing file of another kind is never replaced
    (``-o`` naming the model, an input image or a list file would destroy it)."""

    name: str
    accepts: Callable[[bytes], bool]

    def matches(self, path: Path) -> bool:
        with open(path, "rb") as fh:
            return self.accepts(fh.read(HEAD_BYTES))


#: how much of an existing output is read to tell its kind (a results row with a long path and many classes fits)
HEAD_BYTES = 1 << 16
_BOM = b"\xef\xbb\xbf"


def _results_rows(head: bytes) -> bool:
    """Result rows: the first complete line a JSON object with a ``path`` (keys in any order, a BOM before
    it), or a crash's leftovers that ``--resume`` cuts off: a first row torn before its newline, or zero
    bytes where a power cut left the file's end unwritten."""
    text = head.removeprefix(_BOM).lstrip(b" \t\r\n")
    if not text.strip(b"\x00 \t\r\n"):
        return True
    line, newline, _ = text.partition(b"\n")
    if not newline:  # torn (or longer than what was read): it must at least open a row
        return line.startswith(b"{")
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and "path" in row


#: ``inspect -o`` and watch's ``results.jsonl``
RESULTS_JSONL = Written("a JSONL results file", _results_rows)
#: the CSV's own header (a manifest's ``path,label`` is not one)
RESULTS_CSV = Written(
    "a results CSV", lambda head: head.removeprefix(_BOM).startswith(b"path,status,verdict,")
)
_REPORT = re.compile(rb"\s*<!DOCTYPE html>.{0,400}?<title>defectscope report", re.S | re.I)
HTML_REPORT = Written("a defectscope HTML report", lambda head: _REPORT.match(head) is not None)


def is_special(path: str | os.PathLike[str]) -> bool:
    """An existing file that is neither a regular file nor a folder (device, FIFO, socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_name(path: str | os.PathLike[str], option: str) -> None:
    """A name the OS will not look at (too long, a loop of links) is told as such, not as a traceback from
    ``is_dir`` or ``resolve``."""
    reason = unusable_name(path)
    if reason:
        raise OutputError(f"{option} {path}: cannot be used ({reason})")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str, shown: Path | None = None) -> None:
    """``path`` (absent) can be created: its nearest existing ancestor is a writable folder.  Messages
    name ``shown`` (the folder the user gave, where ``path`` is a probe inside it)."""
    anchor = _existing_ancestor(path.parent)
    path = shown or path
    real = os.path.realpath(anchor)
    kernel = next((k for k in KERNEL_FILESYSTEMS if real == k or real.startswith(k + "/")), None)
    if kernel:
        raise OutputError(
            f"{option} {path}: is under {kernel}, a kernel file system; choose an ordinary folder"
        )
    if not anchor.is_dir():
        raise OutputError(f"{option} {path}: {anchor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=anchor)
    except OSError as exc:
        raise OutputError(
            f"{option} {path}: cannot create files in {anchor} ({os_error_reason(exc)})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(
    path: str | os.PathLike[str], option: str, *, special_ok: bool = True, writes: Written | None = None
) -> None:
    """A file ``option`` will write: absent but creatable, a writable regular file (of the kind it
    ``writes``, when not empty), or (when ``special_ok``) a special file such as ``/dev/stdout`` that is
    then written directly."""
    p = Path(path)
    check_name(p, option)
    if p.is_dir():
        raise OutputError(f"{option} {p}: is a folder; give a file name")
    if is_special(p):
        if not special_ok:
            raise OutputError(
                f"{option} {p}: is a device or pipe, not a regular file; results need a file that "
                "--resume can read back"
            )
        if not os.access(p, os.W_OK):
            raise OutputError(f"{option} {p}: is not writable")
        return
    if p.exists():
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise OutputError(f"{option} {p}: cannot be written ({os_error_reason(exc)})") from None
        if writes is not None:
            _check_same_kind(p, option, writes)
    _check_creatable(p, option)


def _check_same_kind(path: Path, option: str, writes: Written) -> None:
    """An existing non-empty ``path`` is replaced (or continued) only when it is what ``option`` writes."""
    try:
        if path.stat().st_size == 0 or writes.matches(path):
            return
        kind = file_kind(path)
    except OSError as exc:
        raise OutputError(
            f"{option} {path}: cannot be read to tell what it holds ({os_error_reason(exc)})"
        ) from None
    shown = {"checkpoint": "a PyTorch checkpoint", "ONNX model": "an ONNX model"}.get(kind)
    shown = f"is {shown or (f'a {kind}' if kind.endswith('image') else 'another kind of file')}, not {writes.name}"
    raise OutputError(
        f"{option} {path}: {shown}; writing results into it would destroy it: give a new file name (only "
        f"{writes.name} is replaced or continued)"
    )


def check_not_input(
    path: str | os.PathLike[str], option: str, inputs: Mapping[str, str | os.PathLike[str] | None]
) -> None:
    """An output file that is not one of the run's inputs (``{"ckpt_path": ..., "data.source.root": ...}``):
    not the same file as an input file, not inside an input folder. Writing a rejects list over its
    manifest, metrics over their checkpoint, or anything among the images being read loses them."""
    target = os.path.realpath(os.path.expanduser(os.fspath(path)))
    for key, value in inputs.items():
        if not value:
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(value)))
        if os.path.isdir(source) and target.startswith(source.rstrip(os.sep) + os.sep):
            raise OutputError(
                f"{option} {path}: lies inside {key} {value}, which this run reads; give a path outside it"
            )
        if target == source:
            raise OutputError(f"{option} {path}: is {key}, which this run reads; give another file")


def check_output_folder(path: str | os.PathLike[str], option: str) -> None:
    """A folder ``option`` will write into: an existing writable folder, or creatable."""
    p = Path(path)
    check_name(p, option)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option} {p}: is a file, not a folder; give a folder name")
    if p.is_symlink() and not p.exists():  # a folder cannot be made at a dangling link's name
        raise OutputError(
            f"{option} {p}: is a link to {os.readlink(p)}, which does not exist; create that folder or "
            "give another"
        )
    _check_creatable(p / "probe", option, shown=p)


def check_distinct(paths: dict[str, str | None]) -> None:
    """No two options may name the same file: ``{"-o": "r.jsonl", "--csv": ...}``."""
    seen: dict[str, str] = {}
    for option, value in paths.items():
        if not value:
            continue
        key = os.path.abspath(value)
        if key in seen:
            raise OutputError(f"{seen[key]} and {option} name the same file {value}; give each its own")
        seen[key] = option


@contextmanager
def replaced_file(path: str | os.PathLike[str], option: str) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` when the block ends without an error:
    through a temporary file and a rename for a regular file, directly for a special one."""
    out = Path(path)
    special = is_special(out)
    target = out if special else out.with_name(temp_name(out.name))
    try:
        if not special:
            out.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            yield fh
            fh.flush()
            if not special:
                os.fsync(fh.fileno())
        if not special:
            os.replace(target, out)
    except OSError as exc:
        raise OutputError(f"cannot write {option} {out} ({os_error_reason(exc)})") from None
    finally:  # any failure (not only OSError) leaves no temporary file behind
        if not special:
            with suppress(OSError):
                target.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, option: str) -> Path:
    """Write a whole UTF-8 text file (see :func:`replaced_file`)."""
    with replaced_file(path, option) as fh:
        fh.write(text.encode("utf-8", "backslashreplace"))  # an undecodable file name stays visible
    return Path(path)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a short write is not an error until the next one)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]
