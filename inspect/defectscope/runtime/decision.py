"""The one OK/NG rule, shared by training, export, evaluation and the line runtime.

``P(defect)`` is the summed probability of the classes configured as NG (by default every class
except the good one, which equals ``1 - P(good)``).  An image is NG when ``P(defect) >= threshold``.
Classes that are neither good nor NG (ELPV's "probably functional" grade under the binary protocol)
then count as OK, and their images count as good when recall and false-reject rates are measured.

:func:`defect_probability` and :func:`is_ng` index and compare only, so they take numpy arrays and
torch tensors alike: training computes its scores with the very same code as the line PC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .grading import Grading, expected_grade, grade_indices

ArrayLike = TypeVar("ArrayLike")

OK, NG = "OK", "NG"


class DecisionRuleError(ValueError):
    """The NG classes do not fit the class list."""


class NoVerdictError(ValueError):
    """The model's output for an image cannot decide it (not finite, or not one value per class)."""


#: ``">= p67"``: every grade from p67 on (ordered classes only)
GRADE_AT_LEAST = ">="


def check_ng_spec(ng_classes: Any) -> None:
    """The NG classes' form, before any class list is known: none, a list of names or ``">= NAME"``."""
    if ng_classes is None:
        return
    if isinstance(ng_classes, str):
        if not ng_classes.strip().startswith(GRADE_AT_LEAST):  # a bare name waited for the class list (13 s)
            raise DecisionRuleError(
                f"NG classes {ng_classes!r}: expected a list of class names ([{ng_classes}]) or '>= GRADE' "
                "(ordered grades)"
            )
        return
    if not isinstance(ng_classes, list | tuple) or not all(isinstance(c, str) for c in ng_classes):
        raise DecisionRuleError(
            f"expected a list of class names or '{GRADE_AT_LEAST} NAME', got {ng_classes!r:.80}"
        )


def ng_class_names(
    class_names: Sequence[str],
    good_class: str,
    ng_classes: Sequence[str] | str | None,
    ordered: bool = False,
) -> list[str]:
    """The NG classes in class order; ``None`` or empty = every class except ``good_class``.

    ``">= NAME"`` (ordered classes only, ``ordered=True``) is the grade NAME and every worse grade,
    i.e. NAME and the classes after it in class order.
    """
    names = list(class_names)
    if good_class not in names:
        raise DecisionRuleError(f"good class {good_class!r} is not one of the classes {names}")
    if not ng_classes:
        return [c for c in names if c != good_class]
    check_ng_spec(ng_classes)
    if isinstance(ng_classes, str):
        ng_classes = _grades_from(names, ng_classes, ordered)
    wanted = list(ng_classes)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise DecisionRuleError(f"NG class(es) {unknown} are not among the classes {names}")
    if good_class in wanted:
        raise DecisionRuleError(f"the good class {good_class!r} cannot also be an NG class")
    return [c for c in names if c in set(wanted)]


def _grades_from(names: list[str], spec: str, ordered: bool) -> list[str]:
    """``">= NAME"`` -> NAME and the grades after it; anything else is a usage error."""
    text = spec.strip()
    if not text.startswith(GRADE_AT_LEAST):
        raise DecisionRuleError(
            f"NG classes {spec!r}: expected a list of class names or '>= GRADE' (ordered grades)"
        )
    first = text[len(GRADE_AT_LEAST) :].strip()
    if not ordered:
        raise DecisionRuleError(
            f"NG classes {spec!r} need ordered grades (data.ordered: true); give a list of class names instead"
        )
    if first not in names:
        raise DecisionRuleError(f"NG classes {spec!r}: {first!r} is not among the classes {names}")
    return names[names.index(first) :]


def ng_indices(
    class_names: Sequence[str],
    good_class: str,
    ng_classes: Sequence[str] | str | None,
    ordered: bool = False,
) -> list[int]:
    """Column indices of the NG classes in a probability matrix."""
    chosen = set(ng_class_names(class_names, good_class, ng_classes, ordered))
    return [i for i, c in enumerate(class_names) if c in chosen]


def defect_probability(probs: ArrayLike, indices: Sequence[int]) -> ArrayLike:
    """(N, K) class probabilities -> (N,) P(defect), the NG classes' sum clipped to [0, 1]."""
    p: Any = probs
    return p[:, list(indices)].sum(-1).clip(0.0, 1.0)


#: what a threshold must be, in every message that refuses one (command line, config, model file)
THRESHOLD_EXPECTED = "a number in [0, 1]"
THRESHOLD_RANGE = (0.0, 1.0)


def is_threshold(value: float) -> bool:
    """A threshold that decides something: P(defect) lies in [0, 1] (NaN is refused too)."""
    low, high = THRESHOLD_RANGE
    return low <= value <= high


#: what a recall target must be, in every message that refuses one (config, command line, checkpoint)
RECALL_EXPECTED = "a recall target in (0, 1]"
#: the recall target where none is set (conf/train.yaml writes the same value out)
DEFAULT_TARGET_RECALL = 0.99


def is_recall_target(value: float) -> bool:
    """A share of the defect images the threshold must flag: 0 asks for nothing, 1 for every one (NaN refused)."""
    return 0.0 < value <= 1.0


def is_ng(defect_prob: ArrayLike, threshold: float) -> ArrayLike:
    """The verdict rule: NG exactly when ``P(defect) >= threshold`` (arrays, tensors or floats)."""
    p: Any = defect_prob
    return p >= threshold


def is_defect_label(labels: ArrayLike, indices: Sequence[int]) -> ArrayLike:
    """Ground truth for recall and false-reject rates: the label is one of the NG classes."""
    y: Any = labels
    out = y == indices[0]
    for i in indices[1:]:
        out = out | (y == i)
    return out


@dataclass(frozen=True)
class Decision:
    """The verdict for one image and what it rests on."""

    verdict: str
    top_class: str
    top_prob: float
    defect_prob: float
    probs: dict[str, float]
    defect_class: str  # most likely NG class (whose CAM explains an NG)
    #: ordered grades only: the expected grade index sum_k k * p_k (0 = best)
    expected_grade: float | None = None


def decide(
    probs: np.ndarray,
    class_names: Sequence[str],
    indices: Sequence[int],
    threshold: float,
    grading: Grading | None = None,
) -> Decision:
    """One image's (K,) probabilities -> :class:`Decision` under the project-wide rule.

    ``top_class`` is the most probable class, or with ordered grades the grade ``grading`` gives
    (:mod:`.grading`); the OK/NG verdict is the threshold rule either way.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(1, -1)
    if p.shape[1] != len(class_names):  # a NaN or a missing column must never read as OK
        raise NoVerdictError(f"the model gave {p.shape[1]} probabilities for {len(class_names)} classes")
    if not np.isfinite(p).all():
        raise NoVerdictError("the model gave probabilities that are not finite (NaN or infinite)")
    top = int(grade_indices(p, grading)[0])
    defect_prob = float(defect_probability(p, indices)[0])
    defect_idx = max(indices, key=lambda i: p[0, i])
    return Decision(
        verdict=NG if is_ng(defect_prob, threshold) else OK,
        top_class=class_names[top],
        top_prob=float(p[0, top]),
        defect_prob=defect_prob,
        probs={c: float(v) for c, v in zip(class_names, p[0])},
        defect_class=class_names[defect_idx],
        expected_grade=None if grading is None else float(expected_grade(p)[0]),
    )
