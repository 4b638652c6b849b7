"""ONNX Runtime execution-provider choice and session options for line PCs.

Kept apart from the inspector so the policy (what "auto" means, what the defaults are) is in one
readable place.  ORT's own silent fallback is disabled: we decide, and say so in one line.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Short names users type -> ORT provider names, in "auto" preference order.
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
GRAPH_OPT_CHOICES = ("disable", "basic", "extended", "all")
#: Providers that run on the GPU and therefore want IO binding.
GPU_PROVIDERS = frozenset({"tensorrt", "cuda"})
#: Why an int8 export stays on the CPU provider (NVIDIA/TensorRT #2774; ORT's CUDA QDQ handling).
INT8_ON_GPU = (
    "int8 exports (QDQ, uint8 with non-zero zero points) are made for the CPU provider: TensorRT takes "
    "int8 only with zero point 0, and CUDA runs QDQ convolutions in fp32 with extra steps"
)
#: Session config key behind ``InferenceSession.get_provider_graph_assignment_info`` (ORT >= 1.24).
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"


#: Distinct image sizes after which the CUDA provider's per-size set-up is pointed out, once.
CUDA_SIZES_NOTE_AT = 8


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used."""


def short_name(ort_name: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda' (unknown names are lower-cased without the suffix)."""
    for short, full in PROVIDERS.items():
        if full == ort_name:
            return short
    return ort_name.removesuffix("ExecutionProvider").lower()


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's FPUs).

    Linux: distinct (package, core) pairs among the CPUs in our affinity mask.  Elsewhere, or
    when sysfs is unreadable, the logical count is the honest fallback.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topo / "core_id").read_text().strip()
            pkg = (topo / "physical_package_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((pkg, core))
    return max(1, len(cores))


def provider_chain(kind: str, trt_options: dict[str, str] | None = None, device_id: int = 0) -> list[Any]:
    """The ORT ``providers`` list that makes ``kind`` primary, with the usual partition fallbacks.

    TensorRT hands unsupported nodes to CUDA, CUDA to the CPU; the primary is verified after the
    session exists, so a silently missing library cannot pass for success, and the start-up check
    reports how many nodes each provider took.  ``trt_options`` come from :mod:`.trt`;
    ``device_id`` is the GPU both GPU providers run on (one runner per GPU on a multi-GPU PC, one
    training process per GPU under DDP).
    """
    if kind == "cpu":
        return [PROVIDERS["cpu"]]
    gpu = {"device_id": str(device_id)}
    cuda = (PROVIDERS["cuda"], {**gpu, "cudnn_conv_algo_search": "HEURISTIC"})
    if kind == "cuda":
        return [cuda, PROVIDERS["cpu"]]
    if kind == "tensorrt":
        return [(PROVIDERS["tensorrt"], {**dict(trt_options or {}), **gpu}), cuda, PROVIDERS["cpu"]]
    raise ProviderError(f"unknown provider {kind!r}; choose one of {', '.join(PROVIDER_CHOICES)}")


def candidates(requested: str, available: list[str], *, int8: bool = False) -> list[str]:
    """Short provider names to try, best first; raises when a forced one is not in this ORT build.

    ``auto`` runs an int8 model on the CPU provider (:data:`INT8_ON_GPU` says why); a forced GPU
    provider is the user's call and only gets a warning.
    """
    have = [short_name(p) for p in available]
    if requested == "auto":
        if int8 and PROVIDERS["cpu"] in available:
            return ["cpu"]
        return [k for k in PROVIDERS if PROVIDERS[k] in available] or ["cpu"]
    if requested not in PROVIDERS:
        raise ProviderError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    if PROVIDERS[requested] not in available:
        hint = ""
        if requested in GPU_PROVIDERS:
            hint = (
                "; install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu "
                "(never both in one environment)"
            )
        raise ProviderError(
            f"provider {requested!r} is not available in this onnxruntime build "
            f"(available: {', '.join(have)}){hint}"
        )
    return [requested]


#: ONNX Runtime's telemetry opt-outs, read once when it is imported (the name changed between releases:
#: 1.32 reads the first, later ones the second). Its Linux builds since 1.29 would otherwise upload usage
#: events and store a device id in the home folder (a service user without one printed a warning at every
#: start). Set either to 0 in the environment to leave ONNX Runtime's telemetry on.
TELEMETRY_OPT_OUTS = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")


def import_ort() -> Any:
    """onnxruntime (telemetry off unless the environment says otherwise), or a clear instruction when
    the base install lacks it. Every ONNX Runtime import of defectscope goes through here."""
    for name in TELEMETRY_OPT_OUTS:
        os.environ.setdefault(name, "1")
    try:
        import onnxruntime
    except ImportError as exc:
        raise ProviderError(
            f"onnxruntime is not installed ({exc}); install it with: pip install onnxruntime "
            "(onnxruntime-gpu on NVIDIA PCs; never both)"
        ) from None
    if all(os.environ[name] != "0" for name in TELEMETRY_OPT_OUTS):
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def session_options(threads: int | None, graph_opt: str, *, profile_prefix: str | None = None) -> Any:
    """Fast defaults: one intra-op thread per physical core, sequential execution, full graph opts.

    Node placement is recorded for the start-up report; ``profile_prefix`` turns on ORT's profiler
    instead, for versions without that record.
    """
    ort = import_ort()

    if graph_opt not in GRAPH_OPT_CHOICES:
        raise ProviderError(f"unknown graph optimisation {graph_opt!r}; choose one of {GRAPH_OPT_CHOICES}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: our one-line fallback message replaces ORT's dump
    so.graph_optimization_level = levels[graph_opt]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads if threads and threads > 0 else physical_cores()
    so.inter_op_num_threads = 1
    # Idle intra-op threads must sleep, not spin: decoding threads need those cores (measured
    # 1.7x more images/s on 2 cores).  Input shapes vary per batch, so per-shape memory patterns
    # would only pile up.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_mem_pattern = False
    so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class NewSizeWatch:
    """Says once when the CUDA provider has met many image sizes: it sets up its convolutions per size.

    cuDNN prepares each convolution for every new input shape (image size and batch size).  Measured
    on an NVIDIA H200 (onnxruntime-gpu 1.31.1, batch 1, docs/benchmarks.md "GPU"): 0.1-0.6 s per
    new size for an fp32 Lite0, 3.4-5.6 s in fp16, then 2-3 ms per image, so a folder of mixed sizes
    ran at 3 images/s where the CPU provider ran 163.  Sizes are counted, not batch sizes: the
    advice is about mixed sizes.  Thread-safe: batches may run from several threads.
    """

    def __init__(self, kind: str, log: Callable[[str], None], at: int = CUDA_SIZES_NOTE_AT) -> None:
        self._active = kind == "cuda"
        self._log, self._at = log, at
        self._sizes: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def seen(self, height: int, width: int) -> None:
        if not self._active:
            return
        with self._lock:
            if not self._active:  # another thread said it meanwhile
                return
            self._sizes.add((height, width))
            if len(self._sizes) < self._at:
                return
            self._active = False
        self._log(
            f"defectscope: cuda has met {self._at} image sizes and sets up its convolutions once per new size "
            "(on an H200 0.1-0.6 s in fp32, 3.4-5.6 s in fp16): for lots of mixed sizes --provider cpu "
            "can be faster"
        )
