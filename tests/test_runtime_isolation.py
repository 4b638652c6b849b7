"""The line runtime must work where the training stack is absent (no torch on a line PC).

torch, lightning, pytorch_lightning, hydra and mlflow are made unimportable (tests/blocked_imports.py);
the runtime is imported AND `defectscope inspect` is run in that interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blocked_imports import blocking_env
from onnx_models import build_model, make_image

BLOCKED = ("torch", "lightning", "pytorch_lightning", "hydra", "mlflow")

CHECK = """
import sys
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("blocker not active")
import defectscope.runtime, defectscope.runtime.inspector, defectscope.runtime.cli
import defectscope.runtime.watch, defectscope.runtime.report, defectscope.runtime.heatmap
from defectscope.runtime.inspector import Inspector
insp = Inspector(sys.argv[1], provider="cpu")
loaded = {m.split(".")[0] for m in sys.modules}
bad = sorted(loaded & {"torch", "lightning", "pytorch_lightning", "hydra", "mlflow", "cv2", "tqdm", "onnx"})
print("BAD", bad)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return blocking_env(tmp_path, BLOCKED)


def test_runtime_imports_and_inspects_without_training_stack(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    imgs = tmp_path / "imgs"
    for i in range(4):
        make_image(imgs / f"{i}.png", 64, 64, bright=i % 2 == 1, seed=i)
    env = _env(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", CHECK, str(model)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout, r.stdout

    out = tmp_path / "r.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectscope",
            "inspect",
            str(model),
            str(imgs),
            "-o",
            str(out),
            "--report",
            str(tmp_path / "r.html"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {row["verdict"] for row in rows} == {"OK", "NG"}


def test_blocker_really_blocks(tmp_path: Path) -> None:
    """Guard against a vacuous pass: under the blocker, importing torch must fail."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed here, nothing to block")
    r = subprocess.run(
        [sys.executable, "-c", "import torch"], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "blocked by test" in r.stderr


def test_missing_onnxruntime_is_a_clear_exit_2(tmp_path: Path) -> None:
    """The base install (numpy + Pillow only) must say which extra to install, not crash."""
    model = build_model(tmp_path / "m.onnx")
    make_image(tmp_path / "a.png", 64, 64, bright=False)
    env = blocking_env(tmp_path, (*BLOCKED, "onnxruntime"), keep_path=False)
    cmd = [
        sys.executable,
        "-m",
        "defectscope",
        "inspect",
        str(model),
        str(tmp_path / "a.png"),
        "-o",
        str(tmp_path / "r.jsonl"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "onnxruntime is not installed" in r.stderr and "pip install onnxruntime" in r.stderr
    assert "Traceback" not in r.stderr
