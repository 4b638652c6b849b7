"""deploy/gpu_check.sh: runs here on the CPU provider, and its comparisons work on real runs.

The GPU checks themselves (TensorRT/CUDA starts, cache reuse, a second process) need an NVIDIA
PC; what can be shown here is that the script runs end to end, prints one verdict line per check,
and that the pieces those checks stand on measure what they claim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from defectscope.runtime.inspector import file_sha256
from onnx_models import build_model, make_image

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CHECKS = (
    "providers",
    "start-cpu",
    "parity",
    "cache-reuse",
    "cache-invalidate",
    "second-process",
    "throughput",
)


def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", DEPLOY / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_script_runs_on_the_cpu_with_one_verdict_line_per_check(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(DEPLOY / "gpu_check.sh"), str(model), "--providers", "cpu"]
    done = subprocess.run(
        [*cmd, "--workdir", str(tmp_path / "work"), "--seconds", "0.2", "--n-images", "4", "--batch", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [re.split(r"\s+", line)[1] for line in lines[:-1]] == list(CHECKS)
    assert all(re.match(r"(PASS|WARN|FAIL|SKIP) ", line) for line in lines[:-1])
    assert re.match(r"PASS  start-cpu +cpu \((\d+) of \1 (nodes|kernels)\); start ", lines[1])
    assert re.search(r"cpu \d+ images/s", lines[-2])
    assert lines[-1].startswith("gpu_check: 2 PASS, 0 WARN, 0 FAIL, 5 SKIP")
    assert (tmp_path / "work" / "gpu_check.json").is_file()


def test_comparisons_see_a_different_model_under_the_same_name(tmp_path: Path) -> None:
    gc = gpu_check()
    model = build_model(tmp_path / "line3.onnx")
    images = [str(make_image(tmp_path / f"i{k}.png", 96, 64, bright=k % 2 == 0, seed=k)) for k in range(6)]
    args = argparse.Namespace(images_file=tmp_path / "images.json", trt_max_side=None)
    args.images_file.write_text(json.dumps(images))
    first, again = (gc.run(model, "cpu", tmp_path / "trt", args) for _ in range(2))
    assert "error" not in first and re.fullmatch(r"cpu \((\d+) of \1 (nodes|kernels)\)", first["summary"])
    assert gc.compare(first, again) == (0.0, 0)
    other, reweighted = gc.other_model(model, tmp_path / "work")
    assert reweighted and other.name == model.name and file_sha256(other) != file_sha256(model)
    moved = gc.run(other, "cpu", tmp_path / "trt", args)
    diff, flips = gc.compare(first, moved)
    assert diff > 0.05  # an engine serving the old model would be caught by this comparison
    assert flips == sum(a != b for a, b in zip(first["verdicts"], moved["verdicts"]))
    broken = gc.run(tmp_path / "missing.onnx", "cpu", tmp_path / "trt", args)
    assert "model file not found" in broken["error"]
