"""Whether a score read from the heat map ranks defective ELPV cells above good ones better than P(defect).

    python benchmarks/elpv_cam_scores.py MODEL.onnx [--threads 2] [--limit N] [--out scores.json]

Global average pooling averages the class evidence over the whole cell, so a small defect is diluted by
the good area around it.  The exported heat map (``cam``: each class's logit per position, less the head's
bias) gives the per-position logits back (the bias is ``logits - mean(cam)``); their softmax is a
per-position P(defect) = P(p67) + P(p100).  Scored here, on the protocol's test cells through the runtime:
``gap`` (the model's own P(defect), as ``benchmarks/elpv.py``), ``peak`` (its largest per-position value),
``top5`` / ``top20`` (the mean of the highest 5 / 20 % of positions).  For each, the false-reject rate on
p0 at 95 / 99 % recall of p67 + p100 (``elpv_scores.operating_points``, the benchmark's own rule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defectscope.runtime.image import load_image, normalize_batch
from defectscope.runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from elpv_cells import DEFECTIVE_GRADES, EvalError, elpv_test_split, limit_cells
from elpv_scores import operating_points

SCORES = ("gap", "peak", "top5", "top20")


def position_defect(logits: np.ndarray, cam: np.ndarray, ng: list[int]) -> np.ndarray:
    """(N, positions) P(defect) per heat-map position: the softmax of the per-position logits over the
    classes, summed over the NG classes ``ng``."""
    per_position = cam + (logits - cam.mean(axis=(2, 3)))[:, :, None, None]
    per_position = per_position - per_position.max(axis=1, keepdims=True)
    p = np.exp(per_position)
    p /= p.sum(axis=1, keepdims=True)
    return p[:, ng].sum(axis=1).reshape(len(logits), -1)


def local_scores(
    probs: np.ndarray, logits: np.ndarray, cam: np.ndarray, ng: list[int]
) -> dict[str, np.ndarray]:
    """Each cell's score under every rule of :data:`SCORES`."""
    ranked = -np.sort(-position_defect(logits, cam, ng), axis=1)
    n = ranked.shape[1]
    return {
        "gap": probs[:, ng].sum(axis=1),
        "peak": ranked[:, 0],
        "top5": ranked[:, : max(1, n // 20)].mean(axis=1),
        "top20": ranked[:, : max(1, n // 5)].mean(axis=1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an exported 4-class ELPV model (ONNX)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N test cells (a quick check)")
    p.add_argument("--out", type=Path, help="result JSON")
    args = p.parse_args(argv)
    try:
        runner = Inspector(args.model, provider="cpu", threads=args.threads)
        cells = limit_cells(elpv_test_split().cells, args.limit)
    except (ModelLoadError, MetadataError, ProviderError, EvalError) as exc:
        raise SystemExit(str(exc)) from None
    meta = runner.metadata
    names = list(meta.class_names)
    if sorted(names) != sorted(["p0", "p33", "p67", "p100"]) or "cam" not in runner.output_names:
        raise SystemExit(f"{args.model}: expected a 4-class ELPV model with a heat map, got classes {names}")
    ng = [names.index(g) for g in DEFECTIVE_GRADES]
    scores: dict[str, list[float]] = {k: [] for k in SCORES}
    for i in range(0, len(cells), 16):
        arrays = [load_image(c.path, meta.loader) for c in cells[i : i + 16]]
        out = runner.predict(normalize_batch(arrays, meta.mean, meta.std), cam=True)
        for k, v in local_scores(out["probs"], out["logits"], out["cam"], ng).items():
            scores[k] += [float(x) for x in v]
    grades = [c.grade for c in cells]
    points = {k: operating_points(v, grades) for k, v in scores.items()}
    for k, point in points.items():
        frr = [point[r].get("false_reject_rate_p0") for r in ("recall_95", "recall_99")]
        shown = " / ".join("n/a" if f is None else f"{100 * f:.1f}" for f in frr)
        print(f"{k:6s} false rejects (p0) at 95 / 99 % recall: {shown}")
    if args.out:
        doc = {"model": args.model, "cells": len(cells), "operating_points": points}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
