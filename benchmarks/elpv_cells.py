"""The ELPV protocol's cells and scores (``benchmarks/elpv.py``): the test split exactly as training
computes it, and the metric blocks every ELPV figure is read from (the product's own metric code)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope.data.elpv import elpv_source
from defectscope.data.splits import apportion, assign_splits
from defectscope.evaluation.metrics import class_figures, confusion
from defectscope.runtime.grading import ordinal_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
from elpv_scores import operating_points

GRADES = ("p0", "p33", "p67", "p100")
DEFECTIVE_GRADES = ("p67", "p100")
BINARY = ("functional", "defective")
MODULE_TYPES = ("mono", "poly")
#: the DataModule's default validation fraction; it does not affect which cells are in the test split
VAL_FRACTION = 0.15


class EvalError(ValueError):
    """The model or the arguments do not fit the ELPV protocol; the message says what was expected."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Cell:
    """One ELPV test cell with its ground truth."""

    path: str
    grade: str  # p0 / p33 / p67 / p100
    module_type: str  # mono / poly

    @property
    def defective(self) -> bool:
        return self.grade in DEFECTIVE_GRADES


@dataclass(frozen=True)
class Split:
    cells: list[Cell]  # the test cells, in the source's (labels.csv) order
    n_total: int
    n_train: int  # train + val: everything training may use
    test_fraction: float
    seed: int


def _elpv_splits() -> tuple[Any, list[str]]:
    """The 4-class ELPV source and each sample's split, with training's source, strata, keys and settings."""
    data = elpv_source("4class")
    samples = data.samples
    splits = assign_splits(
        [s.split for s in samples],
        [s.stratum or data.class_names[s.label] for s in samples],
        [s.path for s in samples],
        val_fraction=VAL_FRACTION,
        test_fraction=float(data.split_defaults["test_fraction"]),
        seed=int(data.split_defaults["seed"]),
    )
    return data, splits


def elpv_val_paths() -> list[str]:
    """The validation cells training holds out (data.split.val_fraction 0.15 of the non-test part),
    for ``defectscope export --int8 --images LIST``: calibration must not see the test cells."""
    data, splits = _elpv_splits()
    return [s.path for s, sp in zip(data.samples, splits) if sp == "val"]


def elpv_test_split() -> Split:
    """The ELPV test cells, computed with the same source, strata, keys and settings as training."""
    data, splits = _elpv_splits()
    samples = data.samples
    cells = [
        Cell(s.path, data.class_names[s.label], s.meta.get("module_type", "unknown"))
        for s, sp in zip(samples, splits)
        if sp == "test"
    ]
    test_fraction = float(data.split_defaults["test_fraction"])
    seed = int(data.split_defaults["seed"])
    return Split(cells, len(samples), len(samples) - len(cells), test_fraction, seed)


def limit_cells(cells: Sequence[Cell], limit: int | None) -> list[Cell]:
    """A quick subset: ``limit`` cells stratified on grade (the first ones of each grade, in file order)."""
    if limit is None or limit >= len(cells):
        return list(cells)
    if limit <= 0:
        raise EvalError(f"--limit must be a positive number of cells, got {limit}")
    quotas = dict(zip(GRADES, apportion([sum(c.grade == g for c in cells) for g in GRADES], limit)))
    out: list[Cell] = []
    for c in cells:
        if quotas[c.grade] > 0:
            quotas[c.grade] -= 1
            out.append(c)
    return out


def always_functional(cells: Sequence[Cell]) -> dict[str, Any]:
    """Metrics of a model that calls every cell functional (grade p0): the majority-class floor."""
    rows = [
        {"module_type": c.module_type, "grade": c.grade, "true_defective": c.defective,
         "pred_defective": False, "pred_grade": "p0"}
        for c in cells
    ]  # fmt: skip
    return metrics(rows, "4class")


# --------------------------------------------------------------------------- metrics


def block(
    truth: Sequence[int], pred: Sequence[int], labels: Sequence[str], ordinal: bool = False
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (and the ordinal figures) and the confusion matrix of one
    task on one set of cells (the product's metric code, :mod:`defectscope.evaluation.metrics`, as
    ``defectscope evaluate`` reports them)."""
    cm = confusion(truth, pred, len(labels))
    figures = class_figures(cm, labels)
    n = int(cm.sum())
    out = {
        "n": n,
        "accuracy": figures["accuracy"] if n else None,
        "balanced_accuracy": figures["balanced_accuracy"] if n else None,
        "macro_f1": figures["macro_f1"] if n else None,
        "labels": list(labels),
        "confusion": cm.tolist(),
    }
    if ordinal:
        out.update(ordinal_metrics(cm) if n else {})
    return out


def metrics(rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
    """Overall and per-module-type metric blocks from per-cell prediction rows."""
    out: dict[str, Any] = {}
    groups: list[tuple[str, list[dict[str, Any]]]] = [("overall", list(rows))]
    groups += [(m, [r for r in rows if r["module_type"] == m]) for m in MODULE_TYPES]
    for name, sub in groups:
        t_bin = [int(r["true_defective"]) for r in sub]
        entry: dict[str, Any] = {
            "n": len(sub),
            "binary": block(t_bin, [int(r["pred_defective"]) for r in sub], BINARY),
            "binary_argmax": None,
            "four_class": None,
        }
        if task == "4class":
            t4 = [GRADES.index(r["grade"]) for r in sub]
            p4 = [GRADES.index(r["pred_grade"]) for r in sub]
            entry["four_class"] = block(t4, p4, GRADES, ordinal=True)
            entry["binary_argmax"] = block(
                t_bin, [int(r["pred_grade"] in DEFECTIVE_GRADES) for r in sub], BINARY
            )
        if name == "overall" and sub and "p_defective" in sub[0]:
            entry["operating_point"] = operating_points(
                [r["p_defective"] for r in sub], [r["grade"] for r in sub]
            )
        out[name] = entry
    return out
