"""One evaluation document and its printout, for a checkpoint (PyTorch) and an exported model (ONNX).

:func:`evaluation_doc` turns per-image scores and predictions into every figure the user audits;
:func:`report_lines` prints them the same way whichever path produced them.  numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import auroc, class_figures, operating_point, tradeoff_table


def evaluation_doc(
    confmat: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray,
    is_defect: np.ndarray,
    threshold: float,
    *,
    sweep: bool = False,
) -> dict[str, Any]:
    """Class figures from the confusion matrix, OK/NG figures at ``threshold`` (and a sweep)."""
    doc: dict[str, Any] = {
        "class_names": list(class_names),
        "confusion": np.asarray(confmat, dtype=np.int64).tolist(),
        **class_figures(confmat, class_names),
        "threshold": float(threshold),
        "ok_ng": operating_point(scores, is_defect, threshold),
        "auroc": auroc(scores, is_defect),
    }
    if sweep:
        doc["tradeoff"] = tradeoff_table(scores, is_defect)
    return doc


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f} %"


def confusion_lines(confmat: Sequence[Sequence[int]], names: Sequence[str]) -> list[str]:
    """The confusion matrix as text: rows = truth, columns = prediction."""
    width = min(16, max(7, *(len(n) for n in names)))
    corner = "truth \u2193 predicted \u2192"
    first = max(len(corner), *(len(n[:width]) for n in names))
    head = f"  {corner:<{first}}" + "".join(f"{n[:width]:>{width + 2}}" for n in names)
    rows = [
        f"  {n[:width]:<{first}}" + "".join(f"{int(v):>{width + 2}}" for v in row)
        for n, row in zip(names, confmat)
    ]
    return [head, *rows]


def report_lines(doc: dict[str, Any], where: str) -> list[str]:
    """What the user reads: how many images, accuracy, escapes and false rejects, per class."""
    ok_ng = doc["ok_ng"]
    n_defect, n_good = ok_ng["n_defect"], ok_ng["n_good"]
    lines = [
        f"scored {doc['n']} images ({n_good} good, {n_defect} defect): {where}",
        f"accuracy {_pct(doc['accuracy'])}, balanced accuracy {_pct(doc['balanced_accuracy'])}, "
        f"macro-F1 {_pct(doc['macro_f1'])}, AUROC defect vs good {doc['auroc']:.4f}"
        if doc["auroc"] is not None
        else f"accuracy {_pct(doc['accuracy'])}, balanced accuracy {_pct(doc['balanced_accuracy'])}, "
        f"macro-F1 {_pct(doc['macro_f1'])}",
        f"OK/NG at threshold {doc['threshold']:.4g} (NG when P(defect) >= threshold): "
        f"escape rate {_pct(ok_ng.get('escape_rate'))} of {n_defect} defects, "
        f"false-reject rate {_pct(ok_ng.get('false_reject_rate'))} of {n_good} good parts",
        "confusion matrix (rows = truth, columns = prediction):",
        *confusion_lines(doc["confusion"], doc["class_names"]),
        "per class:        precision     recall   support",
    ]
    for name, f in doc["per_class"].items():
        lines.append(
            f"  {name[:14]:<14} {_pct(f['precision']):>11} {_pct(f['recall']):>10} {f['support']:>9}"
        )
    if doc.get("tradeoff"):
        from .metrics import tradeoff_text

        lines += [
            "threshold sweep (recall vs false-reject rate):",
            tradeoff_text(doc["tradeoff"], doc["threshold"]),
        ]
    return lines


def flat_metrics(doc: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
    """The document's figures under training's metric names (``test/acc``, ``test/recall/<class>``...)."""
    ok_ng = doc["ok_ng"]
    values: dict[str, Any] = {
        "acc": doc["accuracy"],
        "bal_acc": doc["balanced_accuracy"],
        "f1_macro": doc["macro_f1"],
        "auroc": doc["auroc"],
        "threshold": doc["threshold"],
        "escape_rate": ok_ng.get("escape_rate"),
        "false_reject_rate": ok_ng.get("false_reject_rate"),
    }
    for name, f in doc["per_class"].items():
        values[f"precision/{name}"] = f["precision"]
        values[f"recall/{name}"] = f["recall"]
    return {
        prefix + k: float(v)
        for k, v in values.items()
        if v is not None and not (isinstance(v, float) and math.isnan(v))
    }
