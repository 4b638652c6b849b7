"""ONNX export end to end on a small real CNN: graph, dynamic shapes, metadata, parity gate,
atomic write, fp16, and independent consumers (onnx reference evaluator, OpenCV DNN)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from defectscope.export.onnx_export import ExportError, ExportResult, export_model
from defectscope.export.parity import ParityError, ParityInputs, check_parity, random_batches
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.metadata import METADATA_KEY, ModelMetadata
from defectscope.synth import generate
from test_export_support import TinyNet, checkpoint_info, randomize

pytestmark = pytest.mark.slow  # every test here shares a multi-second export fixture

SHA = "ab" * 32


def session(path_or_bytes: Path | bytes) -> Any:
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def reference(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    t = torch.from_numpy(x)
    logits = model(t)
    return {"logits": logits.numpy(), "probs": logits.softmax(1).numpy(), "cam": model.cam(t).numpy()}


def litter(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("export")
    data = generate(root / "data", 6, seed=1, channels=1, size_range=(40, 90))
    val = sorted(str(p) for p in data.rglob("*.png"))
    model = randomize(TinyNet(loose_bn=True), seed=5)
    info = checkpoint_info(
        "tinynet",
        {"num_classes": 3, "in_chans": 1},
        val_paths=[*val, str(root / "gone.png")],
        mlflow_run_id="r1",
    )
    log: list[str] = []
    result = export_model(model, info, root / "model.onnx", checkpoint_sha256=SHA, log=log.append)
    return {"root": root, "model": model, "info": info, "result": result, "log": log}


def test_graph_is_valid_bn_free_and_named(setup: dict[str, Any]) -> None:
    result: ExportResult = setup["result"]
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert {"Mul", "Add"} <= ops  # the unfoldable BN, exported as a per-channel affine map
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,) = proto.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1] == 1 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3]))
    assert [o.name for o in proto.graph.output] == ["logits", "probs", "cam"]
    assert result.size_bytes == result.path.stat().st_size
    assert any("folded 5 BatchNorm" in line for line in setup["log"])


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (4, 1, 45, 77), (1, 1, 96, 64), (4, 1, 64, 40)])
def test_dynamic_shapes_match_pytorch(setup: dict[str, Any], shape: tuple[int, ...]) -> None:
    sess = session(setup["result"].path)
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    got = dict(zip(["logits", "probs", "cam"], sess.run(None, {"input": x})))
    want = reference(setup["model"], x)
    n, _, h, w = shape
    assert got["cam"].shape == (n, 3, -(-h // 4), -(-w // 4))
    for k in want:
        assert got[k].shape == want[k].shape
        scale = max(1.0, float(np.abs(want[k]).max()))
        assert float(np.abs(got[k] - want[k]).max()) <= 1e-5 * scale, k
    assert np.allclose(got["probs"].sum(1), 1.0, atol=1e-6)


def test_metadata_round_trips_through_the_ort_session(setup: dict[str, Any]) -> None:
    result: ExportResult = setup["result"]
    info = setup["info"]
    meta_json = session(result.path).get_modelmeta().custom_metadata_map[METADATA_KEY]
    meta = ModelMetadata.from_json(meta_json, source=str(result.path))
    assert meta == result.metadata
    assert meta.class_names == info["class_names"] and meta.good_class == "good"
    source = meta.threshold_source  # chosen again on this graph, over the labelled val images that exist
    assert source["method"] == "recall target" and meta.threshold == source["threshold"]
    assert source["n_defect"] + source["n_good"] == 6 and source["variant"] == "fp32"
    assert meta.channels == 1 and meta.mean == [0.5] and meta.std == [0.25]
    # the checkpoint's loader, fields it predates (downscale) at their defaults
    assert meta.loader == LoaderConfig(**info["loader"]) and meta.loader.downscale == "exact"
    assert meta.model_name == "tinynet" and meta.total_stride == 4
    assert meta.outputs == ["logits", "probs", "cam"] and meta.fp16 is False
    assert meta.mlflow_run_id == "r1" and meta.checkpoint_sha256 == SHA
    p = meta.parity
    assert p["real_images"] == 6  # the seventh val path does not exist: skipped, and said so
    assert any("gone.png" in line and "skipped" in line for line in setup["log"])
    assert len(p["random_shapes"]) == 6 and {s[0] for s in p["random_shapes"]} == {1, 4}
    assert len({tuple(s[2:]) for s in p["random_shapes"]}) == 3
    assert any(s[2] != s[3] for s in p["random_shapes"])
    for ref in ("fused", "unfused"):
        assert 0 <= p[f"max_abs_prob_{ref}"] <= 1e-4
        assert p[f"max_abs_logit_{ref}"] >= 0 and p[f"max_rel_cam_{ref}"] <= 1e-4


def _perturb_one_conv_weight(proto: onnx.ModelProto) -> None:
    for i, init in enumerate(proto.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.ndim == 4 and arr.dtype == np.float32:
            arr = arr.copy()
            arr.flat[0] += 0.5
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
            return
    raise AssertionError("no conv weight initializer found")


def test_parity_gate_rejects_a_tampered_graph_and_writes_nothing(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    with pytest.raises(ParityError, match="max_abs_prob") as err:
        export_model(
            setup["model"],
            setup["info"],
            out,
            parity_images=0,
            tamper=_perturb_one_conv_weight,
            log=lambda _s: None,
        )
    numbers = err.value.numbers
    assert numbers["max_abs_prob_fused"] > 1e-4 and numbers["max_abs_prob_unfused"] > 1e-4
    assert out.read_bytes() == b"previous model"
    assert litter(tmp_path) == []

    # the same gate, called directly on a perturbed copy of the good file
    proto = onnx.load(str(setup["result"].path))
    _perturb_one_conv_weight(proto)
    inputs = ParityInputs(batches=random_batches(1, 16))
    with pytest.raises(ParityError):
        check_parity(proto.SerializeToString(), {"unfused": setup["model"]}, inputs)
    good = check_parity(setup["result"].path.read_bytes(), {"unfused": setup["model"]}, inputs)
    assert good["max_abs_prob_unfused"] <= 1e-4


def test_failed_write_leaves_old_file_and_no_litter(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import defectscope.export.atomic as atomic

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    old, fresh = tmp_path / "old.onnx", tmp_path / "fresh.onnx"
    old.write_bytes(b"previous model")
    for out in (old, fresh):
        with pytest.raises(OSError, match="simulated"):
            export_model(setup["model"], setup["info"], out, parity_images=0, log=lambda _s: None)
    assert old.read_bytes() == b"previous model"
    assert not fresh.exists()
    assert litter(tmp_path) == []


def test_no_cam_and_fp16(setup: dict[str, Any], tmp_path: Path) -> None:
    model = setup["model"]
    res = export_model(model, setup["info"], tmp_path / "h.onnx", cam=False, fp16=True, log=lambda _s: None)
    proto = onnx.load(str(res.path))
    assert [o.name for o in proto.graph.output] == ["logits", "probs"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert res.size_bytes < setup["result"].size_bytes
    meta = ModelMetadata.from_json(session(res.path).get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.fp16 is True and meta.outputs == ["logits", "probs"]
    assert meta.parity["prob_tolerance"] == 2e-2 and meta.parity["real_images"] == 6
    x = np.random.default_rng(7).standard_normal((4, 1, 48, 80)).astype(np.float32)
    _logits, probs = session(res.path).run(None, {"input": x})
    assert probs.dtype == np.float32 and probs.shape == (4, 3)
    assert float(np.abs(probs - reference(model, x)["probs"]).max()) <= 2e-2


def test_reference_evaluator_and_opencv_agree_with_ort(setup: dict[str, Any]) -> None:
    """Two consumers that share no code with ONNX Runtime read the same graph the same way."""
    import cv2
    from onnx.reference import ReferenceEvaluator

    path: Path = setup["result"].path
    sess = session(path)
    ref_eval = ReferenceEvaluator(onnx.load(str(path)))
    net = cv2.dnn.readNetFromONNX(str(path))  # OpenCV 5 handles the dynamic N/H/W dims
    for shape in [(1, 1, 32, 40), (2, 1, 48, 33)]:
        x = np.random.default_rng(shape[3]).standard_normal(shape).astype(np.float32)
        want = dict(zip(["logits", "probs", "cam"], sess.run(None, {"input": x})))
        got_ref = dict(zip(["logits", "probs", "cam"], ref_eval.run(None, {"input": x})))
        net.setInput(x, "input")
        got_cv = dict(zip(["logits", "probs", "cam"], net.forward(["logits", "probs", "cam"])))
        for got in (got_ref, got_cv):
            assert got["probs"].shape == want["probs"].shape
            assert float(np.abs(got["probs"] - want["probs"]).max()) <= 1e-5
            assert got["cam"].shape == want["cam"].shape
            assert float(np.abs(got["cam"] - want["cam"]).max()) <= 1e-4 * max(
                1.0, float(np.abs(want["cam"]).max())
            )


def test_bad_requests_fail_before_any_work(setup: dict[str, Any], tmp_path: Path) -> None:
    model, info = setup["model"], setup["info"]
    quiet: dict[str, Any] = {"log": lambda _s: None, "parity_images": 0}
    with pytest.raises(ExportError, match="opset >= 18"):
        export_model(model, info, tmp_path / "a.onnx", opset=17, **quiet)
    with pytest.raises(ExportError, match="is a directory"):
        export_model(model, info, tmp_path, **quiet)
    with pytest.raises(ExportError, match=r"in_chans=1.*channels=3"):
        three = dict(info, loader=dict(info["loader"], channels=3), mean=[0.5] * 3, std=[0.2] * 3)
        export_model(model, three, tmp_path / "b.onnx", **quiet)
    with pytest.raises(ExportError, match="good_class"):
        export_model(model, dict(info, good_class="ok"), tmp_path / "c.onnx", **quiet)
    with pytest.raises(ExportError, match="--images"):
        export_model(model, info, tmp_path / "d.onnx", images_dir=tmp_path / "nope", log=lambda _s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_write_mode_is_what_a_plain_write_gives(tmp_path: Path) -> None:
    """mkstemp's 0600 must not leak: a line-PC service user has to read the exported model."""
    from defectscope.export.atomic import atomic_write_bytes

    old_umask = os.umask(0o022)
    try:
        fresh = atomic_write_bytes(tmp_path / "fresh.onnx", b"model")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.onnx"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write_bytes(kept, b"new")
        assert kept.read_bytes() == b"new" and kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_umask)
