"""Shift consistency: the protocol on models whose answer is known, and the training test stage.

The protocol (defectscope.shift_consistency) is numpy-only; here it runs over plain callables, over a
real ONNX Runtime session, and inside `train` / `evaluate`, whose figures land in a real MLflow store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectscope.shift_consistency import ShiftProtocol, ShiftRecord, measure, summarise, translate


def _blob_images(n: int = 6, side: int = 64) -> np.ndarray:
    """Flat grey images with one bright 5x5 blob near the centre column (+- 3 px)."""
    x = np.zeros((n, 1, side, side), dtype=np.float32)
    for i in range(n):
        r, c = 20 + 4 * i, side // 2 - 3 + i % 7
        x[i, 0, r : r + 5, c : c + 5] = 1.0
    return x


def _probs(defect: np.ndarray) -> np.ndarray:
    """Two classes (good, defect) from a per-image defect score in [0, 1]."""
    p = np.clip(defect, 0.0, 1.0)
    return np.stack([1.0 - p, p], axis=1)


def brightness_anywhere(batch: np.ndarray) -> np.ndarray:
    """Position-independent: 'defect' when the brightest pixel is bright, wherever it is."""
    return _probs(0.2 + 0.6 * (batch.max(axis=(1, 2, 3)) > 0.5))


def brightness_left_half(batch: np.ndarray) -> np.ndarray:
    """Built to depend on position: only the left half of the image counts."""
    w = batch.shape[3]
    return _probs(0.2 + 0.6 * (batch[:, :, :, : w // 2].max(axis=(1, 2, 3)) > 0.5))


def _first(record: ShiftRecord, n: int) -> ShiftRecord:
    return ShiftRecord(
        record.top1[:n], record.p_defect[:n], record.top1_copies[:n], record.p_defect_copies[:n]
    )


def test_translate_moves_content_and_keeps_the_size() -> None:
    x = np.arange(1, 2 * 1 * 6 * 7 + 1, dtype=np.float32).reshape(2, 1, 6, 7)
    for dy, dx in [(2, 3), (-1, 2), (0, -3), (3, -2)]:
        for padding in ("reflect", "replicate", "zeros"):
            y = translate(x, dy, dx, padding)
            assert y.shape == x.shape and y.flags.c_contiguous
            rows = slice(max(dy, 0), 6 + min(dy, 0))
            cols = slice(max(dx, 0), 7 + min(dx, 0))
            src = x[:, :, max(-dy, 0) : 6 - max(dy, 0), max(-dx, 0) : 7 - max(dx, 0)]
            assert np.array_equal(y[:, :, rows, cols], src)
    assert translate(x, 0, 2, "zeros")[0, 0, 0, :2].tolist() == [0.0, 0.0]
    assert translate(x, 0, 2, "replicate")[0, 0, 0, :2].tolist() == [1.0, 1.0]
    assert translate(x, 0, 2, "reflect")[0, 0, 0, :2].tolist() == [3.0, 2.0]


def test_offsets_are_distinct_nonzero_bounded_and_fixed_by_the_seed() -> None:
    proto = ShiftProtocol(copies=12, max_shift=4, seed=3)
    offsets = proto.offsets()
    assert len(set(offsets)) == 12 and (0, 0) not in offsets
    assert all(abs(dy) <= 4 and abs(dx) <= 4 for dy, dx in offsets)
    assert offsets == ShiftProtocol(copies=12, max_shift=4, seed=3).offsets()
    assert offsets != ShiftProtocol(copies=12, max_shift=4, seed=4).offsets()
    with pytest.raises(ValueError, match="only 8 distinct offsets"):
        ShiftProtocol(copies=9, max_shift=1)
    with pytest.raises(ValueError, match="padding must be one of reflect, replicate, zeros"):
        ShiftProtocol(padding="wrap")
    with pytest.raises(ValueError, match="copies must be an integer >= 1"):
        ShiftProtocol(copies=0)
    from defectscope.training.config import TrainingConfigError, shift_protocol

    assert shift_protocol({"copies": 0}) is None  # the config's 0 is off, so its message says so (attack)
    with pytest.raises(TrainingConfigError, match=r"copies must be an integer >= 0 \(0: off\), got -1"):
        shift_protocol({"copies": -1})


def test_a_position_independent_model_is_fully_consistent() -> None:
    proto = ShiftProtocol(copies=8, max_shift=12)
    record = measure(brightness_anywhere, _blob_images(), ng_indices=[1], protocol=proto)
    assert record.p_defect_copies.shape == (6, 8)
    figures = summarise(record, threshold=0.5)
    assert figures == {
        "top1_consistency": 1.0,
        "pair_consistency": 1.0,
        "dp_mean": 0.0,
        "dp_max": 0.0,
        "verdict_flip_rate": 0.0,
    }


def test_a_model_built_to_depend_on_position_is_not() -> None:
    proto = ShiftProtocol(copies=8, max_shift=12)
    record = measure(brightness_left_half, _blob_images(), ng_indices=[1], protocol=proto)
    figures = summarise(record, threshold=0.5)
    # the blob straddles the centre line: moving it a few px left or right changes the answer
    crossed = (record.top1_copies != record.top1[:, None]).sum()
    assert 0 < crossed < record.top1_copies.size
    assert figures["top1_consistency"] < 1.0 and figures["verdict_flip_rate"] > 0.0
    assert figures["pair_consistency"] == pytest.approx(1.0 - crossed / record.top1_copies.size)
    assert figures["dp_max"] == pytest.approx(0.6) and 0.0 < figures["dp_mean"] < 0.6
    # the verdict counts flips at the given threshold only: above both levels, nothing flips
    assert summarise(record, threshold=0.9)["verdict_flip_rate"] == 0.0
    both = ShiftRecord.concat([record, record])
    assert summarise(both, 0.5) == figures and summarise(_first(record, 0), 0.5) == {}


def test_the_same_function_runs_an_onnx_runtime_session(tmp_path: Path) -> None:
    """A GAP CNN exported to ONNX through the product's exporter, measured with its session as the callable."""
    import torch

    from defectscope.export.onnx_export import export_model
    from defectscope.models import create_model
    from defectscope.runtime.inspector import Inspector
    from test_export_support import checkpoint_info, randomize

    torch.manual_seed(0)
    model: Any = randomize(create_model("resnet", num_classes=3, in_chans=1, widths=[4, 8], depths=[1, 1]), 1)
    info = checkpoint_info("resnet", model.model_kwargs)
    export_model(model, info, tmp_path / "m.onnx", parity_images=0, threshold=0.5, log=lambda _s: None)
    insp = Inspector(tmp_path / "m.onnx", provider="cpu", threads=1)
    x = np.random.default_rng(2).standard_normal((3, 1, 48, 56)).astype(np.float32)
    proto = ShiftProtocol(copies=4, max_shift=insp.metadata.total_stride)
    via_ort = measure(lambda b: insp.predict(b, cam=False)["probs"], x, insp.metadata.ng_indices, proto)
    with torch.no_grad():
        via_torch = measure(
            lambda b: model(torch.from_numpy(b)).softmax(1).numpy(), x, insp.metadata.ng_indices, proto
        )
    assert np.array_equal(via_ort.top1_copies, via_torch.top1_copies)
    assert np.abs(via_ort.p_defect_copies - via_torch.p_defect_copies).max() < 1e-4


@pytest.mark.slow
def test_training_test_stage_logs_shift_figures_and_evaluate_reproduces_them(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from defectscope.training.evaluate import evaluate
    from defectscope.training.train import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"paths.data_dir={smoke_data_dir}", "trainer.enable_progress_bar=false"]
    cfg = compose_train(
        ["experiment=smoke", *common, f"paths.output_dir={tmp_path / 'run'}", f"paths.launch_dir={tmp_path}",
         f"logger.tracking_uri={uri}", "trainer.max_epochs=1", "model.blur=2", "model.padding_mode=reflect",
         "shift_consistency.copies=3"]
    )  # fmt: skip
    metrics = train(cfg)
    keys = {f"test/shift/{k}" for k in ("top1_consistency", "pair_consistency", "dp_mean", "dp_max")}
    keys.add("test/shift/verdict_flip_rate")
    assert keys <= set(metrics)
    assert 0.0 <= metrics["test/shift/dp_mean"] <= metrics["test/shift/dp_max"] <= 1.0
    assert metrics["test/shift/top1_consistency"] <= metrics["test/shift/pair_consistency"]
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("defectscope-smoke").experiment_id]
    )
    assert {k: run.data.metrics[k] for k in keys} == pytest.approx({k: metrics[k] for k in keys})

    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ev_cfg = compose_train(
        [f"ckpt_path={ckpt}", *common, f"paths.output_dir={tmp_path / 'ev'}", f"paths.launch_dir={tmp_path}",
         "shift_consistency.copies=3"],
        config_name="evaluate",
    )  # fmt: skip
    assert {k: v for k, v in evaluate(ev_cfg).items() if k in keys} == pytest.approx(
        {k: metrics[k] for k in keys}, abs=1e-6
    )
    off = compose_train(
        [f"ckpt_path={ckpt}", *common, f"paths.output_dir={tmp_path / 'ev0'}", f"paths.launch_dir={tmp_path}",
         "shift_consistency.copies=0"],
        config_name="evaluate",
    )  # fmt: skip
    assert not keys & set(evaluate(off))
