"""What a search leaves behind: ``pareto.csv``, ``trials.csv``, ``front.png``, ``search_summary.json`` and
one-line commands that retrain or export any front member. The front is Optuna's own
(``study.best_trials``: non-dominated, and within the latency budget when one was set)."""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..training.plots import plain_text
from .settings import LATENCY, SearchSettings
from .space import MISSING, Param, base_value, split_name


def hydra_value(v: Any) -> str:
    """A value as a Hydra override writes it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def param_overrides(cfg: Any, params: Sequence[Param], values: dict[str, Any]) -> list[str]:
    """``model.widths[0]=8`` ... -> ``model.widths=[8,...]``: one override per config key, ``+`` for new keys."""
    from omegaconf import OmegaConf

    merged: dict[str, Any] = {}
    for p in params:
        if p.name not in values:
            continue
        key, index = split_name(p.name)
        if index is None:
            merged[key] = values[p.name]
            continue
        if key not in merged:
            base = base_value(cfg, Param(key, p.distribution))
            merged[key] = list(base) if base is not MISSING and base is not None else []
        merged[key][index] = values[p.name]
    out = []
    for key, value in merged.items():
        prefix = "" if OmegaConf.select(cfg, key, default=MISSING) is not MISSING else "+"
        out.append(f"{prefix}{key}={hydra_value(value)}")
    return out


def commands(cfg: Any, params: Sequence[Param], t: FrozenTrial) -> dict[str, str]:
    base = [str(o) for o in t.user_attrs.get("base_overrides", [])]
    retrain = ["defectscope", "train", *base, *param_overrides(cfg, params, t.params)]
    out = {"retrain": " ".join(shlex.quote(a) for a in retrain)}
    ckpt = t.user_attrs.get("checkpoint")
    if ckpt:
        out["export"] = " ".join(
            shlex.quote(a) for a in ["defectscope", "export", ckpt, "-o", f"trial{t.number}.onnx"]
        )
    return out


def row(cfg: Any, params: Sequence[Param], s: SearchSettings, t: FrozenTrial) -> dict[str, Any]:
    u = t.user_attrs
    values = dict(zip(s.objectives, t.values or []))
    out: dict[str, Any] = {"trial": t.number, **values}
    lat = values.get(LATENCY)
    out["images_per_s"] = round(1000.0 / lat, 1) if lat else None
    for key in ("flops", "params", "onnx_bytes", "latency_ms_untrained", "stopped_at_epoch", "seed"):
        out[key] = u.get(key)
    for key in ("checkpoint", "onnx", "mlflow_run_id"):
        out[key] = u.get(key)
    out.update({f"param:{k}": v for k, v in t.params.items()})
    out.update(commands(cfg, params, t))
    return out


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation (how well FLOPs order the measured latencies)."""
    if len(x) < 3:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def best_under(s: SearchSettings, rows: Sequence[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    fits = [r for r in rows if r.get(LATENCY) is not None and r[LATENCY] <= budget]
    if not fits:
        return None
    sign = 1 if s.direction == "maximize" else -1
    return max(fits, key=lambda r: (sign * r[s.metric], -r[LATENCY]))


@plain_text
def plot_front(
    path: Path, s: SearchSettings, rows: Sequence[dict[str, Any]], front: set[int], rho: float | None
) -> Path:
    """Left: every finished trial, latency against the metric, front in red; right: FLOPs against latency."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4.5), dpi=110)
    ax, bx = fig.subplots(1, 2)
    for r in rows:
        stopped = r.get("stopped_at_epoch") is not None
        ax.scatter(
            r[LATENCY], r[s.metric], s=28, facecolors="none" if stopped else "0.6", edgecolors="0.4", zorder=2
        )
        if r.get("seed"):
            ax.scatter(r[LATENCY], r[s.metric], s=160, marker="*", color="tab:blue", zorder=3)
    pts = sorted((r[LATENCY], r[s.metric], r["trial"]) for r in rows if r["trial"] in front)
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.step(xs, ys, where="post", color="tab:red", zorder=4, label="Pareto front")
        ax.scatter(xs, ys, color="tab:red", zorder=5)
        for x, y, n in pts:
            ax.annotate(
                str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="tab:red"
            )
    if s.max_latency_ms is not None:
        ax.axvline(s.max_latency_ms, color="tab:green", ls="--", label=f"budget {s.max_latency_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency per image through the runtime (ms, log scale)")
    ax.set_ylabel(s.metric)
    ax.set_title(f"{s.study_name}: {len(rows)} trials (star: seed, hollow: stopped early)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    with_flops = [r for r in rows if r.get("flops")]
    bx.scatter([r["flops"] / 1e9 for r in with_flops], [r[LATENCY] for r in with_flops], s=20, color="0.3")
    bx.set_xscale("log")
    bx.set_yscale("log")
    for axis in (ax.xaxis, bx.xaxis, bx.yaxis):
        axis.set_minor_formatter(NullFormatter())
    bx.set_xlabel("GFLOPs per image")
    bx.set_ylabel("measured latency (ms per image)")
    bx.set_title(
        "FLOPs vs measured latency" + (f" (Spearman {rho:.2f})" if rho is not None else ""), fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(
    study: optuna.Study, cfg: Any, params: Sequence[Param], s: SearchSettings, out_dir: Path
) -> dict[str, Any]:
    """Write the files, return the summary (also written as ``search_summary.json``)."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    rows = [row(cfg, params, s, t) for t in done]
    front_ids = {t.number for t in study.best_trials} if done else set()
    front = sorted((r for r in rows if r["trial"] in front_ids), key=lambda r: r[LATENCY])
    with_flops = [r for r in rows if r.get("flops")]
    rho = spearman([r["flops"] for r in with_flops], [r[LATENCY] for r in with_flops])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "pareto": write_csv(out_dir / "pareto.csv", front),
        "trials": write_csv(out_dir / "trials.csv", rows),
    }
    if rows:
        files["plot"] = plot_front(out_dir / "front.png", s, rows, front_ids, rho)
    states = {st.name.lower(): sum(t.state == st for t in trials) for st in TrialState}
    summary: dict[str, Any] = {
        "study": s.study_name,
        "objectives": s.objectives,
        "directions": s.directions,
        "trials": states,
        "front": front,
        "flops_latency_spearman": rho,
        "max_latency_ms": s.max_latency_ms,
        "best_under_budget": best_under(s, rows, s.max_latency_ms) if s.max_latency_ms is not None else None,
        "files": {k: str(v) for k, v in files.items()},
        "all": rows,
    }
    summary_path = out_dir / "search_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    summary["files"]["summary"] = str(summary_path)
    return summary


def summary_lines(summary: dict[str, Any], s: SearchSettings) -> list[str]:
    st = summary["trials"]
    lines = [
        f"== defectscope search: study {summary['study']!r}: {st['complete']} complete, {st['pruned']} pruned "
        f"(over budget or infeasible), {st['fail']} failed, {st['running']} running",
        f"Pareto front ({len(summary['front'])} trials, {s.metric} against latency per image):",
    ]
    for r in summary["front"]:
        lines += [
            f"  trial {r['trial']}: {s.metric}={r[s.metric]:.4f}  {r[LATENCY]:.3f} ms ({r['images_per_s']} images/s)"
            f"  {(r['flops'] or 0) / 1e9:.3f} GFLOPs",
            f"    retrain: {r['retrain']}",
        ]
        if r.get("export"):
            lines.append(f"    export:  {r['export']}")
    pick = summary.get("best_under_budget")
    if s.max_latency_ms is not None:
        lines.append(
            f"best under {s.max_latency_ms:g} ms: trial {pick['trial']} ({s.metric}={pick[s.metric]:.4f}, "
            f"{pick[LATENCY]:.3f} ms)\n    retrain: {pick['retrain']}"
            if pick
            else f"no finished trial measures under search.max_latency_ms={s.max_latency_ms:g}"
        )
    if summary["flops_latency_spearman"] is not None:
        lines.append(f"FLOPs vs measured latency: Spearman {summary['flops_latency_spearman']:.2f}")
    lines += [f"{k + ':':9s}{v}" for k, v in summary["files"].items()]
    return lines
