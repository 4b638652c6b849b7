"""Test-time flips as part of the model, so an exported graph can carry them to the line PC.

The flipped copies of a batch go through the backbone as one larger batch; each copy's feature
map is flipped back and the maps are averaged.  Because the head is global average pooling
followed by a Linear layer, the logits of the averaged map are exactly the mean of the copies'
logits, and its class-activation map is the mean of the copies' maps flipped back, so the GAP
contract (``cam.mean() == logits - bias``) still holds.  With strided layers the flipped-back maps
can be up to one cell out of line, which blurs the heat map slightly; the logits are exact.  This
averages logits; ``benchmarks/elpv.py --tta`` averages probabilities outside the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defectscope.runtime.metadata import TTA_FLIPS, TTA_NAMES

from .errors import ModelConfigError

#: view name -> the flipped axes of each extra copy; one table, shared with the runtime's metadata
TTA_VIEWS = TTA_FLIPS
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


class FlipTTA(nn.Module):
    """A GAP classifier averaged over flipped copies of each input, in one backbone pass.

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
        """Features of every view, flipped back to the input's orientation and averaged."""
        m: Any = self.model
        flips = TTA_VIEWS[self.views]
        if not flips:
            return m.forward_features(x)
        stacked = torch.cat([x, *(torch.flip(x, dims) for dims in flips)], dim=0)
        f = m.forward_features(stacked).float()  # sum in fp32: k fp16 maps could overflow
        per_view = f.unflatten(0, (len(flips) + 1, -1))
        total = per_view[0]
        for i, dims in enumerate(flips, start=1):
            total = total + torch.flip(per_view[i], dims)
        return total / (len(flips) + 1)

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
