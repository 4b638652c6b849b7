"""`defectscope watch` latency: from a frame's final rename into the hot folder to its durable row.

A producer writes each frame under a dot-temp name and renames it into the hot folder at a fixed
rate, as camera software should; a monitor thread polls every millisecond. "visible" is when the
frame's row can be read from ``OUT/results.jsonl`` (written and flushed); "durable" is when the frame
has left the hot folder: watch moves a file only after its row was fsync'd, so this is an upper
bound on the time to a durable row. The budget is the issue's: twice the single-image work (read,
decode, resize, normalise and the model at batch 1, each on one thread) of the same frames.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: low-latency options for writers that rename into place: poll every 5 ms, take a file once its
#: (size, mtime) held over one poll. The defaults (0.5 s, 2 polls) wait 1-1.5 s by design.
LOW_LATENCY_ARGS = ("--interval", "0.005", "--stable-polls", "1")


class _Monitor(threading.Thread):
    """Polls the results file and the hot folder; records when each frame's row appears and moves."""

    def __init__(self, results: Path, hot: Path) -> None:
        super().__init__(daemon=True)
        self.results, self.hot = results, hot
        self.visible: dict[str, float] = {}
        self.durable: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        pos, tail = 0, b""
        while not self.stop.is_set():
            now = time.perf_counter()
            try:
                size = os.stat(self.results).st_size
            except FileNotFoundError:
                size = 0
            if size > pos:
                with open(self.results, "rb") as f:
                    f.seek(pos)
                    chunk = f.read(size - pos)
                pos += len(chunk)
                *lines, tail = (tail + chunk).split(b"\n")
                for line in lines:
                    self.visible.setdefault(os.path.basename(json.loads(line)["path"]), now)
            for name in [n for n in self.visible if n not in self.durable]:
                if not (self.hot / name).exists():
                    self.durable[name] = now
            time.sleep(0.001)


def _wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"defectscope watch exited early: {log.read_text(errors='replace')[-500:]}")
        if "watching" in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError("defectscope watch did not start in time")


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p90_ms": round(float(np.percentile(a, 90)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def measure_watch(
    model: Path,
    frames: Sequence[Path],
    workdir: Path,
    *,
    fps: float,
    count: int,
    extra: Sequence[str] = LOW_LATENCY_ARGS,
) -> dict[str, Any]:
    """Run `defectscope watch` on a fresh hot folder, feed ``count`` frames at ``fps``, time each row."""
    base = workdir / "watch"
    shutil.rmtree(base, ignore_errors=True)
    hot, out = base / "hot", base / "out"
    hot.mkdir(parents=True)
    cmd = [sys.executable, "-m", "defectscope", "watch", str(model), "--in", str(hot), "--out", str(out)]
    cmd += ["--provider", "cpu", *extra]
    blobs = [Path(f).read_bytes() for f in frames]
    ext = Path(frames[0]).suffix
    renamed: dict[str, float] = {}
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_ready(Path(log.name), proc)
            monitor = _Monitor(out / "results.jsonl", hot)
            monitor.start()
            start = time.perf_counter() + 0.2
            for i in range(count):
                time.sleep(max(0.0, start + i / fps - time.perf_counter()))
                name = f"frame_{i:05d}{ext}"
                tmp = hot / f".{name}.tmp"
                tmp.write_bytes(blobs[i % len(blobs)])
                os.rename(tmp, hot / name)
                renamed[name] = time.perf_counter()
            end = time.monotonic() + 60
            while len(monitor.durable) < count and time.monotonic() < end and proc.poll() is None:
                time.sleep(0.01)
            monitor.stop.set()
            monitor.join()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    missing = [n for n in renamed if n not in monitor.durable]
    if missing:
        raise RuntimeError(
            f"watch left {len(missing)} of {count} frames without a durable row, e.g. {missing[0]}"
        )
    return {
        "frames": count,
        "fps": fps,
        "options": " ".join(extra),
        "visible": _percentiles([monitor.visible[n] - t for n, t in renamed.items()]),
        "durable": _percentiles([monitor.durable[n] - t for n, t in renamed.items()]),
    }


def watch_row(
    workdir: Path, kind: str, frames: int, size: tuple[int, int], seed: int, *, fps: float, count: int
) -> dict[str, Any]:
    """Latency on camera frames of ``kind`` with the small model under the ``fast`` policy (the
    training default), against twice the single-image work of the same frames."""
    from bench_cases import camera_frames, small_model, stage_costs

    paths = camera_frames(workdir, kind, frames, size)
    model = small_model(workdir, 1 if kind.startswith("grey") else 3, "fast", seed)
    stages = stage_costs(paths, model, batch_size=1)
    single = (
        sum(stages["ms"][k] for k in ("read", "decode", "resize")) + stages["model_and_normalise_batch1_ms"]
    )
    row = measure_watch(model, paths, workdir, fps=fps, count=count)
    p99 = row["durable"]["p99_ms"]
    return {
        "kind": kind,
        "model": model.name,
        "decoded_size": stages["decoded_size"],
        "single_image_ms": round(single, 2),
        "budget_ms": round(2 * single, 1),
        **row,
        "p99_over_budget": round(p99 / (2 * single), 3),
    }
