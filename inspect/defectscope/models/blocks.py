"""Residual building block: the ResNet basic block with a projection shortcut."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .act import ActSpec, get_act
from .conv import ConvNormAct
from .errors import ModelConfigError
from .geometry import SizeOp, branch_sizes_agree, collect_size_ops
from .norm import NormSpec


class BasicBlock(nn.Module):
    """Two k×k conv-norm layers plus a shortcut, then the activation: act(F(x) + S(x)).

    S is identity when shape is kept, otherwise a 1×1 strided conv + norm (projection).
    Padding must keep the main path and the shortcut the same size, hence 'same' only.
    ``blur``/``padding_mode``: see :mod:`defectscope.models.conv` (both strided convs are anti-aliased).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: NormSpec = "batch",
        act: ActSpec = "relu",
        norm_kwargs: dict[str, Any] | None = None,
        zero_init_last: bool = True,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        same: dict[str, Any] = {
            "norm": norm,
            "norm_kwargs": norm_kwargs,
            "blur": blur,
            "padding_mode": padding_mode,
        }
        self.conv1 = ConvNormAct(in_chans, out_chans, kernel, stride, "same", dilation, act=act, **same)
        self.conv2 = ConvNormAct(out_chans, out_chans, kernel, 1, "same", dilation, act=None, **same)
        self.shortcut: nn.Module
        if stride != 1 or in_chans != out_chans:
            self.shortcut = ConvNormAct(in_chans, out_chans, 1, stride, 0, act=None, **same)
        else:
            self.shortcut = nn.Identity()
        self.act = get_act(act)
        if zero_init_last:
            last_norm = self.conv2.norm
            weight = getattr(last_norm, "weight", None)
            if isinstance(weight, torch.Tensor):
                nn.init.zeros_(weight)
        main = collect_size_ops(self.conv1) + collect_size_ops(self.conv2)
        if not branch_sizes_agree(main, collect_size_ops(self.shortcut)):
            raise ModelConfigError(
                f"residual block {in_chans}->{out_chans} (kernel={kernel}, stride={stride}, dilation={dilation}): "
                "main path and shortcut give different output sizes"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))

    def size_ops(self, prefix: str) -> list[SizeOp]:
        return collect_size_ops(self.conv1, f"{prefix}.conv1") + collect_size_ops(
            self.conv2, f"{prefix}.conv2"
        )
