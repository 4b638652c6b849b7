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
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from defectscope.data.sources import SourceError, elpv_source
from defectscope.data.splits import apportion, assign_splits
from defectscope.evaluation.metrics import class_figures, confusion
from defectscope.runtime.grading import Grading, expected_grade, grade_indices, ordinal_metrics
from defectscope.runtime.image import ImageLoadError, LoaderConfig, load_image, normalize_batch
from defectscope.runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from defectscope.runtime.metadata import TTA_NAMES, TTA_VIEWS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
from elpv_scores import operating_points, shipped_point

GRADES = ("p0", "p33", "p67", "p100")
DEFECTIVE_GRADES = ("p67", "p100")
BINARY = ("functional", "defective")
MODULE_TYPES = ("mono", "poly")
TTA_CHOICES = TTA_NAMES
#: the DataModule's default validation fraction; it does not affect which cells are in the test split
VAL_FRACTION = 0.15
SEED_LABEL = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")

#: published figures on ELPV (their protocols; not re-run here). Accuracies in %, None = not reported.
REFERENCES: list[dict[str, Any]] = [
    {
        "label": "Deitsch et al. 2019, CNN (fine-tuned VGG-19)",
        "task": "4class",
        "binary_acc": None,
        "four_class_acc": 88.42,
        "note": "average accuracy, 4 grades, their 75/25 protocol",
    },
    {
        "label": "Deitsch et al. 2019, SVM (hand-crafted features)",
        "task": "4class",
        "binary_acc": None,
        "four_class_acc": 82.44,
        "note": "average accuracy, 4 grades, their 75/25 protocol",
    },
    {
        "label": "lightweight CNN (2023)",
        "task": "4class",
        "binary_acc": None,
        "four_class_acc": 83.5,
        "note": "4 grades, as cited in issue 6",
    },
]


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


# --------------------------------------------------------------------------- models


class Runner(Protocol):
    """What the evaluator needs from a model: its classes, its preprocessing and probabilities."""

    name: str
    class_names: list[str]
    loader_config: LoaderConfig
    mean: list[float]
    std: list[float]
    threads: int
    provider: str
    sha256: str | None
    info: dict[str, Any]

    def probs(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxRunner:
    """An exported model in the line-PC runtime (ONNX Runtime via :class:`Inspector`)."""

    def __init__(self, path: str, provider: str, threads: int | None) -> None:
        try:
            self.inspector = Inspector(path, provider=provider, threads=threads)
        except (ModelLoadError, MetadataError, ProviderError) as exc:
            raise EvalError(str(exc)) from None
        meta = self.inspector.metadata
        self.name = meta.model_name
        self.class_names = list(meta.class_names)
        self.loader_config = meta.loader
        self.mean, self.std = list(meta.mean), list(meta.std)
        self.threads = self.inspector.threads
        self.provider = self.inspector.provider
        self.sha256: str | None = self.inspector.sha256
        self.info: dict[str, Any] = {
            "threshold": meta.threshold,
            "good_class": meta.good_class,
            "ng_classes": list(meta.ng_classes),
            "grading": meta.grader,
            "graph_tta": meta.tta,
            "graph_tta_views": meta.tta_views,
        }

    def probs(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.inspector.predict(batch, cam=False)["probs"], dtype=np.float64)


class TorchRunner:
    """A training checkpoint through PyTorch, with the same runtime loader and normalisation."""

    def __init__(self, path: str, threads: int | None) -> None:
        import torch

        from defectscope.checkpoint import CheckpointError, load_checkpoint
        from defectscope.export.grading import GradingExportError, checkpoint_grading
        from defectscope.models.corn import with_link
        from defectscope.runtime.decision import ng_class_names
        from defectscope.runtime.files import file_sha256

        self._torch = torch
        self.threads = threads or torch.get_num_threads()
        try:
            model, info = load_checkpoint(path)
            link, grading = checkpoint_grading(info)
        except (CheckpointError, GradingExportError) as exc:
            raise EvalError(f"{path}: {exc}") from None
        self.model = with_link(model, link).eval()
        self.name = str(info["model_name"])
        self.class_names = list(info["class_names"])
        self.loader_config = LoaderConfig(**info["loader"])
        self.mean, self.std = list(info["mean"]), list(info["std"])
        self.provider = "torch-cpu"
        self.sha256: str | None = file_sha256(path)
        self.info: dict[str, Any] = {
            "threshold": info["threshold"],
            "good_class": info["good_class"],
            "ng_classes": ng_class_names(self.class_names, info["good_class"], info.get("ng_classes")),
            "grading": Grading.from_doc(grading, len(self.class_names)) if grading else None,
            "val_paths": list(info.get("val_paths") or []),
        }

    def probs(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        before = torch.get_num_threads()  # restored: in-process callers keep their setting
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(np.ascontiguousarray(batch)))
                return logits.float().softmax(dim=1).double().numpy()
        finally:
            torch.set_num_threads(before)


def model_task(class_names: Sequence[str], source: str) -> str:
    """'4class' or 'binary' from the class names, which must be the ELPV source's names."""
    if sorted(class_names) == sorted(GRADES):
        return "4class"
    if sorted(class_names) == sorted(BINARY):
        return "binary"
    raise EvalError(
        f"{source}: class names {list(class_names)} are not an ELPV task; expected {list(GRADES)} "
        f"(data.source.task=4class) or {list(BINARY)} (data.source.task=binary)"
    )


def tta_views(batch: np.ndarray, tta: str) -> list[np.ndarray]:
    """The copies of a preprocessed NCHW batch whose probabilities are averaged: the runtime's table of
    test-time views (transposed first, then flipped)."""
    views = [batch]
    for transposed, axes in TTA_VIEWS[tta]:
        v = batch.transpose(0, 1, 3, 2) if transposed else batch
        views.append(np.flip(v, axes) if axes else v)
    return [np.ascontiguousarray(v) for v in views]


# --------------------------------------------------------------------------- evaluation


def _batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of equally shaped images, ``batch_size`` at a time (ELPV cells are all one size)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]


def predict_cells(
    runner: Runner, cells: Sequence[Cell], tta: str, batch_size: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Probabilities (cells x model classes) after TTA, and the timings of the pass."""
    t0 = time.perf_counter()
    arrays = [load_image(c.path, runner.loader_config) for c in cells]
    decode_s = time.perf_counter() - t0
    batches = list(_batches(arrays, batch_size))
    runner.probs(normalize_batch([arrays[i] for i in batches[0]], runner.mean, runner.std))  # warm-up
    probs = np.zeros((len(cells), len(runner.class_names)), dtype=np.float64)
    prep_s = compute_s = 0.0
    for idx in batches:
        t1 = time.perf_counter()
        views = tta_views(normalize_batch([arrays[i] for i in idx], runner.mean, runner.std), tta)
        t2 = time.perf_counter()
        probs[idx] = np.mean([runner.probs(v) for v in views], axis=0)
        t3 = time.perf_counter()
        prep_s += t2 - t1
        compute_s += t3 - t2
    n = len(cells)
    total = decode_s + prep_s + compute_s
    timings = {
        "images": n,
        "decode_s": decode_s,
        "preprocess_s": prep_s,
        "compute_s": compute_s,
        "compute_images_per_s": n / compute_s if compute_s > 0 else float("inf"),
        "end_to_end_images_per_s": n / total if total > 0 else float("inf"),
    }
    return probs, timings


def prediction_rows(
    cells: Sequence[Cell],
    probs: np.ndarray,
    class_names: Sequence[str],
    task: str,
    grading: Grading | None = None,
) -> list[dict[str, Any]]:
    """Per-cell rows (the auditable record every figure is computed from); with a grading rule the
    4-class answer is that rule's (and the row keeps the expected grade)."""
    rows = []
    col = {name: i for i, name in enumerate(class_names)}
    graded = grade_indices(probs, grading)
    expected = expected_grade(probs) if grading is not None else None
    for i, (c, p) in enumerate(zip(cells, probs)):
        pd = {name: float(p[col[name]]) for name in class_names}
        if task == "4class":
            pred_grade: str | None = class_names[int(graded[i])]
            p_def = pd["p67"] + pd["p100"]
        else:
            pred_grade = None
            p_def = pd["defective"]
        rows.append(
            {
                "path": c.path,
                "module_type": c.module_type,
                "grade": c.grade,
                "true_defective": c.defective,
                "probs": pd,
                "p_defective": p_def,
                "pred_defective": p_def >= 0.5,
                "pred_grade": pred_grade,
                **({"expected_grade": float(expected[i])} if expected is not None else {}),
            }
        )
    return rows


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
        "split": {
            "test_fraction": split.test_fraction,
            "seed": split.seed,
            "n_cells": split.n_total,
            "n_train": split.n_train,
            "n_test": len(split.cells),
            "limit": limit,
            "n_evaluated": len(cells),
        },
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
        "speed": {
            **timings,
            "threads": runner.threads,
            "provider": runner.provider,
            "batch_size": batch_size,
            "tta_views": len(tta_views(np.zeros((1, 1, 2, 2), np.float32), tta))
            * int(runner.info.get("graph_tta_views", 1)),
        },
        "machine": machine(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    return result, rows


# --------------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _acc(metric_doc: dict[str, Any], group: str, task: str) -> float | None:
    b = metric_doc[group][task]
    return None if b is None else b["accuracy"]


def row_values(metric_doc: dict[str, Any], speed: dict[str, Any] | None) -> dict[str, float | None]:
    """The numbers of one table row (accuracies as fractions; images/s as measured)."""
    m = metric_doc["overall"]
    f1 = m["four_class"] if m["four_class"] is not None else m["binary"]
    point = m.get("operating_point") or {}
    return {
        "binary_acc": _acc(metric_doc, "overall", "binary"),
        "four_class_acc": _acc(metric_doc, "overall", "four_class"),
        "macro_f1": f1["macro_f1"],
        "bal_acc": f1.get("balanced_accuracy"),
        "qwk": (m["four_class"] or {}).get("qwk"),
        "mae": (m["four_class"] or {}).get("mae"),
        "frr95": (point.get("recall_95") or {}).get("false_reject_rate_p0"),
        "frr99": (point.get("recall_99") or {}).get("false_reject_rate_p0"),
        "mono_binary": _acc(metric_doc, "mono", "binary"),
        "mono_four_class": _acc(metric_doc, "mono", "four_class"),
        "poly_binary": _acc(metric_doc, "poly", "binary"),
        "poly_four_class": _acc(metric_doc, "poly", "four_class"),
        "compute_ips": None if speed is None else speed["compute_images_per_s"],
        "e2e_ips": None if speed is None else speed["end_to_end_images_per_s"],
    }


def row_name(result: dict[str, Any]) -> str:
    """The label, flagged when the row is not the full protocol or not the ONNX runtime."""
    name = str(result["label"])
    split = result["split"]
    if split["n_evaluated"] != split["n_test"]:
        name += f" ({split['n_evaluated']}-cell subset)"
    if result.get("model_format") == "checkpoint":
        name += " [PyTorch checkpoint]"
    return name


TABLE_HEADER = (
    "| model | task | TTA | binary acc % | 4-class acc % | macro-F1 % | balanced acc % | QWK | MAE "
    "| FRR p0 at 95 / 99 % recall | mono bin / 4-cl % | poly bin / 4-cl % | images/s compute / end to end |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
TABLE_NOTES = (
    "binary: defective when p >= 0.5 (grades 0.67, 1.0); a 4-class model's binary verdict is "
    "P(p67) + P(p100) >= 0.5. macro-F1 is over the 4 grades for 4-class models, over the 2 classes for "
    "binary ones; balanced acc is their mean recall. QWK (quadratic-weighted kappa) and MAE (mean absolute "
    "error in grades) are over the 4 grades. FRR p0 at 95 / 99 % recall: share of the p0 cells flagged at the "
    "threshold that catches 95 / 99 % of the p >= 0.5 cells (chosen on these cells). Images/s are per "
    "test cell (all TTA views included), with the provider and threads recorded in each result file; end to end = decode + preprocessing + compute, not overlapped. "
    "Published rows: their own protocols, not re-run here."
)


def _fmt(values: Sequence[float | None], ips: bool = False, plain: bool = False) -> str:
    """One cell: a value, or mean ± std over seeds (percent; ``plain``: as is, 3 decimals)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    scale, digits = (1.0, 0) if ips else (1.0, 3) if plain else (100.0, 2)
    if len(values) == 1:
        return f"{scale * vals[0]:.{digits}f}"
    # sample standard deviation (n - 1): the seed-to-seed spread the issue asks for
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{scale * float(np.mean(vals)):.{digits}f} ± {scale * std:.{digits}f}"


def table_row(name: str, task: str, tta: str, rows: Sequence[dict[str, float | None]]) -> str:
    def col(key: str, ips: bool = False, plain: bool = False) -> str:
        return _fmt([r.get(key) for r in rows], ips, plain)

    return (
        f"| {name} | {task} | {tta} | {col('binary_acc')} | {col('four_class_acc')} | {col('macro_f1')} "
        f"| {col('bal_acc')} | {col('qwk', plain=True)} | {col('mae', plain=True)} "
        f"| {col('frr95')} / {col('frr99')} "
        f"| {col('mono_binary')} / {col('mono_four_class')} | {col('poly_binary')} / {col('poly_four_class')} "
        f"| {col('compute_ips', True)} / {col('e2e_ips', True)} |"
    )


def seed_groups(results: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Results whose labels differ only in a ``-s<digits>`` suffix and share task, TTA and cell count."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        m = SEED_LABEL.match(str(r["label"]))
        if m:
            key = (m["group"], r["task"], r["tta"], int(r["split"]["n_evaluated"]))
            groups.setdefault(key, []).append(r)
    return [(k[0], v) for k, v in groups.items() if len(v) >= 2]


def markdown_table(results: Sequence[dict[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    """One table: every result, a mean ± std row per seed group, the baseline and published rows."""
    lines = [TABLE_HEADER]
    for r in results:
        lines.append(table_row(row_name(r), r["task"], r["tta"], [row_values(r["metrics"], r["speed"])]))
    for group, members in seed_groups(results):
        name = f"**{group}** (mean ± std, {len(members)} seeds)"
        vals = [row_values(r["metrics"], r["speed"]) for r in members]
        lines.append(table_row(name, members[0]["task"], members[0]["tta"], vals))
    if baseline is not None:
        n = baseline["overall"]["n"]
        name = f'always "functional" / p0 (computed on the {n} test cells)'
        lines.append(table_row(name, "–", "–", [row_values(baseline, None)]))
    for ref in REFERENCES:
        lines.append(
            f"| {ref['label']} ({ref['note']}) | {ref['task']} | – "
            f"| {_pct(None if ref['binary_acc'] is None else ref['binary_acc'] / 100)} "
            f"| {ref['four_class_acc']:.2f} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | – |"
        )
    return "\n".join(lines) + "\n\n" + TABLE_NOTES + "\n"


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def plot_confusion(result: dict[str, Any], path: Path) -> None:
    """The 4-class (when the model has one) and binary confusion matrices with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = result["metrics"]["overall"]
    blocks = [(k, overall[k]) for k in ("four_class", "binary") if overall[k] is not None]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.6 * len(blocks), 4.2), squeeze=False)
    for ax, (key, b) in zip(axes[0], blocks):
        cm = np.asarray(b["confusion"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ticks = range(len(b["labels"]))
        ax.set_xticks(ticks, b["labels"])
        ax.set_yticks(ticks, b["labels"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        kind = "4-class" if key == "four_class" else f"binary ({result['binary_rule']})"
        ax.set_title(f"{kind}\nacc {_pct(b['accuracy'])} %, macro-F1 {_pct(b['macro_f1'])} %", fontsize=9)
    fig.suptitle(
        f"{result['label']} ({result['model_name']}, TTA {result['tta']}) on ELPV test, n={overall['n']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_text(result: dict[str, Any]) -> str:
    """Human-readable lines printed after a run."""
    lines = [f"binary verdict: {result['binary_rule']} (defective = grades 0.67 and 1.0)"]
    for group in ("overall", *MODULE_TYPES):
        m = result["metrics"][group]
        parts = [f"binary acc {_pct(m['binary']['accuracy'])} %, F1 {_pct(m['binary']['macro_f1'])} %"]
        if m["binary_argmax"] is not None:
            parts.append(f"binary (argmax grouping) {_pct(m['binary_argmax']['accuracy'])} %")
        if m["four_class"] is not None:
            f = m["four_class"]
            parts.append(
                f"4-class acc {_pct(f['accuracy'])} %, balanced {_pct(f['balanced_accuracy'])} %, macro-F1 "
                f"{_pct(f['macro_f1'])} %, QWK {f.get('qwk', float('nan')):.3f}, MAE {f.get('mae', float('nan')):.3f}, "
                f"off by > 1 grade {_pct(f.get('off_by_more_than_one'))} %"
            )
        lines.append(f"{group:>7} (n={m['n']}): " + "; ".join(parts))
    for key, point in (result["metrics"]["overall"].get("operating_point") or {}).items():
        lines.append(
            f"at {key.replace('recall_', '')} % recall of the p >= 0.5 cells (threshold {point['threshold']:.4f}): "
            f"false-reject rate {_pct(point.get('false_reject_rate_p0'))} % of p0, "
            f"{_pct(point.get('false_reject_rate_functional'))} % of p0 + p33"
        )
    ship = result.get("shipped")
    if ship:
        lines.append(
            f"shipped threshold {ship['threshold']:.4f} (NG = {', '.join(ship['ng_classes'])}): recall "
            f"{_pct(ship['recall'])} % of p >= 0.5, false-reject rate {_pct(ship['false_reject_rate_p0'])} % of p0"
        )
    if m_four := result["metrics"]["overall"]["four_class"]:
        lines.append("4-class confusion (rows truth p0..p100, columns given): " + str(m_four["confusion"]))
    base = result["always_functional"]["overall"]
    lines.append(
        f"always 'functional' (p0) on these cells: {_pct(base['binary']['accuracy'])} % binary, "
        f"{_pct(base['four_class']['accuracy'])} % 4-class"
    )
    s = result["speed"]
    lines.append(
        f"speed: {s['compute_images_per_s']:.1f} images/s compute, {s['end_to_end_images_per_s']:.1f} "
        f"images/s end to end (decode {s['decode_s']:.2f} s, preprocess {s['preprocess_s']:.2f} s, compute "
        f"{s['compute_s']:.2f} s; {s['threads']} threads, {s['provider']}, {s['tta_views']} view(s) per image)"
    )
    return "\n".join(lines)


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
