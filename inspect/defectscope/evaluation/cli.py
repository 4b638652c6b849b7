"""`defectscope evaluate MODEL.onnx DATA`: audit an exported model as it ships, through the runtime.

DATA is labelled: a folder of class folders named like the model's classes, or a CSV with header
``path,label``.  Every image is decoded with the model's own loader settings and scored by ONNX
Runtime exactly as ``defectscope inspect`` would; the verdict uses the model's threshold (or
``--threshold``).  Printed: accuracy, balanced accuracy, escape and false-reject rates, the confusion
matrix and per-class precision/recall; written to ``--out``: evaluation.json, predictions.csv,
confusion.png and, with ``--sweep``, roc_pr.png and the recall/false-reject trade-off.  Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sources import SourceError
from ..runtime.decision import defect_probability, is_defect_label, is_ng
from ..runtime.files import error_line, unusable_name
from ..runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError, check_model_path
from ..runtime.options import CommandParser, add_engine_options, unit_number
from ..runtime.outputs import OutputError, check_output_folder
from ..runtime.results import csv_cell
from .labelled import Labelled, read_labelled
from .metrics import confusion
from .report import evaluation_doc, report_lines
from .scoring import score_paths

PROG = "defectscope evaluate"


class EvaluateError(ValueError):
    """DATA or an option does not fit the model; the message says what was expected."""


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=f"{PROG} MODEL.onnx",
        description="Evaluate an exported model on labelled images through the line runtime (ONNX Runtime). "
        "For a training checkpoint use: defectscope evaluate ckpt_path=CKPT [data=...].",
    )
    p.add_argument("model", type=Path, help="exported model (.onnx)")
    p.add_argument(
        "data", type=Path, help="labelled images: DATA/<class>/*.png or a CSV with header path,label"
    )
    p.add_argument(
        "--threshold", type=unit_number, help="NG when P(defect) >= this (default: the model's threshold)"
    )
    p.add_argument(
        "--sweep", action="store_true", help="also the recall/false-reject trade-off and ROC/PR curves"
    )
    p.add_argument("--out", type=Path, help="folder for evaluation.json, predictions.csv and the PNG plots")
    add_engine_options(p)
    return p


def check_data_path(data: Path) -> None:
    """DATA names a folder or a file, before the model is loaded."""
    unusable = unusable_name(data)
    if unusable:
        raise EvaluateError(f"{data}: cannot be read ({unusable})")
    if not data.exists():
        raise EvaluateError(f"{data}: no such folder or file")
    if not (data.is_dir() or data.is_file()):
        raise EvaluateError(f"{data}: is not a folder or a CSV file (a pipe or device)")


def _labelled(data: Path, inspector: Inspector) -> Labelled:
    meta = inspector.metadata
    labelled = read_labelled(data, meta.class_names, meta.good_class)
    if labelled is None or not labelled.paths:
        raise EvaluateError(
            f"{data}: expected labelled images: a folder of class folders named like the model's classes "
            f"({', '.join(meta.class_names)}) or a CSV with header path,label"
        )
    return labelled


def evaluate_model(
    inspector: Inspector, labelled: Labelled, threshold: float, *, sweep: bool, batch_size: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The evaluation document and one prediction row per readable image."""
    meta = inspector.metadata
    scored = score_paths(
        lambda b: inspector.predict(b, cam=False)["probs"],
        labelled.paths,
        meta.loader,
        meta.mean,
        meta.std,
        batch_size,
    )
    names = meta.class_names
    if problem := scored.not_finite(labelled.paths, inspector.model_path):
        raise EvaluateError(problem)
    if not scored.index:
        path, error = scored.failed[0]
        raise EvaluateError(
            f"{labelled.source}: none of its {len(labelled.paths)} images could be read; first {path}: {error}"
        )
    truth = np.array([names.index(labelled.labels[i]) for i in scored.index], dtype=np.int64)
    pred = scored.probs.argmax(axis=1) if len(truth) else np.zeros(0, dtype=np.int64)
    p_defect = defect_probability(scored.probs, meta.ng_indices) if len(truth) else np.zeros(0)
    is_defect = np.asarray(is_defect_label(truth, meta.ng_indices), dtype=bool)
    doc = evaluation_doc(
        confusion(truth, pred, len(names)), names, p_defect, is_defect, threshold, sweep=sweep
    )
    doc.update(
        model=inspector.model_path,
        model_sha256=inspector.sha256,
        variant=meta.variant,
        good_class=meta.good_class,
        ng_classes=list(meta.ng_classes),
        model_threshold=meta.threshold,
        threshold_source=meta.threshold_source,
        data=labelled.source,
        unreadable=[{"path": p, "error": e} for p, e in scored.failed],
    )
    rows = [
        {"path": labelled.paths[i], "label": labelled.labels[i], "predicted": names[int(k)],
         "defect_prob": round(float(p), 6), "verdict": "NG" if is_ng(float(p), threshold) else "OK"}
        for i, k, p in zip(scored.index, pred, p_defect)
    ]  # fmt: skip
    return doc, rows


def write_outputs(out: Path, doc: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """evaluation.json, predictions.csv, confusion.png (+ roc_pr.png with a sweep); returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    # a name that is not valid UTF-8 (surrogate escapes) is written as backslash escapes, as inspect's CSV does
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        writer = csv.DictWriter(
            fh, ["path", "label", "predicted", "defect_prob", "verdict"], lineterminator="\n"
        )
        writer.writeheader()
        text = ("path", "label", "predicted")  # file and class names: kept text in a spreadsheet
        writer.writerows({k: csv_cell(v) if k in text else v for k, v in row.items()} for row in rows)
    written = [str(out / "evaluation.json"), str(out / "predictions.csv")]
    try:
        from ..training import plots
    except ImportError:
        return [*written, "(no PNG plots: they need matplotlib, pip install matplotlib)"]
    scores = np.array([r["defect_prob"] for r in rows])
    defect = np.array([r["label"] in doc["ng_classes"] for r in rows], dtype=bool)
    written.append(
        plots.confusion_png(
            np.asarray(doc["confusion"]),
            doc["class_names"],
            scores,
            defect,
            doc["threshold"],
            out / "confusion.png",
        )
    )
    if "tradeoff" in doc:
        written.append(plots.roc_pr_png(scores, defect, doc["threshold"], out / "roc_pr.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_model_path(args.model)  # the model first, then DATA and --out: all before the model is loaded
        check_data_path(args.data)
        if args.out:
            check_output_folder(args.out, "--out")
        inspector = Inspector(args.model, provider=args.provider, threads=args.threads)
        labelled = _labelled(args.data, inspector)
        threshold = inspector.threshold if args.threshold is None else float(args.threshold)
        doc, rows = evaluate_model(
            inspector, labelled, threshold, sweep=args.sweep, batch_size=args.batch_size
        )
    except (EvaluateError, SourceError, ModelLoadError, MetadataError, ProviderError, OutputError) as exc:
        print(error_line(PROG, exc), file=sys.stderr)
        return 2
    given = "" if args.threshold is None else f" (given; the model's is {inspector.threshold:g})"
    print(f"model: {args.model} ({doc['variant']}), threshold {threshold:g}{given}")
    print("\n".join(report_lines(doc, f"every readable image of {labelled.source}")))
    if doc["unreadable"]:
        first = doc["unreadable"][0]
        print(
            f"not scored: {len(doc['unreadable'])} unreadable image(s), first {first['path']}: {first['error']}"
        )
    if args.out:
        print("wrote " + ", ".join(write_outputs(args.out, doc, rows)))
    return 0
