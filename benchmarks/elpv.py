"""ELPV accuracy benchmark (issue 6): an exported model on the 656 ELPV test cells, as a line PC runs it.

    python benchmarks/elpv.py MODEL.onnx [--label resnet_small-s1] [--tta none|hflip|flips|dihedral]
                              [--batch-size 32] [--threads N] [--provider auto] [--limit N]
                              [--out results.json] [--predictions preds.jsonl] [--plot confusion.png]
    python benchmarks/elpv.py --checkpoint best.ckpt ...      # the same through PyTorch (needs torch)
    python benchmarks/elpv.py --table a.json b.json ...        # merge result files into one table
    python benchmarks/elpv.py --val-list val.txt               # validation cells, for export --int8
    python benchmarks/elpv.py --test-list test.txt             # test cells, for defectscope inspect @test.txt

Protocol (Deitsch et al. 2019): the 2,624 cells are split 75/25, stratified on the 4-grade label, seed
42 (1,968 train / 656 test).  The split is computed by the project's own ELPV source and split code
exactly as training does, so the test cells are the ones no training run has seen.  The model is run
through the torch-free :class:`defectscope.runtime.Inspector` with the loader config and mean/std
embedded in the model, i.e. the preprocessing of a line PC.

Reported: binary accuracy (defective when the ELPV defect probability p >= 0.5, i.e. grades 0.67 and
1.0), 4-class accuracy (p0/p33/p67/p100), macro-F1 and confusion matrices (rows = truth, columns =
prediction), overall and per module type (mono/poly).  A 4-class model's binary verdict is
P(p67) + P(p100) >= 0.5; the argmax grouping (argmax in {p67, p100}) is reported as well.  A model
with ordered grades gives its 4-class answer by its own grading rule (cut points, median; the rule
the runtime applies, from the model's metadata), otherwise by argmax.  Beside accuracy: balanced
accuracy, the ordinal figures of the 4 grades (mean absolute error in grades, share off by more than
one grade, quadratic-weighted kappa) and the OK/NG operating point (false-reject rate at 95 % and 99 %
recall of the p >= 0.5 cells, and at the model's own threshold); see ``elpv_scores.py``.  A binary
model's verdict is P(defective) >= 0.5 (the protocol's cut, not the model's tuned threshold); it has
no 4-class figures.  Macro-F1 averages F1 = 2TP / (2TP + FP + FN) over the classes that occur in the
truth or the predictions of the cells evaluated (scikit-learn's default set).

Speed: decode (one thread), preprocessing and the model run are timed separately in one sequential
pass; ``compute`` images/s counts only the ONNX Runtime calls (all TTA views included), ``end to end``
counts decode + preprocessing + compute without overlap, so it is a lower bound for `defectscope
inspect`, which decodes on worker threads while the model runs.

Table mode groups rows by seed: a label ending in ``-s<digits>`` (``resnet_small-s1``) belongs to the
group named by the rest (``resnet_small``); results of one group that share task, TTA and the number
of cells evaluated get an extra row with the mean ± sample standard deviation (n - 1) of every figure
when there are at least two of them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.sources import SourceError
from defectscope.runtime.image import ImageLoadError
from defectscope.runtime.metadata import TTA_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
from elpv_cells import (
    EvalError,
    Split,
    always_functional,
    elpv_test_split,
    elpv_val_paths,
    limit_cells,
    metrics,
)
from elpv_models import OnnxRunner, Runner, TorchRunner, model_task, predict_cells, prediction_rows, tta_views
from elpv_scores import shipped_point
from elpv_table import (
    TABLE_HEADER,
    markdown_table,
    plot_confusion,
    row_name,
    row_values,
    summary_text,
    table_row,
)

__all__ = ["EvalError", "always_functional", "elpv_test_split", "evaluate", "limit_cells", "main"]

TTA_CHOICES = TTA_NAMES


def machine() -> dict[str, Any]:
    """What the speed figures were measured on (a busy machine makes them suspect, so load is kept)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load: list[float] | None = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "load_average": load,
        "python": sys.version.split()[0],
    }


def _open_runner(
    model: str, checkpoint: bool, tta: str, batch_size: int, threads: int | None, provider: str
) -> tuple[Runner, str]:
    """The runner after checking the request against it; also the TTA the graph already holds."""
    if tta not in TTA_CHOICES:
        raise EvalError(f"--tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    runner: Runner = TorchRunner(model, threads) if checkpoint else OnnxRunner(model, provider, threads)
    graph_tta = str(runner.info.get("graph_tta", "none"))
    if graph_tta != "none" and tta != "none":
        raise EvalError(
            f"{model} already averages test-time {graph_tta} in its graph (defectscope export --tta); "
            f"run it with --tta none, not --tta {tta}"
        )
    return runner, graph_tta


def _split_doc(split: Split) -> dict[str, Any]:
    return {
        "test_fraction": split.test_fraction,
        "seed": split.seed,
        "n_cells": split.n_total,
        "n_train": split.n_train,
        "n_test": len(split.cells),
    }


def _speed_settings(runner: Runner, batch_size: int, tta: str) -> dict[str, Any]:
    """How the timings were taken; ``tta_views`` counts the script's views times the graph's."""
    return {
        "threads": runner.threads,
        "provider": runner.provider,
        "batch_size": batch_size,
        "tta_views": len(tta_views(np.zeros((1, 1, 2, 2), np.float32), tta))
        * int(runner.info.get("graph_tta_views", 1)),
    }


def evaluate(
    model: str,
    *,
    checkpoint: bool = False,
    label: str | None = None,
    tta: str = "none",
    batch_size: int = 32,
    threads: int | None = None,
    provider: str = "auto",
    limit: int | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the protocol; returns the result document and the per-cell prediction rows."""
    runner, graph_tta = _open_runner(model, checkpoint, tta, batch_size, threads, provider)
    task = model_task(runner.class_names, model)
    split = elpv_test_split()
    cells = limit_cells(split.cells, limit)
    log(
        f"ELPV test split: {split.n_train} train / {len(split.cells)} test cells (stratified on the "
        f"4 grades, seed {split.seed}); evaluating {len(cells)} with {runner.name} ({task}, "
        f"TTA {tta if graph_tta == 'none' else graph_tta + ' in the graph'}, {runner.threads} threads, "
        f"{runner.provider})"
    )
    probs, timings = predict_cells(runner, cells, tta, batch_size)
    grading = runner.info.get("grading")
    rows = prediction_rows(cells, probs, runner.class_names, task, grading)
    extra: dict[str, Any] = {}
    if "val_paths" in runner.info:
        test_paths = {c.path for c in split.cells}
        extra["checkpoint_val_paths_in_test"] = sum(p in test_paths for p in runner.info["val_paths"])
    result = {
        "label": label or Path(model).stem,
        "model": str(model),
        "model_format": "checkpoint" if checkpoint else "onnx",
        "model_name": runner.name,
        "sha256": runner.sha256,
        "task": task,
        "class_names": runner.class_names,
        "model_threshold": runner.info["threshold"],
        "binary_rule": "P(p67) + P(p100) >= 0.5" if task == "4class" else "P(defective) >= 0.5",
        "tta": tta if graph_tta == "none" else f"graph {graph_tta}",
        "split": {**_split_doc(split), "limit": limit, "n_evaluated": len(cells)},
        "grading": grading.to_doc() if grading is not None else None,
        "metrics": metrics(rows, task),
        "shipped": shipped_point(
            probs,
            runner.class_names,
            runner.info["ng_classes"],
            runner.info["threshold"],
            [c.grade for c in cells],
        ),
        "always_functional": always_functional(cells),
        "speed": {**timings, **_speed_settings(runner, batch_size, tta)},
        "machine": machine(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return result, rows


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/elpv.py",
        description="ELPV accuracy benchmark: an exported model on the 656 test cells (75/25 stratified "
        "split, seed 42) through the line-PC runtime, or --table to merge result files.",
    )
    p.add_argument("model", nargs="?", help="exported model (.onnx), or a .ckpt with --checkpoint")
    p.add_argument("--checkpoint", metavar="CKPT", help="evaluate a training checkpoint with PyTorch instead")
    p.add_argument("--label", help="row name in the table (default: the model file's stem); "
                   "NAME-s<seed> rows are averaged per NAME in --table")  # fmt: skip
    p.add_argument("--tta", choices=TTA_CHOICES, default="none",
                   help="flips = identity, hflip, vflip and both, probabilities averaged (default none)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: physical cores)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only N test cells, stratified on grade (quick checks; not the protocol)")  # fmt: skip
    p.add_argument("--out", type=Path, help="result JSON")
    p.add_argument("--predictions", type=Path,
                   help="per-cell JSONL (default: next to --out as <out>.predictions.jsonl)")  # fmt: skip
    p.add_argument("--plot", type=Path, help="confusion-matrix PNG")
    p.add_argument("--val-list", type=Path, metavar="FILE",
                   help="write the validation cells' paths (one per line) for export --int8 --images, and exit; "
                   "the split of experiment=elpv (data.split.val_fraction 0.15)")  # fmt: skip
    p.add_argument("--test-list", type=Path, metavar="FILE",
                   help="write the 656 test cells' paths (one per line) for `defectscope inspect MODEL @FILE`, and exit")  # fmt: skip
    p.add_argument("--table", nargs="+", type=Path, metavar="RESULT_JSON",
                   help="print one markdown table from result files (+ baseline and published rows)")  # fmt: skip
    return p


def _read_result(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: cannot read a result JSON: {exc}") from None
    if not isinstance(doc, dict) or "metrics" not in doc or "label" not in doc:
        raise EvalError(f"{path}: not a result file written by benchmarks/elpv.py --out")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        lists = [(f, name) for f, name in ((a.val_list, "validation"), (a.test_list, "test")) if f]
        if lists:
            if a.model or a.checkpoint or a.table:
                p.error(
                    "--val-list/--test-list write cell lists and exit; give no model or --table with them"
                )
            for path, name in lists:
                cells = (
                    elpv_val_paths() if name == "validation" else [c.path for c in elpv_test_split().cells]
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(f"{q}\n" for q in cells), encoding="utf-8")
                print(f"wrote {len(cells)} ELPV {name} cells to {path}")
            return 0
        if a.table:
            if a.model or a.checkpoint:
                p.error("--table merges result files; give no model with it")
            print(
                markdown_table([_read_result(f) for f in a.table], always_functional(elpv_test_split().cells))
            )
            return 0
        if bool(a.model) == bool(a.checkpoint):
            p.error("give exactly one of MODEL (.onnx) or --checkpoint CKPT")
        model = a.checkpoint or a.model
        if not Path(model).is_file():
            raise EvalError(f"{model}: model file not found")
        result, rows = evaluate(
            model,
            checkpoint=bool(a.checkpoint),
            label=a.label,
            tta=a.tta,
            batch_size=a.batch_size,
            threads=a.threads,
            provider=a.provider,
            limit=a.limit,
        )
    except (EvalError, SourceError, ImageLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preds = a.predictions or (a.out.with_suffix(".predictions.jsonl") if a.out else None)
    if preds:
        write_predictions(preds, rows)
        result["predictions"] = str(preds)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if a.plot:
        plot_confusion(result, a.plot)
    print(summary_text(result))
    print()
    print(TABLE_HEADER)
    print(
        table_row(
            row_name(result), result["task"], result["tta"], [row_values(result["metrics"], result["speed"])]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
