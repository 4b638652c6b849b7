"""Normalizer-free ResNet (Brock et al., 2021, "Characterizing signal propagation to close
the performance gap in unnormalized ResNets").  No normalisation layer anywhere.

* :class:`ScaledStdConv2d` re-parameterises every weight as
  Ŵ = gain · (W − mean(W)) / (std(W) · √fan_in), with std² · fan_in clamped below at ``eps``,
  so each output unit sees unit-variance weights (per output channel, over in×k×k).
* :class:`GammaAct` multiplies the activation by γ = 1/√Var[act(z)], z ~ N(0, 1), computed
  numerically for whichever activation is configured (γ ≈ 1.7139 for ReLU).
* Residual blocks compute x_{l+1} = x_l + α · g · f(x_l / β_l), where β_l = √Var[x_l] is the
  analytically tracked expected variance (Var grows by α² per block and resets to 1 + α² after
  a transition block whose shortcut sees the normalised input), and g is a learnable scalar
  skip gain initialised to ``skipinit`` (0 by default: every block starts as the identity).

Train with adaptive gradient clipping (``defectscope.models.agc``) excluding the head.
``blur``/``padding_mode`` follow :mod:`defectscope.models.conv`: a strided conv runs at stride 1 and
a BlurPool subsamples after its activation; the projection shortcut is blurred before its 1×1 conv.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .act import ActSpec, get_act
from .base import GapClassifier, check_positive_int
from .conv import BlurPool, check_blur, check_padding_mode, make_blur, resolve_padding
from .errors import ModelConfigError
from .geometry import SizeOp, branch_sizes_agree, collect_size_ops
from .registry import register_model


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardisation and a learnable per-output-channel gain."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel: int,
        stride: int = 1,
        padding: str | int = "same",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        gain_init: float = 1.0,
        eps: float = 1e-4,
        padding_mode: str = "zeros",
    ) -> None:
        pad = resolve_padding(padding, kernel, dilation)
        mode = check_padding_mode(padding_mode)
        super().__init__(in_chans, out_chans, kernel, stride, pad, dilation, groups, bias, mode)
        self.gain = nn.Parameter(torch.full((out_chans, 1, 1, 1), float(gain_init)))
        self.eps = eps
        self.fan_in = (in_chans // groups) * kernel * kernel
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps))
        return (w - mean) * scale * self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)  # honours padding_mode


def activation_gamma(act: nn.Module) -> float:
    """γ = 1/√Var[act(z)] for z ~ N(0, 1), by quadrature on a fine grid (deterministic)."""
    z = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    w = pdf * (z[1] - z[0])
    with torch.no_grad():
        y = act(z)
    mean = (w * y).sum()
    var = (w * y * y).sum() - mean * mean
    if var <= 1e-12:
        raise ModelConfigError(
            f"activation {act!r} has ~zero output variance; it cannot be used normalizer-free"
        )
    return float(1.0 / torch.sqrt(var))


class GammaAct(nn.Module):
    """act(x) · γ, with γ restoring unit variance for unit-Gaussian inputs."""

    def __init__(self, act: ActSpec) -> None:
        super().__init__()
        self.act = get_act(act)
        self.gamma = activation_gamma(self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.gamma

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:.4f}"


class NFBasicBlock(nn.Module):
    """Pre-activation basic block: x + α·g·conv(γact(conv(γact(x/β)))); shortcut conv on transitions."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        stride: int,
        *,
        alpha: float,
        beta: float,
        act: ActSpec,
        skipinit: float,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.inv_beta = 1.0 / float(beta)
        self.act1 = GammaAct(act)
        blur2 = make_blur(out_chans, blur, stride, padding_mode)
        conv_stride = stride if blur2 is None else 1
        self.conv1 = ScaledStdConv2d(in_chans, out_chans, 3, conv_stride, padding_mode=padding_mode)
        self.act2 = GammaAct(act)
        self.blur2 = blur2 if blur2 is not None else nn.Identity()
        self.conv2 = ScaledStdConv2d(out_chans, out_chans, 3, 1, padding_mode=padding_mode)
        self.skip_gain = nn.Parameter(torch.tensor(float(skipinit)))
        self.transition = stride != 1 or in_chans != out_chans
        self.shortcut: nn.Module = nn.Identity()
        if self.transition:
            project = ScaledStdConv2d(in_chans, out_chans, 1, conv_stride, 0)
            blur_in = make_blur(in_chans, blur, stride, padding_mode)
            self.shortcut = project if blur_in is None else nn.Sequential(blur_in, project)
        if not branch_sizes_agree(self.size_ops("block"), collect_size_ops(self.shortcut)):
            raise ModelConfigError("nf_resnet block: main path and shortcut disagree in output size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(x * self.inv_beta)
        skip = self.shortcut(h) if self.transition else x
        out = self.conv2(self.blur2(self.act2(self.conv1(h))))
        return skip + out * (self.skip_gain * self.alpha)

    def size_ops(self, prefix: str) -> list[SizeOp]:
        return (
            collect_size_ops(self.conv1, f"{prefix}.conv1")
            + collect_size_ops(self.blur2, f"{prefix}.blur2")
            + collect_size_ops(self.conv2, f"{prefix}.conv2")
        )


class NFResNet(GapClassifier):
    """Normalizer-free ResNet with a GAP head; stem: two 3×3 stride-2 convs (total stride 4)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (2, 2, 2, 2),
        stem_width: int = 16,
        alpha: float = 0.2,
        skipinit: float = 0.0,
        act: ActSpec = "relu",
        drop_rate: float = 0.0,
        blur: int = 0,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(num_classes=num_classes, in_chans=in_chans)
        check_blur(blur)
        check_padding_mode(padding_mode)
        if len(widths) != len(depths) or not widths:
            raise ModelConfigError(
                f"widths {list(widths)} and depths {list(depths)} must be non-empty and equally long"
            )
        for i, (w, d) in enumerate(zip(widths, depths)):
            check_positive_int(w, f"widths[{i}]")
            check_positive_int(d, f"depths[{i}]")
        check_positive_int(stem_width, "stem_width")
        if not alpha > 0:
            raise ModelConfigError(f"alpha must be > 0, got {alpha!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        stem_blur = make_blur(stem_width, blur, 2, padding_mode)
        stem_stride = 2 if stem_blur is None else 1
        layers["stem_conv1"] = ScaledStdConv2d(
            self.in_chans, stem_width, 3, stem_stride, padding_mode=padding_mode
        )
        layers["stem_act"] = GammaAct(act)
        if stem_blur is not None:
            layers["stem_blur1"] = stem_blur
        layers["stem_conv2"] = ScaledStdConv2d(
            stem_width, stem_width, 3, stem_stride, padding_mode=padding_mode
        )
        if stem_blur is not None:
            layers["stem_blur2"] = BlurPool(stem_width, blur, 2, padding_mode)
        expected_var = 1.0
        chans = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(depth):
                stride = 2 if (j == 0 and i > 0) else 1
                block = NFBasicBlock(
                    chans,
                    width,
                    stride,
                    alpha=alpha,
                    beta=math.sqrt(expected_var),
                    act=act,
                    skipinit=skipinit,
                    blur=blur,
                    padding_mode=padding_mode,
                )
                blocks[f"block{j}"] = block
                expected_var = (1.0 if block.transition else expected_var) + alpha**2
                chans = width
            layers[f"stage{i}"] = nn.Sequential(blocks)
        layers["final_act"] = GammaAct(act)
        self.features = nn.Sequential(layers)
        self.init_head(chans, drop_rate)


@register_model
def nf_resnet(
    *,
    num_classes: int,
    in_chans: int,
    widths: Sequence[int] = (16, 32, 64, 128),
    depths: Sequence[int] = (2, 2, 2, 2),
    stem_width: int = 16,
    alpha: float = 0.2,
    skipinit: float = 0.0,
    act: ActSpec = "relu",
    drop_rate: float = 0.0,
    blur: int = 0,
    padding_mode: str = "zeros",
) -> NFResNet:
    """Normalizer-free ResNet (no norm layers); pair it with AGC during training."""
    return NFResNet(
        num_classes=num_classes,
        in_chans=in_chans,
        widths=widths,
        depths=depths,
        stem_width=stem_width,
        alpha=alpha,
        skipinit=skipinit,
        act=act,
        drop_rate=drop_rate,
        blur=blur,
        padding_mode=padding_mode,
    )
