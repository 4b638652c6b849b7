"""Reading an image file's bytes safely: the step before decoding that every loader shares.

Whatever the name turns out to be (a folder, a named pipe, a link to a device, a file far larger than
any image the pixel limit allows, a name the OS refuses), the reader ends with bytes or an
:class:`ImageLoadError` saying what it is; it never blocks and never reads without bound.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NoReturn

#: open flags for image files: binary (Windows would read text: CRLF folded, 0x1A an end of file), a
#: named pipe that slipped past the status check must not block, a tty must not become the controlling one
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
)


class ImageLoadError(Exception):
    """An image could not be turned into a model input; the message names file and cause."""

    def __init__(self, path: str | os.PathLike[str], kind: str, reason: str) -> None:
        self.path = str(path)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image of ``max_pixels`` pixels can need (16-bit RGBA, uncompressed, plus
    64 MiB of headers and metadata): a larger file is refused before it is read into memory."""
    return max_pixels * 8 + (64 << 20)


def read_image_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's bytes (:func:`read_image_file` without the status)."""
    return read_image_file(path, max_bytes)[0]


def read_image_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the status of the file they were read from (``fstat`` of the open file, so
    it describes those bytes even if the name is replaced meanwhile).  Checked to be a regular file
    before it is opened (a named pipe would block the reader forever, or wake its writer; a device such
    as a link to ``/dev/zero`` never ends) and again once open, without blocking, in case the name was
    replaced in between."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            _refuse(path, mode)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageLoadError(path, "vanished", "a link whose target does not exist") from None
        raise ImageLoadError(path, "vanished", "file does not exist (missing or vanished)") from None
    except OSError as exc:
        if os.path.isdir(path):  # Windows refuses to open a folder; elsewhere fstat below says so
            raise ImageLoadError(path, "is_directory", "is a directory, not an image file") from None
        raise ImageLoadError(path, "unreadable", f"cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # the name itself cannot be handed to the OS
        reason = "the name contains a NUL byte, which no file name can" if "\0" in str(path) else str(exc)
        raise ImageLoadError(path, "unreadable", reason) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _refuse(path, st.st_mode)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = (
                fh.read() if st.st_size <= max_bytes else b""
            )  # a regular file ends; read(n) would allocate n
        except OSError as exc:
            raise ImageLoadError(path, "unreadable", f"cannot be read: {exc.strerror or exc}") from None
    if st.st_size > max_bytes or len(data) > max_bytes:
        raise ImageLoadError(
            path,
            "too_large",
            f"{max(st.st_size, len(data))} bytes, more than an image within the pixel limit can need",
        )
    if not data:
        raise ImageLoadError(path, "zero_bytes", "file is empty (zero bytes)")
    return data, st


def _refuse(path: Path, mode: int) -> NoReturn:
    """The error of a name that is not a regular file: a folder, or a pipe, socket or device."""
    if stat.S_ISDIR(mode):
        raise ImageLoadError(path, "is_directory", "is a directory, not an image file")
    raise ImageLoadError(path, "not_a_file", "not a regular file (a pipe, socket or device)")
