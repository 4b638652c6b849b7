"""One frame, one tensor: a 5 MP camera frame through `defectscope inspect` and through training's dataset,
plus the pipeline pieces inspect is built from (chunked decoding, batch buffers, inference lanes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.runtime import Inspector
from defectscope.runtime.cli import main as inspect_main
from defectscope.runtime.image import LoaderConfig
from defectscope.runtime.pipeline import (
    BatchBuffer,
    Batcher,
    InferenceLanes,
    Item,
    decode_stream,
    model_input,
)
from onnx_models import build_model, make_image
from test_data_datamodule import data_cfg, ready

FRAME = (2448, 2048)  # 5 MP, the camera case of issue 20


def _frame(path: Path, channels: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w, h = FRAME
    shade = np.linspace(60, 190, w, dtype=np.float32)[None, :] + np.zeros((h, 1), np.float32)
    bands = [shade + 15 * c + rng.normal(0, 5, (h, w)).astype(np.float32) for c in range(channels)]
    arr = np.clip(np.stack(bands, axis=2), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if channels == 1 else arr).save(path, quality=90)
    return path


def _dataset(root: Path) -> list[Path]:
    """Small training images, and the 5 MP frames (grey PNG, RGB JPEG) as the validation split."""
    for split in ("train", "test"):
        for cls in ("good", "dent"):
            for i in range(2):
                make_image(root / split / cls / f"{i}.png", 64, 64, bright=cls == "dent", seed=i)
    return [
        _frame(root / "val" / "good" / "grey.png", 1, 0),
        _frame(root / "val" / "dent" / "colour.jpg", 3, 1),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_a_5mp_frame_is_the_same_tensor_through_inspect_and_training(tmp_path: Path, channels: int) -> None:
    from defectscope.export.onnx_export import build_metadata

    frames = _dataset(tmp_path / "data" / "images")
    norm = [f"data.mean=[{','.join(['0.45'] * channels)}]", f"data.std=[{','.join(['0.2'] * channels)}]"]
    dm = ready(
        data_cfg("folder", tmp_path, "data.loader.max_side=512", f"data.loader.channels={channels}", *norm)
    )
    assert dm.loader_config.downscale == "fast"  # the training default: JPEG DCT scaling, box reduce
    # what training writes into the checkpoint, then export into the model, then the runtime reads back
    info = {
        "loader": dm.loader_config.to_dict(),
        "class_names": ["good", "crack", "scratch"],
        "good_class": "good",
        "threshold": 0.5,
        "mean": dm.mean,
        "std": dm.std,
        "model_name": "fixture_cnn",
    }
    model = build_model(
        tmp_path / "m.onnx", metadata=build_metadata(info, torch.nn.Identity(), cam=True, fp16=False)
    )
    inspector = Inspector(model, provider="cpu")
    assert inspector.loader_config == dm.loader_config

    val = dm.datasets["val"]
    trained = {p: val[i]["image"].numpy()[None] for i, p in enumerate(val.paths)}
    assert sorted(trained) == sorted(str(f) for f in frames)
    items = list(decode_stream(val.paths, inspector.loader_config, workers=2, window=4))
    for item in items:
        assert item.error is None and item.size == FRAME
        x = model_input([item], inspector.metadata, BatchBuffer())
        assert x.shape == (1, channels, 416, 512)
        np.testing.assert_array_equal(x, trained[item.path])  # bit for bit

    out = tmp_path / "rows.jsonl"
    assert inspect_main([str(model), *val.paths, "-o", str(out), "--provider", "cpu"]) == 0
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    for path, tensor in trained.items():
        probs = inspector.predict(tensor, cam=False)["probs"][0]
        assert (rows[path]["width"], rows[path]["height"]) == FRAME
        assert [rows[path]["probs"][c] for c in inspector.class_names] == [float(v) for v in probs]


def test_decoding_keeps_input_order_and_error_rows(tmp_path: Path) -> None:
    paths = [str(make_image(tmp_path / f"{i}.png", 40 + i, 40, bright=False, seed=i)) for i in range(7)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths.insert(3, str(bad))
    cfg = LoaderConfig(channels=1, min_size=8)
    for workers in (0, 1, 3):
        items = list(decode_stream(iter(paths), cfg, workers=workers, window=4))
        assert [it.path for it in items] == paths
        assert [it.error is not None for it in items] == [p == str(bad) for p in paths]
        assert [it.array.shape[1] for it in items if it.array is not None] == list(range(40, 47))


def test_batch_buffer_is_reused_until_a_batch_needs_more() -> None:
    buf = BatchBuffer()
    a = buf.get((4, 1, 8, 8))
    b = buf.get((2, 3, 4, 4))
    assert a.shape == (4, 1, 8, 8) and b.shape == (2, 3, 4, 4) and np.shares_memory(a, b)
    c = buf.get((8, 1, 8, 8))
    assert not np.shares_memory(a, c) and np.shares_memory(c, buf.get((1, 1, 2, 2)))


def test_inference_lanes_give_the_results_of_one_lane_in_order(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    inspector = Inspector(model, provider="cpu", threads=1)
    cfg = inspector.loader_config
    paths = [
        str(make_image(tmp_path / f"{i}.png", 48 + 16 * (i % 3), 64, bright=i % 2 == 0, seed=i))
        for i in range(20)
    ]
    runs = []
    for lanes in (1, 2, 3):
        batcher, done = Batcher(batch_size=2, max_pending=4), []
        with InferenceLanes(inspector, 0.5, want_cam=True, lanes=lanes) as runner:
            for item in decode_stream(paths, cfg, workers=2, window=6):
                for batch in batcher.add(item):
                    done += runner.submit(batch)
            for batch in batcher.drain():
                done += runner.submit(batch)
            done += runner.drain()
        results = [r for batch in done for r in batch]
        assert sorted(r.item.path for r in results) == sorted(paths)
        runs.append([(r.item.path, r.decision, None if r.cam is None else r.cam.tobytes()) for r in results])
    assert runs[0] == runs[1] == runs[2]  # same batches, same order, same bits
    assert {d.verdict for _, d, _ in runs[0] if d is not None} == {"OK", "NG"}
    singles = [[Item(p, np.zeros((40, 40, 1), np.uint8))] for p in paths[:5]]
    with InferenceLanes(inspector, 0.5, want_cam=False, lanes=2) as runner:
        out = [r for batch in singles for done in runner.submit(batch) for r in done] + [
            r for done in runner.drain() for r in done
        ]
    assert [r.item.path for r in out] == paths[:5]  # submission order, whatever lane finished first
