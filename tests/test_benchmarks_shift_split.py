"""benchmarks/shift_split.py on a real ONNX model: a defect at the border leaves the frame under a shift
and flips the verdict; the same defect in the middle does not; good images never flip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from onnx_models import build_model

REPO = Path(__file__).resolve().parents[1]


def _surface(path: Path, rng: np.random.Generator, defect: str | None) -> None:
    """A dark textured 96x96 surface; the fixture model calls a bright patch NG."""
    a = rng.integers(10, 70, (96, 96), dtype=np.uint8)
    if defect == "centre":
        a[36:60, 36:60] = 250
    elif defect == "left":
        a[16:80, 0:8] = 250  # 8 px wide at the border: a shift of 8 px or more to the left removes it
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)


def test_border_defects_flip_and_centred_ones_hold(tmp_path: Path, cli_env: dict[str, str]) -> None:
    work = tmp_path / "ph"
    build_model(work / "model.onnx")
    rng = np.random.default_rng(0)
    for region in ("left", "centre"):
        for i in range(6):
            _surface(work / f"test-{region}" / "good" / f"g{i}.png", rng, None)
            _surface(work / f"test-{region}" / "crack" / f"c{i}.png", rng, region)
    env = {**cli_env, "PYTHONPATH": str(REPO / "benchmarks")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "shift_split.py"), "--workdir", str(work), "--shifts", "4,16",
         "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "shift_split.json").read_text())
    assert set(result) == {"left@4", "left@16", "centre@4", "centre@16"}
    border, centred = result["left@16"], result["centre@16"]
    assert border["n"] == centred["n"] == 12
    # every border defect is NG as it is and OK in some copy: the shift moved it out of the frame
    assert border["ng_to_ok"] == 0.5  # 6 defects of 12 images
    assert border["defect"]["verdict_flip_rate"] == 1.0
    assert border["good"]["verdict_flip_rate"] == 0.0
    assert centred["all"]["verdict_flip_rate"] == 0.0 and centred["ng_to_ok"] == 0.0
    assert result["centre@4"]["ng_to_ok"] == 0.0
    assert border["type_change_only"] == 0.0  # one NG class: no type to change
