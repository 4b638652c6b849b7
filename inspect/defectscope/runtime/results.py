"""Result rows and the append-only JSONL file that is the run's source of truth.

Crash safety rests on three rules: a batch's rows are written with ONE ``write`` then flushed (and
fsync'd, at most every ``fsync_interval_s``); only the last line can ever be torn (append-only file), and :func:`recover_jsonl`
truncates it; every complete line is a finished input.  CSV is derived from the JSONL at the end
of a run, so it can never disagree with it.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .inspector import Decision

ROW_KEYS = (
    "path",
    "status",
    "verdict",
    "label",
    "score",
    "defect_prob",
    "probs",
    "width",
    "height",
    "error",
    "model_sha256",
    "provider",
    "latency_ms",
)


class ResultsFileError(RuntimeError):
    """An existing results file cannot be continued (corrupt line, other model)."""


def ok_row(
    path: str,
    decision: Decision,
    size: tuple[int, int],
    *,
    sha256: str,
    provider: str,
    latency_ms: float,
) -> dict[str, Any]:
    return {
        "path": path,
        "status": "ok",
        "verdict": decision.verdict,
        "label": decision.top_class,
        "score": decision.top_prob,
        "defect_prob": decision.defect_prob,
        "probs": decision.probs,
        "width": size[0],
        "height": size[1],
        "error": None,
        "model_sha256": sha256,
        "provider": provider,
        "latency_ms": round(latency_ms, 3),
    }


def error_row(path: str, error: str, *, sha256: str, provider: str, latency_ms: float) -> dict[str, Any]:
    return {
        "path": path,
        "status": "error",
        "verdict": None,
        "label": None,
        "score": None,
        "defect_prob": None,
        "probs": None,
        "width": None,
        "height": None,
        "error": error,
        "model_sha256": sha256,
        "provider": provider,
        "latency_ms": round(latency_ms, 3),
    }


def encode_row(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames/creations in ``path`` durable (POSIX; a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class JsonlWriter:
    """Buffered rows, committed per batch with one write + flush; fsync at most every interval.

    A flushed row is in the OS: a killed process (``kill -9``, crash) loses nothing.  Only a power
    cut can lose rows not yet fsync'd, and their inputs are then simply inspected again by
    ``--resume`` (no row is ever duplicated).  ``fsync_interval_s=0`` syncs every commit, which
    ``watch`` needs because it moves the original right after the commit.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool, fsync_interval_s: float = 0.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab" if append else "wb")  # noqa: SIM115 - lives as long as the writer
        self._buf: list[bytes] = []
        self.committed = 0
        self.fsync_interval_s = float(fsync_interval_s)
        self.fsyncs = 0
        self._last_sync = time.monotonic()
        self._unsynced = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def add(self, row: dict[str, Any]) -> None:
        self._buf.append(encode_row(row))

    def commit(self) -> None:
        if not self._buf:
            return
        self._f.write(b"".join(self._buf))
        self._f.flush()
        self.committed += len(self._buf)
        self._buf.clear()
        self._unsynced = True
        if time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._f.fileno())
            self.fsyncs += 1
            self._unsynced = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.sync()
        self._f.close()


def recover_jsonl(path: str | os.PathLike[str]) -> int:
    """Truncate a torn last line (a crash mid-write); returns the number of bytes removed."""
    p = Path(path)
    if not p.exists():
        return 0
    with open(p, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos, keep = size, 0
        while pos > 0:  # scan backwards for the last complete line
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def iter_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a results file, streamed; a corrupt complete line is an error naming the line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultsFileError(f"{path}:{lineno}: not a valid result row ({exc})") from None
            if not isinstance(row, dict) or "path" not in row:
                raise ResultsFileError(f"{path}:{lineno}: not a result row (no 'path')")
            yield row


def load_done(path: str | os.PathLike[str], sha256: str) -> Counter[str]:
    """How many rows each path already has; refuses a file written with another model."""
    done: Counter[str] = Counter()
    for row in iter_rows(path):
        if row.get("model_sha256") != sha256:
            raise ResultsFileError(
                f"{path}: holds results of another model (sha256 {row.get('model_sha256')}); "
                f"this model is {sha256}; write to a new results file instead of --resume"
            )
        done[row["path"]] += 1
    return done


def skip_done(paths: Iterator[str], done: Counter[str]) -> Iterator[str]:
    """Drop inputs that already have a row; a path listed k times is skipped at most k times."""
    for p in paths:
        if done.get(p, 0) > 0:
            done[p] -= 1
            continue
        yield p


def csv_columns(class_names: Sequence[str]) -> list[str]:
    return [k for k in ROW_KEYS if k != "probs"] + [f"prob_{c}" for c in class_names]


def write_csv(
    jsonl_path: str | os.PathLike[str], csv_path: str | os.PathLike[str], class_names: Sequence[str]
) -> int:
    """Regenerate the CSV from the JSONL (atomically); returns the number of rows."""
    out = Path(csv_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cols = csv_columns(class_names)
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in iter_rows(jsonl_path):
            probs = row.get("probs") or {}
            flat = {k: row.get(k) for k in ROW_KEYS if k != "probs"}
            flat.update({f"prob_{c}": probs.get(c) for c in class_names})
            w.writerow(["" if flat[c] is None else flat[c] for c in cols])
            n += 1
    os.replace(tmp, out)
    return n
