"""Position-holdout benchmark (issue 17): is a defect found where no training image had one?

    python benchmarks/position_holdout.py --workdir outputs/holdout/base --label base [options]
        [--train-region left] [--regions left,centre,right] [--n-train 800] [--n-test 600]
        [--min-size 128] [--max-size 224] [--epochs 15] [--seed 42] [--threads 2]
        [--out result.json] [hydra overrides for training, e.g. model.blur=3 model.padding_mode=reflect]
    python benchmarks/position_holdout.py --table a.json b.json ...    # merge result files into one table
    python benchmarks/position_holdout.py --speed a/model.onnx b/model.onnx ... [--threads 2] [--rounds 5]

Every step is the real CLI in a subprocess, as a user would run it:

1. ``defectscope synth --region R`` writes one test set per region with the SAME seed, so the sets
   hold the same surfaces, sizes, classes and defect shapes and differ only in where the defects lie
   (good images are identical across the sets).
2. ``defectscope train experiment=synthetic`` (the default model, one-cycle AdamW) on a synthetic
   set whose defects all lie in ``--train-region`` (``data.source.region``), for ``--epochs``.
3. ``defectscope export`` of the best checkpoint (fp32, parity-gated).
4. ``defectscope inspect`` of every test set; each row is scored against its class folder:
   label accuracy, OK/NG accuracy, escape rate (defects passed as OK), false-reject rate (good parts
   called NG) and the mean P(defect) of the defect images, at the model's own threshold.

Moved regions are compared with the in-place one (``--train-region``).  The default augmentation
flips images, so a left-trained model also sees right-hand defects; the centre third is the region
no training image reaches.  The exported model's shift consistency (``defectscope.shift_consistency``,
through ONNX Runtime) is measured on the in-place test set, and its runtime images/s on one batch of
32 grey 256x256 images with ``--threads`` threads.  On a machine others use too, ``--speed`` times
several exported models in turns (A B C, A B C, ...) and reports each one's median, so a change in
the background load hits every model alike.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench_common import load_average, machine_info, measure
from defectscope.demo import score_holdout
from defectscope.runtime.inspector import Inspector
from defectscope.shift_consistency import ShiftProtocol, ShiftRecord, summarise
from defectscope.shift_consistency import measure as shift_measure
from defectscope.synth import REGIONS

TEST_SEED = 20261202
TRAIN_SEED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="data, run, model and results go here")
    p.add_argument("--label", default="run", help="row name in the table")
    p.add_argument("--train-region", default="left", choices=REGIONS[1:])
    p.add_argument("--regions", default="left,centre,right", help="test regions, comma-separated")
    p.add_argument("--n-train", type=int, default=800, help="training images (before the val/test split)")
    p.add_argument("--n-test", type=int, default=600, help="images per test region")
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--max-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=42, help="training seed")
    p.add_argument("--threads", type=int, default=2, help="runtime threads for inspect and the speed figure")
    p.add_argument("--out", type=Path, help="result JSON (default WORKDIR/result.json)")
    p.add_argument("--table", nargs="+", type=Path, help="print the table of these result files and exit")
    p.add_argument("--speed", nargs="+", type=Path, help="time these ONNX models in turns and exit")
    p.add_argument("--rounds", type=int, default=5, help="turns per model for --speed")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    return p


def run(cmd: list[str], log: Path) -> None:
    """One CLI step, its output appended to ``log``; a failure stops the benchmark with the log's tail."""
    print(f"== {shlex.join(cmd)}", flush=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n== {shlex.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise SystemExit(f"position_holdout: step failed with exit code {rc}: {shlex.join(cmd)}\n{tail}")


def defect_mean_probability(results: Path, good_class: str = "good") -> float:
    """Mean P(defect) the model gave the defect images of one results file."""
    probs = []
    for line in results.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["status"] == "ok" and Path(row["path"]).parent.name != good_class:
            probs.append(float(row["defect_prob"]))
    return float(np.mean(probs)) if probs else float("nan")


class ShiftRun(NamedTuple):
    """One protocol run: the per-image record, the images in its order, and what judged them."""

    record: ShiftRecord
    paths: list[Path]
    threshold: float
    protocol: ShiftProtocol
    ng_indices: list[int]
    good_class: str


def onnx_shift_records(
    model: Path,
    images: Sequence[Path],
    threads: int,
    protocols: Sequence[ShiftProtocol | None],
    batch: int = 16,
) -> list[ShiftRun]:
    """The shift-consistency protocol's per-image records through ONNX Runtime (same function as
    training), one per protocol, from one decode of the images; None: offsets up to the total stride."""
    insp = Inspector(model, provider="cpu", threads=threads)
    meta = insp.metadata
    groups: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = {}
    for path in images:
        img = insp.load(path)[0]
        groups.setdefault(img.shape, []).append((path, img))
    chunks = [items[i : i + batch] for items in groups.values() for i in range(0, len(items), batch)]
    inputs = [insp.preprocess([img for _, img in chunk]) for chunk in chunks]
    order = [path for chunk in chunks for path, _ in chunk]
    runs = []
    for given in protocols:
        protocol = given or ShiftProtocol(max_shift=int(meta.total_stride))
        records = [
            shift_measure(lambda b: insp.predict(b, cam=False)["probs"], x, meta.ng_indices, protocol)
            for x in inputs
        ]
        runs.append(
            ShiftRun(
                ShiftRecord.concat(records),
                order,
                insp.threshold,
                protocol,
                list(meta.ng_indices),
                meta.good_class,
            )
        )
    return runs


def onnx_shift_consistency(
    model: Path, images: Sequence[Path], threads: int, max_shift: int | None = None
) -> dict[str, Any]:
    """The protocol's figures on an exported model.

    ``max_shift`` defaults to the model's total stride. On small images a shift that large also moves
    defects near the border out of the frame, so the benchmark reports 8 px as well (sub-stride phases
    of the first layers, content kept).
    """
    (run,) = onnx_shift_records(
        model, images, threads, [ShiftProtocol(max_shift=int(max_shift)) if max_shift else None]
    )
    figures: dict[str, Any] = summarise(run.record, run.threshold)
    figures.update(images=len(images), copies=run.protocol.copies, max_shift=run.protocol.max_shift)
    return figures


def runtime_speed(
    models: Sequence[Path], threads: int, rounds: int = 1, side: int = 256, batch: int = 32
) -> list[dict[str, Any]]:
    """ONNX Runtime images/s (fp32, CPU, one grey batch) of each model, timed in ``rounds`` turns."""
    sessions = [Inspector(m, provider="cpu", threads=threads) for m in models]
    x = np.random.default_rng(0).standard_normal((batch, 1, side, side)).astype(np.float32)
    rates: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for insp, got in zip(sessions, rates):
            got.append(measure(lambda i=insp: i.predict(x, cam=False), batch, 3.0, 0.5)["images_per_s"])
    return [
        {"model": str(m), "images_per_s": float(np.median(r)), "rounds": r, "batch": batch, "side": side,
         "threads": threads, "load_average": load_average()}
        for m, r in zip(models, rates)
    ]  # fmt: skip


def score_regions(results: dict[str, Path], in_place: str) -> dict[str, Any]:
    """Per-region scores and each moved region's differences from the in-place one (in points)."""
    scores = {
        r: {**score_holdout(p), "defect_prob_mean": defect_mean_probability(p)} for r, p in results.items()
    }
    base = scores[in_place]
    deltas = {
        r: {
            k: round(100 * (s[k] - base[k]), 2) for k in ("label_accuracy", "verdict_accuracy", "escape_rate")
        }
        for r, s in scores.items()
        if r != in_place
    }
    return {"scores": scores, "moved_minus_in_place_pt": deltas}


def _complete_test_set(folder: Path, n: int) -> bool:
    """True when ``synth`` already wrote all ``n`` images there (its manifest lists them)."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return False
    rows = manifest.read_text(encoding="utf-8").splitlines()[1:]
    return len(rows) == n and all((folder / row.split(",")[0]).is_file() for row in rows)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "steps.log"
    exe = [sys.executable, "-m", "defectscope"]
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if args.train_region not in regions:
        raise SystemExit(f"--regions must include the training region {args.train_region!r}")
    sizes = ["--min-size", str(args.min_size), "--max-size", str(args.max_size)]
    t0 = time.perf_counter()
    for region in regions:
        if _complete_test_set(work / f"test-{region}", args.n_test):
            continue  # a rerun after an interruption keeps the sets: same seed, same images
        run([*exe, "synth", str(work / f"test-{region}"), "--n", str(args.n_test), "--seed", str(TEST_SEED),
             "--region", region, *sizes], log)  # fmt: skip
    train_cmd = [
        *exe, "train", "experiment=synthetic", f"seed={args.seed}", f"trainer.max_epochs={args.epochs}",
        f"data.source.root={work / 'train-data'}", f"data.source.n={args.n_train}",
        f"data.source.seed={TRAIN_SEED}", f"data.source.region={args.train_region}",
        f"data.source.min_size={args.min_size}", f"data.source.max_size={args.max_size}",
        "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={work / 'train'}", *args.overrides,
    ]  # fmt: skip
    t_train = time.perf_counter()
    run(train_cmd, log)
    t_train = time.perf_counter() - t_train
    model = work / "model.onnx"
    run([*exe, "export", str(work / "train" / "checkpoints" / "best.ckpt"), "-o", str(model)], log)
    results = {}
    for region in regions:
        results[region] = work / f"results-{region}.jsonl"
        results[region].unlink(missing_ok=True)
        run([*exe, "inspect", str(model), str(work / f"test-{region}"), "--recursive", "--threads",
             str(args.threads), "-o", str(results[region])], log)  # fmt: skip
    in_place_images = sorted((work / f"test-{args.train_region}").rglob("*.png"))
    return {
        "label": args.label,
        "train_region": args.train_region,
        "overrides": list(args.overrides),
        "train_command": shlex.join(train_cmd),
        "n_train": args.n_train,
        "n_test": args.n_test,
        "sizes": [args.min_size, args.max_size],
        "epochs": args.epochs,
        "seed": args.seed,
        **score_regions(results, args.train_region),
        "shift_consistency": onnx_shift_consistency(model, in_place_images, args.threads),
        "shift_consistency_8px": onnx_shift_consistency(model, in_place_images, args.threads, max_shift=8),
        "runtime": runtime_speed([model], args.threads)[0],
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(args.threads),
    }


def table(files: Sequence[Path]) -> str:
    """One markdown row per result: in-place figures, moved differences, shift consistency, speed."""
    rows = [
        "| run | OK/NG acc in place | Δ centre | Δ right | escapes in place | Δ centre | Δ right "
        "| false rejects | shift top-1 | mean abs ΔP | verdict flips | 8 px: top-1 / flips | images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in files:
        r = json.loads(f.read_text(encoding="utf-8"))
        base = r["scores"][r["train_region"]]
        d = r["moved_minus_in_place_pt"]
        sc = r["shift_consistency"]
        s8 = r.get("shift_consistency_8px")
        near = f"{100 * s8['top1_consistency']:.2f} % / {100 * s8['verdict_flip_rate']:.2f} %" if s8 else "-"

        def delta(region: str, key: str, deltas: dict[str, Any] = d) -> str:
            return f"{deltas[region][key]:+.2f}" if region in deltas else "-"

        rows.append(
            f"| {r['label']} | {100 * base['verdict_accuracy']:.2f} % | {delta('centre', 'verdict_accuracy')} "
            f"| {delta('right', 'verdict_accuracy')} | {100 * base['escape_rate']:.2f} % "
            f"| {delta('centre', 'escape_rate')} | {delta('right', 'escape_rate')} "
            f"| {100 * base['false_reject_rate']:.2f} % | {100 * sc['top1_consistency']:.2f} % "
            f"| {sc['dp_mean']:.4f} | {100 * sc['verdict_flip_rate']:.2f} % | {near} "
            f"| {r['runtime']['images_per_s']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.speed:
        rows = runtime_speed(args.speed, args.threads, args.rounds)
        print(json.dumps({"machine": machine_info(args.threads), "runtime": rows}, indent=2))
        return 0
    if args.workdir is None:
        raise SystemExit("position_holdout: --workdir is required (or --table FILES)")
    result = benchmark(args)
    out = args.out or args.workdir / "result.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {k: result[k] for k in ("moved_minus_in_place_pt", "shift_consistency", "runtime")}, indent=2
        )
    )
    print(table([out]))
    print(f"result: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
