"""kill -9 at several moments, then --resume: exactly one row per input (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from onnx_models import build_model, make_image

N_IMAGES = 300


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _start(model: Path, listing: Path, out: Path, resume: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "defectscope", "inspect", str(model), f"@{listing}", "-o", str(out)]
    cmd += ["--batch-size", "4", "--workers", "2"] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_at_three_points_then_resume_gives_exactly_one_row_per_input(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    imgs = tmp_path / "imgs"
    paths = []
    for i in range(N_IMAGES):
        side = (48, 64, 96, 128)[i % 4]
        paths.append(
            str(make_image(imgs / f"{i:04d}.png", side, side + 16 * (i % 3), bright=i % 5 == 0, seed=i))
        )
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths.append(str(imgs / "broken.png"))
    inputs = paths + paths[:20]  # some inputs listed twice: each listing needs its own row
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(inputs) + "\n")
    out = tmp_path / "r.jsonl"

    kills = []
    for i, at_least in enumerate((1, 120, 250)):
        proc = _start(model, listing, out, resume=i > 0)
        deadline = time.monotonic() + 60
        while _count_lines(out) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, "the run finished before the kill point; the test would prove nothing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        kills.append(_count_lines(out))
    assert kills[-1] < len(inputs)

    proc = _start(model, listing, out, resume=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err.decode()  # the broken file is an error row, everything else ok
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["path"] for r in rows) == Counter(inputs)
    assert sum(r["status"] == "error" for r in rows) == 1
    print(f"rows present at the three SIGKILLs: {kills}; final rows {len(rows)} for {len(inputs)} inputs")


@pytest.mark.slow
def test_sigterm_ends_the_run_as_ctrl_c_does_and_resume_finishes(tmp_path: Path) -> None:
    """SIGTERM (kill, a service stopping) killed inspect silently; now it writes the pending rows, says how
    many this session wrote (those are in the file), exits 130, and --resume gives one row per input."""
    model = build_model(tmp_path / "m.onnx")
    inputs = [
        str(make_image(tmp_path / "imgs" / f"{i:04d}.png", 96, 96, bright=i % 5 == 0, seed=i))
        for i in range(N_IMAGES)
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(inputs) + "\n")
    out = tmp_path / "r.jsonl"
    proc = _start(model, listing, out, resume=False)
    deadline = time.monotonic() + 60
    while _count_lines(out) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, "the run finished before the signal; the test would prove nothing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    written = _count_lines(out)
    assert proc.returncode == 130 and written < len(inputs), err.decode()
    assert (
        f"interrupted after {written} rows this session; rerun the same command with --resume" in err.decode()
    )
    proc = _start(model, listing, out, resume=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert Counter(json.loads(line)["path"] for line in out.read_text().splitlines()) == Counter(inputs)
