"""Does a search find a front member as accurate as the baseline and faster? (docs/search.md)

    python benchmarks/bench_search.py --storage sqlite:///search.db --study NAME
        [--baseline-trial N | --baseline-run DIR] [--rounds 5] [--out result.json]

The baseline is the study's seed trial (the composed config: the experiment's own model and recipe,
trained at the search's fidelity), another trial (``--baseline-trial``), or a ``defectscope train``
run folder (``--baseline-run``: e.g. the default model with its full recipe; its best checkpoint is
exported here and timed at the seed trial's input size). Speeds are re-measured
here, baseline and front members interleaved round by round through the runtime (each round the
median of the search's own ``latency`` settings), so load from other processes hits them alike. The
target: a front member within ``--max-drop`` points of the baseline's validation metric at
>= ``--min-speedup`` x its images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench_common import load_average, logical_cores


def interleaved_ms(
    onnx: dict[int, str], sizes: dict[int, tuple[int, int]], rounds: int, batch: int
) -> dict[int, float]:
    """Median over rounds of each model's median latency per image, models alternating each round."""
    from defectscope.search.measure import LatencySettings, measure_latency

    settings = LatencySettings(batch=batch, warmup=3, repeats=15)
    runs: dict[int, list[float]] = {n: [] for n in onnx}
    for _ in range(rounds):
        for n, path in onnx.items():
            runs[n].append(measure_latency(path, *sizes[n], settings).ms_per_image)
    return {n: statistics.median(v) for n, v in runs.items()}


def run_baseline(run_dir: Path, metric: str) -> tuple[float, str]:
    """(best validation metric, exported ONNX path) of a ``defectscope train`` run folder."""
    import torch

    from defectscope.export.onnx_export import export_checkpoint

    ckpt = run_dir / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    scores = [
        v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint") and metric in k
    ]
    if not scores:
        raise SystemExit(f"{ckpt}: no ModelCheckpoint state monitoring {metric}")
    onnx = run_dir / "model.onnx"
    if not onnx.is_file():
        export_checkpoint(ckpt, onnx, log=lambda _m: None)
    return float(scores[0]), str(onnx)


def main(argv: list[str] | None = None) -> int:
    import optuna

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--baseline-trial", type=int, default=None)
    p.add_argument("--baseline-run", type=Path, default=None, help="a defectscope train run folder")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-drop", type=float, default=0.5, help="points of the metric (x100)")
    p.add_argument("--min-speedup", type=float, default=1.5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    study = optuna.load_study(study_name=a.study, storage=a.storage)
    done = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    base_no = a.baseline_trial
    if base_no is None:
        base_no = next(
            (n for n, t in done.items() if t.user_attrs.get("seed") == "the composed config"), None
        )
    if base_no not in done:
        p.error(f"baseline trial {base_no} is not a complete trial of {a.study}")
    members = sorted({t.number for t in study.best_trials} | {base_no})
    onnx = {n: done[n].user_attrs["onnx"] for n in members}
    lat = {n: done[n].user_attrs["latency"] for n in members}
    ms = interleaved_ms(
        onnx, {n: (lat[n]["height"], lat[n]["width"]) for n in members}, a.rounds, lat[base_no]["batch"]
    )
    base_metric, base_ips = done[base_no].values[0], 1000.0 / ms[base_no]
    rows: list[dict[str, Any]] = []
    for n in members:
        metric, ips = done[n].values[0], 1000.0 / ms[n]
        rows.append(
            {
                "trial": n,
                "metric": metric,
                "images_per_s": round(ips, 1),
                "speedup": round(ips / base_ips, 3),
                "metric_drop_pt": round((base_metric - metric) * 100, 2),
                "input": [lat[n]["height"], lat[n]["width"]],
                "flops": done[n].user_attrs.get("flops") if n in done else None,
                "params": done[n].params if n in done else str(a.baseline_run),
                "meets_target": (base_metric - metric) * 100 <= a.max_drop
                and ips / base_ips >= a.min_speedup,
            }
        )
        print(
            f"trial {n:3d}{' (baseline)' if n == base_no else '':11s} metric {metric:.4f}  {ips:8.1f} images/s  x{ips / base_ips:.2f}"
        )
    result = {
        "study": a.study,
        "storage": a.storage.split("@")[-1],
        "baseline": str(a.baseline_run) if base_no == -1 else f"trial {base_no}",
        "trials_complete": len(done),
        "target": {"max_drop_pt": a.max_drop, "min_speedup": a.min_speedup},
        "met": any(r["meets_target"] and r["trial"] != base_no for r in rows),
        "rows": rows,
        "cores": logical_cores(),
        "load_average": load_average(),
    }
    print(
        f"target (<= {a.max_drop} pt below, >= {a.min_speedup}x images/s): {'met' if result['met'] else 'missed'}"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
