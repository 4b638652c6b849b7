"""Shared pieces of the speed benchmark: machine description, the timing loop, the benchmark models.

Every engine row is timed by :func:`measure` (warm-up, then whole calls until a minimum duration has
passed), so rows differ only in what they run.  Models are built from a ``conf/model`` preset with a
fixed seed and random, non-trivial BatchNorm statistics, so BN folding really changes the weights and
every run of the benchmark sees the same weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF_MODELS = REPO / "conf" / "model"
CLASS_NAMES = ["good", "scratch", "spot", "crack"]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def logical_cores() -> int:
    """CPUs this process may run on (the default thread count of every row)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1/5/15-minute load: a busy machine makes every figure of the run suspect, so it is recorded."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (inspect runs, workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """How many cores *other* processes kept busy while a section ran.

    The load average cannot tell: the benchmark's own threads raise it, and it decays over minutes,
    so it flags every section after the first. Machine busy time minus our own (and our reaped
    children's) CPU time over the same interval is what competed with the measurement.
    """

    def __init__(self) -> None:
        self._busy0 = _machine_busy_seconds()
        self._own0 = _own_cpu_seconds()
        self._t0 = time.perf_counter()

    def cores(self) -> float | None:
        busy = _machine_busy_seconds()
        if busy is None or self._busy0 is None:
            return None
        wall = max(time.perf_counter() - self._t0, 1e-9)
        foreign = (busy - self._busy0) - (_own_cpu_seconds() - self._own0)
        return round(max(foreign, 0.0) / wall, 2)


def machine_info(threads: int) -> dict[str, Any]:
    """What the figures were measured on."""
    import onnxruntime as ort

    from defectscope import __version__
    from defectscope.runtime.providers import physical_cores

    return {
        "cpu": cpu_model(),
        "logical_cores": logical_cores(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "defectscope": __version__,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }


def measure(
    fn: Callable[[], object], images: int, min_seconds: float, warmup_seconds: float
) -> dict[str, Any]:
    """Images/s of ``fn`` (one call = ``images`` images): warm up, then time whole calls.

    Calls are repeated until ``min_seconds`` have passed and at least 3 calls were timed.  The
    headline rate is images over total time; the median call is kept as a noise check.
    """
    t_end = time.perf_counter() + warmup_seconds
    fn()
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= min_seconds and len(times) >= 3:
            break
    total = sum(times)
    return {
        "images_per_s": round(images * len(times) / total, 2),
        "median_images_per_s": round(images / statistics.median(times), 2),
        "calls": len(times),
        "seconds": round(total, 3),
    }


def preset_config(name: str) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` as a plain dict; pretrained ``weights`` are dropped (speed only)."""
    from omegaconf import OmegaConf

    path = CONF_MODELS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONF_MODELS.glob("*.yaml")))
        raise SystemExit(f"--model {name!r}: no preset {path}; choose one of {names}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(raw, dict)
    cfg = {str(k): v for k, v in raw.items()}
    if "weights" in cfg:
        cfg["weights"] = None
    return cfg


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int) -> int:
    """Give every BatchNorm random running statistics and affine parameters; returns how many.

    Fresh BNs (mean 0, var 1, gamma 1 or 0 with zero-init residuals) would make folding a no-op.
    """
    g = torch.Generator().manual_seed(seed)
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            count += 1
    return count


def build_model(cfg: dict[str, Any], in_chans: int, seed: int) -> nn.Module:
    """The preset's network (eval mode) with seeded weights and random BatchNorm statistics."""
    from defectscope.models import model_from_config

    torch.manual_seed(seed)
    model = model_from_config(cfg, num_classes=len(CLASS_NAMES), in_chans=in_chans)
    randomise_bn(model, seed + 1)
    return model.eval()


def export_info(
    cfg: dict[str, Any], channels: int, downscale: str = "exact", min_size: int = 32
) -> dict[str, Any]:
    """The checkpoint ``defectscope`` entry :func:`export_model` needs, for an in-memory model."""
    from defectscope.runtime.image import LoaderConfig

    loader = LoaderConfig(
        channels=channels, max_side=512, min_size=min_size, size_multiple=32, downscale=downscale
    )
    return {
        "model_name": str(cfg["name"]),
        "class_names": list(CLASS_NAMES),
        "good_class": CLASS_NAMES[0],
        "threshold": 0.5,
        # conf/data/_base.yaml's policy, long side capped at 512 px
        "loader": loader.to_dict(),
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "mlflow_run_id": None,
    }


def model_path(
    workdir: Path, cfg: dict[str, Any], channels: int, fp16: bool = False, downscale: str = "exact"
) -> Path:
    """Where a benchmark model is written: presets sharing a registry name get different files."""
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    tail = ("_fp16" if fp16 else "") + ("" if downscale == "exact" else f"_{downscale}")
    return workdir / "models" / f"{cfg['name']}-{digest}_{channels}ch{tail}.onnx"


def export(
    model: nn.Module,
    cfg: dict[str, Any],
    channels: int,
    path: Path,
    *,
    fp16: bool = False,
    downscale: str = "exact",
) -> Path:
    """The project's exporter (fuse, ONNX, parity gate on random inputs, metadata) on ``model``."""
    from defectscope.export.onnx_export import export_model

    path.parent.mkdir(parents=True, exist_ok=True)
    # the loader admits only sides the graph can run (reflect padding needs a few more pixels)
    info = export_info(cfg, channels, downscale, max(32, int(getattr(model, "min_input_size", 1))))
    # speed only: the threshold is set by hand, not earned on images
    export_model(model, info, path, fp16=fp16, parity_images=0, threshold=0.5, log=lambda _m: None)
    return path


def bench_sgemm(n: int, threads: int, min_seconds: float) -> dict[str, Any]:
    """Peak single-precision GFLOP/s: best n x n x n matmul of numpy (BLAS), torch.mm and ORT.

    The three GEMM libraries differ a lot per CPU (an old OpenBLAS may not know a new core and fall
    back to AVX2 kernels), so the peak is the best any of them reaches; ORT's MatMul is MLAS, the
    library the runtime's convolutions use.
    """
    from threadpoolctl import threadpool_limits

    flop = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out: dict[str, Any] = {"n": n, "flop_per_call": flop}
    with threadpool_limits(limits=threads, user_api="blas"):
        out["numpy"] = _gemm_rate(lambda: a @ b, flop, min_seconds)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch"] = _gemm_rate(lambda: torch.mm(ta, tb), flop, min_seconds)
    session = _ort_matmul(n, threads)
    out["onnxruntime"] = _gemm_rate(lambda: session.run(None, {"A": a, "B": b}), flop, min_seconds)
    best = max(("numpy", "torch", "onnxruntime"), key=lambda k: out[k]["best_gflops"])
    out["peak_gflops"] = out[best]["best_gflops"]
    out["peak_source"] = best
    return out


def _ort_matmul(n: int, threads: int) -> Any:
    """An ONNX Runtime session holding one n x n MatMul (default session options, ``threads``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def spec(name: str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n])

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm", [spec("A"), spec("B")], [spec("C")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _gemm_rate(fn: Callable[[], object], flop: float, min_seconds: float) -> dict[str, Any]:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < min_seconds or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "best_gflops": round(flop / min(times) / 1e9, 1),
        "mean_gflops": round(flop * len(times) / sum(times) / 1e9, 1),
        "calls": len(times),
    }
