"""What a new image size costs on ONNX Runtime's CUDA provider, per provider-option set.

    python benchmarks/gpu_new_shapes.py [--model efficientnet_lite0] [--out gpu_new_shapes.json]

A line camera sends one size, but ``defectscope inspect`` on a mixed folder meets a new size with
almost every image, and ORT's CUDA provider prepares its convolutions per input shape.  For each
option set this records the session start, the first and second call at each of several new sizes
(batch 1), and the steady images/s at one fixed batch, so the runtime's defaults can be chosen on
measurements.  Needs onnxruntime-gpu and a GPU; elsewhere it writes what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import build_model, export, machine_info, measure, model_path, preset_config

#: (name, CUDA provider options); the runtime's choice is ``heuristic``
OPTION_SETS: tuple[tuple[str, dict[str, str]], ...] = (
    ("exhaustive", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
    ("heuristic", {"cudnn_conv_algo_search": "HEURISTIC"}),
    ("default", {"cudnn_conv_algo_search": "DEFAULT"}),
    ("heuristic-small-ws", {"cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0"}),
    ("heuristic-nhwc", {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}),
)
NEW_SIZES = ((300, 300), (461, 388), (203, 196), (333, 191), (241, 503))
#: fp16 models are timed with these option sets only (device time is short)
FP16_SETS = ("heuristic", "heuristic-nhwc")


def one_option_set(path: Path, options: dict[str, str], channels: int, batch: int) -> dict[str, Any]:
    import onnxruntime as ort

    from defectscope.runtime.providers import session_options

    t0 = time.perf_counter()
    sess = ort.InferenceSession(
        str(path), sess_options=session_options(None, "all"),
        providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"],
    )  # fmt: skip
    start_s = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    first, second = [], []
    for h, w in NEW_SIZES:
        x = rng.standard_normal((1, channels, h, w), dtype=np.float32)
        for times in (first, second):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append(round((time.perf_counter() - t0) * 1000, 1))
    x = rng.standard_normal((batch, channels, 384, 512), dtype=np.float32)
    steady = measure(lambda: sess.run(None, {name: x}), batch, 1.5, 0.5)
    return {
        "providers": sess.get_providers(),
        "start_s": round(start_s, 2),
        "first_call_ms": first,
        "second_call_ms": second,
        "median_first_ms": statistics.median(first),
        "median_second_ms": statistics.median(second),
        f"images_per_s_b{batch}_384x512": steady["images_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0", help="conf/model preset (random weights)")
    p.add_argument("--out", type=Path, default=Path("gpu_new_shapes.json"))
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench"))
    p.add_argument("--batch", type=int, default=32, help="batch of the steady images/s row")
    args = p.parse_args(argv)
    import onnxruntime as ort

    result: dict[str, Any] = {"machine": machine_info(0), "onnxruntime": ort.__version__, "sizes": NEW_SIZES}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        result["error"] = "this onnxruntime build has no CUDAExecutionProvider"
    else:
        cfg = preset_config(args.model)
        for fp16 in (False, True):
            path = export(build_model(cfg, 3, 0), cfg, 3, model_path(args.workdir, cfg, 3, fp16), fp16=fp16)
            for label, options in OPTION_SETS:
                if fp16 and label not in FP16_SETS:
                    continue
                key = f"{label}{'-fp16' if fp16 else ''}"
                try:
                    result[key] = one_option_set(path, options, 3, args.batch)
                except Exception as exc:  # one option ORT rejects must not cost the others
                    result[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(key, json.dumps(result[key]), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
