"""Fused vs unfused PyTorch speed on the CPU: what BN folding buys before ONNX Runtime is involved.

    python -m defectscope.export.bench [--preset resnet_small] [--batch 8] [--size 256] [--reps 40]

Both models are timed interleaved (one forward each per round) so that load from other processes
hits them alike; the median round gives images/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .fuse import fuse_conv_bn


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from defectscope.models import model_from_config

    p = argparse.ArgumentParser(prog="python -m defectscope.export.bench", description=__doc__)
    p.add_argument("--preset", default="resnet_small", help="conf/model/<preset>.yaml")
    p.add_argument("--conf", type=Path, default=Path("conf/model"), help="preset folder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = OmegaConf.to_container(OmegaConf.load(args.conf / f"{args.preset}.yaml"), resolve=True)
    assert isinstance(raw, dict)
    cfg = {str(k): v for k, v in raw.items() if k != "weights"}  # random init: speed only
    torch.manual_seed(0)
    model = model_from_config(cfg, num_classes=4, in_chans=args.channels).eval()
    fused = fuse_conv_bn(model)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        for _ in range(3):
            model(x), fused(x)
        for _ in range(args.reps):
            for name, m in (("unfused", model), ("fused", fused)):
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    print(
        f"{args.preset}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, inference_mode"
    )
    for name, ts in times.items():
        print(f"  {name:8s} {args.batch / statistics.median(ts):8.1f} images/s (median of {args.reps})")
    ratio = statistics.median(times["unfused"]) / statistics.median(times["fused"])
    print(f"  speed-up {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
