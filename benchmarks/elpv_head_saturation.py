"""Whether the head's ReLU6 caps the evidence of small defects under global average pooling (ELPV).

    python benchmarks/elpv_head_saturation.py best.ckpt m.predictions.jsonl [--threads 2] [--out sat.json]

EfficientNet-Lite ends in a 1x1 convolution with ReLU6 before the average over the 10 x 10 map of a
300 px cell.  If a small crack drove its positions to the cap of 6, its pooled evidence could not grow
past 6 / 100 per channel, and a different activation there would be a lever.  This counts, on the
protocol's test cells, how many of that layer's activations sit at the cap: overall, at the most saturated
position of each cell, and per channel, for good (p0) cells, defective cells the served graph catches
(P(defect) >= 0.5) and those it scores as good (P(defect) < 0.2).  P(defect) is read from the
predictions of ``benchmarks/elpv.py --out`` for the same model, so the groups are the served graph's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defectscope.checkpoint import CheckpointError, load_checkpoint
from defectscope.plain import PlainDataError
from defectscope.runtime.decision import is_ng
from defectscope.runtime.image import load_image, normalize_batch
from defectscope.runtime.metadata import parse_loader
from elpv_cells import DEFECTIVE_GRADES, elpv_test_split
from elpv_ensemble import read_rows

CAP = 6.0
GROUPS = {
    "good (p0)": lambda grade, p: grade == "p0",
    "defective, caught (P >= 0.5)": lambda grade, p: grade in DEFECTIVE_GRADES and bool(is_ng(p, 0.5)),
    "defective, scored good (P < 0.2)": lambda grade, p: grade in DEFECTIVE_GRADES and p < 0.2,
}


def saturation(head_out: torch.Tensor) -> dict[str, float]:
    """Shares of one cell's head activations (C, H, W) at the cap."""
    at_cap = (head_out >= CAP - 1e-3).float()
    return {
        "activations": float(at_cap.mean()),
        "channels_at_busiest_position": float(at_cap.mean(dim=0).max()),
        "channels_capped_anywhere": float(at_cap.amax(dim=(1, 2)).mean()),
    }


def measure(ckpt: str, predictions: str) -> dict[str, Any]:
    model, info = load_checkpoint(ckpt)
    conv_head = getattr(getattr(model, "features", None), "conv_head", None)
    if conv_head is None:
        raise SystemExit(
            f"{ckpt}: expected an EfficientNet-Lite model (features.conv_head), got {info['model']}"
        )
    rows = read_rows(Path(predictions))
    loader = parse_loader(info["loader"])
    seen: dict[str, torch.Tensor] = {}
    conv_head.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    groups: dict[str, list[dict[str, float]]] = {name: [] for name in GROUPS}
    model.eval()
    for cell in elpv_test_split().cells:
        p_defect = float(sum(rows[cell.path]["probs"][g] for g in DEFECTIVE_GRADES))
        x = torch.from_numpy(normalize_batch([load_image(cell.path, loader)], info["mean"], info["std"]))
        with torch.inference_mode():
            model(x)
        for name, member in GROUPS.items():
            if member(cell.grade, p_defect):
                groups[name].append(saturation(seen["out"][0]))
    return {
        name: {"cells": len(v), **{k: float(np.mean([s[k] for s in v])) for k in v[0]}} if v else {"cells": 0}
        for name, v in groups.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the run's best.ckpt")
    p.add_argument("predictions", help="benchmarks/elpv.py's predictions of that model's export (.jsonl)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="result JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = measure(args.checkpoint, args.predictions)
    except (CheckpointError, PlainDataError, OSError, KeyError) as exc:
        raise SystemExit(f"{args.checkpoint}: {exc}") from None
    for name, r in result.items():
        shares = ", ".join(f"{k} {100 * v:.2f} %" for k, v in r.items() if k != "cells")
        print(f"{name}: {r['cells']} cells; at the cap: {shares}")
    if args.out:
        doc = {"checkpoint": args.checkpoint, "predictions": args.predictions, "cap": CAP, "groups": result}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
