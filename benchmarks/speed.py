"""defectscope speed benchmark: model throughput, machine peak, end to end, training, memory (issue 6),
decode-bound cases against the all-cores CPU bound and watch latency (issue 20).

    python benchmarks/speed.py [--quick] [--model resnet_small] [--threads N] [--baseline SRC]
                               [--out docs/bench/speed.json] [--only throughput,sgemm,e2e,train,memory,gpu,...]

One run measures everything with the same weights, inputs and thread count (default: every core
this process may use) and writes ``OUT`` (JSON with every figure and the machine), ``OUT`` with
``.md`` (the table for docs/benchmarks.md, also printed) and ``OUT`` with ``.png`` (images/s vs
batch size).  With ``--only`` the named sections are re-measured and merged into an existing
``OUT`` of the same model and mode; each section records when it was measured.  Generated images
and models are cached in ``--workdir`` (git-ignored ``outputs/bench`` by default).  ``--baseline``
names another checkout's source folder (the one holding ``defectscope/``); the ``cases`` section then
also runs that code's `defectscope inspect` on the same inputs, for before/after figures in one run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench_common import REPO, ForeignLoad, load_average, logical_cores, machine_info, preset_config

SECTIONS = ("sgemm", "throughput", "gpu", "e2e", "memory", "train", "cases", "watch")


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``--quick`` shrinks everything for tests."""

    min_seconds: float = 2.0
    warmup_seconds: float = 0.5
    sgemm_n: int = 4096
    e2e_images: int = 2000
    e2e_min_side: int = 96
    e2e_max_side: int = 512
    memory_inputs: tuple[int, int] = (1000, 10000)
    train_images: int = 1000
    train_epochs: int = 4
    small_images: int = 500  # case (b): distinct 300x300 grey PNGs, each listed small_repeat times
    small_repeat: int = 4
    camera_frames: int = 8  # case (c): distinct frames per kind
    camera_size: tuple[int, int] = (2448, 2048)
    camera_kinds: tuple[str, ...] = ("grey-png", "grey-jpg", "rgb-png", "rgb-jpg")
    camera_seconds: float = 6.0  # inputs per camera case: about this long at the bound
    watch_frames: int = 100
    watch_fps: float = 5.0
    watch_kinds: tuple[str, ...] = ("grey-png", "grey-jpg", "rgb-png", "rgb-jpg")


QUICK = Sizes(
    min_seconds=0.3,
    warmup_seconds=0.05,
    sgemm_n=1024,
    e2e_images=40,
    memory_inputs=(20, 200),
    train_images=64,
    train_epochs=2,
    small_images=8,
    small_repeat=2,
    camera_frames=2,
    camera_size=(612, 512),
    camera_kinds=("grey-jpg",),
    camera_seconds=0.2,
    watch_frames=6,
    watch_fps=10.0,
    watch_kinds=("grey-jpg",),
)


def _counts(text: str) -> tuple[int, int]:
    try:
        small, large = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two counts such as 1000,10000, got {text!r}") from None
    if small < 1 or large % small:
        raise argparse.ArgumentTypeError(f"the second count must be a multiple of the first, got {text!r}")
    return small, large


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {bad or text!r}; choose from {', '.join(SECTIONS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    from defectscope.runtime.options import default_workers

    p = argparse.ArgumentParser(
        prog="python benchmarks/speed.py", description=(__doc__ or "").strip().splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests; figures are meaningless)")
    p.add_argument("--model", default="resnet_small", help="conf/model preset (default resnet_small)")
    p.add_argument("--threads", type=int, default=None, help="threads for every row (default: all cores)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "speed.json", help="JSON output")
    p.add_argument(
        "--only", type=_sections, default=list(SECTIONS), help=f"comma list of {','.join(SECTIONS)}"
    )
    p.add_argument(
        "--workdir", type=Path, default=REPO / "outputs" / "bench", help="cache for images, models, runs"
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per throughput row")
    p.add_argument("--e2e-images", type=int, default=None, help="PNG files for the end-to-end run (2000)")
    p.add_argument(
        "--memory-inputs", type=_counts, default=None, help="inspect inputs, small,large (1000,10000)"
    )
    p.add_argument("--train-images", type=int, default=None, help="synthetic training set size (1000)")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs; the first is not timed (4)")
    p.add_argument("--batch-size", type=int, default=16, help="inspect --batch-size (its default, 16)")
    p.add_argument("--workers", type=int, default=default_workers(), help="inspect --workers (its default)")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="source folder of another checkout (holding defectscope/): the cases section also runs its "
        "inspect, for before figures (e.g. git archive main inspect | tar -x -C /tmp/base; /tmp/base/inspect)",
    )
    p.add_argument(
        "--inspect-args",
        type=shlex.split,
        default=[],
        help="extra options for the cases section's inspect runs, to measure a lever against the defaults "
        "(e.g. --inspect-args='--threads 2': one batch on all cores instead of one per core)",
    )
    return p


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    given = {
        "min_seconds": args.min_seconds,
        "e2e_images": args.e2e_images,
        "memory_inputs": args.memory_inputs,
        "train_images": args.train_images,
        "train_epochs": args.train_epochs,
    }
    return replace(sizes, **{k: v for k, v in given.items() if v is not None})


def _log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def previous(out: Path, model: str, quick: bool, only: Sequence[str]) -> dict[str, Any]:
    """Earlier results to merge into when only some sections run (same model and mode only)."""
    if set(only) == set(SECTIONS) or not out.is_file():
        return {}
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("model") != model or bool(old.get("quick")) != quick:
        _log(f"{out} holds another model or mode; starting a fresh result file")
        return {}
    return old


def one_channel_model(cfg: dict[str, Any], workdir: Path, seed: int, state: dict[str, Any]) -> Path:
    """The 1-channel ONNX model the file-based sections inspect with (exported once per run)."""
    from bench_common import build_model, export, model_path

    if "onnx_1ch" not in state:
        state["onnx_1ch"] = export(build_model(cfg, 1, seed), cfg, 1, model_path(workdir, cfg, 1))
    path_: Path = state["onnx_1ch"]
    return path_


def run_section(
    name: str,
    args: argparse.Namespace,
    sizes: Sizes,
    cfg: dict[str, Any],
    threads: int,
    state: dict[str, Any],
) -> Any:
    import bench_e2e
    import bench_throughput
    from bench_common import bench_sgemm

    work: Path = args.workdir
    if name == "sgemm":
        return bench_sgemm(sizes.sgemm_n, threads, sizes.min_seconds)
    if name == "throughput":
        out = bench_throughput.run_throughput(
            cfg,
            work,
            threads,
            min_seconds=sizes.min_seconds,
            warmup_seconds=sizes.warmup_seconds,
            seed=args.seed,
        )
        state["onnx_1ch"] = Path(out["models"]["1x300x300"]["onnx"])
        return out
    if name == "gpu":
        return bench_throughput.run_gpu(
            cfg, work, min_seconds=sizes.min_seconds, warmup_seconds=sizes.warmup_seconds, seed=args.seed
        )
    if name in ("e2e", "memory"):
        onnx = one_channel_model(cfg, work, args.seed, state)
        n = max(sizes.e2e_images, sizes.memory_inputs[0]) if name == "memory" else sizes.e2e_images
        paths = bench_e2e.image_set(work, n, sizes.e2e_min_side, sizes.e2e_max_side)
        if name == "e2e":
            return bench_e2e.run_e2e(onnx, paths, work, threads, args.batch_size, args.workers)
        return bench_e2e.run_memory(
            onnx, paths, work, threads, args.batch_size, args.workers, sizes.memory_inputs
        )
    if name in ("cases", "watch"):
        return _decode_bound(name, args, sizes, cfg, state)
    if name == "train":
        import bench_train

        return bench_train.run_train(
            args.model,
            cfg,
            work,
            images=sizes.train_images,
            epochs=sizes.train_epochs,
            threads=threads,
            quick=args.quick,
        )
    raise ValueError(name)


def _decode_bound(
    name: str, args: argparse.Namespace, sizes: Sizes, cfg: dict[str, Any], state: dict[str, Any]
) -> Any:
    """Issue 20's sections: the decode-bound cases, and watch latency on camera frames."""
    import os

    import bench_cases
    import bench_e2e
    import bench_watch
    from defectscope.runtime.cli import build_parser as inspect_parser

    work: Path = args.workdir
    frames, size = sizes.camera_frames, sizes.camera_size
    if name == "watch":
        rows = [
            bench_watch.watch_row(
                work, kind, frames, size, args.seed, fps=sizes.watch_fps, count=sizes.watch_frames
            )
            for kind in sizes.watch_kinds
        ]
        return {"rows": rows}
    mixed = bench_e2e.image_set(work, sizes.e2e_images, sizes.e2e_min_side, sizes.e2e_max_side)
    small = bench_e2e.image_set(work, sizes.small_images, 300, 300)
    big_model = one_channel_model(cfg, work, args.seed, state)
    small_model = bench_cases.small_model(work, 1, "exact", args.seed)
    cases = [
        (bench_cases.Case(f"mixed-png-{args.model}", big_model, mixed), 0.0),
        (bench_cases.Case("300-grey-png-tiny", small_model, small, sizes.small_repeat), 0.0),
        *bench_cases.camera_cases(work, frames, size, sizes.camera_seconds, args.seed, sizes.camera_kinds),
    ]
    env = None
    if args.baseline is not None:
        if not (args.baseline / "defectscope" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {args.baseline}: no defectscope/ package in that folder")
        env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
    batch = int(inspect_parser().get_default("batch_size"))
    return bench_cases.run_cases(cases, work, logical_cores(), batch, env, _log, args.inspect_args)


def write_outputs(results: dict[str, Any], out: Path) -> str:
    import bench_report

    results["targets"] = bench_report.targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = bench_report.markdown(results)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    bench_report.plot(results, out.with_suffix(".png"))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads = args.threads or logical_cores()
    if threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(threads)
    sizes = sizes_from(args)
    cfg = preset_config(args.model)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = previous(args.out, args.model, args.quick, args.only)
    results.update(
        model=args.model,
        model_config=cfg,
        quick=args.quick,
        machine=machine_info(threads),
        sizes=asdict(sizes),
        inspect_options={"batch_size": args.batch_size, "workers": args.workers},
    )
    sections = results.setdefault("sections", {})
    state: dict[str, Any] = {}
    for name in [s for s in SECTIONS if s in args.only]:
        _log(f"{name} ...")
        start, t0, foreign = load_average(), time.perf_counter(), ForeignLoad()
        results[name] = run_section(name, args, sizes, cfg, threads, state)
        sections[name] = {
            "measured_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1),
            "load_average_before": start,
            "load_average_after": load_average(),
            "foreign_cores": foreign.cores(),
        }
        _log(f"{name} done in {sections[name]['seconds']} s")
        write_outputs(results, args.out)  # a later failure keeps what was measured
    print(write_outputs(results, args.out), end="")
    _log(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
