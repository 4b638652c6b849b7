"""Post-training static int8 quantisation of an exported model, for CPU line PCs.

Why: on a 2-core line PC the 1x1 convolutions of an EfficientNet-Lite are compute-bound at ~80 % of
the fp32 peak, so the only way to serve it faster is fewer or cheaper operations.  x86 CPUs with
VNNI (AVX512-VNNI / AVX-VNNI) do 8-bit multiply-adds at several times the fp32 rate, and ONNX
Runtime runs a QDQ graph (QuantizeLinear/DequantizeLinear around each Conv) as QLinearConv kernels.

How: activation ranges are calibrated on real images (never random inputs: the ranges must be the
line's), weights are quantised per output channel (int8), activations per tensor (uint8).  The
nodes that produce the outputs (classifier, softmax, CAM projection) stay fp32: they are a
negligible share of the work.  Then a gate runs the fp32 and the int8 graph on held-back
images that calibration did not see and requires that they agree on the class, on the OK/NG
verdict and on the verdict of the images fp32 calls NG; the measured agreement, probability error
and speed-up go into the metadata.

Not for GPUs: TensorRT's explicit quantisation wants symmetric (int8) activations, not these uint8
ones, and no GPU was available to measure what the CUDA provider makes of a QDQ graph; export fp16
for GPU line PCs instead.  CPUs without VNNI can saturate the
uint8 x int8 products; ``reduce_range`` (7-bit weights) avoids that at a small accuracy cost.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from defectscope.runtime.decision import defect_probability, is_ng
from defectscope.runtime.grading import Grading, grade_indices
from defectscope.runtime.metadata import INPUT_NAME
from defectscope.runtime.providers import import_ort

#: calibration methods offered. onnxruntime's "entropy" is left out: in onnxruntime 1.32 it gave
#: exactly the min/max scales for every tensor of Lite0 (docs/benchmarks.md)
INT8_METHODS = ("minmax", "percentile")
#: the gate is a statistic: fewer held-back images than this decide nothing
MIN_CHECK_IMAGES = 10
#: Lite0 on ELPV (docs/benchmarks.md): keeping the first two convolutions fp32 took the top-1 agreement
#: with fp32 from 96.9 to 99.2 % (7-bit weights) and from 42 to 95 % (8-bit, a CPU without VNNI), for
#: under 2 % of the multiply-adds. By default only where AUTO_MIN_CONVS convolutions or more come before
#: the head: in a smaller network the first two are a large share of the compute (of a 2-conv net, all)
DEFAULT_FP32_CONVS = 2
AUTO_MIN_CONVS = 10
#: where --fp32-convs was not given and the gate fails, this many more tries, each keeping FP32_CONVS_STEP
#: more convolutions fp32: Lite0/Lite2 on ELPV passed with 2, 5 or 8 by seed (docs/benchmarks.md)
AUTO_FP32_STEPS = 2
FP32_CONVS_STEP = 3


class QuantizationError(ValueError):
    """The model cannot be quantised as asked (no calibration images, bad settings)."""


class Int8GateError(RuntimeError):
    """The int8 graph disagrees with the fp32 graph beyond the gate; ``numbers`` has the figures."""

    def __init__(self, message: str, numbers: dict[str, Any]) -> None:
        super().__init__(message)
        self.numbers = numbers


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies uint8 x int8 without saturating (AVX512-VNNI or AVX-VNNI); None where
    its flags cannot be read (not Linux).  Without VNNI a failed gate is often saturation, which
    ``reduce_range`` avoids."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags))


@dataclass(frozen=True)
class Int8Config:
    """Calibration and gate settings (``defectscope export --int8 ...``)."""

    calib_images: int = 128
    check_images: int = 128
    method: str = "minmax"
    reduce_range: bool = False
    min_agreement: float = 0.95
    #: convolutions this close to the input stay fp32 (:func:`early_convs`); None: :func:`fp32_convs_for`
    fp32_convs: int | None = None

    def __post_init__(self) -> None:
        if self.method not in INT8_METHODS:
            raise QuantizationError(
                f"int8 calibration method {self.method!r} is unknown; choose one of {', '.join(INT8_METHODS)}"
            )
        if self.calib_images < 1:
            raise QuantizationError(
                f"--calib-images: int8 calibration needs >= 1 image, got {self.calib_images}"
            )
        if self.check_images < MIN_CHECK_IMAGES:
            raise QuantizationError(
                f"--check-images: the int8 gate needs >= {MIN_CHECK_IMAGES} held-back images, "
                f"got {self.check_images}"
            )
        if not 0.0 <= self.min_agreement <= 1.0:
            raise QuantizationError(f"--min-agreement must lie in [0, 1], got {self.min_agreement}")
        n = self.fp32_convs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise QuantizationError(f"--fp32-convs: expected a whole number >= 0, got {self.fp32_convs!r}")


def split_paths(paths: Sequence[str], cfg: Int8Config, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, check) image lists from ``paths``, shuffled with a fixed seed.

    Paths are de-duplicated after resolving them (``a.png`` and ``./a.png`` are one image).  With at
    least ``calib_images + check_images`` images both get what they asked for; with fewer, a third
    is held back for the gate and the rest calibrates.  Fewer than ``MIN_CHECK_IMAGES + 1`` images
    cannot give a meaningful gate and raise :class:`QuantizationError`.
    """
    first: dict[str, str] = {}
    for p in paths:
        first.setdefault(os.path.realpath(p), p)
    unique = list(first.values())
    need = MIN_CHECK_IMAGES + 1
    if len(unique) < need:
        raise QuantizationError(
            f"int8 needs >= {need} readable images ({MIN_CHECK_IMAGES} to gate on and some to calibrate "
            f"on), got {len(unique)}"
        )
    random.Random(seed).shuffle(unique)
    if len(unique) >= cfg.calib_images + cfg.check_images:
        n_check = cfg.check_images
    else:
        n_check = min(cfg.check_images, max(MIN_CHECK_IMAGES, len(unique) // 3))
    return unique[n_check : n_check + cfg.calib_images], unique[:n_check]


def conv_depths(graph: onnx.GraphProto) -> dict[str, int]:
    """Each convolution's name -> the most convolutions on a path from the input to it (the stem: 0).

    Counted along the graph, so every copy of the backbone (test-time views run as separate passes)
    has its own first layers.  The quantiser keeps layers fp32 by name, so a nameless one is refused.
    """
    convs_before: dict[str, int] = {}  # tensor -> most convolutions on a path from the input to it
    depths: dict[str, int] = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        seen = max((convs_before.get(t, 0) for t in node.input), default=0)
        if node.op_type == "Conv":
            if not node.name:
                raise QuantizationError(
                    "the graph has a convolution without a name; int8 keeps layers fp32 by name"
                )
            depths[node.name] = seen
            seen += 1
        for t in node.output:
            convs_before[t] = seen
    return depths


def last_convs(graph: onnx.GraphProto) -> set[str]:
    """Convolutions from which no other convolution is reached: the CAM head (for CORN behind a Concat)."""
    reaches_conv: set[str] = set()  # tensors from which a convolution is reached
    last = set()
    for node in reversed(graph.node):  # every consumer before its producer
        downstream = any(t in reaches_conv for t in node.output)
        if node.op_type == "Conv" and not downstream:
            last.add(node.name)
        if downstream or node.op_type == "Conv":
            reaches_conv.update(node.input)
    return last


def early_convs(graph: onnx.GraphProto, depth: int) -> list[str]:
    """Names of the convolutions with fewer than ``depth`` convolutions before them, heads excepted.

    These see the image itself or a map of few channels at full resolution, where rounding to 8 bits
    is not averaged away; they hold little of the compute.
    """
    heads = last_convs(graph)
    return [name for name, seen in conv_depths(graph).items() if seen < depth and name not in heads]


def fp32_convs_for(graph: onnx.GraphProto, asked: int | None) -> int:
    """``asked``, or by default :data:`DEFAULT_FP32_CONVS` when the longest chain of convolutions before
    the head has at least :data:`AUTO_MIN_CONVS` (each test-time pass counted once), else 0."""
    if asked is not None:
        return asked
    depths = conv_depths(graph)
    backbone = max((depths[name] for name in last_convs(graph)), default=0)
    return DEFAULT_FP32_CONVS if backbone >= AUTO_MIN_CONVS else 0


def _exclude(proto: onnx.ModelProto, fp32_convs: int | None) -> list[str]:
    """Nodes that stay fp32 although their type is quantisable: the CAM head and what makes the
    outputs, and the first convolutions (:func:`fp32_convs_for`)."""
    outputs = {o.name for o in proto.graph.output}
    keep = [n.name for n in proto.graph.node if n.name and outputs.intersection(n.output)]
    keep += sorted(last_convs(proto.graph) - set(keep))
    return keep + [
        n for n in early_convs(proto.graph, fp32_convs_for(proto.graph, fp32_convs)) if n not in keep
    ]


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol, preparing one batch at a time on request.

    ``prepare`` turns an item into the model's NCHW float32 input; calibration images are kept as
    uint8 until then, a quarter of the memory of normalised float batches.
    """

    def __init__(
        self, items: Sequence[Any], input_name: str, prepare: Callable[[Any], np.ndarray] | None = None
    ) -> None:
        self._items = items
        self._it: Iterator[Any] = iter(items)
        self._name = input_name
        self._prepare: Callable[[Any], np.ndarray] = prepare or (lambda x: x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        return None if item is None else {self._name: self._prepare(item)}

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_qdq(
    model_bytes: bytes,
    batches: Sequence[Any],
    cfg: Int8Config,
    prepare: Callable[[Any], np.ndarray] | None = None,
) -> bytes:
    """Calibrate on ``batches`` (NCHW float32, or what ``prepare`` turns into that) and return the
    QDQ int8 model; metadata_props are carried over.

    Memory: min/max calibration adds ReduceMin/ReduceMax outputs and keeps only those per batch, so
    it does not grow with resolution; the histogram methods hold more.
    """
    if not batches:
        raise QuantizationError("int8 calibration got no images")
    import_ort()  # ONNX Runtime imported the one way (its telemetry off)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load_from_string(model_bytes)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice through the root logger
    with tempfile.TemporaryDirectory(prefix="defectscope-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        try:
            quantize_static(
                str(src),
                str(dst),
                _Batches(batches, proto.graph.input[0].name, prepare),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=None,  # every op ORT can quantise: Clip/Relu then fold into
                # the Conv's output range; a Conv-only graph leaves float activations between the
                # convs and measured 1.9x slower and less accurate on Lite0/ELPV
                nodes_to_exclude=_exclude(proto, cfg.fp32_convs),
                per_channel=True,
                reduce_range=cfg.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[cfg.method],
                calibration_providers=["CPUExecutionProvider"],
            )
        finally:
            root.setLevel(level)
        quant = onnx.load(str(dst))
    del quant.metadata_props[:]
    quant.metadata_props.extend(proto.metadata_props)
    quant.doc_string = proto.doc_string
    return quant.SerializeToString()


def _session(model_bytes: bytes) -> Any:
    ort = import_ort()

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def _timed_run(
    session: Any, names: list[str], batches: Sequence[np.ndarray]
) -> tuple[list[dict[str, np.ndarray]], float]:
    """Outputs per batch and the best-of-two total run time (the first pass also warms up)."""
    best = math.inf
    outs: list[dict[str, np.ndarray]] = []
    for _ in range(2):
        outs = []
        t0 = time.perf_counter()
        for x in batches:
            outs.append(dict(zip(names, session.run(names, {INPUT_NAME: x}))))
        best = min(best, time.perf_counter() - t0)
    return outs, best


def check_int8(
    fp32_bytes: bytes,
    int8_bytes: bytes,
    batches: Sequence[np.ndarray],
    *,
    ng_indices: Sequence[int],
    thresholds: tuple[float, float],
    min_agreement: float,
    grading: Grading | None = None,
) -> dict[str, Any]:
    """Run both graphs on the held-back ``batches``; raise :class:`Int8GateError` below the gate.

    Agreement is measured on what the line acts on: the top-1 class (the grade, for a model with a
    grading rule), the OK/NG verdict (:func:`defectscope.runtime.decision.is_ng`, each graph at the
    threshold it earns itself on the validation images, ``thresholds`` = (fp32, int8), as each would
    ship) and, separately, the verdict on the images fp32 calls NG, so a
    mostly-OK check set cannot hide an int8 model that lets defects through.  Probability and CAM
    errors are reported, not gated: int8 moves probabilities by ~1e-2 and what matters is whether a
    decision flips.  Non-finite int8 outputs fail the gate outright.
    """
    ref, q = _session(fp32_bytes), _session(int8_bytes)
    names = [o.name for o in ref.get_outputs()]
    want, t_ref = _timed_run(ref, names, batches)
    got, t_q = _timed_run(q, names, batches)
    n = sum(int(x.shape[0]) for x in batches)
    p_ref = np.concatenate([w["probs"] for w in want]).astype(np.float64)
    p_q = np.concatenate([g["probs"] for g in got]).astype(np.float64)
    finite = bool(np.isfinite(p_q).all())
    ng_ref = is_ng(defect_probability(p_ref, ng_indices), thresholds[0])
    ng_q = is_ng(defect_probability(p_q, ng_indices), thresholds[1])
    agreement = {
        "top1_agreement": float(np.mean(grade_indices(p_ref, grading) == grade_indices(p_q, grading))),
        "verdict_agreement": float(np.mean(ng_ref == ng_q)),
    }
    if ng_ref.any():
        agreement["ng_agreement"] = float(np.mean(ng_q[ng_ref]))
    diff = np.abs(p_ref - p_q)
    numbers: dict[str, Any] = {
        "check_images": n,
        "fp32_ng_images": int(ng_ref.sum()),
        **{k: round(v, 4) for k, v in agreement.items()},
        "min_agreement": min_agreement,
        "max_abs_prob": float(f"{float(diff.max()):.3e}") if finite else "nan",
        "mean_abs_prob": float(f"{float(diff.mean()):.3e}") if finite else "nan",
        "speedup_vs_fp32_cpu": round(t_ref / t_q, 2) if t_q > 0 else None,
    }
    if "cam" in names and finite:
        rel = [
            float(np.max(np.abs(g["cam"] - w["cam"]))) / max(float(np.max(np.abs(w["cam"]))), 1e-6)
            for g, w in zip(got, want)
        ]
        numbers["max_rel_cam"] = float(f"{max(rel):.3e}")
    bad = [f"{k} = {v:.4f} < {min_agreement:g}" for k, v in agreement.items() if not v >= min_agreement]
    if not finite:
        bad.insert(0, "non-finite probabilities")
    if bad:
        numbers["failed"] = [k for k, v in agreement.items() if not v >= min_agreement]
        raise Int8GateError(
            f"int8 gate failed on {n} held-back images: the int8 model disagrees with fp32: "
            + "; ".join(bad),
            numbers,
        )
    return numbers
