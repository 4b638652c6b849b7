"""Turn the benchmark's JSON into target verdicts, a markdown table for docs/benchmarks.md and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_cases_report import decode_bound_markdown, decode_bound_targets, verdict

ENGINE_LABELS = {
    "eager": "PyTorch eager",
    "eager_fused": "PyTorch eager, BN folded",
    "onnxruntime": "defectscope ONNX Runtime (CPU)",
}


def _throughput_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per input shape: ONNX Runtime against eager PyTorch, and ONNX Runtime's share of the sgemm peak."""
    out: list[dict[str, Any]] = []
    tp = results.get("throughput") or {}
    peak = (results.get("sgemm") or {}).get("peak_gflops")
    shapes = list((tp.get("models") or {}).keys()) or ["1x300x300", "3x384x512"]
    for shape in shapes:
        ratio = (tp.get("ratios") or {}).get("onnxruntime_vs_eager", {}).get(f"{shape}_b8")
        out.append(
            {
                "target": f"ONNX Runtime / PyTorch eager images/s, batch 8, {shape}",
                "goal": ">= 2.0x",
                "value": ratio,
                "text": f"{ratio:.2f}x" if ratio is not None else "-",
                "status": verdict(ratio, 2.0),
            }
        )
    for shape in shapes:
        row = next(
            (
                r
                for r in tp.get("rows") or []
                if r["engine"] == "onnxruntime" and r["shape"] == shape and r["batch"] == 32
            ),
            None,
        )
        frac = row["gflops_achieved"] / peak if row and peak else None
        text = f"{frac:.1%} ({row['gflops_achieved']:.1f} of {peak:.1f} GFLOP/s)" if frac and row else "-"
        out.append(
            {
                "target": f"ONNX Runtime share of sgemm peak, batch 32, {shape}",
                "goal": ">= 50%",
                "value": round(frac, 4) if frac is not None else None,
                "text": text,
                "status": verdict(frac, 0.5),
            }
        )
    return out


def _e2e_target(results: dict[str, Any]) -> dict[str, Any]:
    e2e = results.get("e2e") or {}
    frac = e2e.get("fraction_of_bound_sequential")
    return {
        "target": "`defectscope inspect` images/s / (decode + compute) bound",
        "goal": ">= 85%",
        "value": frac,
        "text": (
            f"{frac:.1%} ({e2e['inspect_images_per_s']} vs {e2e['bound_sequential_images_per_s']} img/s; "
            f"{e2e.get('in_run_fraction_of_bound_sequential') or 0:.1%} leaving out start-up)"
            if frac is not None
            else "-"
        ),
        "status": verdict(frac, 0.85),
    }


def _train_target(results: dict[str, Any]) -> dict[str, Any]:
    tr = results.get("train") or {}
    ratio = tr.get("ratio_app_vs_plain")
    return {
        "target": "`defectscope train` images/s / plain PyTorch loop",
        "goal": ">= 0.90x",
        "value": ratio,
        "text": (
            f"{ratio:.2f}x ({tr['app']['images_per_s']} vs {tr['plain']['images_per_s']} img/s)"
            if ratio is not None
            else "-"
        ),
        "status": verdict(ratio, 0.9),
    }


def _memory_target(results: dict[str, Any]) -> dict[str, Any]:
    mem = results.get("memory") or {}
    ratio = mem.get("rss_ratio")
    runs = mem.get("runs") or []
    return {
        "target": f"inspect peak RSS, {' vs '.join(f'{n:,}' for n in mem.get('inputs', [1000, 10000])[::-1])} inputs",
        "goal": "within 10%",
        "value": ratio,
        "text": (
            f"{ratio:.3f}x ({runs[1]['peak_rss_mib']} vs {runs[0]['peak_rss_mib']} MiB)"
            if ratio is not None and len(runs) == 2
            else "-"
        ),
        "status": verdict(abs(ratio - 1.0) if ratio is not None else None, 0.10, higher_is_better=False),
    }


def _gpu_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per input shape: the faster of TensorRT fp16 and CUDA fp16 against eager fp32, batch 8, on the GPU."""
    gpu = results.get("gpu")
    rows = gpu.get("rows", []) if isinstance(gpu, dict) else []
    rate = {(r["engine"], r["shape"]): r["images_per_s"] for r in rows if r.get("batch") == 8}
    out: list[dict[str, Any]] = []
    for shape in sorted({r["shape"] for r in rows}) or ["1x300x300", "3x384x512"]:
        eager = rate.get(("eager_cuda_fp32", shape))
        fast = [(rate[(e, shape)], e) for e in ("ort_tensorrt_fp16", "ort_cuda_fp16") if (e, shape) in rate]
        best = max(fast) if fast else None
        ratio = round(best[0] / eager, 3) if best and eager else None
        text = (
            f"{ratio:.2f}x ({best[1]} {best[0]:.0f} vs eager {eager:.0f} img/s)"
            if ratio and best and eager
            else "-"
        )
        out.append(
            {
                "target": f"GPU: TensorRT or CUDA fp16 / PyTorch eager fp32 images/s, batch 8, {shape}",
                "goal": ">= 3.0x",
                "value": ratio,
                "text": text,
                "status": verdict(ratio, 3.0),
            }
        )
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target of the issue: what, goal, measured value and MET/MISSED."""
    return [
        *_throughput_targets(results),
        _e2e_target(results),
        _train_target(results),
        _memory_target(results),
        *decode_bound_targets(results),
        *_gpu_targets(results),
    ]


def busy_warning(results: dict[str, Any]) -> str:
    """A loud note when other processes competed for the cores: OpenMP (PyTorch) rows suffer most.

    Judged on the cores other processes kept busy during each section (``foreign_cores``); the load
    average also counts the benchmark's own threads, so it is only the fallback for old result files.
    """
    m = results.get("machine") or {}
    sections = (results.get("sections") or {}).values()
    foreign = [s["foreign_cores"] for s in sections if s.get("foreign_cores") is not None]
    if foreign:
        worst = max(foreign)
        if worst < 0.25:
            return ""
        return (
            f" **WARNING: other load (processes, or the hypervisor's steal time) kept up to {worst:.2f} cores "
            "busy during a section; the figures are not representative, rerun on an idle machine.**"
        )
    loads = [m.get("load_average_at_start")] + [s.get("load_average_before") for s in sections]
    worst = max((la[0] for la in loads if la), default=0.0)
    if worst < 0.5:
        return ""
    return (
        f" **WARNING: the machine was busy (1-minute load up to {worst:.2f}); the figures are not "
        "representative, rerun on an idle machine.**"
    )


def _throughput_lines(results: dict[str, Any]) -> list[str]:
    """Model throughput per shape and engine, and the sgemm peak."""
    lines: list[str] = []
    tp = results.get("throughput")
    if tp:
        batches = sorted({int(r["batch"]) for r in tp["rows"]})
        lines += [
            "",
            "Model throughput, images/s (input already preprocessed; "
            "GFLOP/s = 2 x MACs of convs and linears per image x images/s):",
            "",
            "| Shape (CxHxW) | Engine | "
            + " | ".join(f"batch {b}" for b in batches)
            + " | GFLOP/s at largest batch |",
            "|---|---|" + "---|" * len(batches) + "---|",
        ]
        for shape in tp["models"]:
            for engine, label in ENGINE_LABELS.items():
                rows = {r["batch"]: r for r in tp["rows"] if r["shape"] == shape and r["engine"] == engine}
                if not rows:
                    continue
                cells = [f"{rows[b]['images_per_s']:.1f}" if b in rows else "-" for b in batches]
                last = rows.get(batches[-1])
                lines.append(
                    f"| {shape} | {label} | "
                    + " | ".join(cells)
                    + f" | {last['gflops_achieved'] if last else '-'} |"
                )
    sg = results.get("sgemm")
    if sg:
        lines += [
            "",
            f"Machine peak: sgemm {sg['n']}x{sg['n']}, best call: numpy {sg['numpy']['best_gflops']}, "
            f"torch.mm {sg['torch']['best_gflops']}, ONNX Runtime MatMul "
            f"{sg.get('onnxruntime', {}).get('best_gflops', '-')} GFLOP/s; peak = {sg['peak_gflops']} "
            f"({sg['peak_source']}).",
        ]
    return lines


def _run_lines(results: dict[str, Any]) -> list[str]:
    """End to end inspect and training throughput."""
    lines: list[str] = []
    e2e = results.get("e2e")
    if e2e:
        lines += [
            "",
            f"End to end over {e2e['images']} synthetic PNGs (batch {e2e['batch_size']}, "
            f"{e2e['decode_workers']} decode workers, mean batch {e2e['mean_batch']}): "
            f"inspect {e2e['inspect_images_per_s']} img/s end to end ({e2e['inspect_in_run_images_per_s']} "
            f"after start-up), decode {e2e['decode_single_thread_images_per_s']} img/s on 1 thread / "
            f"{e2e['decode_parallel_images_per_s']} with {e2e['decode_workers']} workers, compute "
            f"{e2e['compute_images_per_s']} img/s; bound {e2e['bound_sequential_images_per_s']} img/s "
            f"(decode then compute), {e2e['bound_overlap_images_per_s']} img/s if decoding overlapped "
            f"compute for free ({e2e['fraction_of_bound_overlap']:.0%} of that); peak RSS "
            f"{e2e['inspect_peak_rss_mib']} MiB. inspect flushes its JSONL every batch and fsyncs at most once a "
            "second; an fsync per batch would cost "
            f"{e2e['batches']} batches x {e2e.get('commit_ms', '?')} ms = about "
            f"{e2e.get('per_batch_fsync_seconds', '?')} s of its {e2e['inspect_seconds']} s.",
        ]
    tr = results.get("train")
    if tr:
        lines += [
            "",
            f"Training: batch {tr['batch_size']}, {tr['num_workers']} loader workers, epochs "
            f"{tr['app']['timed_epochs']} timed of {tr['epochs']}: app {tr['app']['images_per_s']} img/s, "
            f"plain loop {tr['plain']['images_per_s']} img/s.",
        ]
    return lines


def _gpu_lines(results: dict[str, Any]) -> list[str]:
    """The GPU rows, or why there are none."""
    lines: list[str] = []
    gpu = results.get("gpu")
    if isinstance(gpu, str):
        lines += ["", f"GPU: {gpu}."]
    elif gpu:
        lines += [
            "",
            f"GPU ({gpu.get('device')}):",
            "",
            "| Shape | Engine | Batch | images/s |",
            "|---|---|---|---|",
        ]
        for r in gpu["rows"]:
            value = r.get("images_per_s", r.get("error", "-"))
            lines.append(f"| {r['shape']} | {r['engine']} | {r.get('batch', '-')} | {value} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """Tables ready to paste into docs/benchmarks.md."""
    m = results.get("machine") or {}
    lines = [
        f"## Speed benchmark: {results.get('model', '?')}",
        "",
        f"{m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical / {m.get('physical_cores', '?')} "
        f"physical cores, {m.get('threads', '?')} threads for every row; torch {m.get('torch', '?')}, "
        f"onnxruntime {m.get('onnxruntime', '?')}, numpy {m.get('numpy', '?')}; {m.get('date', '?')}"
        + (" (QUICK MODE: sizes too small for real figures)" if results.get("quick") else ""),
        f"Load average at start: {m.get('load_average_at_start')}; cores used by other load per section: "
        + (
            ", ".join(f"{k} {v.get('foreign_cores')}" for k, v in (results.get("sections") or {}).items())
            or "-"
        )
        + "."
        + busy_warning(results),
        "",
        "| Target | Goal | Measured | Status |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['goal']} | {t['text']} | {t['status']} |" for t in targets(results)]
    lines += _throughput_lines(results)
    lines += _run_lines(results)
    lines += decode_bound_markdown(results)
    lines += _gpu_lines(results)
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Images/s vs batch size, one panel per input shape, one line per engine."""
    tp = results.get("throughput")
    if not tp:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(tp["models"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for engine, label in ENGINE_LABELS.items():
            rows = sorted(
                (r for r in tp["rows"] if r["shape"] == shape and r["engine"] == engine),
                key=lambda r: r["batch"],
            )
            if rows:
                ax.plot(
                    [r["batch"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=label
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in tp["rows"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        values = [r["images_per_s"] for r in tp["rows"] if r["shape"] == shape and r["images_per_s"] > 0]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")  # engines orders of magnitude apart: keep the slow ones readable
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(f"{results.get('model', '')}, input {shape}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = results.get("machine") or {}
    fig.suptitle(f"{m.get('cpu', '')}, {m.get('threads', '?')} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
