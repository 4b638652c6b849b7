"""`defectscope export --int8`: a trained model calibrated on real images, gated against fp32, run by
the line runner; plus the gate and its refusals (the plumbing that needs no model: test_int8_inputs.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from defectscope.export.cli import main
from defectscope.export.parity import real_batches
from defectscope.export.quantize import (
    Int8Config,
    Int8GateError,
    check_int8,
    cpu_has_vnni,
    early_convs,
    quantize_qdq,
    split_paths,
)
from defectscope.runtime.inspector import Inspector
from defectscope.runtime.metadata import ModelMetadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, smoke_data_dir: Path) -> dict[str, Any]:
    """`defectscope train experiment=smoke` (a real trained model) and its fp32 export."""
    root = tmp_path_factory.mktemp("int8")
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "train", "experiment=smoke", f"paths.data_dir={smoke_data_dir}",
         f"hydra.run.dir={root / 'run'}", "logger=none"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = root / "run" / "checkpoints" / "best.ckpt"
    fp32 = root / "fp32.onnx"
    assert main([str(ckpt), "-o", str(fp32), "--parity-images", "4"]) == 0
    images = sorted((smoke_data_dir / "synthetic-smoke").rglob("*.png"))
    return {"root": root, "ckpt": ckpt, "fp32": fp32, "images": images}


def _qdq_ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _float_convs(model: onnx.ModelProto) -> list[str]:
    """Convolutions whose weights are a float tensor, not a dequantised int8 one."""
    made_by = {out: n.op_type for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return [n.name for n in convs if made_by.get(n.input[1]) != "DequantizeLinear"]


@pytest.mark.slow
def test_int8_export_is_gated_self_describing_and_runs_in_the_line_runner(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "line" / "model-int8.onnx"
    capsys.readouterr()
    rc = main([str(trained["ckpt"]), "-o", str(out), "--int8", "--parity-images", "4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "int8 gate" in text and "top1_agreement" in text and " int8" in text

    proto = onnx.load(str(out))
    ops = _qdq_ops(proto)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    # a 2-convolution network: by default every convolution but the CAM head is int8 (none kept fp32)
    cam = [n.name for n in proto.graph.node if "cam" in n.output]
    assert len(cam) == 1 and _float_convs(proto) == cam
    insp = Inspector(out, provider="cpu", threads=1)
    ref = Inspector(trained["fp32"], provider="cpu", threads=1)
    meta = insp.metadata
    q = meta.quantization
    assert meta.int8 and not meta.fp16 and not ref.metadata.int8
    # the checkpoint's validation images: some calibrate, the others (disjoint) gate
    assert q["calib_images"] >= 1 and q["check_images"] >= 1
    assert q["min_agreement"] == 0.95 and q["calibration"] == "minmax" and q["check_images"] >= 10
    assert q["fp32_ng_images"] >= 1 and "ng_agreement" in q and q["weights"] == "int8 per channel"
    assert q["fp32_convs"] == 0 and q["fp32_conv_nodes"] == 0
    assert meta.parity["graph"] == "fp32, before int8 quantisation"
    # everything else the runner needs is the fp32 export's; the threshold is earned by each graph
    for key in ("class_names", "good_class", "mean", "std", "channels", "checkpoint_sha256"):
        assert getattr(meta, key) == getattr(ref.metadata, key), key
    assert meta.threshold == q["int8_threshold"] and ref.metadata.threshold == q["fp32_threshold"]
    assert (
        "int8" in meta.threshold_source["variant"] and "int8" not in ref.metadata.threshold_source["variant"]
    )

    # the runner's own loader and session, on every size bucket: int8 decides like fp32
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for p in trained["images"][:120]:
        img = insp.load(p)[0]
        groups.setdefault(img.shape, []).append(img)
    assert len(groups) >= 2
    same = total = 0
    for imgs in groups.values():
        batch = insp.preprocess(imgs[:16])
        got, want = insp.predict(batch), ref.predict(batch)
        assert got["cam"].shape == want["cam"].shape
        assert np.isfinite(got["probs"]).all() and np.allclose(got["probs"].sum(1), 1, atol=1e-5)
        assert float(np.abs(got["probs"] - want["probs"]).max()) < 0.1
        same += int((got["probs"].argmax(1) == want["probs"].argmax(1)).sum())
        total += len(batch)
    assert same / total >= 0.9, (same, total)


@pytest.mark.slow
def test_int8_through_defectscope_inspect(trained: dict[str, Any], tmp_path: Path) -> None:
    """An int8 model is just a model to `defectscope inspect`: one row per image, verdicts written."""
    model = tmp_path / "int8.onnx"
    argv = [str(trained["ckpt"]), "-o", str(model), "--int8", "--parity-images", "0", "--fp32-convs", "1"]
    assert main(argv) == 0
    proto = onnx.load(str(model))  # --fp32-convs 1: the first convolution and the CAM head stay fp32
    first = early_convs(onnx.load(str(trained["fp32"])).graph, 1)
    assert len(first) == 1 and _float_convs(proto) == first + [
        n.name for n in proto.graph.node if "cam" in n.output
    ]
    quantization = Inspector(model, provider="cpu", threads=1).metadata.quantization
    assert quantization["fp32_convs"] == 1 and quantization["fp32_conv_nodes"] == 1
    folder = tmp_path / "in"
    folder.mkdir()
    for p in trained["images"][:10]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "res.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope", "inspect", str(model), str(folder), "-o", str(out),
         "--threads", "1", "--report", str(tmp_path / "report.html")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in trained["images"][:10])
    assert all(r["verdict"] in ("OK", "NG") for r in rows)
    assert (tmp_path / "report.html").stat().st_size > 0


def test_gate_rejects_a_badly_calibrated_model(trained: dict[str, Any]) -> None:
    """Calibrated on black frames, every activation range collapses: the gate must refuse it."""
    fp32 = trained["fp32"].read_bytes()
    insp = Inspector(trained["fp32"], provider="cpu", threads=1)
    meta = insp.metadata
    spread = [str(p) for p in trained["images"][::8]]  # sorted by class folder: every 8th covers all
    assert len({Path(p).parent.name for p in spread}) == 4
    batches, n, _ = real_batches(spread, meta.loader, meta.mean, meta.std, len(spread))
    black = [np.full_like(b[:4], -float(meta.mean[0]) / float(meta.std[0])) for b in batches]

    def gate(quantized: bytes, min_agreement: float) -> dict[str, Any]:
        """Both graphs at the fp32 model's threshold, on the same held-back batches."""
        thresholds = (meta.threshold, meta.threshold)
        return check_int8(
            fp32,
            quantized,
            batches,
            ng_indices=meta.ng_indices,
            thresholds=thresholds,
            min_agreement=min_agreement,
        )

    bad = quantize_qdq(fp32, black, Int8Config())
    with pytest.raises(Int8GateError, match=f"int8 gate failed on {n} held-back images") as err:
        gate(bad, 0.95)
    figures = err.value.numbers
    assert figures["check_images"] == n == len(spread)
    assert min(v for k, v in figures.items() if k.endswith("_agreement") and k != "min_agreement") < 0.95
    # the same model calibrated on real frames passes the same gate
    good = quantize_qdq(fp32, batches[::2], Int8Config())
    numbers = gate(good, 0.9)
    assert numbers["top1_agreement"] >= 0.9 and numbers["max_abs_prob"] < figures["max_abs_prob"]


def test_gate_failure_exits_1_names_the_figures_and_writes_nothing(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list whose calibration share is black frames (the split is seeded, so the test knows which
    entries calibrate) and whose check share is real images: the CLI must refuse the model."""
    from PIL import Image

    cfg = Int8Config(calib_images=24, check_images=16)
    names = [str(tmp_path / "imgs" / f"{i:03d}.png") for i in range(40)]
    calib, check = split_paths(names, cfg)
    (tmp_path / "imgs").mkdir()
    real = trained["images"][::4]
    for i, name in enumerate(check):
        Path(name).write_bytes(real[i].read_bytes())
    for name in calib:
        Image.new("L", (64, 64), 0).save(name)
    listing = tmp_path / "images.txt"
    gone = [str(tmp_path / "gone" / f"{i}.png") for i in range(3)]
    listing.write_text("\n".join(names + gone) + "\n")
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    rc = main([str(trained["ckpt"]), "-o", str(out), "--int8", "--images", str(listing),
               "--calib-images", "24", "--check-images", "16", "--parity-images", "0"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert "3 of 43 images in --images" in cap.out and gone[0] in cap.out
    assert "int8 gate failed on 16 held-back images" in cap.err and "top1_agreement" in cap.err
    assert "fp32_convs: 0" in cap.err  # what was kept fp32 is among the figures of a refusal too
    assert "kept the first 0 convolution(s) fp32; more may pass" in cap.err and "--fp32-convs 3" in cap.err
    # a 2-convolution network's default (none fp32) is tried alone: more would leave little to quantise
    assert "the gate failed with the first" not in cap.out and "fp32_convs_tried" not in cap.err
    assert f"nothing was written to {out}" in cap.err and not out.exists()
    # on a CPU without VNNI (8-bit products saturate) the error says what to try; with VNNI it does not
    assert ("try --reduce-range" in cap.err) == (cpu_has_vnni() is False)
    # the error names exactly the figures below the gate (which ones depends on the trained model); 95 %
    # recall of 23 validation defects allows a miss, so no hint about a one-image threshold
    figures = dict(
        re.findall(r"^\s+(top1_agreement|verdict_agreement|ng_agreement): ([\d.]+)$", cap.err, re.M)
    )
    below = [
        k
        for k in ("top1_agreement", "verdict_agreement", "ng_agreement")
        if float(figures[k]) < cfg.min_agreement
    ]
    assert below and f"failed: {below}" in cap.err and "allows no miss" not in cap.err, cap.err


def test_gate_hint_when_one_image_sets_the_compared_thresholds() -> None:
    """ELPV's case: 92 validation defect images, 99 % recall needs all of them, so one image sets each
    graph's threshold; the hint appears only when verdicts are what failed."""
    from defectscope.evaluation.threshold import threshold_report
    from defectscope.export.int8_step import gate_hints

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.2, 1.0, 92), rng.uniform(0.0, 0.5, 200)])
    defect = np.arange(scores.size) < 92

    def earned(target: float) -> dict[str, Any]:
        report = threshold_report(scores, defect, target, 0.1)
        assert report is not None
        return {"threshold": report["threshold"], "threshold_source": {"method": "recall target", **report}}

    cfg = Int8Config(reduce_range=True)  # no VNNI hint, whatever this CPU is
    flipped = {
        "verdict_agreement": 0.9375,
        "ng_agreement": 0.92,
        "failed": ["verdict_agreement", "ng_agreement"],
    }
    (hint,) = gate_hints(cfg, earned(0.99), flipped)
    assert "recall 99.0 % of 92 defect images allows no miss" in hint
    assert gate_hints(cfg, earned(0.99), {"ng_agreement": 0.92, "failed": ["ng_agreement"]}) == [hint]
    assert gate_hints(cfg, earned(0.95), flipped) == []  # room for 4 misses: not one image's threshold
    assert gate_hints(cfg, earned(0.99), {"top1_agreement": 0.5, "failed": ["top1_agreement"]}) == []
    by_hand = {"threshold": 0.5, "threshold_source": {"method": "set by hand", "threshold": 0.5}}
    assert gate_hints(cfg, by_hand, flipped) == []
    # with how many convolutions stayed fp32 among the figures, a failed gate also suggests keeping more
    *_, more = gate_hints(cfg, earned(0.99), {**flipped, "fp32_convs": 2}, 5)
    assert "kept the first 2 convolution(s) fp32" in more and "--fp32-convs 5" in more
    assert gate_hints(cfg, by_hand, {"fp32_convs": 2, "failed": []}, 5) == []  # nothing failed
    assert gate_hints(cfg, by_hand, {**flipped, "fp32_convs": 2}, None) == []  # no convolution left to keep


def test_int8_bad_requests_exit_2_and_write_nothing(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    ckpt = str(trained["ckpt"])
    few = tmp_path / "few.txt"
    few.write_text("".join(f"{p}\n" for p in trained["images"][:5]))
    cases = [
        ([ckpt, "-o", str(out), "--int8", "--fp16"], "--fp16 and --int8 exclude each other"),
        ([ckpt, "-o", str(out), "--int8", "--calibration", "mean"], "--calibration: invalid choice"),
        (
            [ckpt, "-o", str(out), "--int8", "--min-agreement", "2"],
            "--min-agreement: expected a number in [0, 1]",
        ),
        (
            [ckpt, "-o", str(out), "--int8", "--fp32-convs", "-1"],
            "--fp32-convs: expected a whole number >= 0",
        ),
        (
            [ckpt, "-o", str(out), "--int8", "--calib-images", "0"],
            "--calib-images: expected a whole number >= 1",
        ),
        (
            [ckpt, "-o", str(out), "--int8", "--check-images", "5"],
            "--check-images: the int8 gate needs >= 10",
        ),
        ([ckpt, "-o", str(out), "--int8", "--images", str(few)], "int8 needs >= 11 readable images"),
        ([ckpt, "-o", str(out), "--int8", "--images", str(trained["images"][0])], "not one image"),
    ]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert message in err, (argv, err)
        if "--images" in argv and argv[-1] == str(few):
            assert f"got 5 in --images {few}; add line images to it" in err
    assert not out.exists()


@pytest.mark.slow
def test_int8_mlflow_registration_is_tagged_with_the_gate_figures(
    trained: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        # with flips in the graph: the int8 gate compares against the fp32 graph with the same flips
        rc = main([str(trained["ckpt"]), "-o", str(tmp_path / "m8.onnx"), "--int8", "--mlflow",
                   "--parity-images", "0", "--tta", "hflip"])  # fmt: skip
        text = capsys.readouterr().out
        assert rc == 0, text
        client = MlflowClient(uri)
        version = client.get_model_version("defectscope-gapcnn", "1")
        assert version.tags["defectscope.int8"] == "true" and version.tags["defectscope.fp16"] == "false"
        assert version.tags["defectscope.tta"] == "hflip" and "int8, test-time hflip (2 views)" in text
        metrics = client.get_run(version.run_id).data.metrics
        stored = ModelMetadata.from_json(version.tags["defectscope.defectscope_json"]).quantization
        assert metrics["export/int8_top1_agreement"] == stored["top1_agreement"]
        assert metrics["export/int8_check_images"] == stored["check_images"] >= 10
        loaded = mlflow.onnx.load_model(f"models:/defectscope-gapcnn/{version.version}")
        assert _qdq_ops(loaded)["QuantizeLinear"] > 0
    finally:
        mlflow.set_tracking_uri(before)


@pytest.mark.slow
def test_int8_layers_benchmark_compares_and_times_each_choice(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """benchmarks/int8_layers.py: one row per --fp32-convs value, agreement with fp32 on held-back images
    of the export's own split, and a speed for every graph."""
    images = tmp_path / "images.txt"
    images.write_text("".join(f"{p}\n" for p in trained["images"][::4]), encoding="utf-8")
    out = tmp_path / "layers.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_layers.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(trained["fp32"]), "--images", str(images), "--fp32-convs", "0,1",
         "--rounds", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    _, check = split_paths([str(p) for p in trained["images"][::4]], Int8Config())
    assert result["check_images"] == len(check) and result["reduce_range"] is False
    rows = result["rows"]
    assert list(rows) == ["int8, first 0 fp32", "int8, first 1 fp32", "fp32"]
    first = early_convs(onnx.load(str(trained["fp32"])).graph, 1)
    assert (
        rows["int8, first 0 fp32"]["fp32_convs"] == [] and rows["int8, first 1 fp32"]["fp32_convs"] == first
    )
    for name, row in rows.items():
        assert row["images_per_s"] > 0, name
        if name != "fp32":
            assert 0.5 <= row["top1_agreement"] <= 1 and 0 <= row["mean_abs_p_ng"] <= row["max_abs_p_ng"] <= 1
