"""Does a search find a model as accurate as the baseline and faster? (docs/search.md)

    python benchmarks/bench_search.py --storage sqlite:///search.db --study NAME
        [--baseline-trial N | --baseline-run DIR] [--candidate-run DIR ...] [--rounds 5] [--out result.json]

Entries: the study's Pareto front, the baseline, and any ``--candidate-run`` (a front member retrained
with ``defectscope train``, for example with the full recipe's epochs). The baseline is the study's
seed trial (the composed config: the experiment's own model and recipe at the search's fidelity),
another trial (``--baseline-trial``), or a ``defectscope train`` run folder (``--baseline-run``: the
default model with its full recipe). A run folder's best checkpoint is exported here and timed at
its own representative input size (the median validation image after its loader policy, as the
search measures). Every entry is re-timed here, interleaved round by round through the runtime, so
load from other processes hits them alike. Target: an entry within ``--max-drop`` points of the
baseline's validation metric at >= ``--min-speedup`` x its images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench_common import load_average, logical_cores


def interleaved_ms(entries: dict[str, dict[str, Any]], rounds: int, batch: int) -> dict[str, float]:
    """Median over rounds of each entry's median latency per image, entries alternating each round."""
    from defectscope.search.measure import LatencySettings, measure_latency

    settings = LatencySettings(batch=batch, warmup=3, repeats=15)
    runs: dict[str, list[float]] = {k: [] for k in entries}
    for _ in range(rounds):
        for key, e in entries.items():
            runs[key].append(measure_latency(e["onnx"], *e["size"], settings).ms_per_image)
    return {k: statistics.median(v) for k, v in runs.items()}


def run_entry(run_dir: Path, metric: str) -> dict[str, Any]:
    """A ``defectscope train`` run folder: best metric (checkpoint callback state), export, input size."""
    from defectscope.checkpoint import load_checkpoint, read_info
    from defectscope.export.onnx_export import export_model
    from defectscope.runtime.files import file_sha256
    from defectscope.runtime.image import LoaderConfig
    from defectscope.search.measure import input_size, model_cost, native_size

    ckpt = run_dir / "checkpoints" / "best.ckpt"
    state = read_info(ckpt)[0].get("callbacks") or {}  # through the product's one checkpoint reader
    scores = [
        v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint") and metric in k
    ]
    if not scores:
        raise SystemExit(f"{ckpt}: no ModelCheckpoint state monitoring {metric}")
    onnx = run_dir / "model.onnx"
    model, info = load_checkpoint(ckpt)
    if not onnx.is_file():
        export_model(model, info, onnx, checkpoint_sha256=file_sha256(ckpt), log=lambda _m: None)
    loader = LoaderConfig(**info["loader"])
    h, w = input_size(native_size(info["val_paths"], loader.channels), loader)
    return {
        "metric": float(scores[0]),
        "onnx": str(onnx),
        "size": (h, w),
        "flops": model_cost(model, loader.channels, h, w)["flops"],
        "config": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    import optuna

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--baseline-trial", type=int, default=None)
    p.add_argument("--baseline-run", type=Path, default=None, help="a defectscope train run folder")
    p.add_argument("--candidate-run", type=Path, action="append", default=[], help="more run folders")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-drop", type=float, default=0.5, help="points of the metric (x100)")
    p.add_argument("--min-speedup", type=float, default=1.5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    study = optuna.load_study(study_name=a.study, storage=a.storage)
    metric = study.user_attrs["defectscope_objectives"][0]
    done = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    seed = next((n for n, t in done.items() if t.user_attrs.get("seed") == "the composed config"), None)
    base_trial = a.baseline_trial if a.baseline_trial is not None else seed
    entries: dict[str, dict[str, Any]] = {}
    for n in sorted(
        {t.number for t in study.best_trials} | ({base_trial} if a.baseline_run is None else set())
    ):
        t = done[n]
        lat = t.user_attrs["latency"]
        entries[f"trial {n}"] = {
            "metric": float(t.values[0]),
            "onnx": t.user_attrs["onnx"],
            "size": (lat["height"], lat["width"]),
            "flops": t.user_attrs.get("flops"),
            "config": t.params,
            "stopped_at_epoch": t.user_attrs.get("stopped_at_epoch"),
        }
    base = f"trial {base_trial}"
    if a.baseline_run is not None:
        base = f"run {a.baseline_run.name}"
        entries[base] = run_entry(a.baseline_run, metric)
    for run in a.candidate_run:
        entries[f"run {run.name}"] = run_entry(run, metric)
    if base not in entries:
        p.error(f"no baseline: {base} is not a complete trial of {a.study}")
    batch = next(iter(done.values())).user_attrs["latency"]["batch"]
    ms = interleaved_ms(entries, a.rounds, batch)
    base_metric, base_ips = entries[base]["metric"], 1000.0 / ms[base]
    rows: list[dict[str, Any]] = []
    for key, e in entries.items():
        ips = 1000.0 / ms[key]
        drop = (base_metric - e["metric"]) * 100
        row = {"entry": key, **{k: v for k, v in e.items() if k != "onnx"}, "images_per_s": round(ips, 1)}
        row.update(speedup=round(ips / base_ips, 3), metric_drop_pt=round(drop, 2))
        row["meets_target"] = key != base and drop <= a.max_drop and ips / base_ips >= a.min_speedup
        rows.append(row)
        mark = " (baseline)" if key == base else ""
        print(f"{key + mark:32s} {metric} {e['metric']:.4f}  {ips:8.1f} images/s  x{ips / base_ips:.2f}")
    result = {
        "study": a.study,
        "metric": metric,
        "baseline": base,
        "trials_complete": len(done),
        "target": {"max_drop_pt": a.max_drop, "min_speedup": a.min_speedup},
        "met": any(r["meets_target"] for r in rows),
        "rows": rows,
        "batch": batch,
        "rounds": a.rounds,
        "cores": logical_cores(),
        "load_average": load_average(),
    }
    print(
        f"target (<= {a.max_drop} pt below, >= {a.min_speedup}x images/s): {'met' if result['met'] else 'missed'}"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
