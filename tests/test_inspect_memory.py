"""Memory stays flat in the number of inputs: 10x more inputs, (almost) the same peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_models import build_model, make_image


def peak_rss_mib(cmd: list[str]) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, cmd
    return usage.ru_maxrss / 1024  # KiB on Linux


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs wait4 (POSIX)")
def test_peak_rss_does_not_grow_with_inputs(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    paths = [
        str(make_image(tmp_path / "i" / f"{i}.png", 64, 48 + 16 * (i % 3), bright=i % 2 == 0, seed=i))
        for i in range(100)
    ]
    rss = {}
    for repeat in (3, 30):  # 300 vs 3,000 inputs
        listing = tmp_path / f"l{repeat}.txt"
        listing.write_text("\n".join(paths * repeat) + "\n")
        out = tmp_path / f"r{repeat}.jsonl"
        cmd = [sys.executable, "-m", "defectscope", "inspect", str(model), f"@{listing}", "-o", str(out)]
        cmd += ["--csv", str(tmp_path / f"r{repeat}.csv"), "--report", str(tmp_path / f"r{repeat}.html")]
        rss[repeat] = peak_rss_mib(cmd)
        assert out.read_text().count("\n") == 100 * repeat
    assert rss[30] - rss[3] < 12, rss
