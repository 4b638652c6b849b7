"""Inspector: metadata validation, provider choice, prediction and batch invariance (real ORT)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from defectscope.runtime.files import file_sha256
from defectscope.runtime.image import ImageLoadError
from defectscope.runtime.inspector import (
    Inspector,
    MetadataError,
    ModelLoadError,
    ProviderError,
)
from defectscope.runtime.providers import CUDA_SIZES_NOTE_AT, NewSizeWatch, candidates, physical_cores
from onnx_models import build_model, fixture_metadata, make_image, metadata_without


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


@pytest.fixture(scope="module")
def inspector(model: Path) -> Inspector:
    return Inspector(model, provider="cpu", threads=1)


def test_loads_metadata_provider_and_hash(model: Path, inspector: Inspector) -> None:
    assert inspector.provider == "cpu"
    assert inspector.providers[0] == "CPUExecutionProvider"
    assert inspector.metadata.class_names == ["good", "crack", "scratch"]
    assert inspector.threshold == 0.5 and inspector.has_cam
    assert inspector.sha256 == file_sha256(model) and len(inspector.sha256) == 64
    assert inspector.loader_config.channels == 1


def test_auto_uses_cpu_here_and_threads_default_to_physical_cores(model: Path) -> None:
    insp = Inspector(model)
    assert insp.provider == "cpu"
    assert insp.threads == physical_cores() >= 1
    assert Inspector(model, threads=3).threads == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"omit_metadata": True}, "not a model exported by `defectscope export`"),
        ({"raw_metadata": '{"format": "acme.model", "format_version": 1}'}, "expected 'defectscope.model'"),
        ({"raw_metadata": "{not json"}, "not valid JSON"),
        ({"raw_metadata": metadata_without("format_version")}, "format_version None is not supported"),
        ({"raw_metadata": metadata_without("threshold", "mean")}, "lacks required keys: mean, threshold"),
        ({"raw_metadata": metadata_without("good_class")}, "lacks required keys: good_class"),
    ],
)
def test_foreign_or_older_models_are_refused_clearly(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = build_model(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(MetadataError) as exc:
        Inspector(path, provider="cpu")
    assert message in str(exc.value)
    assert "bad.onnx" in str(exc.value) or "defectscope export" in str(exc.value)


def test_missing_or_broken_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        Inspector(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(
        ModelLoadError, match=r"junk\.onnx is damaged \(cut off\?\)"
    ):  # model_checks, before ORT
        Inspector(junk)


def test_graph_contract_is_checked(tmp_path: Path) -> None:
    # metadata says 3 channels but the graph's input has 1
    meta = fixture_metadata(channels=1)
    path = build_model(tmp_path / "m.onnx", metadata=meta)
    doc = fixture_metadata(channels=3).to_json()
    wrong = build_model(tmp_path / "wrong.onnx", raw_metadata=doc)
    assert Inspector(path, provider="cpu").metadata.channels == 1
    with pytest.raises(ModelLoadError, match="1 channels but metadata says 3"):
        Inspector(wrong, provider="cpu")


def test_forcing_an_unavailable_provider_names_what_is_available(model: Path) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    with pytest.raises(ProviderError) as exc:
        Inspector(model, provider="cuda")
    text = str(exc.value)
    assert "'cuda' is not available" in text and "cpu" in text and "onnxruntime-gpu" in text
    with pytest.raises(ProviderError, match="'tensorrt' is not available"):
        Inspector(model, provider="tensorrt")
    with pytest.raises(ProviderError, match="unknown provider"):
        candidates("vulkan", ["CPUExecutionProvider"])


def test_auto_falls_back_with_one_line_when_gpu_sessions_fail(
    model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Pretend this ORT build offers TensorRT and CUDA: real sessions are attempted, do not activate
    # them (the CPU wheel lacks them), and auto must fall back to CPU with exactly one line.
    lines: list[str] = []
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    insp = Inspector(model, available=avail, log=lines.append)
    assert insp.provider == "cpu"
    assert len(lines) == 1
    assert "tensorrt failed" in lines[0] and "cuda failed" in lines[0] and lines[0].endswith("-> using cpu")
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err  # ORT's own multi-line fallback banner stays off
    # the same pretend-availability with a forced provider is an error, not a silent CPU run
    with pytest.raises(ProviderError, match="provider 'cuda' failed to start: not activated"):
        Inspector(model, provider="cuda", available=avail)


def test_predict_outputs_and_cam_matches_logits(inspector: Inspector, tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.png", 120, 90, bright=True, seed=3)
    arr, size = inspector.load(img)
    assert size == (120, 90) and arr.shape == (90, 120, 1)
    batch = inspector.preprocess([img])
    assert batch.shape == (1, 1, 90, 120) and batch.dtype == np.float32
    out = inspector.predict(batch)
    assert set(out) == {"logits", "probs", "cam"}
    assert out["probs"].shape == (1, 3) and np.allclose(out["probs"].sum(1), 1.0, atol=1e-5)
    assert out["cam"].shape == (1, 3, 23, 30)
    # CAM = head weights applied to the feature map, so its spatial mean is logits minus the bias
    bias = np.array([3.0, 0.0, 0.0], np.float32)
    assert np.allclose(out["cam"].mean(axis=(2, 3)) + bias, out["logits"], atol=1e-4)
    assert "cam" not in inspector.predict(batch, cam=False)
    with pytest.raises(ValueError, match=r"expected a batch shaped \(N, 1, H, W\)"):
        inspector.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_decision_rule(inspector: Inspector) -> None:
    d = inspector.decide(np.array([0.6, 0.1, 0.3]), 0.4)
    assert (d.verdict, d.top_class, d.defect_class) == ("NG", "good", "scratch")  # 1 - 0.6 >= 0.4
    assert d.defect_prob == pytest.approx(0.4) and d.top_prob == pytest.approx(0.6)
    assert inspector.decide(np.array([0.6, 0.1, 0.3]), 0.41).verdict == "OK"


def test_same_probabilities_alone_or_in_any_batch(inspector: Inspector, tmp_path: Path) -> None:
    paths = [make_image(tmp_path / f"{i}.png", 96, 80, bright=i % 2 == 0, seed=i) for i in range(9)]
    arrays = [inspector.load(p)[0] for p in paths]
    alone = np.stack([inspector.predict(inspector.preprocess([a]))["probs"][0] for a in arrays])
    together = inspector.predict(inspector.preprocess(arrays))["probs"]
    assert np.abs(alone - together).max() <= 1e-5
    for size in (2, 4, 5):
        for start in range(0, 9, size):
            part = inspector.predict(inspector.preprocess(arrays[start : start + size]))["probs"]
            assert np.abs(part - alone[start : start + size]).max() <= 1e-5
    verdicts = {inspector.decide(p).verdict for p in alone}
    assert verdicts == {"OK", "NG"}  # the fixture separates dark and bright images


def test_loader_errors_surface_as_image_load_errors(inspector: Inspector, tmp_path: Path) -> None:
    tiny = make_image(tmp_path / "tiny.png", 20, 20, bright=False)
    with pytest.raises(ImageLoadError) as exc:
        inspector.load(tiny)
    assert exc.value.kind == "too_small"


def test_io_binding_path_gives_the_same_outputs(model: Path, inspector: Inspector, tmp_path: Path) -> None:
    """The GPU code path (IO binding) run against the CPU device: same numbers as session.run."""
    bound = Inspector(model, provider="cpu", threads=1, io_binding=True)
    assert bound._io_device == "cpu" and inspector._io_device is None
    arrays = [
        bound.load(make_image(tmp_path / f"{i}.png", 72, 64, bright=i == 1, seed=i))[0] for i in range(3)
    ]
    batch = bound.preprocess(arrays)
    a, b = bound.predict(batch), inspector.predict(batch)
    assert a.keys() == b.keys() == {"logits", "probs", "cam"}
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-6)


def test_batcher_groups_equal_sizes_and_bounds_pending() -> None:
    from defectscope.runtime.pipeline import Batcher, Item

    rng = np.random.default_rng(0)
    b = Batcher(batch_size=4, max_pending=6)
    batches = []
    for i in range(200):
        h = int(rng.choice([32, 48, 64, 80, 96]))
        batches += b.add(Item(f"{i}", np.zeros((h, 40, 1), np.uint8)))
        assert b.pending <= 6
    batches += b.drain()
    assert b.pending == 0
    assert sorted(int(it.path) for batch in batches for it in batch) == list(range(200))
    for batch in batches:
        assert 1 <= len(batch) <= 4 and len({it.array.shape for it in batch if it.array is not None}) == 1
    assert sum(len(batch) == 4 for batch in batches) > 10  # full batches do form


def test_cuda_points_out_its_per_size_setup_once_and_only_cuda(model: Path) -> None:
    said: list[str] = []
    watch = NewSizeWatch("cuda", said.append, at=3)
    for h, w in [(64, 64), (64, 64), (64, 80), (64, 64), (80, 64)]:  # the 3rd distinct size is the 5th batch
        watch.seen(h, w)
    assert len(said) == 1 and "cuda has met 3 image sizes" in said[0] and "--provider cpu" in said[0]
    for side in range(90, 120):
        watch.seen(side, side)
    assert len(said) == 1  # once per session
    for kind in ("cpu", "tensorrt"):  # TensorRT's engine covers its whole profile; the CPU has no such cost
        other: list[str] = []
        quiet = NewSizeWatch(kind, other.append, at=2)
        for side in range(40, 60):
            quiet.seen(side, side)
        assert other == []
    # wired into predict: a real session (on the CPU here) with a CUDA watch in place
    lines: list[str] = []
    insp = Inspector(model, provider="cpu", threads=1, log=lines.append)
    for side in range(32, 32 + 2 * CUDA_SIZES_NOTE_AT):  # the CPU provider's own watch says nothing
        insp.predict(np.zeros((1, 1, side, side), np.float32), cam=False)
    assert not any("image sizes" in line for line in lines)
    insp._new_sizes = NewSizeWatch("cuda", lines.append, at=3)
    for side in (40, 40, 48, 56):
        insp.predict(np.zeros((2, 1, side, side), np.float32), cam=False)
    assert sum("cuda has met 3 image sizes" in line for line in lines) == 1


def test_cuda_size_note_is_said_once_from_many_threads() -> None:
    said: list[str] = []
    watch = NewSizeWatch("cuda", said.append, at=4)
    start = threading.Barrier(8)

    def feed(k: int) -> None:
        start.wait()
        for side in range(200):
            watch.seen(side, k)

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(said) == 1
