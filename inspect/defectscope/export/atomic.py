"""Write a file so readers see either the old content or the complete new one, never a partial.

The line runtime and ``watch`` may pick a model up the moment it appears; a half-written ``.onnx``
(full disk, crash, Ctrl-C) must therefore never sit at the final path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _final_mode(target: Path) -> int:
    """The mode a plain ``open(target, "wb")`` would leave: the existing file's, else 0o666 minus umask.

    ``mkstemp`` creates 0600 files; a model copied to a line PC is read by a service user (deploy/),
    so the exported file must be as readable as any other file the user writes.
    """
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Temp file in the target's directory, fsync, ``os.replace``, fsync the directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _final_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target
