"""Model throughput: PyTorch eager (unfused, fused) vs the defectscope ONNX Runtime inspector.

One model per input shape (1-channel and 3-channel stems differ), each with the same weights in all
three engines; every engine sees the same input array at each batch size and the same thread count.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench_common import build_model, export, measure, model_path

#: (channels, height, width): a 300x300 grey part and a 512x384 (W x H) colour image.
SHAPES: tuple[tuple[int, int, int], ...] = ((1, 300, 300), (3, 384, 512))
BATCHES: tuple[int, ...] = (1, 8, 32)
ENGINES = ("eager", "eager_fused", "onnxruntime")


def shape_key(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"{c}x{h}x{w}"


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def run_throughput(
    cfg: dict[str, Any],
    workdir: Path,
    threads: int,
    *,
    min_seconds: float,
    warmup_seconds: float,
    seed: int = 0,
    batches: Sequence[int] = BATCHES,
    shapes: Sequence[tuple[int, int, int]] = SHAPES,
) -> dict[str, Any]:
    """Rows of images/s (and achieved GFLOP/s) per engine, shape and batch size, plus ratios."""
    from defectscope.export.fuse import fuse_conv_bn_report
    from defectscope.models.flops import count_flops
    from defectscope.runtime import Inspector

    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for c, h, w in shapes:
        key = shape_key((c, h, w))
        model = build_model(cfg, c, seed)
        fused, report = fuse_conv_bn_report(model)
        flops = count_flops(model, (c, h, w))
        onnx_path = export(model, cfg, c, model_path(workdir, cfg, c))
        inspector = Inspector(onnx_path, provider="cpu", threads=threads, log=lambda _m: None)
        models[key] = {
            "onnx": str(onnx_path),
            "params": flops.params,
            "macs_per_image": flops.macs,
            "flops_per_image": flops.flops,
            "bn_folded": len(report.fused),
            "bn_kept": len(report.kept),
            "ort_threads": inspector.threads,
        }
        rng = np.random.default_rng(seed)
        for b in batches:
            x = rng.standard_normal((b, c, h, w), dtype=np.float32)
            xt = torch.from_numpy(x)
            engines: dict[str, Any] = {
                "eager": _torch_call(model, xt),
                "eager_fused": _torch_call(fused, xt),
                "onnxruntime": _ort_call(inspector, x),
            }
            probs = {name: _probs(fn()) for name, fn in engines.items()}
            for name, fn in engines.items():
                r = measure(fn, b, min_seconds, warmup_seconds)
                diff = float(np.abs(probs[name] - probs["eager"]).max())
                rows.append(
                    {
                        "engine": name,
                        "shape": key,
                        "batch": b,
                        **r,
                        "gflops_achieved": float(f"{r['images_per_s'] * flops.flops / 1e9:.4g}"),
                        "max_prob_diff_vs_eager": diff,
                    }
                )
    return {
        "flops_note": "FLOPs = 2 x MACs of every Conv2d and Linear (defectscope.models.flops.count_flops)",
        "models": models,
        "rows": rows,
        "ratios": ratios(rows),
    }


def _torch_call(model: nn.Module, x: torch.Tensor) -> Any:
    def call() -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = model(x)
        return out

    return call


def _ort_call(inspector: Any, x: np.ndarray) -> Any:
    def call() -> np.ndarray:
        probs: np.ndarray = inspector.predict(x, cam=False)["probs"]
        return probs

    return call


def _probs(out: Any) -> np.ndarray:
    """Class probabilities from a torch forward (logits) or an inspector call (probs)."""
    if isinstance(out, torch.Tensor):
        return _softmax(out.float().numpy())
    return np.asarray(out, dtype=np.float64)


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per shape and batch: onnxruntime / eager and fused / eager images/s."""
    rate = {(r["engine"], r["shape"], r["batch"]): r["images_per_s"] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (engine, shape, batch), value in rate.items():
        if engine == "eager" or value <= 0:
            continue
        base = rate.get(("eager", shape, batch))
        if base:
            out.setdefault(f"{engine}_vs_eager", {})[f"{shape}_b{batch}"] = round(value / base, 3)
    return out


# --------------------------------------------------------------------------- optional GPU rows


def gpu_available() -> bool:
    import onnxruntime as ort

    return bool(torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers())


def run_gpu(
    cfg: dict[str, Any],
    workdir: Path,
    *,
    min_seconds: float,
    warmup_seconds: float,
    seed: int = 0,
    batches: Sequence[int] = BATCHES,
    shapes: Sequence[tuple[int, int, int]] = SHAPES,
) -> dict[str, Any] | str:
    """Eager fp32 (CUDA), ORT CUDA fp32/fp16 and TensorRT fp16 rows; a row that fails records why.

    Inspector rows include the host->device copy of the input and the copy of the outputs back.
    """
    if not gpu_available():
        return "not available on this machine"
    rows: list[dict[str, Any]] = []
    for c, h, w in shapes:
        key = shape_key((c, h, w))
        model = build_model(cfg, c, seed)
        engines = (["eager_cuda_fp32"] if torch.cuda.is_available() else []) + [
            "ort_cuda_fp32",
            "ort_cuda_fp16",
            "ort_tensorrt_fp16",
        ]
        for name in engines:
            try:
                runner = _gpu_runner(name, model, cfg, c, workdir)
                for b in batches:
                    x = np.random.default_rng(seed).standard_normal((b, c, h, w), dtype=np.float32)
                    r = measure(_ort_call(runner, x), b, min_seconds, warmup_seconds)
                    rows.append({"engine": name, "shape": key, "batch": b, **r})
            except Exception as exc:  # one missing library must not cost the other rows
                rows.append({"engine": name, "shape": key, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda", "rows": rows}


def _gpu_runner(name: str, model: nn.Module, cfg: dict[str, Any], channels: int, workdir: Path) -> Any:
    """Something with ``predict(x, cam=False)`` returning probabilities, for one GPU engine."""
    from defectscope.runtime import Inspector

    if name == "eager_cuda_fp32":
        return _CudaEager(model)
    fp16 = name.endswith("fp16")
    path = model_path(workdir, cfg, channels, fp16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, cfg, channels, path, fp16=fp16)
    provider = "tensorrt" if "tensorrt" in name else "cuda"
    return Inspector(path, provider=provider, trt_cache_dir=workdir / "trt", log=lambda _m: None)


class _CudaEager:
    """PyTorch eager on the GPU with the same predict(x) call shape as the inspector."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).to("cuda").eval()

    def predict(self, x: np.ndarray, cam: bool = False) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to("cuda")).softmax(1).cpu().numpy()
        torch.cuda.synchronize()
        return {"probs": np.asarray(out)}
