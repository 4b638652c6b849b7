"""Common shape of every defectscope classifier: features -> global average pool -> Linear.

The GAP head is what makes class activation maps exact: because averaging is linear,
``cam(x)[n, k].mean() == logits[n, k] - head.bias[k]``.  Export writes the CAM as a second
ONNX output for the line-PC heatmaps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelConfigError
from .geometry import SizeOp, collect_size_ops, min_input_size, total_stride, trace_sizes


def check_positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


class GapClassifier(nn.Module):
    """Base class: subclasses set ``self.features`` then call :meth:`init_head`.

    Attributes every model has: ``num_classes``, ``in_chans``, ``num_features``, ``head``
    (the final nn.Linear), ``min_input_size`` and ``total_stride`` (derived from the layers),
    ``pretrained_cfg`` (None, or ``{"mean": [...], "std": [...], ...}`` for pretrained weights).
    """

    features: nn.Module
    head: nn.Linear

    def __init__(self, *, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.in_chans = check_positive_int(in_chans, "in_chans")
        self.num_features = 0
        self.min_input_size = 1
        self.min_feature_size = 1
        self.total_stride = 1
        self.size_ops_cache: list[SizeOp] = []
        self.pretrained_cfg: dict[str, Any] | None = None
        #: Set by ``finetune.freeze_backbone(..., bn_eval=True)``; ``train()`` then keeps BN in eval.
        self.frozen_bn_eval = False
        #: Registry name and plain rebuild kwargs, filled in by ``create_model``.
        self.model_name = type(self).__name__
        self.model_kwargs: dict[str, Any] = {}

    def init_head(self, num_features: int, drop_rate: float = 0.0) -> None:
        """Create the dropout + Linear head and derive the geometry from ``self.features``."""
        if not 0.0 <= float(drop_rate) < 1.0:
            raise ModelConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.num_features = num_features
        self.head_drop = nn.Dropout(float(drop_rate)) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(num_features, self.num_classes)
        self.size_ops_cache = collect_size_ops(self.features)
        # InstanceNorm of a 1x1 map has no variance to normalise by (PyTorch refuses it), so models
        # with one need a final feature map of at least 2x2; the others need 1x1.
        has_instance_norm = any(isinstance(m, nn.InstanceNorm2d) for m in self.features.modules())
        self.min_feature_size = 2 if has_instance_norm else 1
        self.min_input_size = min_input_size(self.size_ops_cache, self.min_feature_size)
        self.total_stride = total_stride(self.size_ops_cache)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_features, h, w)."""
        return self.features(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pooling -> optional dropout -> ``self.head`` -> logits (N, num_classes)."""
        pooled = f.mean(dim=(2, 3))
        return self.head(self.head_drop(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Σ_k w_ck · f_k at feature resolution, without the bias: (N, num_classes, h, w)."""
        weight = self.head.weight.reshape(self.num_classes, self.num_features, 1, 1)
        return F.conv2d(f, weight)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation maps (N, num_classes, h, w); their spatial mean is logits − bias."""
        return self.cam_from_features(self.forward_features(x))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and CAM from one feature pass (what export puts in the ONNX graph).

        Logits are computed as in :meth:`forward_head` (dropout is identity in eval mode).
        """
        f = self.forward_features(x)
        return self.forward_head(f), self.cam_from_features(f)

    def feature_size(self, size: int) -> int:
        """Side of the feature map for a ``size``-pixel input side (<= 0: empty)."""
        rows = trace_sizes(self.size_ops_cache, size)
        return rows[-1][2] if rows else size

    def train(self, mode: bool = True) -> GapClassifier:
        super().train(mode)
        if mode and self.frozen_bn_eval:
            from .finetune import set_bn_eval

            set_bn_eval(self)
        return self
