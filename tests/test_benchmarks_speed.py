"""benchmarks/speed.py as the lead runs it, in --quick mode: a real subprocess through every section.

The figures of a quick run mean nothing; what is checked is that every section ran for real and that
the JSON is internally consistent (ratios, bounds and fractions match the rows they come from), so a
full run on a quiet machine can be trusted to report what it measured.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"
ENGINES = {"eager", "eager_fused", "onnxruntime"}
SHAPES = {"1x300x300", "3x384x512"}
BATCHES = {1, 8, 32}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def _check_throughput(tp: dict[str, Any], threads: int) -> None:
    rows = tp["rows"]
    assert {(r["engine"], r["shape"], r["batch"]) for r in rows} == {
        (e, s, b) for e in ENGINES for s in SHAPES for b in BATCHES
    }
    for r in rows:
        assert r["images_per_s"] > 0 and r["calls"] >= 3, r
        assert r["max_prob_diff_vs_eager"] < 1e-4, r  # same weights in all three engines
        flops = tp["models"][r["shape"]]["flops_per_image"]
        assert _close(r["gflops_achieved"], r["images_per_s"] * flops / 1e9, 0.02), r
    for shape, m in tp["models"].items():
        assert m["flops_per_image"] == 2 * m["macs_per_image"] > 0
        assert m["bn_folded"] >= 1 and m["bn_kept"] == 0  # the BN statistics were non-trivial and folded
        assert m["ort_threads"] == threads and Path(m["onnx"]).is_file(), shape
    rate = {(r["engine"], r["shape"], r["batch"]): r["images_per_s"] for r in rows}
    for shape in SHAPES:
        got = tp["ratios"]["onnxruntime_vs_eager"][f"{shape}_b8"]
        assert _close(got, rate[("onnxruntime", shape, 8)] / rate[("eager", shape, 8)], 0.01)


def _check_e2e(e2e: dict[str, Any], n: int) -> None:
    assert e2e["images"] == n and e2e["batches"] >= 1
    t_dec, t_comp = 1 / e2e["decode_single_thread_images_per_s"], 1 / e2e["compute_images_per_s"]
    assert _close(e2e["bound_sequential_images_per_s"], 1 / (t_dec + t_comp), 0.02)
    assert _close(
        e2e["fraction_of_bound_sequential"],
        e2e["inspect_images_per_s"] / e2e["bound_sequential_images_per_s"],
        0.02,
    )
    # inspect's own rate leaves out interpreter start-up and model load, so it is the larger one
    assert e2e["inspect_in_run_images_per_s"] >= e2e["inspect_images_per_s"] > 0
    assert f"inspected {n} inputs" in e2e["inspect_summary"]
    # the RSS is inspect's own: a child started straight from the benchmark process (torch, models,
    # decoded images: 500+ MiB) would report the parent's size instead
    assert 20 < e2e["inspect_peak_rss_mib"] < 400
    assert e2e["commit_ms"] > 0


def _check_cases(cases: dict[str, Any], cores: int) -> None:
    """Issue 20's table: every ratio is the one its rows give; the baseline ran the same inputs."""
    rows = cases["cases"]
    assert [r["case"] for r in rows][:2] == ["mixed-png-tiny", "300-grey-png-tiny"]
    assert {r["case"] for r in rows[2:]} == {"camera-grey-jpg-exact", "camera-grey-jpg-fast"}
    for r in rows:
        st = r["stages"]
        assert set(st["ms"]) == {"read", "decode", "resize", "normalise", "model"}
        assert all(v > 0 for v in st["ms"].values()), r
        assert _close(st["total_ms"], sum(st["ms"].values()), 0.01)
        assert _close(r["bound_images_per_s"], cores / (st["total_ms"] / 1e3), 0.01)
        assert _close(r["fraction_of_bound"], r["inspect"]["images_per_s"] / r["bound_images_per_s"], 0.01)
        assert _close(r["vs_naive"], r["inspect"]["images_per_s"] / r["naive_images_per_s"], 0.01)
        # the run's own rate leaves out start-up, so it is the larger one
        assert r["inspect"]["images_per_s"] >= r["inspect"]["end_to_end_images_per_s"] > 0
        assert ("before" in r) == r["case"].endswith(("tiny", "exact")), r["case"]  # main predates "fast"
    camera = {r["case"]: r for r in rows[2:]}
    assert camera["camera-grey-jpg-fast"]["stages"]["downscale"] == "fast"
    assert camera["camera-grey-jpg-exact"]["stages"]["input_shape"] == [416, 512, 1]
    assert cases["inspect_args"] == ["--provider", "cpu"]  # inspect's own defaults otherwise
    worst = min(rows, key=lambda r: r["fraction_of_bound"])
    assert cases["worst_fraction_of_bound"] == {"case": worst["case"], "value": worst["fraction_of_bound"]}


def _check_watch(watch: dict[str, Any]) -> None:
    (row,) = watch["rows"]
    assert row["kind"] == "grey-jpg" and row["frames"] == 6 and "--stable-polls 1" in row["options"]
    for key in ("visible", "durable"):
        q = row[key]
        assert 0 < q["p50_ms"] <= q["p90_ms"] <= q["p99_ms"] <= q["max_ms"] < 60_000, row
    assert row["durable"]["p50_ms"] >= row["visible"]["p50_ms"]  # a frame moves only after its row
    assert _close(row["budget_ms"], 2 * row["single_image_ms"], 0.02)
    assert _close(row["p99_over_budget"], row["durable"]["p99_ms"] / row["budget_ms"], 0.02)


@pytest.mark.slow
def test_quick_run_measures_every_section(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "results" / "speed.json"
    work = tmp_path / "work"
    args = ["--quick", "--model", "tiny", "--min-seconds", "0.1", "--out", str(out), "--workdir", str(work)]
    args += ["--e2e-images", "24", "--memory-inputs", "12,48", "--train-images", "48"]
    args += ["--baseline", str(REPO / "inspect")]  # this checkout as its own "before": the mechanism only
    proc = _run(args, tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text(encoding="utf-8"))

    m = r["machine"]
    assert m["cpu"] and m["threads"] == m["logical_cores"] >= 1
    for pkg in ("torch", "onnxruntime", "numpy"):
        assert m[pkg] == importlib.metadata.version(pkg)
    assert set(r["sections"]) == {"sgemm", "throughput", "gpu", "e2e", "memory", "train", "cases", "watch"}
    assert r["quick"] is True and r["model"] == "tiny" and r["model_config"]["name"] == "gapcnn"

    _check_throughput(r["throughput"], m["threads"])
    sg = r["sgemm"]
    best = {k: sg[k]["best_gflops"] for k in ("numpy", "torch", "onnxruntime")}
    assert sg["peak_gflops"] == max(best.values()) > 0 and best[sg["peak_source"]] == sg["peak_gflops"]
    _check_e2e(r["e2e"], 24)
    _check_cases(r["cases"], m["logical_cores"])
    _check_watch(r["watch"])

    mem = r["memory"]
    assert [run["inputs"] for run in mem["runs"]] == [12, 48]
    assert _close(mem["rss_ratio"], mem["runs"][1]["peak_rss_mib"] / mem["runs"][0]["peak_rss_mib"], 0.01)

    tr = r["train"]
    app, plain = tr["app"], tr["plain"]
    assert app["timed_epochs"] == plain["timed_epochs"] == [2]  # epoch 1 (start-up) left out of both
    assert app["images_per_epoch"] == plain["images_per_epoch"] > 0  # same data on both sides
    assert _close(tr["ratio_app_vs_plain"], app["images_per_s"] / plain["images_per_s"], 0.01)
    # the app's own Throughput callback measured (nearly) the same epoch
    assert _close(app["app_logged_images_per_s_last_epoch"], app["images_per_s"], 0.25)

    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available() and "CUDAExecutionProvider" not in ort.get_available_providers():
        assert r["gpu"] == "not available on this machine"

    gpu_targets = [t for t in r["targets"] if t["target"].startswith("GPU:")]
    assert len(gpu_targets) == 2
    if r["gpu"] == "not available on this machine":
        assert all(t["status"] == "not measured" and t["value"] is None for t in gpu_targets)
    targets = [t for t in r["targets"] if t not in gpu_targets]
    assert len(targets) == 10 and all(t["status"] in ("MET", "MISSED") for t in targets)
    by_name = {t["target"]: t for t in targets}
    b8 = by_name["ONNX Runtime / PyTorch eager images/s, batch 8, 1x300x300"]
    assert b8["value"] == r["throughput"]["ratios"]["onnxruntime_vs_eager"]["1x300x300_b8"]
    assert b8["status"] == ("MET" if b8["value"] >= 2.0 else "MISSED")

    worst = by_name["`defectscope inspect` / all-cores CPU bound, worst of 4 decode-bound cases"]
    assert worst["value"] == r["cases"]["worst_fraction_of_bound"]["value"]
    assert worst["status"] == ("MET" if worst["value"] >= 0.85 else "MISSED")

    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| Target | Goal | Measured | Status |" in table and "QUICK MODE" in table
    assert "| camera-grey-jpg-fast | " in table and "| grey-jpg 612x512 | " in table
    assert table in proc.stdout
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --only re-measures one section and keeps the rest of the file
    proc = _run([*args, "--only", "sgemm"], tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads(out.read_text(encoding="utf-8"))
    assert again["throughput"] == r["throughput"] and again["train"] == r["train"]
    assert again["sections"]["sgemm"]["measured_at"] >= r["sections"]["sgemm"]["measured_at"]


def test_unknown_section_is_a_usage_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = _run(["--only", "throughput,bogus", "--out", str(tmp_path / "x.json")], tmp_path, cli_env)
    assert proc.returncode == 2
    assert "bogus" in proc.stderr
    assert "choose from sgemm, throughput, gpu, e2e, memory, train, cases, watch" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_new_shapes_records_what_is_missing_without_a_gpu(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """benchmarks/gpu_new_shapes.py (docs/benchmarks.md, GPU table 3) runs here and says why it measured nothing."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the script would measure for minutes")
    out = tmp_path / "new_shapes.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_new_shapes.py"), "--out", str(out)],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["error"] == "this onnxruntime build has no CUDAExecutionProvider"
    assert doc["onnxruntime"] == ort.__version__ and doc["machine"]["onnxruntime"] == ort.__version__
    assert not any(k.startswith("heuristic") for k in doc)


def test_train_layout_times_both_layouts_of_a_real_training_step(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """benchmarks/train_layout.py (docs/benchmarks.md, "Training speed") as a subprocess, one small case."""
    out = tmp_path / "layout.json"
    args = ["--case", "tiny:48:1", "--batch", "4", "--seconds", "0.2", "--rounds", "2", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_layout.py"), *args, "--out", str(out)],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert row["case"] == "tiny:48:1" and set(row["images_per_s"]) == {"contiguous", "channels_last"}
    for layout, rates in row["rounds"].items():
        assert len(rates) == 2 and all(r > 0 for r in rates) and row["images_per_s"][layout] == max(rates)
    ratio = row["images_per_s"]["channels_last"] / row["images_per_s"]["contiguous"]
    assert row["channels_last_speedup"] == pytest.approx(ratio, abs=1e-3)


def test_gpu_target_is_computed_from_the_h200_rows() -> None:
    """The GPU target row of speed.py's report, on the figures measured on the lent H200 (docs/bench)."""
    report = _bench_module("bench_report")
    results = json.loads((REPO / "docs" / "bench" / "gpu_h200_speed.json").read_text(encoding="utf-8"))
    rate = {
        (r["engine"], r["shape"]): r["images_per_s"] for r in results["gpu"]["rows"] if r.get("batch") == 8
    }
    by_name = {t["target"]: t for t in report.targets(results) if t["target"].startswith("GPU:")}
    assert len(by_name) == 2
    for shape in ("1x300x300", "3x384x512"):
        t = by_name[f"GPU: TensorRT or CUDA fp16 / PyTorch eager fp32 images/s, batch 8, {shape}"]
        # TensorRT failed to start there (an error row), so CUDA fp16 is the faster one
        expected = rate[("ort_cuda_fp16", shape)] / rate[("eager_cuda_fp32", shape)]
        assert t["value"] == pytest.approx(expected, abs=1e-3) and "ort_cuda_fp16" in t["text"]
        assert t["status"] == ("MET" if expected >= 3.0 else "MISSED")
    assert not any(engine == "ort_tensorrt_fp16" for engine, _ in rate)  # its rows are errors, not rates


def _bench_module(name: str) -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.idle
@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_foreign_load_counts_other_processes_not_our_own() -> None:
    """A process we did not reap is foreign; the busy-warning then fires on it, not on our own threads."""
    common = _bench_module("bench_common")
    report = _bench_module("bench_report")
    idle = common.ForeignLoad()
    time.sleep(1.0)
    background = idle.cores()
    if background is None or background > 0.3:  # a busy machine cannot tell the two cases apart
        pytest.skip(f"other load keeps {background} cores busy; this check needs an idle machine (CI)")
    spin = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"]
    # our own work: a child we reap (as the benchmark reaps inspect) spins for 1.5 s
    own = common.ForeignLoad()
    subprocess.run(spin, check=True)
    own_cores = own.cores()
    # someone else's work: a process that is still running (not reaped) when we look
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        other = common.ForeignLoad()
        time.sleep(1.5)
        other_cores = other.cores()
    finally:
        spinner.kill()
        spinner.wait()
    assert own_cores is not None and other_cores is not None
    assert other_cores >= 0.5  # one spinning process is about one core
    assert own_cores <= other_cores - 0.5  # the same spin, reaped by us, is not counted

    def sections(*cores: float) -> dict[str, Any]:
        return {"machine": {}, "sections": {f"s{i}": {"foreign_cores": c} for i, c in enumerate(cores)}}

    assert report.busy_warning(sections(0.0, 0.1)) == ""
    assert "1.20 cores" in report.busy_warning(sections(0.0, 1.2))
    # old result files without foreign_cores fall back to the load average
    assert "load up to 1.50" in report.busy_warning({"machine": {"load_average_at_start": [1.5, 1, 1]}})
