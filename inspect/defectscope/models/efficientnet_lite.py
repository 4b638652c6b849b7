"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the TF "lite" edge variants), written for defectscope.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and the
stem (32) and head (1280) widths as well as the repeats of the first and last stage are not
scaled.  Blocks are MBConv: expand 1×1 -> depthwise k×k -> project 1×1, each conv followed by
BatchNorm (eps 1e-3, momentum 0.01 as in TF), ReLU6 after expand and depthwise, and an identity
residual when stride is 1 and in == out.

Padding is static and symmetric (k//2).  The TF weights were trained with TF 'SAME' padding,
which pads stride-2 layers asymmetrically (one extra pixel bottom/right) on even inputs; the
output sizes are identical (⌈x/2⌉) but the sampling grid is offset by one pixel.  That costs a
little ImageNet accuracy and nothing after fine-tuning, and it keeps the ONNX graph free of
shape-dependent padding.

``blur``/``padding_mode`` (see :mod:`defectscope.models.conv`) reach the stem and every MBConv
through ``ConvNormAct``; the anti-aliasing filter is a fixed buffer, so the TF weights load unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .act import ActSpec
from .base import GapClassifier
from .conv import ConvNormAct, check_blur, check_padding_mode
from .errors import ModelConfigError
from .geometry import SizeOp, collect_size_ops
from .norm import NormSpec
from .registry import register_model

#: (repeats, kernel, stride, expand ratio, in, out) per stage, EfficientNet-B0/Lite0 base.
BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: variant -> (width multiplier, depth multiplier, native resolution, dropout)
LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
STEM_WIDTH = 32
HEAD_WIDTH = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay; fine-tuning on a few hundred steps wants more (model.bn_momentum)


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
    """Scale a width and round to a multiple of ``divisor`` without dropping more than 10 %."""
    if multiplier == 1.0:
        return filters
    scaled = filters * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
    return math.ceil(multiplier * repeats)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only; identity in eval/export)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device) < keep
        return x * mask.to(x.dtype) / keep


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (``expand`` absent when ratio is 1)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        *,
        norm: NormSpec,
        norm_kwargs: dict[str, Any],
        act: ActSpec,
        drop_path: float = 0.0,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        mid = in_chans * expand_ratio
        self.has_expand = expand_ratio != 1
        common: dict[str, Any] = {"norm": norm, "norm_kwargs": norm_kwargs, "padding_mode": padding_mode}
        if self.has_expand:
            self.expand = ConvNormAct(in_chans, mid, 1, act=act, **common)
        self.dw = ConvNormAct(mid, mid, kernel, stride, "same", groups=mid, act=act, blur=blur, **common)
        self.project = ConvNormAct(mid, out_chans, 1, act=None, **common)
        self.has_residual = stride == 1 and in_chans == out_chans
        self.drop_path = DropPath(drop_path) if (self.has_residual and drop_path > 0) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.has_expand else x
        y = self.project(self.dw(y))
        if self.has_residual:
            y = self.drop_path(y) + x
        return y

    def size_ops(self, prefix: str) -> list[SizeOp]:
        ops = collect_size_ops(self.expand, f"{prefix}.expand") if self.has_expand else []
        return (
            ops
            + collect_size_ops(self.dw, f"{prefix}.dw")
            + collect_size_ops(self.project, f"{prefix}.project")
        )


class EfficientNetLite(GapClassifier):
    """EfficientNet-Lite with the defectscope GAP head (``features`` -> GAP -> dropout -> ``head``).

    ``self.features`` is ``Sequential(stem, blocks, conv_head)``; ``blocks[i]`` is the i-th MBConv
    in the same order as ``_blocks.i`` of the lukemelas/TF checkpoints.
    """

    def __init__(
        self,
        variant: str,
        *,
        num_classes: int,
        in_chans: int,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.0,
        norm: NormSpec = "batch",
        norm_groups: int = 8,
        act: ActSpec = "relu6",
        bn_momentum: float = BN_MOMENTUM,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(num_classes=num_classes, in_chans=in_chans)
        shift: dict[str, Any] = {"blur": check_blur(blur), "padding_mode": check_padding_mode(padding_mode)}
        if variant not in LITE_PARAMS:
            raise ModelConfigError(
                f"unknown EfficientNet-Lite variant {variant!r}; valid: {', '.join(LITE_PARAMS)}"
            )
        width_mult, depth_mult, resolution, default_drop = LITE_PARAMS[variant]
        self.variant = variant
        self.native_resolution = resolution
        if not 0.0 <= drop_path_rate < 1.0:
            raise ModelConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        norm_kwargs: dict[str, Any] = {"norm_groups": norm_groups, "eps": BN_EPS}
        if isinstance(norm, str) and norm.strip().lower() in ("batch", "bn", "batchnorm"):
            if not 0.0 < bn_momentum <= 1.0:
                raise ModelConfigError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")
            norm_kwargs["momentum"] = bn_momentum

        stem = ConvNormAct(
            self.in_chans, STEM_WIDTH, 3, 2, "same", norm=norm, act=act, norm_kwargs=norm_kwargs, **shift
        )
        plan: list[tuple[int, int, int, int, int]] = []  # (in, out, kernel, stride, expand)
        last = len(BASE_STAGES) - 1
        chans = STEM_WIDTH
        for i, (repeats, kernel, stride, expand, _cin, cout) in enumerate(BASE_STAGES):
            out = round_filters(cout, width_mult)
            n = repeats if i in (0, last) else round_repeats(repeats, depth_mult)
            for j in range(n):
                plan.append((chans, out, kernel, stride if j == 0 else 1, expand))
                chans = out
        blocks = [
            MBConv(
                cin,
                cout,
                k,
                s,
                e,
                norm=norm,
                norm_kwargs=norm_kwargs,
                act=act,
                drop_path=drop_path_rate * idx / len(plan),
                **shift,
            )
            for idx, (cin, cout, k, s, e) in enumerate(plan)
        ]
        conv_head = ConvNormAct(
            chans, HEAD_WIDTH, 1, norm=norm, act=act, norm_kwargs=norm_kwargs, padding_mode=padding_mode
        )
        self.features = nn.Sequential(
            OrderedDict(stem=stem, blocks=nn.Sequential(*blocks), conv_head=conv_head)
        )
        self.block_plan = plan
        self.mbconv_blocks: list[MBConv] = blocks  # plain list: no second registration
        _init_weights(self.features)
        self.init_head(HEAD_WIDTH, default_drop if drop_rate is None else drop_rate)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")


def _variant_builder(variant: str, doc: str) -> Callable[..., EfficientNetLite]:
    """One registry builder per Lite variant; they differ only in the variant's scaling row."""

    def build(
        *,
        num_classes: int,
        in_chans: int,
        weights: str | None = None,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.0,
        norm: NormSpec = "batch",
        norm_groups: int = 8,
        act: ActSpec = "relu6",
        bn_momentum: float = BN_MOMENTUM,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> EfficientNetLite:
        model = EfficientNetLite(
            variant,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            norm=norm,
            norm_groups=norm_groups,
            act=act,
            bn_momentum=bn_momentum,
            blur=blur,
            padding_mode=padding_mode,
        )
        if weights is not None:
            from .pretrained import load_pretrained

            load_pretrained(model, weights)
        return model

    build.__name__ = build.__qualname__ = f"efficientnet_{variant}"
    build.__doc__ = doc + " ``weights``: None | 'package' | path | https URL."
    return build


efficientnet_lite0 = register_model(_variant_builder("lite0", "EfficientNet-Lite0 (width 1.0, depth 1.0)."))
efficientnet_lite1 = register_model(_variant_builder("lite1", "EfficientNet-Lite1 (width 1.0, depth 1.1)."))
efficientnet_lite2 = register_model(_variant_builder("lite2", "EfficientNet-Lite2 (width 1.1, depth 1.2)."))
