"""Which convolutions int8 hurts: one fp32 graph quantised with its first N convolutions kept fp32, for
several N, each compared with fp32 on held-back images and timed against it.

    python benchmarks/int8_layers.py m.onnx --images val.txt [--reduce-range] [--fp32-convs 0,1,2,3,5,8]
        [--threads 2] --out docs/bench/int8_fp32_convs.json

The images are split as `defectscope export --int8` splits them (calibration / held-back check) and
quantised by the same function, so the figures are what the export's gate would see: top-1 agreement,
the change in P(NG) and how well each graph keeps fp32's ranking of P(NG) (which the threshold and the
operating point rest on).  Speed: the graphs take turns on one batch, best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from defectscope.export.parity import list_images, load_groups, real_batches
from defectscope.export.quantize import Int8Config, early_convs, quantize_qdq, split_paths
from defectscope.runtime.image import normalize_batch
from defectscope.runtime.metadata import INPUT_NAME
from defectscope.runtime.sessions import read_metadata


def _chunks(batches: list[Any], size: int = 16) -> list[Any]:
    return [b[i : i + size] for b in batches for i in range(0, len(b), size)]


def _session(graph: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def _probs(session: ort.InferenceSession, batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([session.run(["probs"], {INPUT_NAME: b})[0] for b in batches])


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x))


def compare(ref: np.ndarray, got: np.ndarray, ng: list[int]) -> dict[str, float]:
    """Agreement of one int8 graph's probabilities with fp32's on the same images."""
    p_ref, p_got = ref[:, ng].sum(1), got[:, ng].sum(1)
    return {
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "mean_abs_p_ng": float(np.abs(p_got - p_ref).mean()),
        "max_abs_p_ng": float(np.abs(p_got - p_ref).max()),
        "rank_corr_p_ng": float(np.corrcoef(_ranks(p_ref), _ranks(p_got))[0, 1]),
    }


def timed(sessions: dict[str, ort.InferenceSession], batch: np.ndarray, rounds: int) -> dict[str, float]:
    """Images/s of each graph on ``batch``, the graphs taking turns so a busy moment hits all alike."""
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(["probs"], {INPUT_NAME: batch})
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(len(batch) / seconds, 1) for name, seconds in best.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    fp32 = args.model.read_bytes()
    proto = onnx.load_from_string(fp32)
    meta = read_metadata(ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]), str(args.model))
    paths = list_images(args.images)  # a folder, a list file or a CSV manifest, as export --images reads it
    cfg = Int8Config(reduce_range=args.reduce_range)
    calib_paths, check_paths = split_paths(paths, cfg)
    calib, _, _ = load_groups(calib_paths, meta.loader, len(calib_paths))
    check, n_check, _ = real_batches(check_paths, meta.loader, meta.mean, meta.std, len(check_paths))
    check = _chunks(check)
    sessions = {"fp32": _session(fp32, args.threads)}
    ref = _probs(sessions["fp32"], check)
    rows: dict[str, Any] = {}
    for n in args.fp32_convs:
        graph = quantize_qdq(
            fp32,
            _chunks(calib),
            Int8Config(reduce_range=args.reduce_range, fp32_convs=n),
            lambda imgs: normalize_batch(imgs, meta.mean, meta.std),
        )
        name = f"int8, first {n} fp32"
        sessions[name] = _session(graph, args.threads)
        rows[name] = {
            "fp32_convs": early_convs(proto.graph, n),
            **compare(ref, _probs(sessions[name], check), meta.ng_indices),
        }
        print(name, {k: v for k, v in rows[name].items() if k != "fp32_convs"}, flush=True)
    if args.rounds > 0:  # 0: agreement only (the figures hold on a busy machine; speeds would not)
        for name, images_per_s in timed(sessions, check[0], args.rounds).items():
            rows.setdefault(name, {})["images_per_s"] = images_per_s
    return {
        "model": str(args.model), "reduce_range": args.reduce_range, "check_images": n_check,
        "calib_images": len(calib_paths), "threads": args.threads, "batch": len(check[0]), "rows": rows,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an fp32 export (defectscope export, no --int8)")
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="a text file of image paths, one per line (e.g. from benchmarks/elpv.py --val-list)",
    )
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    p.add_argument("--fp32-convs", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 5, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds; 0 = agreement only")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = run(args)
    for name, row in result["rows"].items():
        if "images_per_s" in row:
            print(f"{name}: {row['images_per_s']} images/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
