"""Validation/test metrics and the OK/NG operating threshold.

Per-step updates are cheap: the class metrics share one set of per-class counts (torchmetrics compute
groups) and the defect scores are only appended; everything heavier happens once per epoch.  Under
DDP torchmetrics gathers the states across ranks at ``compute()``, so the threshold is chosen on the
scores of the WHOLE validation set, identically on every rank.
"""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from ..evaluation import metrics as shared

_UNSAFE = re.compile(r"[^\w\-. /]")


def metric_key(name: str) -> str:
    """A class name usable inside an MLflow metric key (letters, digits, _ - . space /)."""
    return _UNSAFE.sub("_", name)


class DefectScores(Metric):
    """Collects P(defect) and the is-defect flag of every image (for AUROC, threshold, ROC/PR plots)."""

    full_state_update = False
    scores: list[torch.Tensor]
    targets: list[torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self.scores.append(scores.detach().float().flatten())
        self.targets.append(targets.detach().to(torch.int64).flatten())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        # after a DDP sync the list states have been replaced by one gathered tensor each
        if isinstance(self.scores, list) and not self.scores:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        return dim_zero_cat(self.scores), dim_zero_cat(self.targets)


def class_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, balanced accuracy (= macro recall), macro F1 and per-class precision/recall."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bal_acc": MulticlassRecall(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
        },
        compute_groups=True,
    )


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(num_classes)


def choose_threshold(scores: torch.Tensor, is_defect: torch.Tensor, target_recall: float) -> float | None:
    """:func:`defectscope.evaluation.metrics.choose_threshold` on tensors (the one threshold rule)."""
    return shared.choose_threshold(scores.cpu().numpy(), is_defect.cpu().numpy(), target_recall)


def operating_point(scores: torch.Tensor, is_defect: torch.Tensor, threshold: float) -> dict[str, float]:
    """Escape rate (defects passed as OK) and false-reject rate (good parts called NG) at ``threshold``."""
    point = shared.operating_point(scores.cpu().numpy(), is_defect.cpu().numpy(), threshold)
    return {k: float(point[k]) for k in ("escape_rate", "false_reject_rate") if k in point}


def defect_auroc(scores: torch.Tensor, is_defect: torch.Tensor) -> float | None:
    """AUROC of defect vs. good on P(defect); None unless both kinds are present."""
    if scores.numel() == 0 or is_defect.min() == is_defect.max():
        return None
    return float(binary_auroc(scores, is_defect.to(torch.int64)))
