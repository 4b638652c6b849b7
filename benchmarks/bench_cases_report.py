"""Issue 20's part of the speed report: decode-bound cases against the all-cores bound, watch latency."""

from __future__ import annotations

from typing import Any


def verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= goal if higher_is_better else value <= goal
    return "MET" if ok else "MISSED"


def _target(name: str, goal: str) -> dict[str, Any]:
    """A target row not measured yet (the callers fill in value, text and status)."""
    return {"target": name, "goal": goal, "value": None, "text": "-", "status": verdict(None, 0)}


def decode_bound_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20: inspect against the all-cores bound and a naive loop (worst case), watch p99 latency."""
    rows = (results.get("cases") or {}).get("cases") or []
    watch = (results.get("watch") or {}).get("rows") or []
    worst = min(rows, key=lambda r: r["fraction_of_bound"], default=None)
    slow = min(rows, key=lambda r: r["vs_naive"], default=None)
    late = max(watch, key=lambda r: r["p99_over_budget"], default=None)
    n = len(rows)
    out = [
        _target(f"`defectscope inspect` / all-cores CPU bound, worst of {n} decode-bound cases", ">= 85%"),
        _target(f"`defectscope inspect` / naive loop, worst of {n} decode-bound cases", ">= 1.0x"),
        _target(
            "`defectscope watch` p99 latency to a durable row, 5 MP frames at 5/s, worst kind",
            "<= 2x single-image work",
        ),
    ]
    if worst and slow:
        v = worst["fraction_of_bound"]
        text = f"{v:.1%} ({worst['case']}: {worst['inspect']['images_per_s']} vs {worst['bound_images_per_s']} img/s)"
        out[0].update(value=v, text=text, status=verdict(v, 0.85))
        v = slow["vs_naive"]
        text = f"{v:.2f}x ({slow['case']}: {slow['inspect']['images_per_s']} vs {slow['naive_images_per_s']} img/s)"
        out[1].update(value=v, text=text, status=verdict(v, 1.0))
    if late:
        v = late["p99_over_budget"]
        text = (
            f"{late['durable']['p99_ms']} ms vs {late['budget_ms']} ms ({late['kind']}; {v:.2f}x the budget)"
        )
        out[2].update(value=v, text=text, status=verdict(v, 1.0, higher_is_better=False))
    return out


def decode_bound_markdown(results: dict[str, Any]) -> list[str]:
    """The per-case table (stage costs, bound, naive loop, inspect, ratios) and the watch latencies."""
    lines: list[str] = []
    cases = results.get("cases") or {}
    rows = cases.get("cases") or []
    if rows:
        before = cases.get("baseline")
        lines += [
            "",
            f"Decode-bound cases: CPU ms per image of each stage on one thread (model at inspect's batch size "
            f"{cases.get('batch_size')}); bound = cores / sum; inspect "
            f"`{' '.join(cases.get('inspect_args') or ['--provider', 'cpu'])}` (otherwise its defaults), start-up "
            "left out"
            + ("; before = the baseline checkout's inspect on the same inputs" if before else "")
            + ":",
            "",
            "| case | inputs | decoded → model | read | decode | resize | normalise | model | bound img/s | "
            "naive img/s | inspect img/s | inspect / bound | inspect / naive |"
            + (" before img/s | before / bound |" if before else ""),
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|---:|" if before else ""),
        ]
        for r in rows:
            st = r["stages"]
            shape = "x".join(str(v) for v in st["input_shape"][:2][::-1])
            cells = [
                r["case"],
                str(r["inputs"]),
                f"{'x'.join(map(str, st['decoded_size']))} → {shape}",
                *(f"{st['ms'][k]:.2f}" for k in ("read", "decode", "resize", "normalise", "model")),
                f"{r['bound_images_per_s']}",
                f"{r['naive_images_per_s']}",
                f"{r['inspect']['images_per_s']}",
                f"{r['fraction_of_bound']:.1%}",
                f"{r['vs_naive']:.2f}x",
            ]
            if before:
                b = r.get("before")
                cells += [f"{b['images_per_s']}", f"{r['before_fraction_of_bound']:.1%}"] if b else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    watch = (results.get("watch") or {}).get("rows") or []
    if watch:
        w0 = watch[0]
        lines += [
            "",
            f"`defectscope watch` latency, {w0['frames']} frames per kind at {w0['fps']:g}/s (`{w0['options']}`): "
            "visible = row readable, durable = frame moved (only after its row was fsync'd); "
            "budget = 2 x (read + decode + resize + normalise + model at batch 1, one thread):",
            "",
            "| frames | budget ms | visible p50 / p99 ms | durable p50 / p99 / max ms | p99 / budget |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in watch:
            v, d = r["visible"], r["durable"]
            lines.append(
                f"| {r['kind']} {'x'.join(map(str, r['decoded_size']))} | {r['budget_ms']} | "
                f"{v['p50_ms']} / {v['p99_ms']} | {d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} | "
                f"{r['p99_over_budget']:.2f} |"
            )
    scaling = [(r["case"], r["decode_only_images_per_s"]) for r in rows if "decode_only_images_per_s" in r]
    if scaling:
        workers = scaling[0][1]["workers"]
        lines += [
            "",
            f"Decoding alone (read, decode, resize), images/s: one thread, {workers} threads (inspect's "
            f"decode_stream) and {workers} processes (a warm pool, chunks of paths):",
            "",
            f"| case | 1 thread | {workers} threads | {workers} processes |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {c} | {s['one_thread']} | {s['threads']} | {s['processes']} |" for c, s in scaling]
    return lines
