"""Result rows and the append-only JSONL file that is the run's source of truth.

Crash safety rests on three rules: a batch's rows are written with ONE ``write`` then flushed (and
fsync'd, at most every ``fsync_interval_s``); only the last line can ever be torn (append-only file), and :func:`recover_jsonl`
truncates it; every complete line is a finished input.  CSV is derived from the JSONL at the end
of a run, so it can never disagree with it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .outputs import OutputError, replaced_file, write_all
from .pipeline import Result

#: every row's fields, in file and CSV order; each is documented in deploy/README.md ("Result rows")
ROW_KEYS = (
    "path",
    "status",
    "verdict",
    "defect_prob",
    "threshold",
    "threshold_source",
    "top_class",
    "top_prob",
    "probs",
    "width",
    "height",
    "error",
    "model_sha256",
    "provider",
    "latency_ms",
)
#: fields renamed since the first row format; :func:`iter_rows` reads old files under the new names
RENAMED = {"label": "top_class", "score": "top_prob"}
THRESHOLD_FROM_MODEL = "model"
THRESHOLD_FROM_OPTION = "--threshold"


class ResultsFileError(RuntimeError):
    """An existing results file cannot be continued (corrupt line, other model or threshold)."""


@dataclass(frozen=True)
class RunStamp:
    """What every row of one results file must share: the model and the threshold that decided."""

    model_sha256: str
    provider: str
    threshold: float
    threshold_source: str  # THRESHOLD_FROM_MODEL or THRESHOLD_FROM_OPTION

    @classmethod
    def of(cls, sha256: str, provider: str, model_threshold: float, override: float | None) -> RunStamp:
        if override is None:
            return cls(sha256, provider, float(model_threshold), THRESHOLD_FROM_MODEL)
        return cls(sha256, provider, float(override), THRESHOLD_FROM_OPTION)

    def fields(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "model_sha256": self.model_sha256,
            "provider": self.provider,
        }


def result_row(result: Result, stamp: RunStamp) -> dict[str, Any]:
    """The row of one pipeline result: a verdict, or ``status: error`` with the loader's reason."""
    d, size = result.decision, result.item.size
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(path=result.item.path, latency_ms=round(result.latency_ms, 3), **stamp.fields())
    if d is not None and size is not None:
        row.update(
            status="ok",
            verdict=d.verdict,
            defect_prob=d.defect_prob,
            top_class=d.top_class,
            top_prob=d.top_prob,
            probs=d.probs,
            width=size[0],
            height=size[1],
        )
    else:
        row.update(status="error", error=result.error or result.item.error or "unknown")
    return row


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of any format under today's names (``label`` -> ``top_class``, ...); missing -> None."""
    for old, new in RENAMED.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
    for key in ROW_KEYS:
        row.setdefault(key, None)
    return row


#: fields read as numbers (summary, report, the resume check); null where a row has none
_NUMBER_FIELDS = ("defect_prob", "threshold", "top_prob", "width", "height", "latency_ms")


def checked_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """``row`` under today's names (:func:`upgrade_row`) with the types later steps rely on: a row
    another tool wrote, or a hand edit, is one line naming the field, not a traceback in the summary."""
    row = upgrade_row(row)

    def refuse(key: str, expected: str) -> NoReturn:
        raise ResultsFileError(f"{where}: {key!r} must be {expected}, got {row[key]!r:.60}")

    if not isinstance(row["path"], str):
        refuse("path", "a string")
    for key in _NUMBER_FIELDS:
        value = row[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            refuse(key, "a number or null")
    if row["status"] == "ok":
        for key in ("defect_prob", "top_prob"):
            if row[key] is None:
                refuse(key, "a number in a row with status 'ok'")
    if row["probs"] is not None and not isinstance(row["probs"], dict):
        refuse("probs", "an object of class probabilities or null")
    return row


def check_same_run(
    row: dict[str, Any], stamp: RunStamp, where: str, elsewhere: str = "write to a new results file"
) -> None:
    """Refuse to append rows of this run to a file whose rows came from another model or threshold
    (rows written before thresholds were recorded are checked on the model only). ``elsewhere`` says where
    this run's rows may go instead (``watch``: another ``--out`` folder)."""
    if row.get("model_sha256") != stamp.model_sha256:
        raise ResultsFileError(
            f"{where}: holds results of another model (sha256 {row.get('model_sha256')}); this model is "
            f"{stamp.model_sha256}; {elsewhere}"
        )
    old = row.get("threshold")
    if old is not None and float(old) != stamp.threshold:
        raise ResultsFileError(
            f"{where}: holds results decided with threshold {old:g} ({row.get('threshold_source')}), "
            f"but this run uses {stamp.threshold:g} ({stamp.threshold_source}); {elsewhere}, or run with "
            f"--threshold {old:g}"
        )


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSONL line.  A file name that is not valid UTF-8 (its bytes arrive as lone surrogates) is
    written as JSON ``\\udcXX`` escapes: the line stays UTF-8 and reads back to the same path."""
    text = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
    return text.encode("utf-8", "backslashreplace")


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
    """Buffered rows, committed per batch with one write; fsync at most every interval.

    A committed row is in the OS: a killed process (``kill -9``, crash) loses nothing.  Only a power
    cut can lose rows not yet fsync'd, and their inputs are then simply inspected again by
    ``--resume`` (no row is ever duplicated).  ``fsync_interval_s=0`` syncs every commit, which
    ``watch`` needs because it moves the original right after the commit.  A failed write (disk
    full) cuts the file back to its last complete row and raises :class:`OutputError`, so every
    row before stays intact and ``--resume`` goes on from there.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool, fsync_interval_s: float = 0.0) -> None:
        self.path = Path(path)
        # O_BINARY: Windows would write each row's newline as CRLF and the row ends would drift
        flags = (
            os.O_WRONLY
            | os.O_CREAT
            | os.O_APPEND
            | getattr(os, "O_BINARY", 0)
            | (0 if append else os.O_TRUNC)
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot open results {self.path} ({exc.strerror or exc})") from None
        self._end = os.fstat(self._fd).st_size  # end of the last complete row
        self._start = self._end  # where this session's rows begin
        self._buf: list[bytes] = []
        self.committed = 0
        self.fsync_interval_s = float(fsync_interval_s)
        self.fsyncs = 0
        self._last_sync = time.monotonic()
        self._unsynced = False
        self._failed = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def add(self, row: dict[str, Any]) -> None:
        self._buf.append(encode_row(row))

    def commit(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        n = len(self._buf)
        self._buf.clear()
        try:
            write_all(self._fd, data)
        except OSError as exc:
            self._fail(exc)
        self._end += len(data)
        self.committed += n
        self._unsynced = True
        if time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(exc)
            self.fsyncs += 1
            self._unsynced = False
        self._last_sync = time.monotonic()

    def _fail(self, exc: OSError) -> NoReturn:
        """Cut a partly written batch off (the file ends with a complete row again) and say so."""
        self._failed = True
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._end)
        raise OutputError(f"cannot write results to {self.path} ({exc.strerror or exc})") from None

    def rows_written(self) -> int:
        """This session's complete rows, counted in the file itself: a SIGTERM raised as KeyboardInterrupt may land
        between a batch's write and ``committed += n`` (the message said 36 rows where the file held 40)."""
        with open(self.path, "rb") as f:
            f.seek(self._start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def close(self) -> None:
        try:
            if not self._failed:
                self.commit()
                self.sync()
        finally:
            os.close(self._fd)


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
    """Rows of a results file of any format (:func:`upgrade_row`), streamed; a corrupt complete
    line is an error naming the line."""
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
            yield checked_row(row, f"{path}:{lineno}")


def last_row(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last complete row of a results file (read from the end; ``None`` when there is none)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - (1 << 20)))
            tail = f.read()
    except FileNotFoundError:
        return None
    lines = [ln for ln in tail.split(b"\n") if ln.strip()]
    if not tail.endswith(b"\n") and lines:
        lines.pop()  # a torn last line is no row
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "path" in row:
            return checked_row(row, f"{path} (its last row)")
    return None


def csv_columns(class_names: Sequence[str]) -> list[str]:
    return [k for k in ROW_KEYS if k != "probs"] + [f"prob_{c}" for c in class_names]


#: a spreadsheet reads a cell that starts with one of these as a formula
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: the result columns whose text comes from outside (file names, class names from the model, errors)
TEXT_COLUMNS = ("path", "top_class", "error")


def csv_cell(value: Any) -> Any:
    """A free-text cell (a file name, a class name from a model file, an error) as a spreadsheet shows
    text: one that starts like a formula gets a leading apostrophe. Every CSV defectscope writes uses this
    on its free-text columns; the JSONL keeps the exact text."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(
    jsonl_path: str | os.PathLike[str], csv_path: str | os.PathLike[str], class_names: Sequence[str]
) -> int:
    """Regenerate the CSV from the JSONL (see :func:`replaced_file`); returns the number of rows."""
    cols = csv_columns(class_names)
    n = 0
    with replaced_file(csv_path, "--csv") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", newline="")
        w = csv.writer(text)
        w.writerow(cols)
        for row in iter_rows(jsonl_path):
            probs = row.get("probs") or {}
            flat = {k: row.get(k) for k in ROW_KEYS if k != "probs"}
            flat.update({f"prob_{c}": probs.get(c) for c in class_names})
            w.writerow(
                [csv_cell(flat[c]) if c in TEXT_COLUMNS else "" if flat[c] is None else flat[c] for c in cols]
            )
            n += 1
        text.flush()
        text.detach()
    return n
