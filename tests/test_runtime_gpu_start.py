"""GPU runner policy, tested on the CPU with real ONNX Runtime sessions (issue 21).

What a GPU must still confirm is in deploy/gpu_check.sh; here (the TensorRT engine cache:
test_runtime_trt_cache.py): the profile covering every size the loader can produce, int8 under
``auto``, the loader-config validation, the one-line messages that replace ONNX Runtime's own output,
the start-up run at the edges of the input range, and the node-placement report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from defectscope.runtime import cli
from defectscope.runtime.image import LoaderConfig, target_size
from defectscope.runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from defectscope.runtime.ortlog import quiet_ort
from defectscope.runtime.providers import PROVIDERS, candidates, provider_chain, session_options
from defectscope.runtime.sessions import start_shapes
from defectscope.runtime.startcheck import Placement, StartCheckError, exercise, placement_from_profile
from defectscope.runtime.trt import (
    TrtProfile,
    largest_side,
    profile_for,
)
from onnx_models import build_model, fixture_metadata

GPU_AVAILABLE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "m.onnx")


def _edit_after_features(src: Path, dst: Path, nodes: list, inits: list) -> Path:
    """Insert ``nodes`` between the last ReLU (``feat0``) and the heads (``feat``)."""
    m = onnx.load(str(src))
    for n in m.graph.node:
        if n.output[0] == "feat":
            n.output[0] = "feat0"
    m.graph.initializer.extend(inits)
    at = next(i for i, n in enumerate(m.graph.node) if n.output[0] == "feat0") + 1
    for k, node in enumerate(nodes):
        m.graph.node.insert(at + k, node)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def fails_above_min_size(tmp_path: Path) -> Path:
    """Runs at the 32 px minimum (8x8 features) but not larger: a fixed 8x8 term is added."""
    fixed = numpy_helper.from_array(np.zeros((1, 16, 8, 8), np.float32), "fixed")
    node = helper.make_node("Add", ["feat0", "fixed"], ["feat"])
    return _edit_after_features(build_model(tmp_path / "base.onnx"), tmp_path / "fails.onnx", [node], [fixed])


def gives_nan(tmp_path: Path) -> Path:
    """sqrt(-(x + 1)) of non-negative features: every output is NaN."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    nodes = [
        helper.make_node("Add", ["feat0", "one"], ["shifted"]),
        helper.make_node("Neg", ["shifted"], ["negative"]),
        helper.make_node("Sqrt", ["negative"], ["feat"]),
    ]
    return _edit_after_features(build_model(tmp_path / "base.onnx"), tmp_path / "nan.onnx", nodes, [one])


# -- 2. one explicit profile, covering every size the loader produces ------------------------------

loader_configs = st.builds(
    lambda ch, lo, extra, native, mult: (ch, lo, None if native else lo + extra, mult),
    st.integers(1, 4),
    st.integers(1, 96),
    st.integers(0, 1200),
    st.booleans(),
    st.integers(1, 128),
)


@settings(max_examples=300, deadline=None)
@given(loader_configs, st.integers(1, 64), st.integers(64, 4096), st.integers(1, 5000), st.integers(1, 5000))
def test_profile_covers_every_size_the_loader_can_produce(
    spec: tuple[int, int, int | None, int], max_batch: int, native_top: int, width: int, height: int
) -> None:
    channels, min_size, max_side, mult = spec
    try:
        cfg = LoaderConfig(channels=channels, max_side=max_side, min_size=min_size, size_multiple=mult)
    except ValueError as exc:  # what training now refuses: no side between min_size and max_side
        assert max_side is not None and "size_multiple" in str(exc)
        assert max_side // mult * mult < min_size
        return
    native_top = max(native_top, min_size)
    profile = profile_for(cfg, max_batch, native_top if max_side is None else None)
    assert profile.max_batch == max_batch and profile.channels == channels
    meta = fixture_metadata(channels=channels, max_side=max_side, min_size=min_size, size_multiple=mult)
    for shape in start_shapes("tensorrt", meta, profile):  # the start-up run probes both corners
        assert profile.covers(shape) and shape[0] <= max_batch
    w, h = target_size(width, height, cfg)
    assume(min(w, h) >= cfg.min_size)  # smaller ones are refused by the loader (too_small)
    if max_side is not None:
        assert max(w, h) <= max_side
        assert profile.covers((1, channels, h, w)), f"{width}x{height} -> {w}x{h} outside {profile}"
    else:  # native sizes: inside the --trt-max-side profile, or an error row (test below)
        assert profile.covers((1, channels, h, w)) == (max(w, h) <= native_top)


def test_native_size_models_need_a_max_side_for_tensorrt_and_bounded_ones_do_not() -> None:
    native = LoaderConfig(channels=3, max_side=None, min_size=32, size_multiple=32)
    with pytest.raises(ProviderError, match="--trt-max-side"):
        profile_for(native, 16, None)
    assert profile_for(native, 16, 2048) == TrtProfile(16, 3, 32, 2048)
    bounded = LoaderConfig(channels=1, max_side=300, min_size=32, size_multiple=32)
    assert largest_side(bounded) == 288  # the largest multiple of 32 the loader keeps <= 300
    assert profile_for(bounded, 8, None) == TrtProfile(8, 1, 32, 288)


def test_forced_tensorrt_on_a_native_size_model_stops_before_any_work(tmp_path: Path) -> None:
    path = build_model(tmp_path / "native.onnx", max_side=None)
    with pytest.raises(ProviderError, match=r"'tensorrt' failed to start: .*pass --trt-max-side"):
        Inspector(path, provider="tensorrt", available=GPU_AVAILABLE, trt_cache_dir=tmp_path / "trt")


def test_batches_are_sliced_to_the_profile_and_foreign_sizes_refused(model: Path) -> None:
    # The slicing runs in front of any session; a CPU session stands in for the engine.
    insp = Inspector(model, provider="cpu", threads=1)
    batch = np.random.default_rng(0).standard_normal((7, 1, 64, 96), dtype=np.float32)
    whole = insp.predict(batch)
    insp.trt_profile = TrtProfile(3, 1, 32, 128)
    sliced = insp.predict(batch)
    for key in whole:
        np.testing.assert_allclose(sliced[key], whole[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"160x64 input is outside the TensorRT profile .*--trt-max-side"):
        insp.predict(np.zeros((1, 1, 64, 160), np.float32))


# -- 3. int8 under auto ----------------------------------------------------------------------------


def test_int8_models_run_on_the_cpu_under_auto_without_trying_tensorrt(tmp_path: Path) -> None:
    assert candidates("auto", GPU_AVAILABLE, int8=True) == ["cpu"]
    assert candidates("auto", GPU_AVAILABLE) == ["tensorrt", "cuda", "cpu"]
    assert candidates("tensorrt", GPU_AVAILABLE, int8=True) == ["tensorrt"]  # forced: the user's call
    path = build_model(tmp_path / "int8.onnx", int8=True)
    lines: list[str] = []
    insp = Inspector(path, available=GPU_AVAILABLE, log=lines.append, trt_cache_dir=tmp_path / "trt")
    assert insp.provider == "cpu"
    assert len(lines) == 1 and "runs on the CPU provider" in lines[0] and "zero point 0" in lines[0]
    assert not any("fallback" in line for line in lines)  # TensorRT and CUDA were never tried
    assert not (tmp_path / "trt").exists()
    with pytest.raises(ProviderError, match="'cuda' failed to start: not activated"):
        Inspector(path, provider="cuda", available=GPU_AVAILABLE)


def test_gpu_providers_run_on_the_requested_device() -> None:
    """One runner per GPU: ``device_id`` reaches both GPU providers; TensorRT keeps its own options."""
    assert provider_chain("cpu", device_id=3) == ["CPUExecutionProvider"]
    cuda = provider_chain("cuda", device_id=3)
    assert cuda == [
        ("CUDAExecutionProvider", {"device_id": "3", "cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    trt = provider_chain("tensorrt", {"trt_fp16_enable": "True"}, device_id=2)
    assert trt[0] == ("TensorrtExecutionProvider", {"trt_fp16_enable": "True", "device_id": "2"})
    assert trt[1] == ("CUDAExecutionProvider", {"device_id": "2", "cudnn_conv_algo_search": "HEURISTIC"})
    assert provider_chain("cuda")[0][1]["device_id"] == "0"  # the default: the first GPU


def test_the_device_id_reaches_the_session_onnxruntime_opens(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real session class, recording what it is asked for: this ORT build has no CUDA, so the forced
    GPU start fails as it must, after being asked for GPU 2 by both GPU providers."""
    asked: list[Any] = []

    class Recording(ort.InferenceSession):  # type: ignore[misc]
        def __init__(self, path: str, sess_options: Any = None, providers: Any = None, **kw: Any) -> None:
            asked.append(providers)
            super().__init__(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    for kind in ("cuda", "tensorrt"):
        with pytest.raises(ProviderError, match=f"'{kind}' failed to start"):
            Inspector(
                model, provider=kind, device_id=2, available=GPU_AVAILABLE, trt_cache_dir=tmp_path / "trt"
            )
    gpu_options = [opts for chain in asked for name, opts in chain[:-1] if name != "CPUExecutionProvider"]
    assert len(gpu_options) == 3 and all(opts["device_id"] == "2" for opts in gpu_options)


def test_a_device_id_is_checked_and_unused_on_the_cpu(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ProviderError, match=r"^device_id must be a GPU index >= 0, got -1$"):
        Inspector(model, provider="cpu", device_id=-1)
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "r.jsonl"
    code = cli.main([str(model), str(tmp_path / "a.png"), "-o", str(out), "--device-id", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device-id must be a GPU index >= 0, got -1" in err
    assert not out.exists()
    code = cli.main(
        [str(model), str(tmp_path / "a.png"), "-o", str(out), "--device-id", "1", "--provider", "cpu"]
    )
    assert code == 0 and len(out.read_text().splitlines()) == 1


# -- 4. loader-config validation -------------------------------------------------------------------


def test_loader_config_refuses_sizes_outside_its_own_range() -> None:
    with pytest.raises(ValueError, match=r"size_multiple \(128\) must be <= max_side \(100\)"):
        LoaderConfig(max_side=100, min_size=32, size_multiple=128)  # 100x50 would become 128x128
    with pytest.raises(ValueError, match=r"no side between min_size \(80\) and max_side \(100\).* is 64"):
        LoaderConfig(max_side=100, min_size=80, size_multiple=64)
    ok = LoaderConfig(max_side=100, min_size=32, size_multiple=64)
    assert target_size(100, 50, ok) == (64, 64) and largest_side(ok) == 64


def test_a_model_with_such_a_loader_is_refused_at_start_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = fixture_metadata().to_json().replace('"size_multiple": 1', '"size_multiple": 1024')
    path = build_model(tmp_path / "old.onnx", raw_metadata=doc)
    with pytest.raises(
        MetadataError, match=r"old\.onnx: metadata has an unusable loader config: .*size_multiple"
    ):
        Inspector(path, provider="cpu")
    (tmp_path / "a.png").write_bytes(b"")
    code = cli.main([str(path), str(tmp_path / "a.png"), "-o", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "size_multiple (1024) must be <= max_side (512)" in err


# -- 5. one line instead of ONNX Runtime's own output ----------------------------------------------


def test_auto_fallback_is_one_line_and_onnxruntime_prints_nothing(
    model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    insp = Inspector(model, available=GPU_AVAILABLE, log=lines.append, trt_cache_dir=tmp_path / "trt")
    out, err = capfd.readouterr()
    assert insp.provider == "cpu" and out == err == ""  # ORT's warnings are inside the one line
    assert len(lines) == 1 and lines[0].startswith("defectscope: provider fallback: tensorrt failed (")
    assert "not in available provider names" in lines[0] and lines[0].endswith("-> using cpu")
    assert not [p for p in (tmp_path / "trt").rglob(".run-*")]  # the failed attempt left no private copy


def test_a_failing_start_up_run_is_one_line_with_what_onnxruntime_logged(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = fails_above_min_size(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        Inspector(path, provider="cpu")
    out, err = capfd.readouterr()
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path))
    assert "start-up run at 1x1x512x512 failed" in text and "Add node" in text
    assert out == "" and "onnxruntime" not in err  # ORT's ERROR-level log line was captured, not printed


def test_quiet_ort_captures_native_and_python_output_into_one_summary(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    session = ort.InferenceSession(str(fails_above_min_size(tmp_path)), providers=[PROVIDERS["cpu"]])
    with quiet_ort() as cap:
        print("Failed to load libcudnn.so.9: cannot open shared object file")  # as preload_dlls does
        with pytest.raises(Exception, match="Add node"):
            session.run(None, {"input": np.zeros((1, 1, 64, 64), np.float32)})
    out, err = capfd.readouterr()
    assert out == err == ""
    assert any("[E:onnxruntime" in line for line in cap.lines)  # the native logger wrote to fd 2
    summary = cap.summary()
    assert summary is not None and summary.startswith("Non-zero status code returned while running Add node")
    assert summary.endswith("(+1 more lines)") and "\x1b" not in summary


def test_a_session_giving_non_finite_outputs_fails_its_start(tmp_path: Path) -> None:
    path = gives_nan(tmp_path)
    with pytest.raises(ModelLoadError, match=r"start-up run at 1x1x32x32 gave non-finite logits, probs, cam"):
        Inspector(path, provider="cpu")


# -- 6. where the nodes run ------------------------------------------------------------------------


def test_node_placement_is_reported_on_the_cpu(model: Path) -> None:
    nodes = len(onnx.load(str(model)).graph.node)
    insp = Inspector(model, provider="cpu", threads=1)
    if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        assert insp.provider_summary == f"cpu ({nodes} of {nodes} nodes)"
    else:  # onnxruntime < 1.24: counted from the start-up run's profile
        assert insp.provider_summary.startswith("cpu (") and "kernels" in insp.provider_summary


def test_profiled_placement_counts_each_kernel_once(model: Path, tmp_path: Path) -> None:
    nodes = len(onnx.load(str(model)).graph.node)
    so = session_options(1, "disable", profile_prefix=str(tmp_path / "p"))
    session = ort.InferenceSession(str(model), so, providers=[PROVIDERS["cpu"]])
    exercise(session, [(1, 1, 32, 32), (2, 1, 64, 64)])
    trace = session.end_profiling()
    placement = placement_from_profile(trace, "cpu")
    assert placement == Placement("cpu", {"cpu": nodes}, "kernels") and not Path(trace).exists()
    assert placement.text == f"cpu ({nodes} of {nodes} kernels)" and placement.warning() is None


def test_partial_placement_warns_with_the_counts() -> None:
    part = Placement("tensorrt", {"tensorrt": 30, "cuda": 8, "cpu": 2}, "nodes")
    assert part.text == "tensorrt (30 of 40 nodes; cpu 2; cuda 8)"
    warning = part.warning()
    assert warning is not None and "only 75% of the model runs on tensorrt" in warning
    assert Placement("tensorrt", {"tensorrt": 39, "cpu": 1}, "nodes").warning() is None


def test_start_up_run_compares_with_the_shipped_graph_on_the_cpu(model: Path, tmp_path: Path) -> None:
    opt = ort.InferenceSession(str(model), session_options(1, "all"), providers=[PROVIDERS["cpu"]])
    ref = ort.InferenceSession(str(model), session_options(1, "disable"), providers=[PROVIDERS["cpu"]])
    other = ort.InferenceSession(str(build_model(tmp_path / "o.onnx", seed=5)), providers=[PROVIDERS["cpu"]])
    shapes = [(1, 1, 32, 32), (4, 1, 96, 96)]
    same = exercise(opt, shapes, ref)
    assert same is not None and same < 1e-5
    differs = exercise(opt, shapes, other)
    assert differs is not None and differs > 1e-3  # the figure measures something
    with pytest.raises(StartCheckError, match="start-up run at 1x1x64x64 failed"):
        exercise(
            ort.InferenceSession(str(fails_above_min_size(tmp_path)), providers=[PROVIDERS["cpu"]]),
            [(1, 1, 64, 64)],
        )


def test_an_unusable_cache_or_a_clean_request_goes_through_the_start(model: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    lines: list[str] = []
    Inspector(model, available=GPU_AVAILABLE, trt_cache_dir=not_a_folder, log=lines.append)
    assert (
        len(lines) == 1 and f"tensorrt failed (TensorRT engine cache {not_a_folder} is not usable" in lines[0]
    )
    root = tmp_path / "trt"
    old = root / "fedcba9876543210" / "ort1.0.0-b16-c1-32-512-fp32"
    old.mkdir(parents=True)
    (old / "TensorrtExecutionProvider_x.engine").write_bytes(b"x" * 2_000_000)
    lines.clear()
    Inspector(model, available=GPU_AVAILABLE, trt_cache_dir=root, trt_clean=True, log=lines.append)
    assert not old.parent.exists()
    assert f"defectscope: TensorRT cache {root}: removed 1 old engine entries (2.0 MB)" in lines
