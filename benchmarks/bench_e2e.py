"""End to end: `defectscope inspect` on real PNG files against its decode + compute bound, and its memory.

The bound is measured in the same run, on the same files, with the runtime's own pieces:
decode = :func:`defectscope.runtime.pipeline.decode` (the loader inspect calls), once in one thread
and once through :func:`decode_stream` with inspect's worker count and window; compute =
``Inspector.predict`` on the batches inspect's :class:`Batcher` forms from those images (same size
buckets, same batch size, same order).  Images come from `defectscope synth` (through
``deploy/bench_inspect.py``'s cached generator); inspect runs as a real subprocess whose peak RSS
comes from ``wait4`` via :mod:`bench_rss` (a direct child of this big process would report our RSS).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import REPO
from bench_rss import run_measured

sys.path.insert(0, str(REPO / "deploy"))
from bench_inspect import synth_images

_SESSION = re.compile(r"this session \d+ in [\d.]+ s, ([\d.]+) img/s")


def image_set(workdir: Path, n: int, min_side: int, max_side: int) -> list[Path]:
    """``n`` synthetic surfaces of random size, generated once per workdir (cached between runs)."""
    paths = synth_images(workdir / f"synth_{n}_{min_side}_{max_side}", n, min_side, max_side)
    if len(paths) != n:
        raise SystemExit(
            f"{workdir}: expected {n} cached images, found {len(paths)}; delete the folder to regenerate"
        )
    return [Path(p) for p in paths]


def commit_ms(folder: Path, commits: int = 50) -> float:
    """Milliseconds per write + flush + fsync of one small row batch (what a synced commit costs)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".jsonl") as f:
        t0 = time.perf_counter()
        for _ in range(commits):
            f.write("x" * 400 + "\n")
            f.flush()
            os.fsync(f.fileno())
        return (time.perf_counter() - t0) / commits * 1e3


def write_listing(path: Path, paths: list[Path], repeat: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.writelines(f"{p}\n" for p in paths)
    return path


def run_inspect(
    model: Path, listing: Path, out: Path, extra: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """`defectscope inspect MODEL @LISTING -o OUT ...` timed end to end (start-up included).

    ``env`` runs another checkout's code (``PYTHONPATH``), e.g. the unchanged code for "before" figures.
    """
    cmd = [sys.executable, "-m", "defectscope", "inspect", str(model), f"@{listing}", "-o", str(out), *extra]
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        run = run_measured(cmd, fo, fe, env)
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read().decode(), fe.read().decode()
    m = _SESSION.search(stdout)
    rows = 0
    if out.is_file():
        with open(out, encoding="utf-8") as f:
            rows = sum(1 for _ in f)
    return {
        **run,
        "rows": rows,
        "images_per_s": round(rows / run["seconds"], 1),
        # inspect's own rate: interpreter start-up and model load left out
        "in_run_images_per_s": float(m.group(1)) if m else None,
        "summary": stdout.strip().splitlines()[0] if stdout.strip() else stderr.strip()[-300:],
    }


def inspect_args(threads: int, batch_size: int, workers: int) -> list[str]:
    return [
        "--provider",
        "cpu",
        "--threads",
        str(threads),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
    ]


def _decode_times(names: list[str], cfg: Any, workers: int, window: int) -> tuple[list[Any], float, float]:
    """The decoded items and the seconds per image to decode them on one thread and on ``workers``."""
    from defectscope.runtime.pipeline import decode, decode_stream

    n = len(names)
    t0 = time.perf_counter()
    items = [decode(p, cfg) for p in names]
    t_dec1 = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    decoded = sum(1 for _ in decode_stream(names, cfg, workers, window))
    t_decp = (time.perf_counter() - t0) / n
    bad = [it.path for it in items if it.error is not None]
    if bad or decoded != n:
        raise RuntimeError(f"decode failed for {len(bad)} image(s), e.g. {bad[:1]}")
    return items, t_dec1, t_decp


def _compute_times(inspector: Any, items: list[Any], batch_size: int) -> tuple[float, float, list[int]]:
    """Seconds per image to preprocess and to run the model, batched as `defectscope inspect` batches;
    also the batch sizes."""
    from defectscope.runtime.pipeline import Batcher

    batcher = Batcher.for_stream(batch_size)  # the same policy as `defectscope inspect`
    batches = [b for it in items for b in batcher.add(it)] + batcher.drain()
    warm = inspector.preprocess([it.array for it in batches[0] if it.array is not None])
    inspector.predict(warm, cam=False)
    t_pre = t_comp = 0.0
    for group in batches:
        t0 = time.perf_counter()
        x = inspector.preprocess([it.array for it in group if it.array is not None])
        t1 = time.perf_counter()
        inspector.predict(x, cam=False)
        t_pre += t1 - t0
        t_comp += time.perf_counter() - t1
    n = len(items)
    return t_pre / n, t_comp / n, [len(g) for g in batches]


def run_e2e(
    onnx_path: Path, paths: list[Path], workdir: Path, threads: int, batch_size: int, workers: int
) -> dict[str, Any]:
    """Decode-only, compute-only and the real inspect run over the same ``paths``."""
    from defectscope.runtime import Inspector

    n = len(paths)
    names = [str(p) for p in paths]
    for p in paths:  # page cache: every pass below (and inspect) reads warm files
        p.read_bytes()
    inspector = Inspector(onnx_path, provider="cpu", threads=threads, log=lambda _m: None)
    cfg = inspector.loader_config
    window = max(2 * workers, batch_size) + workers  # as `defectscope inspect` sizes it

    items, t_dec1, t_decp = _decode_times(names, cfg, workers, window)
    t_pre, t_comp, sizes = _compute_times(inspector, items, batch_size)
    del items, inspector

    listing = write_listing(workdir / "lists" / f"e2e_{n}.txt", paths)
    run = run_inspect(onnx_path, listing, workdir / "e2e.jsonl", inspect_args(threads, batch_size, workers))
    if run["exit_code"] != 0 or run["rows"] != n:
        raise RuntimeError(f"defectscope inspect failed: {run}")
    in_run = run["in_run_images_per_s"]  # inspect's own rate: start-up and model load excluded
    e2e = float(run["images_per_s"])
    fsync = commit_ms(workdir)
    bound_seq = 1.0 / (t_dec1 + t_comp)
    bound_overlap = 1.0 / max(t_decp, t_comp)
    return {
        "images": n,
        "batch_size": batch_size,
        "decode_workers": workers,
        "threads": threads,
        "batches": len(sizes),
        "mean_batch": round(n / len(sizes), 2),
        "decode_single_thread_images_per_s": round(1 / t_dec1, 1),
        "decode_parallel_images_per_s": round(1 / t_decp, 1),
        "preprocess_images_per_s": round(1 / t_pre, 1) if t_pre > 0 else None,
        "compute_images_per_s": round(1 / t_comp, 1),
        "bound_sequential_images_per_s": round(bound_seq, 1),
        "bound_overlap_images_per_s": round(bound_overlap, 1),
        "bound_note": (
            "sequential = 1 / (t_decode_1thread + t_compute) per image, the issue's bound; overlap = "
            "1 / max(t_decode_parallel, t_compute), optimistic: it assumes decoding threads get cores "
            "ONNX Runtime leaves idle"
        ),
        "inspect_images_per_s": e2e,
        "inspect_in_run_images_per_s": in_run,
        "inspect_seconds": round(run["seconds"], 2),
        "inspect_peak_rss_mib": run["peak_rss_mib"],
        "inspect_summary": run["summary"],
        "commit_ms": round(fsync, 2),
        "commit_note": (
            "inspect flushes its JSONL every batch and fsyncs at most once per --fsync-interval (1 s); "
            "commit_ms x batches is what an fsync per batch would cost (not part of the bound)"
        ),
        "per_batch_fsync_seconds": round(fsync * len(sizes) / 1e3, 2),
        "fraction_of_bound_sequential": round(e2e / bound_seq, 3),
        "fraction_of_bound_overlap": round(e2e / bound_overlap, 3),
        "in_run_fraction_of_bound_sequential": round(in_run / bound_seq, 3) if in_run else None,
    }


def run_memory(
    onnx_path: Path,
    paths: list[Path],
    workdir: Path,
    threads: int,
    batch_size: int,
    workers: int,
    counts: tuple[int, int],
) -> dict[str, Any]:
    """Peak RSS of inspect over ``counts[0]`` images and over the same images listed repeatedly."""
    small, large = counts
    if large % small or len(paths) < small:
        raise ValueError(f"memory counts {counts}: need {small} images and {large} a multiple of {small}")
    base = paths[:small]
    out: dict[str, Any] = {"inputs": list(counts), "distinct_images": small}
    runs = []
    for count in counts:
        listing = write_listing(
            workdir / "lists" / f"mem_{small}_x{count // small}.txt", base, count // small
        )
        run = run_inspect(
            onnx_path, listing, workdir / "mem.jsonl", inspect_args(threads, batch_size, workers)
        )
        if run["exit_code"] != 0 or run["rows"] != count:
            raise RuntimeError(f"defectscope inspect failed: {run}")
        runs.append(
            {
                "inputs": count,
                "seconds": round(run["seconds"], 2),
                "images_per_s": run["images_per_s"],
                "peak_rss_mib": run["peak_rss_mib"],
            }
        )
    out["runs"] = runs
    out["rss_ratio"] = round(float(runs[1]["peak_rss_mib"]) / float(runs[0]["peak_rss_mib"]), 3)
    return out
