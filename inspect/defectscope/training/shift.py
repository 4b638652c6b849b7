"""Shift consistency in the Lightning test stage (protocol: :mod:`defectscope.shift_consistency`).

The test step hands each batch to the torch-free protocol with the module's own model as the
"predict probabilities" callable; :class:`ShiftScores` keeps the per-image answers (gathered across
DDP ranks like the other test metrics) and the epoch end turns them into ``test/shift/*`` figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..shift_consistency import FIGURES, PredictFn, ShiftProtocol, ShiftRecord, measure, summarise

_FIELDS = ("top1", "p_defect", "top1_copies", "p_defect_copies")
#: metric-name prefix under test/ (MLflow: test/shift/top1_consistency, ...)
PREFIX = "shift/"


def torch_predict(model: torch.nn.Module, like: torch.Tensor) -> PredictFn:
    """The model as the protocol's callable: numpy batch in, softmax probabilities out."""

    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device=like.device, dtype=like.dtype)
        return model(x).float().softmax(dim=1).cpu().numpy()

    return predict


class ShiftScores(Metric):
    """Per-image answers of the shift-consistency protocol over a whole test set."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in _FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update_batch(
        self, model: torch.nn.Module, images: torch.Tensor, ng_indices: Sequence[int], protocol: ShiftProtocol
    ) -> None:
        """Measure one test batch: the images and their translated copies through ``model``."""
        record = measure(torch_predict(model, images), images.float().cpu().numpy(), ng_indices, protocol)
        self.update(record)

    def update(self, record: ShiftRecord) -> None:
        for name in _FIELDS:
            getattr(self, name).append(torch.from_numpy(np.asarray(getattr(record, name))))

    def compute(self) -> ShiftRecord | None:
        if isinstance(self.top1, list) and not self.top1:
            return None
        return ShiftRecord(*(dim_zero_cat(getattr(self, name)).numpy() for name in _FIELDS))

    def figures(self, threshold: float) -> dict[str, float]:
        """``{"shift/<figure>": value}`` at the OK/NG ``threshold`` (empty when nothing was measured)."""
        record = self.compute() if self.update_count else None
        values = summarise(record, threshold) if record is not None else {}
        return {f"{PREFIX}{k}": values[k] for k in FIGURES if k in values}
