"""Training objectives, nominal and ordinal, and the grading rule each one ships with.

With ordered classes (``data.ordered: true``: class order = grade order, best first) a confusion
between neighbouring grades is a smaller mistake than one across the scale, and the objectives here
say so in different ways (``ordinal.objective``):

* ``ce``: cross-entropy, the classes as unrelated labels (the only choice for unordered classes);
* ``soft``: cross-entropy against distance-aware soft targets, ``q_j ∝ exp(-soft_beta * |j - y|)``
  (soft ordinal labels): neighbouring grades share some of the target;
* ``expected``: the squared error of the expected grade ``E = sum_k k p_k`` (a regression of the grade,
  as Deitsch et al. regressed the defect probability) plus ``expected_ce`` times cross-entropy to keep
  the probabilities sharp; graded by cut points on E chosen on validation;
* ``corn``: CORN, K - 1 conditional binary tasks "grade > k given grade > k - 1"
  (:mod:`defectscope.models.corn`), graded by the median.

``loss.ng_weight`` adds :func:`ng_cross_entropy`, the OK/NG decision's own loss, to any of them.
Every objective yields per-class probabilities, so P(defect), the threshold, the export and the
runtime contract are the same for all; the rule that picks the grade (:mod:`defectscope.runtime.grading`)
travels with the model.  Names are looked up in :data:`.objectives.OBJECTIVES`; nothing here is built from a string
read out of a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..models.corn import corn_log_probs
from .objectives import ObjectiveChoice, choose_objective


@dataclass(frozen=True)
class Objective(ObjectiveChoice):
    """One resolved objective: its loss, its link and the grading rule the model ships with."""

    def log_probs(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw network outputs -> (N, K) log class probabilities."""
        raw = raw.float()
        return corn_log_probs(raw) if self.link == "corn" else F.log_softmax(raw, dim=1)

    def probs(self, raw: torch.Tensor) -> torch.Tensor:
        """Class probabilities, computed as the exported graph computes them (softmax of the logits)."""
        raw = raw.float()
        return corn_log_probs(raw).softmax(dim=1) if self.link == "corn" else raw.softmax(dim=1)

    def loss(
        self, raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the batch; ``weight`` (per class) weighs each image by its class's weight."""
        raw = raw.float()
        if self.name == "ce":
            return F.cross_entropy(raw, target, weight=weight, label_smoothing=self.label_smoothing)
        if self.name == "corn":
            return _corn_loss(raw, target, weight)
        log_p = F.log_softmax(raw, dim=1)
        k = log_p.shape[1]
        if self.name == "soft":
            grades = torch.arange(k, device=raw.device, dtype=torch.float32)
            q = torch.softmax(-self.soft_beta * (grades[None, :] - target[:, None].float()).abs(), dim=1)
            q = (1 - self.label_smoothing) * q + self.label_smoothing / k
            return _weighted_mean(-(q * log_p).sum(dim=1), target, weight)
        grades = torch.arange(k, device=raw.device, dtype=torch.float32)
        err = (log_p.exp() @ grades - target.float()) ** 2
        ce = F.cross_entropy(raw, target, weight=weight, label_smoothing=self.label_smoothing)
        return _weighted_mean(err, target, weight) + self.expected_ce * ce

    def to_info(self) -> dict[str, Any]:
        """Plain data for the checkpoint (export rebuilds the link and ships the rule)."""
        return {"objective": self.name, "link": self.link, "rule": self.rule, "ordered": self.ordered}


def _weighted_mean(values: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    w = weight[target]
    return (values * w).sum() / w.sum()


def ng_cross_entropy(
    log_probs: torch.Tensor, target: torch.Tensor, is_ng: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy of P(defect) (the NG classes' summed probability, the score the threshold
    cuts) against "the label is an NG class" (``is_ng``: a (K,) boolean mask on the same device).
    ``loss.ng_weight`` adds it to any objective, so the network is also trained on the OK/NG decision
    the line runs on, not only on the grades. Masked, not indexed: no host sync on a GPU."""
    log_ng = log_probs.masked_fill(~is_ng, float("-inf")).logsumexp(dim=1)
    log_ok = log_probs.masked_fill(is_ng, float("-inf")).logsumexp(dim=1)
    return _weighted_mean(-torch.where(is_ng[target], log_ng, log_ok), target, weight)


def _corn_loss(raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """CORN: task k sees only the images of grade >= k and asks "grade > k"; mean over (image, task)."""
    steps = torch.arange(raw.shape[1], device=raw.device)
    seen = (target[:, None] >= steps[None, :]).float()  # task k is conditional on grade > k - 1
    above = (target[:, None] > steps[None, :]).float()
    losses = F.binary_cross_entropy_with_logits(raw, above, reduction="none") * seen
    w = seen if weight is None else seen * weight[target][:, None]
    return (losses * w).sum() / w.sum().clamp(min=1e-12)


def resolve_objective(
    spec: Mapping[str, Any] | None, ordered: bool, label_smoothing: float = 0.0
) -> Objective:
    """``ordinal.*`` from the config -> :class:`Objective`; errors name the key and the choices."""
    return Objective(**asdict(choose_objective(spec, ordered, label_smoothing)))


class ProbsAndLabels(Metric):
    """Every image's class probabilities and label, so the grade is decided once per epoch (the
    cut points of the ``cuts`` rule are chosen on all of validation before anything is counted).

    ``compute()`` gives this rank's own images (the metrics they are counted into sync themselves);
    :meth:`gathered` gives every rank's, for choosing the cut points identically everywhere.
    """

    full_state_update = False
    probs: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach().to(torch.int64).flatten())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.probs, list) and not self.probs:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        return dim_zero_cat(self.probs), dim_zero_cat(self.labels)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' probabilities and labels (this rank's alone when not distributed)."""
        with self.sync_context():
            return self.compute()
