"""The hot-folder watcher behind `defectscope watch`: inspect files as they land in a folder.

Polling only (works on network shares and Windows, no inotify dependency).  A file is taken once
it is complete: its (size, mtime) stayed the same over ``--stable-polls`` polls.  Writers should
write under a temporary name (``*.tmp``, ``*.part``, dotfiles are ignored) and rename into place;
a slow writer that pauses mid-file is covered by ``--grace`` (see :mod:`.hotfolder`).  Every file
moved is logged with its verdict, and so is each sub-folder of the hot folder (never descended).

Commit protocol (``OUT/results.jsonl`` is the source of truth), per batch:
  1. decode + infer; choose each file's unique destination ``OUT/{OK,NG,error}/name``;
  2. append the rows (with ``moved_to``) in one write, flush, fsync;
  3. move each file (rename; across file systems: copy to a dot-temp, fsync, rename, unlink).
Crash points, and what a restart does:
  * before 2: no row, file still in HOT -> inspected again (nothing was recorded);
  * torn row in 2: the torn line is truncated -> same as above;
  * between 2 and 3 (or mid-batch in 3): file in HOT that is the one its row judged (the same inode,
    size and mtime; where the ctime changed, or on Windows, the bytes of the row's sha256) -> moved to
    its recorded destination WITHOUT re-inference; a new delivery under the name is inspected; a file whose bytes cannot be read to
    tell waits, neither moved nor inspected (rows of earlier versions: size, mtime and ctime);
  * inside a cross-device move: a dot-temp in OUT is removed; if the destination is already
    complete (same bytes) the source is just unlinked.
A move that fails (full disk) is retried every poll, unless the file's bytes changed since its row:
then it is inspected again as a new file.
So every file gets exactly one row (a file replaced after its row is a new file, with a row of its own)
and ends up in exactly one of OK/NG/error.  SIGTERM/SIGINT
finish the batch in flight (rows + moves).  A failed write of the results (disk full) stops the
watcher with every row before intact; files without a row stay in HOT.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import PARTIAL_PREFIX, fit_name
from .heatmap import save_overlay
from .hotfolder import (
    CTIME_TRACKS_WRITES,
    INCOMPLETE_KINDS,
    Observation,
    Recorded,
    file_status,
    is_dir_entry,
    is_ignored,
    is_recorded_file,
    log,
    move_no_overwrite,
    recorded_rows,
    same_content,
    same_device,
    verdict_text,
)
from .inspector import Inspector
from .options import RunOptions
from .outputs import OutputError
from .pipeline import BatchBuffer, Batcher, Item, Result, decode, infer
from .results import JsonlWriter, RunStamp, check_same_run, fsync_dir, last_row, recover_jsonl, result_row

RESULTS_NAME = "results.jsonl"
FOLDERS = {"OK": "OK", "NG": "NG", None: "error"}
#: test hook: called with (point, batch number) at the crash points "after_commit" and "mid_move"
EventHook = Callable[[str, int], None]


@dataclass(frozen=True)
class WatchConfig:
    """One `watch` command line, checked and typed."""

    run: RunOptions
    hot: str
    out: str
    interval: float = 0.5
    stable_polls: int = 2
    grace: float = 10.0


@dataclass
class _Pending:
    """A file whose row is committed but which still sits in HOT."""

    name: str
    dest: str  # relative to OUT, e.g. "NG/a.png"
    verdict: str = ""  # for the log line, e.g. "NG (scratch, P(defect) 0.912)"
    source: Recorded | None = None  # the file the row judged: another file under its name is not moved
    #: False for a row found at start-up: its move may have run before the crash, and its status is old
    current: bool = True


class Watcher:
    def __init__(self, cfg: WatchConfig, inspector: Inspector, on_event: EventHook | None = None) -> None:
        self.cfg = cfg
        self.inspector = inspector
        self.hot = Path(cfg.hot).resolve()
        self.out = Path(cfg.out).resolve()
        self.heatmaps = cfg.run.heatmaps
        self.stamp = RunStamp.of(inspector.sha256, inspector.provider, inspector.threshold, cfg.run.threshold)
        self.threshold = self.stamp.threshold
        self.stop = threading.Event()
        self.seen: dict[str, Observation] = {}
        self.stuck: dict[str, _Pending] = {}
        self.ignored_dirs: set[str] = set()
        self._list_error: str | None = None
        self.batches = 0
        self.counts = {"OK": 0, "NG": 0, "error": 0}
        self._on_event = on_event
        for sub in FOLDERS.values():
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        if self.heatmaps:
            Path(self.heatmaps).mkdir(parents=True, exist_ok=True)
        self.results = self.out / RESULTS_NAME
        self.writer: JsonlWriter | None = None
        self._buffer = BatchBuffer()  # every batch is normalised into the same memory

    # -- start-up recovery -----------------------------------------------------------------
    def recover(self) -> int:
        """Finish what a crash interrupted; returns how many files were moved without inference."""
        for sub in FOLDERS.values():
            for entry in os.scandir(self.out / sub):
                if entry.name.startswith(PARTIAL_PREFIX):
                    os.unlink(entry.path)
        torn = recover_jsonl(self.results)
        if torn:
            log(f"watch: dropped a torn last line ({torn} bytes) from {self.results}")
        if not self.results.exists():
            return 0
        here = {str(self.hot / n): n for n in self._names()}
        last: dict[str, dict[str, Any]] = {}  # a name's file in HOT is its last row's, if any row's
        for row in recorded_rows(self.results, here):
            last[here[row["path"]]] = row
        moved = 0
        for name, row in last.items():
            source = Recorded.of_row(row)
            if source is not None:
                moved += self._move(_Pending(name, str(row["moved_to"]), source=source, current=False))
        if moved:
            log(f"watch: recovered {moved} file(s) recorded before a crash; moved without re-inference")
        return moved

    # -- polling ---------------------------------------------------------------------------
    def _names(self) -> list[str]:
        try:
            with os.scandir(self.hot) as it:
                entries = [(e.name, is_dir_entry(e)) for e in it if not is_ignored(e.name)]
        except OSError as exc:
            if self._list_error != str(exc):  # once per failure, not once per poll
                log(f"watch: cannot list {self.hot}: {exc}; trying again every poll")
                self._list_error = str(exc)
            return []
        if self._list_error is not None:
            log(f"watch: {self.hot} can be listed again")
            self._list_error = None
        for name in sorted({n for n, is_dir in entries if is_dir} - self.ignored_dirs):
            self.ignored_dirs.add(name)
            log(f"watch: ignoring sub-folder {name}/ of {self.hot} (only files written into it are taken)")
        return sorted(n for n, is_dir in entries if not is_dir)

    def poll(self) -> list[tuple[str, Observation]]:
        """Update observations; return files whose size and mtime held still long enough."""
        ready = []
        current = set()
        for name in self._names():
            if name in self.stuck:
                continue
            st = file_status(self.hot / name)
            if st is None:
                continue
            current.add(name)
            obs = self.seen.get(name)
            if obs is None or not obs.same(st):
                self.seen[name] = Observation.of(st)
                continue
            obs.stable += 1
            if obs.ready(self.cfg.stable_polls):
                ready.append((name, obs))
        for gone in set(self.seen) - current:
            del self.seen[gone]
        return ready

    def run(self) -> int:
        self.recover()
        last = last_row(self.results)
        if last is not None:  # one results file, one model and threshold: refuse to mix
            check_same_run(
                last, self.stamp, f"--out {self.out}: {RESULTS_NAME} (last row)", "use a new --out folder"
            )
        self.writer = JsonlWriter(self.results, append=True)
        workers = self.cfg.run.workers
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        meta = self.inspector.metadata
        log(
            f"watch: model {meta.model_name} ({meta.variant}, {self.inspector.sha256[:12]}), provider "
            f"{self.inspector.provider_summary}, threshold {self.threshold:g} ({self.stamp.threshold_source}); watching {self.hot} -> {self.out}"
        )
        status = 0
        try:
            while not self.stop.is_set():
                self._retry_stuck()
                ready = self.poll()
                for chunk in _chunks(ready, self.cfg.run.batch_size):
                    self._process(chunk, pool)
                    if self.stop.is_set():
                        break
                self.stop.wait(self.cfg.interval)
        except OutputError as exc:
            log(
                f"watch: error: {exc}; stopping. Every row before is intact; unrecorded files stay in {self.hot}"
            )
            status = 1
        finally:
            self.writer.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        c, n = self.counts, self.batches
        log(
            f"watch: stopped after {n} batch{'es' * (n != 1)}: OK {c['OK']}, NG {c['NG']}, error {c['error']}"
        )
        return status

    # -- one batch -------------------------------------------------------------------------
    def _results(self, chunk: list[tuple[str, Observation]], pool: ThreadPoolExecutor | None) -> list[Result]:
        """Decode and infer the chunk; files still being written are held back (``--grace``)."""
        paths = [str(self.hot / name) for name, _ in chunk]
        loader = self.inspector.loader_config
        items = (
            list(pool.map(decode, paths, [loader] * len(paths), [True] * len(paths)))
            if pool
            else [decode(p, loader, True) for p in paths]
        )
        results: list[Result] = []
        batcher = Batcher(self.cfg.run.batch_size, max_pending=len(items) + 1)
        want_cam = bool(self.heatmaps)
        for (name, obs), item in zip(chunk, items):
            if not self._still_same(name, obs, item):
                continue  # changed or vanished while we read it: not complete after all
            if item.error is not None:
                kind = item.error.split(":", 1)[0]
                if kind in INCOMPLETE_KINDS and obs.wait_for_writer(self.cfg.grace):
                    log(
                        f"watch: {name} reads as {kind}; watching it for more writes (--grace {self.cfg.grace:g} s)"
                    )
                    continue
                results.append(Result(item, error=item.error, latency_ms=item.decode_ms))
                continue
            for batch in batcher.add(item):
                results += self._infer(batch, want_cam)
        for batch in batcher.drain():
            results += self._infer(batch, want_cam)
        return results

    def _infer(self, batch: list[Item], want_cam: bool) -> list[Result]:
        return infer(self.inspector, batch, self.threshold, want_cam=want_cam, buffer=self._buffer)

    def _process(self, chunk: list[tuple[str, Observation]], pool: ThreadPoolExecutor | None) -> None:
        assert self.writer is not None
        results = self._results(chunk, pool)
        if not results:
            return
        stats = dict(chunk)
        reserved: set[str] = set()
        moves = []
        for r in results:
            name = os.path.basename(r.item.path)
            verdict = r.decision.verdict if r.decision is not None and r.item.size is not None else None
            dest = self._unique_dest(FOLDERS[verdict], name, reserved)
            record = stats[name].record
            assert record is not None  # set by _still_same for every file with a result
            row = self._row(r, record, dest)
            if verdict == "NG" and self.heatmaps and r.cam is not None and r.item.array is not None:
                # named after where the file goes: a name that comes again (NG/a_1.png) gets its own
                save_overlay(self.heatmaps, str(self.out / dest), r.item.array, r.cam)
            self.writer.add(row)
            moves.append(_Pending(name, dest, verdict_text(row), record))
        self.writer.commit()
        for m in moves:  # counted once recorded
            self.counts[m.dest.split("/", 1)[0]] += 1
        self.batches += 1
        self._event("after_commit")
        for i, m in enumerate(moves):
            if i == len(moves) // 2:
                self._event("mid_move")
            if self._move(m):
                log(f"watch: {m.name} -> {m.dest}: {m.verdict}")
            self.seen.pop(m.name, None)
        for sub in {m.dest.split("/", 1)[0] for m in moves}:
            fsync_dir(self.out / sub)
        fsync_dir(self.hot)
        c = self.counts
        log(
            f"watch: batch {self.batches}: {len(moves)} file(s); totals OK {c['OK']}, NG {c['NG']}, error {c['error']}"
        )

    def _still_same(self, name: str, obs: Observation, item: Item) -> bool:
        """Whether the file is still the one observed and read (else it is observed anew); records it as
        read: the open file's status and the digest of its bytes, not a later ``stat`` of the name."""
        st = file_status(self.hot / name)
        if st is None:
            self.seen.pop(name, None)
            return False
        read = Recorded.of_stat(item.read_stat if item.read_stat is not None else st, item.sha256)
        if not obs.same(st) or (item.read_stat is not None and read != Recorded.of_stat(st, item.sha256)):
            self.seen[name] = Observation.of(st)  # written to, or replaced, since it was read
            return False
        obs.record = read
        return True

    def _row(self, r: Result, record: Recorded, dest: str) -> dict[str, Any]:
        row = result_row(r, self.stamp)
        row.update(
            moved_to=dest,
            **record.to_row(),
            time=_dt.datetime.now().astimezone().isoformat(timespec="milliseconds"),
        )
        return row

    def _unique_dest(self, sub: str, name: str, reserved: set[str]) -> str:
        """``sub/name``, or ``sub/stem_N.ext`` when taken: never overwrite an earlier file."""
        stem, ext = os.path.splitext(name)
        candidate, n = name, 0
        while candidate in reserved or (self.out / sub / candidate).exists():
            n += 1
            candidate = fit_name(stem, f"_{n}{ext}")  # a 255-byte name plus _1 is past the limit
        reserved.add(candidate)
        return f"{sub}/{candidate}"

    # -- moving ----------------------------------------------------------------------------
    def _move(self, m: _Pending) -> bool:
        """Move one recorded file to its destination; ``False`` while it is stuck (retried later) and when
        the file is no longer the one recorded (it is then inspected as a new file)."""
        src = self.hot / m.name
        dst = self.out / m.dest
        try:
            st = file_status(src)  # a dangling or looping link has its own status, as when it was observed
            if st is None:
                raise FileNotFoundError(src)
            same = self._is_recorded(m, st, dst)
            if same is None:  # its bytes decide, and cannot be read now (locked): neither moved nor inspected
                if m.name not in self.stuck:
                    log(f"watch: cannot read {src} to tell whether it is the file its row judged; will retry")
                self.stuck[m.name] = m
                return False
            if not same:
                self.stuck.pop(m.name, None)
                return False
            if dst.exists():
                if same_content(src, dst):
                    os.unlink(src)  # a crashed cross-device move had already placed it
                    self.stuck.pop(m.name, None)
                    return True
                sub = m.dest.split("/", 1)[0]
                new = self._unique_dest(sub, m.name, set())
                log(f"watch: {m.dest} is taken by another file; moving {m.name} to {new} instead")
                dst = self.out / new
            move_no_overwrite(src, dst)
            self.stuck.pop(m.name, None)
            return True
        except FileNotFoundError:
            self.stuck.pop(m.name, None)  # someone removed it after we recorded it: nothing to move
            return False
        except OSError as exc:
            if m.name not in self.stuck:
                log(f"watch: cannot move {src} to {dst} ({exc}); will retry")
            self.stuck[m.name] = m
            return False

    def _is_recorded(self, m: _Pending, st: os.stat_result, dst: Path) -> bool | None:
        """Whether the file in HOT is the one ``m``'s row judged (None: cannot tell now); logs why not."""
        if m.source is None:
            return True
        if not m.current and dst.exists() and same_device(st, dst.parent):
            # a rename within one file system is atomic: the file judged reached its destination before
            # the crash, so this is a new delivery under the name (a resend, the same file linked in again)
            log(
                f"watch: {m.name}: the file its row judged is already at {m.dest}; inspecting it as a new delivery"
            )
            return False
        trust_stat = m.current or CTIME_TRACKS_WRITES  # else (Windows) a restart reads the bytes once
        same = is_recorded_file(m.source, self.hot / m.name, st, trust_stat=trust_stat)
        if same is False:
            log(f"watch: {m.name} was replaced after its row was written; inspecting the new file")
        elif same:  # later retries compare with this status (a chmod is not read again every poll)
            m.source, m.current = Recorded.of_stat(st, m.source.sha256), True
        return same

    def _retry_stuck(self) -> None:
        for m in list(self.stuck.values()):
            if self._move(m):
                log(f"watch: {m.name} -> {m.dest}: {m.verdict or 'recorded before'}")

    def _event(self, point: str) -> None:
        if self._on_event is not None:
            self._on_event(point, self.batches)


def _chunks(seq: Sequence[tuple[str, Observation]], n: int) -> Iterator[list[tuple[str, Observation]]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])
