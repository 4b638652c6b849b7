"""The settings that need only the class list, checked as soon as the source has listed its classes.

The per-image scan decodes every image (about 14 s for 1,500 ELPV cells, growing with the data set), so a
wrong ``threshold.ng_classes``, ``loss.class_weights`` count or ``data.ordered`` order is told before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..runtime.decision import DecisionRuleError, ng_class_names
from .config import TrainingConfigError, check_class_names, class_weights_form, ng_classes_setting


def weights_per_class(spec: Any, class_names: Sequence[str]) -> list[float] | str | None:
    """``loss.class_weights``: null, ``balanced`` or one positive number per class, in class order."""
    weights = class_weights_form(spec)
    if isinstance(weights, list) and len(weights) != len(class_names):
        raise TrainingConfigError(
            f"loss.class_weights: expected {len(class_names)} positive numbers (one per class, order "
            f"{list(class_names)}), got {weights}"
        )
    return weights


def check_class_settings(
    threshold: Mapping[str, Any],
    class_weights: Any,
    class_names: Sequence[str],
    good_class: str,
    ordered: bool,
) -> None:
    """Whatever the model refuses about its classes, before any image is decoded."""
    names = list(class_names)
    check_class_names(names, len(names), good_class, ordered)
    configured_ng_classes(names, good_class, threshold, ordered)
    weights_per_class(class_weights, names)


def configured_ng_classes(
    class_names: Sequence[str], good_class: str, threshold: Mapping[str, Any], ordered: bool
) -> list[str]:
    """The NG classes ``threshold.ng_classes`` names, in class order; a wrong name is one line naming the key."""
    try:
        return ng_class_names(list(class_names), good_class, ng_classes_setting(threshold), ordered)
    except DecisionRuleError as exc:
        raise TrainingConfigError(f"threshold.ng_classes: {exc}") from None
