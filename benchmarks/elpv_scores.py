"""The OK/NG operating point a line would run at, for the ELPV benchmark (``benchmarks/elpv.py``).

Balanced accuracy and the ordinal figures come from the product (``defectscope.evaluation`` and
``defectscope.runtime.grading``), so the benchmark and ``defectscope evaluate`` cannot disagree.

Operating point: the defective cells are those with p >= 0.5 (grades p67 and p100) and their score is the
protocol's P(defect) = P(p67) + P(p100).  For a recall target r, the threshold is the one training and
export choose (``choose_threshold``: mid-gap below the score of the defective cell that makes the share
r, so recall may end above r at the same false-reject rate), here
chosen on the test cells themselves, so the figure says what the model's ranking allows, not what a
threshold picked in advance delivers.  The false-reject rate is reported on the functional p0 cells (the
issue's figure) and on all cells below 0.5 (p0 and p33).  The shipped threshold, with the model's own NG
classes, is reported separately (``shipped``): that is what a line running the file gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RECALLS = (0.95, 0.99)


def _rates(ng: np.ndarray, grades: np.ndarray) -> dict[str, float | None]:
    defective = np.isin(grades, ("p67", "p100"))
    p0 = grades == "p0"
    functional = ~defective

    def share(mask: np.ndarray) -> float | None:
        return float(ng[mask].mean()) if mask.any() else None

    return {
        "recall": share(defective),
        "false_reject_rate_p0": share(p0),
        "false_reject_rate_functional": share(functional),
    }


def operating_points(
    p_defective: Sequence[float], grades: Sequence[str], recalls: Sequence[float] = RECALLS
) -> dict[str, dict[str, float | None]]:
    """``{"recall_95": {...}, "recall_99": {...}}``: threshold and rates at each recall target."""
    import torch

    from defectscope.runtime.decision import is_ng
    from defectscope.training.metrics import choose_threshold

    scores = np.asarray(p_defective, dtype=np.float64)
    g = np.asarray(grades)
    is_defective = torch.from_numpy(np.isin(g, ("p67", "p100")))
    out: dict[str, dict[str, float | None]] = {}
    for r in recalls:
        t = choose_threshold(torch.from_numpy(scores), is_defective, r)
        entry: dict[str, float | None] = {"threshold": t}
        entry.update(_rates(np.asarray(is_ng(scores, t)), g) if t is not None else {})
        out[f"recall_{round(100 * r)}"] = entry
    return out


def shipped_point(
    probs: np.ndarray, class_names: Sequence[str], ng_classes: Sequence[str], threshold: float,
    grades: Sequence[str],
) -> dict[str, Any]:  # fmt: skip
    """Recall and false-reject rates at the model's own threshold and NG classes (its line verdict)."""
    from defectscope.runtime.decision import defect_probability, is_ng

    cols = [list(class_names).index(c) for c in ng_classes]
    ng = np.asarray(is_ng(defect_probability(np.asarray(probs, dtype=np.float64), cols), threshold))
    return {"threshold": float(threshold), "ng_classes": list(ng_classes), **_rates(ng, np.asarray(grades))}
