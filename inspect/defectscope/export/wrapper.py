"""The module that is actually exported: one feature pass, three named outputs.

``logits`` and ``probs`` come from the model's own head; ``cam`` is the class-activation map
``sum_k w_ck f_k`` computed by the model's ``cam_from_features`` (a 1x1 convolution with the head
weights; the same convolution here for a module without one) from the *same* feature map, so the runner gets heat maps without running the backbone
twice.  ``probs`` is the softmax of ``logits``; a CORN model's "logits" are its log probabilities
(:mod:`defectscope.models.corn`), so the same holds for it.  With ``fp16`` the graph takes
and returns float32 (the runner's contract) and runs the backbone in half precision; the head
(global average pool, Linear, CAM) stays float32: it costs nothing, and averaging a large feature
map in fp16 would lose precision or overflow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OUTPUTS_WITH_CAM = ("logits", "probs", "cam")
OUTPUTS_NO_CAM = ("logits", "probs")


def head_linear(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.head must be the final nn.Linear (model contract), "
            f"got {type(head).__name__}"
        )
    return head


class ExportWrapper(nn.Module):
    """``x -> (logits, probs[, cam])`` from one ``forward_features`` pass."""

    def __init__(self, model: nn.Module, *, cam: bool = True, fp16: bool = False) -> None:
        super().__init__()
        head_linear(model)
        if fp16:  # backbone in half; the tiny head (GAP, Linear, CAM) stays fp32 for accuracy
            model = model.half()
            model.head.float()
        self.model = model
        self.with_cam = cam
        self.fp16 = fp16

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUTS_WITH_CAM if self.with_cam else OUTPUTS_NO_CAM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fp16:
            x = x.half()
        m: Any = self.model  # the model contract's methods are not on nn.Module
        feats = m.forward_features(x).float()
        logits = m.forward_head(feats)
        probs = torch.softmax(logits, dim=1)
        if not self.with_cam:
            return logits, probs
        if hasattr(m, "cam_from_features"):  # defectscope models, and wrappers (TTA, CORN) around them
            return logits, probs, m.cam_from_features(feats)
        w = m.head.weight
        return logits, probs, F.conv2d(feats, w.reshape(w.shape[0], w.shape[1], 1, 1))
