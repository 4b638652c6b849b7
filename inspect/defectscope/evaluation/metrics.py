"""The figures a model is judged by, computed once for every path (PyTorch, ONNX, export).

Inputs are plain numpy arrays: ``scores`` = P(defect) per image and ``is_defect`` (the label is an
NG class) per image, both under the one NG rule (:mod:`defectscope.runtime.decision`), and class
indices for the confusion matrix.  Training (torch tensors), export (ONNX Runtime on
the written graph) and ``defectscope evaluate`` (either) all call these functions, so a threshold
or a false-reject rate means the same thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime.decision import RECALL_EXPECTED, is_ng, is_recall_target

#: recall targets of the trade-off table shown when the chosen threshold costs too many good parts
TRADEOFF_RECALLS = (0.80, 0.90, 0.95, 0.98, 0.99, 0.995, 1.0)


def defects_to_catch(n_defect: int, target_recall: float) -> int:
    """How many of ``n_defect`` defect images a threshold must catch to reach ``target_recall``."""
    return min(n_defect, max(1, math.ceil(target_recall * n_defect - 1e-9)))


def choose_threshold(scores: np.ndarray, is_defect: np.ndarray, target_recall: float) -> float | None:
    """The OK/NG threshold for a recall target: mid-gap below the k-th best defect score.

    With n defect images, k = ceil(target_recall * n) of them must score >= t, so the k-th largest
    defect score is the largest threshold that meets the target.  Taking it as it is leaves no margin
    (the next defect a shade lower escapes), so the threshold moves down to the middle of the gap
    between it and the best-scored good image below it: the same good images are rejected, recall can
    only rise, and both sides keep half the gap.  None when there are no defect images.
    """
    if not is_recall_target(target_recall):
        raise ValueError(f"threshold.target_recall: expected {RECALL_EXPECTED}, got {target_recall}")
    values = np.asarray(scores, dtype=np.float64)
    defect_mask = np.asarray(is_defect, dtype=bool)
    defect = np.sort(values[defect_mask])[::-1]
    n = int(defect.size)
    if n == 0:
        return None
    k = defects_to_catch(n, target_recall)
    top = float(defect[k - 1])
    good = values[~defect_mask]
    below = good[good < top]
    if below.size == 0:
        return top
    best_good = float(below.max())
    middle = (top + best_good) / 2.0
    # strictly inside the gap, also once rounded to float32 (the scores of ONNX graphs and plots)
    inside = best_good < middle < top and np.float32(best_good) < np.float32(middle) < np.float32(top)
    return middle if inside else top


#: figures a stage logs only when its images hold both good and defect ones (:func:`operating_point`, the
#: AUROC): a few validation batches (the sanity check) may lack them where a whole validation has them
BOTH_KINDS_METRICS = ("recall", "escape_rate", "false_reject_rate", "auroc")


def operating_point(scores: np.ndarray, is_defect: np.ndarray, threshold: float) -> dict[str, Any]:
    """Recall, escape rate (defects passed as OK) and false-reject rate (good parts called NG)."""
    ng = np.asarray(is_ng(np.asarray(scores, dtype=np.float64), threshold), dtype=bool)
    defect = np.asarray(is_defect, dtype=bool)
    out: dict[str, Any] = {"n_defect": int(defect.sum()), "n_good": int((~defect).sum())}
    if defect.any():
        out["recall"] = float(ng[defect].mean())
        out["escape_rate"] = 1.0 - out["recall"]
    if (~defect).any():
        out["false_reject_rate"] = float(ng[~defect].mean())
    return out


def tradeoff_table(
    scores: np.ndarray, is_defect: np.ndarray, recalls: Sequence[float] = TRADEOFF_RECALLS
) -> list[dict[str, float | None]]:
    """Recall against false-reject rate at the threshold each recall target would choose
    (plain, JSON-able rows; a rate that cannot be measured is None)."""
    rows: list[dict[str, float | None]] = []
    for target in recalls:
        t = choose_threshold(scores, is_defect, target)
        if t is None:
            break
        point = operating_point(scores, is_defect, t)
        rows.append(
            {
                "target_recall": float(target),
                "threshold": t,
                "recall": point.get("recall"),
                "false_reject_rate": point.get("false_reject_rate"),
            }
        )
    return rows


def _pct(v: float | None, width: int) -> str:
    return f"{'n/a':>{width}}  " if v is None else f"{100 * v:>{width}.1f} %"


def tradeoff_text(
    rows: Sequence[dict[str, float | None]], chosen: float | None = None, target: float | None = None
) -> str:
    """The trade-off table as aligned text lines, the chosen threshold marked: on the row of the recall
    ``target`` when it has one (several targets often share a threshold: 98 % and 99 % on few defect
    images), else on the first row with that threshold."""

    def close(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and math.isclose(float(a), float(b), abs_tol=1e-12)

    at = [i for i, r in enumerate(rows) if close(r["threshold"] or 0.0, chosen)]
    on_target = [i for i in at if close(rows[i]["target_recall"], target)]
    mark = (on_target or at or [-1])[0]
    lines = ["  target recall  threshold   recall  false-reject rate"]
    for i, r in enumerate(rows):
        t = float(r["threshold"] or 0.0)
        lines.append(
            f"  {_pct(r['target_recall'], 11)}  {t:>9.4g}  {_pct(r['recall'], 5)}"
            f"  {_pct(r['false_reject_rate'], 15)}{'  <- chosen' if i == mark else ''}"
        )
    return "\n".join(lines)


def confusion(truth: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = truth, columns = prediction."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def class_figures(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present in the truth), macro-F1 over
    the classes present in truth or prediction, and per-class precision/recall/support."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    n = int(cm.sum())
    recall = np.divide(tp, support, out=np.full_like(tp, np.nan), where=support > 0)
    precision = np.divide(tp, predicted, out=np.full_like(tp, np.nan), where=predicted > 0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / np.maximum(support[present] + predicted[present], 1)
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else None,  # None, not NaN: JSON has no NaN
        "balanced_accuracy": float(np.nanmean(recall)) if (support > 0).any() else None,
        "macro_f1": float(f1.mean()) if present.any() else None,
        "per_class": {
            name: {"precision": _num(precision[i]), "recall": _num(recall[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def roc_pr_curves(scores: np.ndarray, is_defect: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall points over every distinct score (defect = positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_defect, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last].astype(float)
    fps = (last + 1) - tps
    pos, neg = max(1.0, float(y.sum())), max(1.0, float((~y).sum()))
    return {
        "thresholds": s[last],
        "fpr": np.r_[0.0, fps / neg],
        "tpr": np.r_[0.0, tps / pos],
        "recall": tps / pos,
        "precision": tps / np.maximum(tps + fps, 1.0),
    }


def auroc(scores: np.ndarray, is_defect: np.ndarray) -> float | None:
    """Area under the ROC curve of defect vs. good (ties count half); None unless both are present."""
    y = np.asarray(is_defect, dtype=bool)
    if y.all() or not y.any():
        return None
    c = roc_pr_curves(scores, y)
    return float(np.trapezoid(c["tpr"], c["fpr"]))
