"""`defectscope watch MODEL --in HOT --out OUT`: inspect files as they land in a hot folder.

Polling only (works on network shares and Windows, no inotify dependency).  A file is taken once
it is complete: its (size, mtime) stayed the same over ``--stable-polls`` polls.  Writers should
write under a temporary name (``*.tmp``, ``*.part``, dotfiles are ignored) and rename into place;
slow writers are covered by the stability rule.

Commit protocol (``OUT/results.jsonl`` is the source of truth), per batch:
  1. decode + infer; choose each file's unique destination ``OUT/{OK,NG,error}/name``;
  2. append the rows (with ``moved_to``) in one write, flush, fsync;
  3. move each file (rename; across file systems: copy to a dot-temp, fsync, rename, unlink).
Crash points, and what a restart does:
  * before 2: no row, file still in HOT -> inspected again (nothing was recorded);
  * torn row in 2: the torn line is truncated -> same as above;
  * between 2 and 3 (or mid-batch in 3): file in HOT with a row whose (path, size, mtime) match
    -> moved to its recorded destination WITHOUT re-inference;
  * inside a cross-device move: a dot-temp in OUT is removed; if the destination is already
    complete (same size) the source is just unlinked.
So every file gets exactly one row and ends up in exactly one of OK/NG/error.  SIGTERM/SIGINT
finish the batch in flight (rows + moves) and exit 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .heatmap import save_overlay
from .inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from .pipeline import Batcher, Result, decode, infer
from .providers import GRAPH_OPT_CHOICES, PROVIDER_CHOICES
from .results import JsonlWriter, ResultsFileError, error_row, fsync_dir, ok_row, recover_jsonl
from .trt import add_trt_options

PROG = "defectscope watch"
RESULTS_NAME = "results.jsonl"
FOLDERS = {"OK": "OK", "NG": "NG", None: "error"}
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
PARTIAL_PREFIX = ".defectscope-partial-"
#: Transient failures worth another try before the file is declared an error.
RETRY_KINDS = ("unreadable",)
MAX_TRIES = 3


def is_ignored(name: str) -> bool:
    """Names a writer uses while a file is incomplete, plus hidden files."""
    low = name.lower()
    return name.startswith(".") or low.endswith(TEMP_SUFFIXES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Watch a hot folder: inspect each completely written file once, append its row to "
        "OUT/results.jsonl and move it to OUT/OK, OUT/NG or OUT/error.",
    )
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("--in", dest="hot", required=True, help="hot folder to watch (not recursive)")
    p.add_argument("--out", required=True, help="output folder: results.jsonl and OK/, NG/, error/")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    p.add_argument(
        "--stable-polls",
        type=int,
        default=2,
        help="a file is complete when size and mtime are unchanged over this many polls (default 2)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="max files per inference batch (default 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto", help="execution provider")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--graph-opt", choices=GRAPH_OPT_CHOICES, default="all", help="graph optimisation level")
    p.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder")
    add_trt_options(p)
    p.add_argument(
        "--threshold", type=float, default=None, help="NG when P(defect) >= this (default: the model's)"
    )
    p.add_argument("--heatmaps", default=None, help="folder for CAM overlay PNGs of NG files")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.interval <= 0:
        p.error(f"--interval must be > 0, got {a.interval}")
    if a.stable_polls < 1:
        p.error(f"--stable-polls must be >= 1, got {a.stable_polls}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.workers < 0:
        p.error(f"--workers must be >= 0, got {a.workers}")
    if a.threshold is not None and not 0.0 <= a.threshold <= 1.0:
        p.error(f"--threshold must lie in [0, 1], got {a.threshold}")
    if not os.path.isdir(a.hot):
        p.error(f"--in {a.hot!r} is not an existing folder")
    hot, out = Path(a.hot).resolve(), Path(a.out).resolve()
    if hot == out or hot in {out / f for f in FOLDERS.values()}:
        p.error("--in must not be --out or one of its OK/NG/error folders")


def _log(msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable: int = 0
    tries: int = 0


@dataclass
class _Pending:
    """A file whose row is committed but which still sits in HOT."""

    name: str
    dest: str  # relative to OUT, e.g. "NG/a.png"


class Watcher:
    def __init__(self, args: argparse.Namespace, inspector: Inspector) -> None:
        self.args = args
        self.inspector = inspector
        self.hot = Path(args.hot).resolve()
        self.out = Path(args.out).resolve()
        self.threshold = inspector.threshold if args.threshold is None else float(args.threshold)
        self.stop = threading.Event()
        self.seen: dict[str, _Seen] = {}
        self.stuck: dict[str, _Pending] = {}
        self.batches = 0
        self.counts = {"OK": 0, "NG": 0, "error": 0}
        self._fault = _parse_fault(os.environ.get("DEFECTSCOPE_WATCH_FAULT", ""))
        for sub in FOLDERS.values():
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        if args.heatmaps:
            Path(args.heatmaps).mkdir(parents=True, exist_ok=True)
        self.results = self.out / RESULTS_NAME
        self.writer: JsonlWriter | None = None

    # -- start-up recovery -----------------------------------------------------------------
    def recover(self) -> int:
        """Finish what a crash interrupted; returns how many files were moved without inference."""
        for sub in FOLDERS.values():
            for entry in os.scandir(self.out / sub):
                if entry.name.startswith(PARTIAL_PREFIX):
                    os.unlink(entry.path)
        torn = recover_jsonl(self.results)
        if torn:
            _log(f"watch: dropped a torn last line ({torn} bytes) from {self.results}")
        if not self.results.exists():
            return 0
        here = {str(self.hot / n): n for n in self._names()}
        pending: dict[str, tuple[dict[str, Any], os.stat_result]] = {}
        for row in _rows_for(self.results, here):
            name = here[row["path"]]
            try:
                st = os.stat(self.hot / name)
            except OSError:
                continue
            if row.get("source_size") == st.st_size and row.get("source_mtime_ns") == st.st_mtime_ns:
                pending[name] = (row, st)
        for name, (row, _) in pending.items():
            self._move(_Pending(name, str(row["moved_to"])))
        if pending:
            _log(
                f"watch: recovered {len(pending)} file(s) recorded before a crash; moved without re-inference"
            )
        return len(pending)

    # -- polling ---------------------------------------------------------------------------
    def _names(self) -> list[str]:
        try:
            with os.scandir(self.hot) as it:
                return sorted(e.name for e in it if not is_ignored(e.name) and not e.is_dir())
        except OSError as exc:
            _log(f"watch: cannot list {self.hot}: {exc}")
            return []

    def poll(self) -> list[tuple[str, _Seen]]:
        """Update observations; return files whose size and mtime held still long enough."""
        ready = []
        current = set()
        for name in self._names():
            if name in self.stuck:
                continue
            try:
                st = os.stat(self.hot / name)
            except OSError:
                continue
            current.add(name)
            obs = self.seen.get(name)
            if obs is None or (obs.size, obs.mtime_ns) != (st.st_size, st.st_mtime_ns):
                tries = obs.tries if obs else 0
                self.seen[name] = _Seen(st.st_size, st.st_mtime_ns, 0, tries)
                continue
            obs.stable += 1
            if obs.stable >= self.args.stable_polls:
                ready.append((name, obs))
        for gone in set(self.seen) - current:
            del self.seen[gone]
        return ready

    def run(self) -> int:
        self.recover()
        self.writer = JsonlWriter(self.results, append=True)
        workers = self.args.workers
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        _log(
            f"watch: model {self.inspector.metadata.model_name} ({self.inspector.metadata.variant}, "
            f"{self.inspector.sha256[:12]}), provider "
            f"{self.inspector.provider_summary}, threshold {self.threshold:g}; watching {self.hot} -> {self.out}"
        )
        try:
            while not self.stop.is_set():
                self._retry_stuck()
                ready = self.poll()
                for chunk in _chunks(ready, self.args.batch_size):
                    self._process(chunk, pool)
                    if self.stop.is_set():
                        break
                self.stop.wait(self.args.interval)
        finally:
            self.writer.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        c = self.counts
        _log(f"watch: stopped after {self.batches} batches: OK {c['OK']}, NG {c['NG']}, error {c['error']}")
        return 0

    # -- one batch -------------------------------------------------------------------------
    def _process(self, chunk: list[tuple[str, _Seen]], pool: ThreadPoolExecutor | None) -> None:
        assert self.writer is not None
        paths = [str(self.hot / name) for name, _ in chunk]
        cfg = self.inspector.loader_config
        items = list(pool.map(decode, paths, [cfg] * len(paths))) if pool else [decode(p, cfg) for p in paths]
        results: list[Result] = []
        batcher = Batcher(self.args.batch_size, max_pending=len(items) + 1)
        for (name, obs), item in zip(chunk, items):
            if not self._still_same(name, obs):
                continue  # changed or vanished while we read it: not complete after all
            if item.error is not None:
                kind = item.error.split(":", 1)[0]
                obs.tries += 1
                if kind in RETRY_KINDS and obs.tries < MAX_TRIES:
                    obs.stable = 0
                    continue
                results.append(Result(item, error=item.error, latency_ms=item.decode_ms))
                continue
            for batch in batcher.add(item):
                results += infer(self.inspector, batch, self.threshold, want_cam=bool(self.args.heatmaps))
        for batch in batcher.drain():
            results += infer(self.inspector, batch, self.threshold, want_cam=bool(self.args.heatmaps))
        if not results:
            return
        stats = {name: obs for name, obs in chunk}
        reserved: set[str] = set()
        moves = []
        for r in results:
            name = os.path.basename(r.item.path)
            verdict = r.decision.verdict if r.decision is not None and r.item.size is not None else None
            dest = self._unique_dest(FOLDERS[verdict], name, reserved)
            row = self._row(r, stats[name], dest)
            if verdict == "NG" and self.args.heatmaps and r.cam is not None and r.item.array is not None:
                save_overlay(self.args.heatmaps, r.item.path, r.item.array, r.cam)
            self.writer.add(row)
            moves.append(_Pending(name, dest))
            self.counts[FOLDERS[verdict]] += 1
        self.writer.commit()
        self.batches += 1
        self._maybe_fault("after_commit")
        for i, m in enumerate(moves):
            if i == len(moves) // 2:
                self._maybe_fault("mid_move")
            self._move(m)
            self.seen.pop(m.name, None)
        for sub in {m.dest.split("/", 1)[0] for m in moves}:
            fsync_dir(self.out / sub)
        fsync_dir(self.hot)
        c = self.counts
        _log(
            f"watch: batch {self.batches}: {len(moves)} file(s); totals OK {c['OK']}, NG {c['NG']}, error {c['error']}"
        )

    def _still_same(self, name: str, obs: _Seen) -> bool:
        try:
            st = os.stat(self.hot / name)
        except OSError:
            self.seen.pop(name, None)
            return False
        if (st.st_size, st.st_mtime_ns) != (obs.size, obs.mtime_ns):
            self.seen[name] = _Seen(st.st_size, st.st_mtime_ns, 0, obs.tries)
            return False
        return True

    def _row(self, r: Result, obs: _Seen, dest: str) -> dict[str, Any]:
        insp = self.inspector
        if r.decision is not None and r.item.size is not None:
            row = ok_row(
                r.item.path,
                r.decision,
                r.item.size,
                sha256=insp.sha256,
                provider=insp.provider,
                latency_ms=r.latency_ms,
            )
        else:
            row = error_row(
                r.item.path,
                r.error or "unknown",
                sha256=insp.sha256,
                provider=insp.provider,
                latency_ms=r.latency_ms,
            )
        row.update(
            {
                "moved_to": dest,
                "source_size": obs.size,
                "source_mtime_ns": obs.mtime_ns,
                "time": _dt.datetime.now().astimezone().isoformat(timespec="milliseconds"),
            }
        )
        return row

    def _unique_dest(self, sub: str, name: str, reserved: set[str]) -> str:
        """``sub/name``, or ``sub/stem_N.ext`` when taken: never overwrite an earlier file."""
        stem, ext = os.path.splitext(name)
        candidate, n = name, 0
        while candidate in reserved or (self.out / sub / candidate).exists():
            n += 1
            candidate = f"{stem}_{n}{ext}"
        reserved.add(candidate)
        return f"{sub}/{candidate}"

    # -- moving ----------------------------------------------------------------------------
    def _move(self, m: _Pending) -> None:
        src = self.hot / m.name
        dst = self.out / m.dest
        try:
            if dst.exists():
                if dst.stat().st_size == src.stat().st_size:
                    os.unlink(src)  # a crashed cross-device move had already placed it
                    self.stuck.pop(m.name, None)
                    return
                sub = m.dest.split("/", 1)[0]
                new = self._unique_dest(sub, m.name, set())
                _log(f"watch: {m.dest} is taken by another file; moving {m.name} to {new} instead")
                dst = self.out / new
            _move_no_overwrite(src, dst)
            self.stuck.pop(m.name, None)
        except FileNotFoundError:
            self.stuck.pop(m.name, None)  # someone removed it after we recorded it: nothing to move
        except OSError as exc:
            if m.name not in self.stuck:
                _log(f"watch: cannot move {src} to {dst} ({exc}); will retry")
            self.stuck[m.name] = m

    def _retry_stuck(self) -> None:
        for m in list(self.stuck.values()):
            self._move(m)

    def _maybe_fault(self, point: str) -> None:
        """Test hook: SIGKILL ourselves at a chosen crash point (DEFECTSCOPE_WATCH_FAULT=point:batch)."""
        if self._fault and self._fault == (point, self.batches):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
            time.sleep(10)


def _parse_fault(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, n = spec.partition(":")
    return (point, int(n or 1))


def _move_no_overwrite(src: Path, dst: Path) -> None:
    """Rename within a file system; across file systems copy to a dot-temp, fsync, rename, unlink."""
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(PARTIAL_PREFIX + dst.name)
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, tmp)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    os.unlink(src)


def _rows_for(results: Path, wanted: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Rows whose path is in ``wanted``; decodes only the leading path field of other rows."""
    dec = json.JSONDecoder()
    prefix = '{"path":'
    with open(results, encoding="utf-8") as f:
        for line in f:
            if line.startswith(prefix):
                try:
                    path, _ = dec.raw_decode(line, len(prefix))
                except json.JSONDecodeError:
                    continue
                if path not in wanted:
                    continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("path") in wanted and "moved_to" in row:
                yield row


def _chunks(seq: Sequence[tuple[str, _Seen]], n: int) -> Iterator[list[tuple[str, _Seen]]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        if not stop.is_set():
            _log(f"watch: {signal.Signals(signum).name} received; finishing the batch in flight")
        stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        _check_args(parser, args)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        inspector = Inspector.from_args(args)
        watcher = Watcher(args, inspector)
    except (MetadataError, ModelLoadError, ProviderError, ResultsFileError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _install_signals(watcher.stop)
    return watcher.run()


__all__ = ["Watcher", "build_parser", "is_ignored", "main"]
