"""Ordered grades: the rule that turns class probabilities into a grade, and the figures that judge it.

A model trained on ordered classes (``data.ordered: true``; the class order is the grade order, best
first) still outputs one probability per class; what the grade is then follows one of three rules:

* ``argmax``: the most probable class (what an unordered model does);
* ``median``: the smallest grade whose cumulative probability reaches 0.5 (the natural rank of a
  cumulative/CORN model; never skips over a mass of probability on either side);
* ``cuts``: the expected grade ``E = sum_k k * p_k`` (0 .. K-1) placed between ``K - 1`` increasing cut
  points chosen on validation images (:func:`choose_cuts`): grade = number of cuts <= E.  ``cuts_for``
  says what they were chosen for: ``accuracy`` (the most images right) or ``balanced`` (the highest mean
  recall over the grades; accuracy-chosen cuts can give a rare grade an empty range, and then it is never
  predicted: ELPV's p33 and p67, docs/benchmarks.md).

The rule and its cut points travel in the exported model's metadata (``grading``) and the line runtime
applies them; training, export and the benchmark call the same functions.  numpy only: the runtime
imports it, and a model file's ``grading`` entry is untrusted input (:meth:`Grading.from_doc`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RULES = ("argmax", "median", "cuts")
GRADING_KEYS = ("rule", "cuts", "cuts_for")
#: what a ``cuts`` rule's cut points maximise on validation (:func:`choose_cuts`); the first is the default
CUTS_FOR = ("accuracy", "balanced")
#: cuts may lie this far outside the grades 0 .. K-1 (a cut beyond every value = a grade never given)
CUT_MARGIN = 0.5
#: ``grading_source["method"]`` of a ``cuts`` rule: cut points chosen on the exported graph, or kept
CHOSEN_ON_GRAPH, KEPT_FROM_TRAINING = "chosen on this graph", "kept from training"


class GradingError(ValueError):
    """A grading rule that does not fit the classes (bad rule name, wrong number or order of cuts)."""


@dataclass(frozen=True)
class Grading:
    """How probabilities become a grade; ``cuts`` only with ``rule == "cuts"`` (K - 1 increasing values)."""

    rule: str = "argmax"
    cuts: tuple[float, ...] = ()
    cuts_for: str = CUTS_FOR[0]

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rule": self.rule, "cuts": [float(c) for c in self.cuts]}
        # only when not the default: a runtime from before cuts_for still reads default files
        return (
            {**doc, "cuts_for": self.cuts_for}
            if self.rule == "cuts" and self.cuts_for != CUTS_FOR[0]
            else doc
        )

    @classmethod
    def from_doc(cls, doc: Any, n_classes: int, where: str = "grading") -> Grading:
        """Validate an untrusted ``{"rule": ..., "cuts": [...]}``; errors name ``where`` and the field."""
        if not isinstance(doc, Mapping):
            raise GradingError(f"{where} must be an object with keys {', '.join(GRADING_KEYS)}")
        unknown = sorted(set(doc) - set(GRADING_KEYS))
        if unknown:
            raise GradingError(f"{where} has unknown key(s) {unknown}; valid: {', '.join(GRADING_KEYS)}")
        rule = doc.get("rule", "argmax")
        if rule not in RULES:
            raise GradingError(f"{where}.rule must be one of {', '.join(RULES)}, got {rule!r}")
        cuts = doc.get("cuts", [])
        if not isinstance(cuts, list | tuple) or not all(is_finite_number(c) for c in cuts):
            raise GradingError(f"{where}.cuts must be a list of finite numbers")
        want = n_classes - 1 if rule == "cuts" else 0
        if len(cuts) != want:
            raise GradingError(
                f"{where}.cuts needs {want} value(s) for rule {rule!r} and {n_classes} classes"
            )
        values = tuple(float(c) for c in cuts)
        lo, hi = -CUT_MARGIN, n_classes - 1 + CUT_MARGIN
        if any(b < a for a, b in itertools.pairwise(values)) or any(not lo <= c <= hi for c in values):
            raise GradingError(f"{where}.cuts must be non-decreasing values in [{lo}, {hi}], got {values}")
        return cls(str(rule), values, checked_cuts_for(doc.get("cuts_for", CUTS_FOR[0]), f"{where}.cuts_for"))


def checked_cuts_for(value: Any, key: str) -> str:
    """``value`` if it is one of :data:`CUTS_FOR`; otherwise an error naming ``key``."""
    if value not in CUTS_FOR:
        raise GradingError(f"{key} must be one of {', '.join(CUTS_FOR)}, got {value!r}")
    return str(value)


def is_finite_number(value: Any) -> bool:
    """A finite int or float read from a file; an integer too large for a float (10**400) is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def grading_text(grading: Grading | None, source: Mapping[str, Any]) -> str:
    """The model's grading rule and where its cut points came from, in one line ("" for unordered
    classes). ``source`` is the model file's display-only ``grading_source``: only its words are shown."""
    if grading is None:
        return ""
    if grading.rule == "argmax":
        return "ordered grades, the most probable one"
    if grading.rule == "median":
        return "ordered grades, the median of the predicted distribution"
    cuts = ", ".join(f"{c:.3g}" for c in grading.cuts)
    head = f"ordered grades, the expected grade cut at {cuts} (for {grading.cuts_for})"
    method, count = source.get("method"), source.get("count")
    images = f"{count} images" if isinstance(count, int) and not isinstance(count, bool) else "? images"
    where = source.get("images")
    of = f" of {where:.200}" if isinstance(where, str) and where else ""
    if method == CHOSEN_ON_GRAPH:
        return f"{head}, chosen on this {source.get('variant', '?')!s:.60} graph on {images}{of}"
    if method == KEPT_FROM_TRAINING:
        return f"{head}, kept from training (PyTorch): {images} with labels at export, too few to choose them"
    return f"{head}; where the cut points came from is not recorded (exported before defectscope recorded it)"


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) expected grade index ``sum_k k * p_k`` (0 = best grade)."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def grade_indices(probs: np.ndarray, grading: Grading | None = None) -> np.ndarray:
    """(N, K) probabilities -> (N,) grade (class index) under ``grading`` (None = argmax)."""
    p = np.asarray(probs, dtype=np.float64)
    rule = grading.rule if grading is not None else "argmax"
    if rule == "argmax":
        return p.argmax(axis=1)
    if rule == "median":
        below = np.cumsum(p, axis=1) < 0.5 - 1e-12
        return np.minimum(below.sum(axis=1), p.shape[1] - 1)
    assert grading is not None
    return np.searchsorted(np.asarray(grading.cuts), expected_grade(p), side="right")


def choose_cuts(
    expected: np.ndarray, labels: np.ndarray, n_classes: int, cuts_for: str = CUTS_FOR[0]
) -> tuple[float, ...]:
    """The ``n_classes - 1`` cut points on the expected grade that grade the most images right.

    ``cuts_for="balanced"`` counts each image as ``1 / (images of its grade)``, so the cuts maximise
    balanced accuracy (mean recall over the grades present) instead of accuracy.
    Exact, by dynamic programming over the distinct expected grades in order (each grade takes one
    contiguous run of them), O(K * N).  A cut lies midway between the last value of one run and the
    first of the next (0 and K - 1 stand in at the ends); a grade that wins no image gets an empty run.
    """
    checked_cuts_for(cuts_for, "cuts_for")
    e = np.asarray(expected, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if e.size == 0:
        return tuple(k + 0.5 for k in range(n_classes - 1))
    values, inverse = np.unique(e, return_inverse=True)
    m = values.size
    counts = np.zeros((n_classes, m), dtype=np.float64)
    np.add.at(counts, (y, inverse.ravel()), 1.0)
    if cuts_for == "balanced":
        counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    # prefix[k, j]: (weighted) images of grade k among the j smallest distinct values
    prefix = np.concatenate([np.zeros((n_classes, 1)), counts.cumsum(axis=1)], axis=1)
    best = prefix[0].copy()  # best[j]: most (weighted) images right with grades < k on values [0, j)
    starts = []
    positions = np.arange(m + 1)
    for k in range(1, n_classes):
        gain = best - prefix[k]
        running = np.maximum.accumulate(gain)
        new_max = gain > np.concatenate([[-np.inf], running[:-1]])
        starts.append(np.maximum.accumulate(np.where(new_max, positions, 0)))
        best = running + prefix[k]
    bounds = [m]
    for start in reversed(starts):  # where grade k's run begins, given where it ends
        bounds.append(int(start[bounds[-1]]))
    return tuple(_cut_at(values, b, n_classes) for b in reversed(bounds[1:]))


def _cut_at(values: np.ndarray, index: int, n_classes: int) -> float:
    """The cut in front of the ``index``-th distinct value; half a grade beyond the values at the ends."""
    lo = float(values[index - 1]) if index > 0 else float(values[0]) - 1.0
    hi = float(values[index]) if index < values.size else float(values[-1]) + 1.0
    # float32 probabilities can put E a hair beyond 0 .. K-1; a cut stays where Grading accepts it
    return min(max((lo + hi) / 2, -CUT_MARGIN), n_classes - 1 + CUT_MARGIN)


def ordinal_metrics(confusion: Sequence[Sequence[int]] | np.ndarray) -> dict[str, float]:
    """From a K x K confusion matrix (rows = truth, columns = grade given), the ordinal figures.

    ``mae``: mean absolute error in grades; ``off_by_more_than_one``: share of images graded more than one
    grade away; ``qwk``: Cohen's kappa with quadratic weights (1 = perfect, 0 = chance agreement).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        return {"mae": float("nan"), "off_by_more_than_one": float("nan"), "qwk": float("nan")}
    dist = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(np.float64)
    weights = dist**2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    denom = float((weights * expected).sum())
    qwk = 1.0 - float((weights * cm).sum()) / denom if denom > 0 else float("nan")
    return {
        "mae": float((dist * cm).sum() / n),
        "off_by_more_than_one": float(cm[dist > 1].sum() / n),
        "qwk": qwk,
    }
