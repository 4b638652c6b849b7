"""Test-time flips and transposes as part of the model, so an exported graph carries them to the line PC.

The flipped copies of a batch go through the backbone as one larger batch; the transposed copies
(``dihedral``) as a second one, since they are W x H and share a shape with the others only when the
image is square.  Each copy's feature map is turned back to the input's orientation (every layer
treats height and width alike, so a transposed input gives a transposed map of the same size) and the
maps are averaged.  Because the head is global average pooling followed by a Linear layer, the
logits of the averaged map are exactly the mean of the copies' logits, and its class-activation map
is the mean of the copies' maps turned back, so the GAP contract (``cam.mean() == logits - bias``)
still holds.  With strided layers the turned-back maps can be up to one cell out of line, which blurs
the heat map slightly; the logits are exact.  This averages logits; ``benchmarks/elpv.py --tta``
averages probabilities outside the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defectscope.runtime.metadata import TTA_NAMES, TTA_VIEWS, View

from .errors import ModelConfigError

IDENTITY: View = (False, ())
_COPIED = (
    "num_classes",
    "in_chans",
    "num_features",
    "min_input_size",
    "min_feature_size",
    "total_stride",
    "model_name",
)


def check_tta(views: str) -> str:
    if views not in TTA_VIEWS:
        raise ModelConfigError(f"tta must be one of {', '.join(TTA_NAMES)}, got {views!r}")
    return views


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """One view of an NCHW batch: transposed (H <-> W) first, then flipped."""
    transposed, axes = view
    y = x.transpose(2, 3) if transposed else x
    return torch.flip(y, axes) if axes else y


def undo_view(f: torch.Tensor, view: View) -> torch.Tensor:
    """A view's feature map back in the input's orientation (flips undone, then the transpose)."""
    transposed, axes = view
    y = torch.flip(f, axes) if axes else f
    return y.transpose(2, 3) if transposed else y


class FlipTTA(nn.Module):
    """A GAP classifier averaged over flipped (and transposed) copies of each input.

    It keeps the model contract (``forward_features``, ``forward_head``, ``cam``, ``head``, the
    geometry attributes), so fusion checks, the export wrapper and the parity gate use it as is.
    """

    def __init__(self, model: nn.Module, views: str = "flips") -> None:
        super().__init__()
        self.views = check_tta(views)
        self.model = model
        for name in _COPIED:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    @property
    def head(self) -> Any:
        """The wrapped model's final nn.Linear (the export wrapper reads its weights)."""
        return self.model.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every view, turned back to the input's orientation and averaged."""
        m: Any = self.model
        extra = TTA_VIEWS[self.views]
        if not extra:
            return m.forward_features(x)
        views = (IDENTITY, *extra)
        total: torch.Tensor | None = None
        for transposed in (False, True):  # one backbone pass per orientation
            group = [v for v in views if v[0] == transposed]
            if not group:
                continue
            stacked = torch.cat([apply_view(x, v) for v in group], dim=0)
            f = m.forward_features(stacked).float()  # sum in fp32: k fp16 maps could overflow
            per_view = f.unflatten(0, (len(group), -1))
            for i, v in enumerate(group):
                back = undo_view(per_view[i], v)
                total = back if total is None else total + back
        assert total is not None
        return total / len(views)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        return m.forward_head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_from_features(self, f: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        return m.cam_from_features(f)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_from_features(self.forward_features(x))
