"""benchmarks/elpv_cam_scores.py: per-position P(defect) from the exported heat map, and the scores read
from it, on hand-made maps and through the runtime on real ELPV cells."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from onnx_models import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "elpv_cam_scores.py"
GRADES = ["p0", "p33", "p67", "p100"]


@pytest.fixture(scope="module")
def cam_scores() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("elpv_cam_scores", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_a_uniform_map_scores_the_same_everywhere_and_a_spot_peaks(cam_scores: ModuleType) -> None:
    ng = [2, 3]
    bias = np.array([1.0, 0.0, -0.5, 0.2])
    flat = np.zeros((1, 4, 4, 5))
    flat[0, 3] = 0.7  # p100 evidence spread evenly: every position is the whole cell
    spot = np.zeros((1, 4, 4, 5))
    spot[0, 3, 1, 2] = 20.0  # the same total evidence on one of 20 positions
    for cam in (flat, spot):
        logits = cam.mean(axis=(2, 3)) + bias  # how the model's logits relate to its heat map
        probs = _softmax(logits)
        s = cam_scores.local_scores(probs, logits, cam, ng)
        assert np.isclose(s["gap"][0], probs[0, ng].sum())
        per_position = cam_scores.position_defect(logits, cam, ng)
        assert per_position.shape == (1, 20)
        if cam is flat:
            assert np.allclose(per_position, probs[0, ng].sum())
            assert all(np.isclose(s[k][0], s["gap"][0]) for k in ("peak", "top5", "top20"))
    by_hand = _softmax(np.array([1.0, 0.0, -0.5, 20.2]))[2:].sum()  # the spot's own position
    elsewhere = _softmax(bias)[2:].sum()  # the 19 positions without the spot
    assert np.isclose(s["peak"][0], by_hand) and s["peak"][0] > s["gap"][0]
    assert np.isclose(s["top20"][0], (by_hand + 3 * elsewhere) / 4)  # the highest 4 of 20 positions
    assert np.isclose(s["top5"][0], by_hand)  # the highest 5 % of 20 positions is that one position


def test_cli_scores_real_cells_through_the_runtime(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx", class_names=GRADES, good_class="p0", max_side=64, model_name="m")
    out = tmp_path / "scores.json"
    cmd = [sys.executable, str(SCRIPT), str(model), "--limit", "40", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["cells"] == 40 and sorted(doc["operating_points"]) == ["gap", "peak", "top20", "top5"]
    for point in doc["operating_points"].values():
        assert (
            0.95 <= point["recall_95"]["recall"] <= 1 and 0 <= point["recall_95"]["false_reject_rate_p0"] <= 1
        )
    binary = build_model(
        tmp_path / "b.onnx", class_names=["functional", "defective"], good_class="functional"
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(binary)], capture_output=True, text=True, timeout=120
    )
    assert (
        done.returncode != 0
        and "expected a 4-class ELPV model" in done.stderr
        and "Traceback" not in done.stderr
    )
