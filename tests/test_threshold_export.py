"""The shipped threshold is earned by the shipped graph (issue 15, part 2), through the real CLI.

Each exported file's threshold is recomputed here independently: ONNX Runtime on the written file,
the runtime loader on the labelled images, mid-gap below the k-th largest defect score for the recall target.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from defectscope.runtime.image import load_image, normalize_batch
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata
from trust_files import cli, genuine_checkpoint, write_images

pytestmark = pytest.mark.slow  # each test exports a model (a few seconds each on 2 cores)


def _meta(path: Path) -> ModelMetadata:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_json(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])


def _independent_threshold(
    model: Path, paths: list[str], defect: list[bool], recall: float
) -> tuple[float, float]:
    """(threshold, false-reject rate) computed from scratch on the written file."""
    meta = _meta(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores = []
    for p in paths:
        x = normalize_batch([load_image(p, meta.loader)], meta.mean, meta.std)
        probs = sess.run(["probs"], {"input": x})[0][0]
        scores.append(float(sum(probs[i] for i in meta.ng_indices)))
    s, d = np.array(scores), np.array(defect)
    k = math.ceil(recall * d.sum() - 1e-9)
    top = float(np.sort(s[d])[::-1][k - 1])  # the k-th best defect score, then mid-gap below it
    below = s[~d][s[~d] < top]
    t = (top + float(below.max())) / 2 if below.size else top
    return t, float((s[~d] >= t).mean())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("thr")
    images = write_images(root / "images", per_class=12)
    path = root / "model.ckpt"
    ckpt = genuine_checkpoint(path, images)
    paths = sorted(str(p) for p in images.rglob("*.png"))
    labels = [Path(p).parent.name for p in paths]
    ckpt["defectscope"].update(
        val_paths=paths, val_labels=labels, target_recall=0.9, threshold=0.5, warn_false_reject_rate=0.0
    )
    torch.save(ckpt, path)
    return {"root": root, "path": path, "paths": paths, "defect": [c == "crack" for c in labels]}


@pytest.mark.parametrize(
    "variant", [[], ["--int8", "--min-agreement", "0"], ["--tta", "flips"]], ids=["fp32", "int8", "flips"]
)
def test_export_chooses_the_threshold_on_the_graph_it_writes(
    ckpt: dict[str, Any], variant: list[str], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "m.onnx"
    proc = cli(["export", str(ckpt["path"]), "-o", str(out), *variant], tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = _meta(out)
    source = meta.threshold_source
    want, frr = _independent_threshold(out, ckpt["paths"], ckpt["defect"], 0.9)
    assert source["method"] == "recall target" and source["target_recall"] == 0.9
    assert meta.threshold == pytest.approx(want, abs=1e-6) == source["threshold"]
    assert source["false_reject_rate"] == pytest.approx(frr) and source["n_defect"] == 12 == source["n_good"]
    assert source["variant"] == meta.variant and source["training_threshold"] == 0.5
    assert source["images"] == "the checkpoint's 24 validation images"
    assert f"threshold: threshold {want:.4g} for recall >= 90.0 %" in proc.stdout
    assert (source["too_costly"] is True) == (frr > 0.0)  # warn_false_reject_rate 0: any false reject warns
    if frr > 0.0:
        assert "WARNING: the recall target 90.0 % costs a false-reject rate of" in proc.stdout
        assert "target recall  threshold   recall  false-reject rate" in proc.stdout


def test_by_hand_labelled_csv_and_missing_labels(
    ckpt: dict[str, Any], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    hand = tmp_path / "hand.onnx"
    proc = cli(["export", str(ckpt["path"]), "-o", str(hand), "--threshold", "0.3"], tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _meta(hand).threshold == 0.3 and _meta(hand).threshold_source["method"] == "set by hand"
    assert "set by hand (--threshold)" in proc.stdout

    listing = tmp_path / "labels.csv"
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows((p, Path(p).parent.name) for p in ckpt["paths"][::2])
    via_csv = tmp_path / "csv.onnx"
    proc = cli(
        ["export", str(ckpt["path"]), "-o", str(via_csv), "--images", str(listing), "--target-recall", "1.0"],
        tmp_path,
        cli_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _meta(via_csv).parity["real_images"] == 12  # the CSV's 12 images, not random inputs only
    source = _meta(via_csv).threshold_source
    want, _ = _independent_threshold(via_csv, ckpt["paths"][::2], ckpt["defect"][::2], 1.0)
    assert source["images"] == str(listing) and source["target_recall"] == 1.0
    assert (
        source["threshold"] == pytest.approx(want, abs=1e-6) and source["n_defect"] + source["n_good"] == 12
    )

    old = tmp_path / "old.ckpt"
    doc = torch.load(ckpt["path"], weights_only=True)
    doc["defectscope"].pop("val_labels")  # a checkpoint written before val_labels existed
    torch.save(doc, old)
    proc = cli(["export", str(old), "-o", str(tmp_path / "x.onnx")], tmp_path, cli_env)
    assert proc.returncode == 2 and not (tmp_path / "x.onnx").exists()
    assert "records no labelled validation images" in proc.stderr and "--threshold T" in proc.stderr


def test_the_html_report_says_where_the_threshold_came_from(
    ckpt: dict[str, Any], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "m.onnx"
    assert cli(["export", str(ckpt["path"]), "-o", str(out)], tmp_path, cli_env).returncode == 0
    source = _meta(out).threshold_source
    report = tmp_path / "r.html"
    proc = cli(
        ["inspect", str(out), str(ckpt["root"] / "images"), "--recursive", "-o", str(tmp_path / "r.jsonl"),
         "--report", str(report)],
        tmp_path, cli_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert "chosen on this fp32 graph for defect recall ≥ 90.0 %" in text  # the model's threshold row
    assert f"of {source['n_defect']} defect images" in text
    assert ('id="tradeoff"' in text) == bool(source["too_costly"])
    assert json.loads(json.dumps(source))  # plain, JSON-able provenance
