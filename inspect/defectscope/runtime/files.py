"""Facts about files that training, export and the line runtime share, each stated once.

* which names are images (:data:`IMAGE_EXTENSIONS`);
* a file's content hash (:func:`file_sha256`: models and checkpoints are traced by it);
* list files (:func:`list_file_problem`, :func:`read_path_list`): one path per line, ``#`` comments
  and blank lines skipped, spaces around a name stripped, a UTF-8 BOM tolerated, and relative paths
  resolved against **the list file's folder**, so a list means the same files wherever the command
  runs (`inspect @list.txt` and `export --images`); a line that names an existing file as written is
  that file, ``#`` or spaces included, so a list made by ``find`` loses no file; paths made absolute
  by one rule (:func:`absolute_path`), which ``--resume`` matches rows with;
* what a file that should be a model really is (:func:`model_file_problem`), so a checkpoint or an
  image given in its place gets a sentence instead of "Protobuf parsing failed".
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: how much of a list or CSV file :func:`text_problem` looks at
TEXT_HEAD_BYTES = 1 << 16

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: the Pillow decoders the loader opens (the formats of :data:`IMAGE_EXTENSIONS`): a file named on the
#: command line is held to the same formats as a folder's listing, and Pillow's rarer decoders stay shut
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
IMAGE_FORMATS_TEXT = "PNG, JPEG, BMP, TIFF or WebP"

#: leading bytes -> what the file is (checked in order)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "checkpoint"),  # torch.save writes a zip archive
    (b"\x80", "checkpoint"),  # a legacy (pre-zip) torch.save pickle
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"BM", "BMP image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"GIF8", "GIF image"),
)


#: the longest file name, in bytes, that common file systems take (ext4, XFS, NTFS, APFS)
NAME_MAX_BYTES = 255


def fit_name(stem: str, tail: str, limit: int = NAME_MAX_BYTES) -> str:
    """``stem + tail`` within ``limit`` bytes: ``stem`` is cut at a character boundary when needed.

    Names the product derives from an input's (heat maps, ``stem_1.png``, temporary files) add bytes
    to a name that may already be near the limit; an input's undecodable bytes are kept as they are."""
    room = max(limit - len(tail.encode("utf-8", "surrogateescape")), 1)
    data = stem.encode("utf-8", "surrogateescape")[:room]
    short = data.decode("utf-8", "surrogateescape")
    while data and not stem.startswith(short):  # cut inside a character: drop its first bytes
        data = data[:-1]
        short = data.decode("utf-8", "surrogateescape")
    return short + tail


#: a file or folder of ours that holds a delivery until it is complete (a hot folder's cross-device moves,
#: the synthetic generator's set); hidden, so no reader takes it for content
PARTIAL_PREFIX = ".defectscope-partial-"
#: the moment-long file that proves a folder writable (:func:`defectscope.runtime.outputs.check_output_folder`)
PROBE_PREFIX = ".defectscope-probe-"


def temp_name(name: str, prefix: str = "", suffix: str = ".tmp") -> str:
    """The name of a temporary file written beside ``name`` and renamed onto it: the one rule for the
    product's temporary names (results, CSV, report, heat maps, a hot folder's cross-device moves),
    within the name limit however long ``name`` is."""
    return prefix + fit_name(name, suffix, NAME_MAX_BYTES - len(prefix.encode("utf-8")))


def is_image_name(name: str) -> bool:
    """An image file by extension (case-insensitive); hidden files are not images."""
    return (
        not os.path.basename(name).startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )


def walk_files(
    folder: str | os.PathLike[str],
    recursive: bool = True,
    unreadable: Callable[[str, OSError], None] | None = None,
) -> Iterator[str]:
    """Files under ``folder``, sorted per folder, its files before its sub-folders': the one rule for what a
    folder holds (inspect, watch's lots, training's class folders, export's gate images). Hidden files and
    folders are skipped (a tool's cache such as ``.thumbnails/`` is not part of a lot), and a link to a
    folder is not followed (a loop of links would never end); a link to a file is a file. A folder that
    cannot be listed goes to ``unreadable`` (the caller says it, or refuses), else it is passed over."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_dir()) for e in it)
    except OSError as exc:
        if unreadable is not None:
            unreadable(os.fspath(folder), exc)
        return
    subdirs = []
    for name, is_dir, leads_to_dir in entries:
        if name.startswith("."):
            continue
        if is_dir:
            subdirs.append(name)
        elif not leads_to_dir:
            yield os.path.join(folder, name)
    if recursive:
        for name in subdirs:
            yield from walk_files(os.path.join(folder, name), recursive, unreadable)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_file_problem(list_file: str | os.PathLike[str]) -> str | None:
    """Why ``list_file`` cannot be a list of paths (unreadable, UTF-16, binary), or ``None``; only its
    start is read (see :func:`text_problem`)."""
    try:
        with open(list_file, "rb") as fh:
            head = fh.read(TEXT_HEAD_BYTES)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return text_problem(head)


def text_problem(head: bytes) -> str | None:
    """Why a file starting with ``head`` cannot be a list of names or a CSV manifest, or ``None``.

    A line that is not UTF-8 is a file name in another encoding, which the readers keep; NUL bytes
    mean a binary file or UTF-16 text (Notepad's "Unicode", PowerShell's ``>``), which no list can be.
    """
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 text; save it as UTF-8"
    if b"\x00" in head:
        return "is not a text file"
    if b"\r" in head and b"\n" not in head:
        return "ends its lines with \\r alone (old Mac text); save it with \\n or \\r\\n line ends"
    return None


def absolute_path(path: str) -> str:
    """``path`` made absolute without tidying ``..`` away: ``link/..`` is the link target's parent to
    the OS, not the link's folder, so only ``.`` parts and doubled separators go (pathlib's rule)."""
    return str(Path(path).absolute())


def listed_path(name: str, base: str) -> str:
    """A name read from a list file or a CSV manifest as the file it names, the one rule for both: ``~`` is
    the home folder, a relative name starts at the list's folder ``base``, and the result is absolute
    (:func:`absolute_path`: ``.`` parts and doubled separators go, ``..`` stays)."""
    return absolute_path(os.path.join(base, os.path.expanduser(name)))


def read_path_list(list_file: str | os.PathLike[str]) -> Iterator[str]:
    """The paths a list file names, lazily, as absolute paths: relative lines are joined to the list's
    folder, so a list names the same files wherever and however it is given (and ``--resume`` matches them).

    A line's bytes that are not UTF-8 are kept as they are (``surrogateescape``, as the OS gives
    such names), so a list written by ``find`` names those files too and reading never stops mid-run;
    lines end at ``\n`` only (``\r\n`` too), so a ``\r`` inside a name stays in it.
    Raises :class:`OSError` when the list cannot be read.
    """
    base = absolute_path(os.path.dirname(os.fspath(list_file)))
    with open(list_file, encoding="utf-8-sig", errors="surrogateescape", newline="\n") as fh:
        for line in fh:
            entry = _list_entry(line.rstrip("\r\n"), base)
            if entry is not None:
                yield entry


def _list_entry(raw: str, base: str) -> str | None:
    """One list line's path, or ``None`` for a blank or comment line.

    White space (and a byte-order mark left by joined lists) around a name is stripped, and a line
    starting with ``#`` is a comment, unless the line names an existing file (not a folder) as written
    or stripped: ``find`` writes names verbatim, and a row must not vanish because its name starts with ``#``.
    """
    entry = raw.strip().lstrip("\ufeff").strip()
    if entry.startswith("#") or raw != entry:
        for name in dict.fromkeys((raw, entry)):  # as written, then stripped
            path = listed_path(name, base)
            if name and os.path.lexists(path) and not os.path.isdir(path):
                return path
        if entry.startswith("#"):
            return None
    return listed_path(entry, base) if entry else None


def file_kind(path: str | os.PathLike[str]) -> str:
    """``checkpoint``, ``ONNX model``, ``PNG image`` (etc.), ``empty`` or ``other``, from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[8:12] == b"WEBP" and head.startswith(b"RIFF"):
        return "WebP image"
    kind = next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), "other")
    if kind == "other" and head[:1] == b"\x08":  # ModelProto field 1 (ir_version) comes first
        return "ONNX model"
    return kind


@dataclass(frozen=True)
class ModelRole:
    """What a command uses a model file for, so one rule (:func:`model_file_problem`) words its messages
    for that command: how the file is written, and what to run when an image was given in its place."""

    export_args: str = "-o model.onnx"
    image_hint: str = (
        "; the exported .onnx model comes first: defectscope inspect MODEL.onnx IMAGES... -o results.jsonl"
    )


#: the line runtime's model argument (inspect, watch, evaluate)
INSPECTED = ModelRole()
#: ``distill.teacher``: a model exported with its views, read by training
TEACHER = ModelRole(export_args="--tta dihedral -o teacher.onnx", image_hint="")


def model_file_problem(path: str | os.PathLike[str], role: ModelRole = INSPECTED) -> str | None:
    """Why ``path`` cannot be an exported model, with what to run instead; ``None`` if it may be one."""
    p = Path(path)
    try:
        kind = file_kind(p)
    except OSError as exc:  # a file this user may not read is a setting to fix, not a crash to restart after
        return (
            f"{p}: the model file cannot be read ({os_error_reason(exc)}); expected an exported model (.onnx)"
        )
    if kind == "checkpoint":
        return (
            f"{p} is a training checkpoint, not an exported model; export it first: "
            f"defectscope export {p} {role.export_args}"
        )
    if kind == "empty":
        return f"{p} is empty (0 bytes); copy the model again or re-run defectscope export"
    if kind.endswith("image"):
        return f"{p} is a {kind}, not a model{role.image_hint}"
    return None


def unusable_name(path: str | os.PathLike[str]) -> str | None:
    """Why the OS will not even look at ``path`` (a name longer than the file system allows, a loop of
    links, a folder it may not enter), or ``None`` when it can, whether or not the file exists: commands
    ask before ``is_dir``/``exists``/``resolve``, which raise for these or call a loop "not found"."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return os_error_reason(exc)
    return None


def os_error_reason(exc: OSError) -> str:
    """The OS's reason, with what to do where the reason alone does not say it."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENAMETOOLONG:
        reason += ": at most 255 bytes per file or folder name on most file systems"
    return reason


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def error_line(prog: str, message: object) -> str:
    """``PROG: error: MESSAGE`` on one line: a line break inside a file name shows as ``\\n``, and other control
    characters (an escape sequence in a name would drive the terminal) as their ``\\x..`` codes."""
    text = str(message).replace("\r", "\\r").replace("\n", "\\n")
    return f"{prog}: error: {_CONTROL.sub(_escaped, text)}"


def _escaped(match: re.Match[str]) -> str:
    return "\\x" + format(ord(match.group()), "02x")


def os_error_line(exc: OSError) -> str:
    """An OS error about a named file, on one line: the file, then the reason."""
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    return f"{names}: {os_error_reason(exc)}" if names else os_error_reason(exc)


def is_file(path: str | os.PathLike[str]) -> bool:
    """``Path.is_file`` that is False where the OS cannot even look (a name longer than it allows)."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


def checkpoint_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a training checkpoint, read from its first bytes (torch-free, so a command can
    say it before importing torch); ``None`` if it may be one."""
    p = Path(path)
    unusable = unusable_name(p)  # a name too long for the file system, a loop of links
    if unusable:
        return f"{p}: cannot be read ({unusable})"
    exists, regular = p.exists(), p.is_file()
    if not exists:
        return f"{p}: checkpoint file does not exist"
    if not regular:
        return f"{p}: is not a file (expected a .ckpt written by `defectscope train`)"
    try:
        kind = file_kind(p)
    except OSError as exc:  # a file this user may not read
        return f"{p}: the checkpoint file cannot be read ({os_error_reason(exc)})"
    if kind == "ONNX model" or (kind == "other" and p.suffix.lower() == ".onnx"):
        return (
            f"{p} is an exported model (ONNX), not a training checkpoint; export and evaluate ckpt_path= read "
            "the .ckpt that defectscope train writes (outputs/<date>/<time>/checkpoints/best.ckpt), and an "
            f"exported model is used as it is: defectscope inspect {p} IMAGES... -o results.jsonl"
        )
    if kind == "empty" or kind.endswith("image"):
        return f"{p} is {'empty (0 bytes)' if kind == 'empty' else 'a ' + kind}, not a training checkpoint (.ckpt)"
    if kind != "checkpoint":
        return (
            f"{p}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle; expected a .ckpt "
            "written by `defectscope train`)"
        )
    if _zip_without_end(p):
        return (
            f"{p} is truncated: a zip archive whose end record is missing (an interrupted copy or download); "
            "copy it again"
        )
    return None


def _zip_without_end(path: Path) -> bool:
    """A zip archive (torch.save's format) cut short: its end-of-central-directory record, which the
    standard library looks for in the last 64 KiB (comments, zip64 and trailing bytes allowed), is gone."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False
    return not zipfile.is_zipfile(path)


def model_load_failure(path: str | os.PathLike[str], detail: str) -> str:
    """The message when ONNX Runtime cannot load ``path``: a file it cannot even parse is damaged
    (a cut-off copy) or no ONNX model at all; anything else keeps ORT's own words (``detail``)."""
    if "protobuf" in detail.lower():
        return (
            f"{path} is damaged (cut off?) or not an ONNX model ({detail}); copy it again, or re-run "
            "defectscope export on its checkpoint"
        )
    return f"{path}: {detail}"
