"""Simple hook-based FLOP counter for conv/linear layers (benchmarks use it).

Counts multiply-accumulates (MACs) of every ``nn.Conv2d`` (subclasses included) and
``nn.Linear`` actually executed for one input; ``flops = 2 · macs``.  Norms, activations,
pooling and additions are not counted (they are < 2 % for these models), and BatchNorm
costs nothing after export folds it into the convs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class FlopCount:
    """Per-image MACs, FLOPs (2·MACs), parameter count, and per-layer MACs."""

    macs: int
    flops: int
    params: int
    input_size: tuple[int, int, int]
    by_layer: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c, h, w = self.input_size
        return (
            f"{self.params / 1e6:.3f} M params, {self.macs / 1e6:.1f} M MACs "
            f"({self.flops / 1e9:.3f} GFLOPs) at {c}x{h}x{w}"
        )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> FlopCount:
    """Run one (1, C, H, W) zero image through ``model`` in eval mode and count MACs."""
    by_layer: dict[str, int] = {}
    handles = []

    def conv_hook(name: str) -> Callable[[nn.Conv2d, object, torch.Tensor], None]:
        def hook(module: nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
            k = module.kernel_size[0] * module.kernel_size[1]
            by_layer[name] = (
                by_layer.get(name, 0)
                + out.numel() // out.shape[0] * (module.in_channels // module.groups) * k
            )

        return hook

    def linear_hook(name: str) -> Callable[[nn.Linear, object, torch.Tensor], None]:
        def hook(module: nn.Linear, _inp: object, out: torch.Tensor) -> None:
            by_layer[name] = by_layer.get(name, 0) + out.numel() // out.shape[0] * module.in_features

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    macs = sum(by_layer.values())
    return FlopCount(
        macs=macs, flops=2 * macs, params=count_params(model), input_size=input_size, by_layer=by_layer
    )
