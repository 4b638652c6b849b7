"""Test helper: `defectscope watch` as a real subprocess, files dropped like producers drop them, and the
exactly-once check of what came out."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from defectscope.runtime.hotfolder import is_ignored

FOLDERS = ("OK", "NG", "error")
CRASH_SCRIPT = Path(__file__).with_name("watch_crash.py")


def png_bytes(i: int, bright: bool) -> bytes:
    rng = np.random.default_rng(i)
    side = (48, 64, 80)[i % 3]
    arr = rng.integers(10, 70, (side, side), dtype=np.uint8)
    if bright:
        arr[side // 4 : side // 2, side // 4 : side // 2] = 250
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    return buf.getvalue()


class Dropper:
    """Writes files into the hot folder like real producers do, and remembers what it wrote."""

    def __init__(self, hot: Path) -> None:
        self.hot = hot
        self.written: dict[str, str] = {}  # name -> sha1 of the final content
        self.kinds: dict[str, str] = {}

    def _record(self, name: str, data: bytes, kind: str) -> None:
        self.written[name] = hashlib.sha1(data).hexdigest()
        self.kinds[name] = kind

    def atomic(self, name: str, data: bytes, kind: str = "image") -> None:
        tmp = self.hot / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.hot / name)
        self._record(name, data, kind)

    def direct(self, name: str, data: bytes, kind: str = "image") -> None:
        (self.hot / name).write_bytes(data)
        self._record(name, data, kind)

    def slow(self, name: str, data: bytes, chunks: int = 6, pause: float = 0.01) -> None:
        step = max(1, len(data) // chunks)
        with open(self.hot / name, "wb") as f:
            for start in range(0, len(data), step):
                f.write(data[start : start + step])
                f.flush()
                time.sleep(pause)
        self._record(name, data, "slow")


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_watcher_outlives_its_test() -> Iterator[None]:
    """A test that fails while its watcher runs left the process behind (found running an hour later)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def start_watch(
    model: Path, hot: Path, out: Path, log: Path, extra: tuple[str, ...] = (), crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    """`defectscope watch` as a subprocess; ``crash_at="after_commit:1"`` kills it there (watch_crash.py)."""
    prog = ["-m", "defectscope", "watch"] if crash_at is None else [str(CRASH_SCRIPT), crash_at]
    cmd = [sys.executable, *prog, str(model), "--in", str(hot), "--out", str(out)]
    cmd += ["--interval", "0.1", "--stable-polls", "4", "--grace", "1", "--batch-size", "8", "--workers", "2"]
    cmd += extra
    with open(log, "ab") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    _STARTED.append(proc)
    return proc


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_rows(out: Path) -> list[dict[str, Any]]:
    p = out / "results.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.endswith("}")]


def hot_names(hot: Path) -> list[str]:
    return sorted(n for n in os.listdir(hot) if not is_ignored(n))


def check_exactly_once(hot: Path, out: Path, dropper: Dropper) -> list[dict[str, Any]]:
    rows = read_rows(out)
    per_name = Counter(Path(r["path"]).name for r in rows)
    assert per_name == Counter(dropper.written.keys()), "every dropped file needs exactly one row"
    placed: dict[str, list[str]] = {}
    for sub in FOLDERS:
        for name in os.listdir(out / sub):
            assert not name.startswith(".defectscope-partial-")
            placed.setdefault(name, []).append(sub)
    assert sorted(placed) == sorted(r["moved_to"].split("/", 1)[1] for r in rows)
    assert all(len(v) == 1 for v in placed.values())
    for r in rows:
        sub, name = r["moved_to"].split("/", 1)
        expected = {"OK": "OK", "NG": "NG"}.get(r["verdict"], "error")
        assert sub == expected, r
        original = Path(r["path"]).name
        assert hashlib.sha1((out / sub / name).read_bytes()).hexdigest() == dropper.written[original]
    assert hot_names(hot) == []
    return rows
