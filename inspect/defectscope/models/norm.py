"""Normalisation factory (timm-style) and a channel-wise LayerNorm for conv feature maps.

``layer`` means :class:`LayerNorm2d`: at every pixel the C values are normalised to zero mean
and unit variance, then scaled per channel (ConvNeXt-style LayerNorm over C).  This is NOT
``GroupNorm(1, C)``, which normalises over C, H and W together and so couples distant pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ModelConfigError

NormSpec = str | type[nn.Module] | Callable[..., nn.Module] | None

NORM_NAMES: tuple[str, ...] = ("batch", "group", "layer", "instance", "none")
_ALIASES = {
    "bn": "batch",
    "batchnorm": "batch",
    "gn": "group",
    "ln": "layer",
    "in": "instance",
    "null": "none",
}
_KNOWN_KW = ("norm_groups", "eps", "momentum")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an (N, C, H, W) map, independently at each pixel.

    Written with plain reductions (no permutes) so it exports to ONNX with dynamic H/W.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        return y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def is_no_norm(norm: NormSpec) -> bool:
    """True when ``norm`` selects no normalisation (so convs should carry a bias)."""
    return norm is None or (isinstance(norm, str) and _canonical(norm) == "none")


def _canonical(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def get_norm(norm: NormSpec, channels: int, **kw: Any) -> nn.Module:
    """Build a 2-d normalisation layer for ``channels`` feature maps.

    ``norm`` is a name from ``NORM_NAMES``, an ``nn.Module`` class or a ``functools.partial``;
    classes/partials are called as ``norm(channels, **kw)`` minus ``norm_groups``.
    Keyword options: ``norm_groups`` (group count for ``group``, default 8), ``eps``,
    ``momentum`` (``batch`` only).  ``instance`` is affine and keeps no running stats.
    """
    unknown = sorted(set(kw) - set(_KNOWN_KW))
    if unknown:
        raise ModelConfigError(f"get_norm: unknown option(s) {unknown}; accepted: {', '.join(_KNOWN_KW)}")
    groups = kw.pop("norm_groups", 8)
    eps = kw.get("eps")
    momentum = kw.get("momentum")
    if norm is not None and not isinstance(norm, str):
        extra = {k: v for k, v in kw.items() if v is not None}
        return norm(channels, **extra)
    name = "none" if norm is None else _canonical(norm)
    if name == "none":
        return nn.Identity()
    if name == "batch":
        return nn.BatchNorm2d(
            channels, eps=1e-5 if eps is None else eps, momentum=0.1 if momentum is None else momentum
        )
    if name == "group":
        if not isinstance(groups, int) or groups < 1:
            raise ModelConfigError(f"norm_groups must be a positive integer, got {groups!r}")
        if channels % groups:
            raise ModelConfigError(
                f"norm='group': a layer has {channels} channels, which is not divisible by "
                f"norm_groups={groups}; choose norm_groups dividing every stage width"
            )
        return nn.GroupNorm(groups, channels, eps=1e-5 if eps is None else eps)
    if name == "layer":
        return LayerNorm2d(channels, eps=1e-6 if eps is None else eps)
    if name == "instance":
        return nn.InstanceNorm2d(channels, eps=1e-5 if eps is None else eps, affine=True)
    raise ModelConfigError(
        f"norm={norm!r} is not a known normalisation; valid names: {', '.join(NORM_NAMES)}"
    )
