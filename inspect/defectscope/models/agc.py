"""Adaptive gradient clipping (Brock et al., 2021, "High-performance large-scale image
recognition without normalization"), unit-wise.

For each unit i (a row of the weight: one output channel of a conv, one output feature of a
Linear), with W_i its weights and G_i its gradient:

    if ||G_i|| / max(||W_i||, eps) > λ:   G_i <- G_i · λ · max(||W_i||, eps) / ||G_i||

Vectors and scalars (biases, gains) count as a single unit.  The paper does not clip the final
classifier, so pass :func:`agc_parameters` (everything but ``model.head``).  Call it after
backward and before the optimizer step, e.g. in Lightning's ``on_before_optimizer_step``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit (dim 0 rows) broadcastable to ``x``; one norm for 0-d/1-d tensors."""
    if x.ndim <= 1:
        return x.detach().norm()
    return x.detach().flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.ndim - 1))


@torch.no_grad()
def adaptive_grad_clip(parameters: Iterable[torch.Tensor], clipping: float, eps: float = 1e-3) -> float:
    """Clip gradients in place unit-wise; returns the fraction of units that were clipped."""
    if clipping <= 0:
        raise ValueError(f"clipping must be > 0, got {clipping}")
    clipped: list[torch.Tensor] = []
    units = 0
    for p in parameters:
        if p.grad is None:
            continue
        w_norm = unitwise_norm(p).clamp(min=eps)
        g_norm = unitwise_norm(p.grad)
        max_norm = w_norm * clipping
        too_big = g_norm > max_norm
        scale = torch.where(too_big, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale.to(p.grad.dtype))
        clipped.append(too_big.sum())
        units += too_big.numel()
    return float(torch.stack(clipped).sum().item()) / units if units else 0.0  # one device sync


def agc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters except those of ``model.head`` (the classifier is not clipped)."""
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [p for p in model.parameters() if id(p) not in head_ids]
