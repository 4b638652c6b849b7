"""Fine-tuning helpers: freeze the backbone, keep frozen BatchNorm statistics fixed, LR groups
(head/backbone, or layer-wise decay over the backbone's depth).

"Backbone" is everything except ``model.head`` (the final nn.Linear).  BatchNorm layers update
their running mean/var in train mode even when their affine parameters are frozen, so a frozen
backbone also needs its BN layers in eval mode.  ``model.train()`` resets that; defectscope
models (:class:`~defectscope.models.base.GapClassifier`) re-apply it automatically while
``frozen_bn_eval`` is set, other modules need :func:`set_bn_eval` after every ``train()`` call
(e.g. in Lightning's ``on_train_epoch_start``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import GapClassifier


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `head` module; defectscope models expose model.head")
    return head


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(_head(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head_ids = {id(p) for p in _head(model).parameters()}
    return [p for p in model.parameters() if id(p) not in head_ids]


def set_bn_eval(model: nn.Module) -> int:
    """Put every BatchNorm outside the head into eval mode; returns how many.  Re-apply after train()."""
    head = _head(model)
    head_modules = {id(m) for m in head.modules()}
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and id(module) not in head_modules:
            module.eval()
            count += 1
    return count


def freeze_backbone(model: nn.Module, freeze: bool, bn_eval: bool = True) -> None:
    """(Un)freeze everything but the head.  With ``freeze`` and ``bn_eval`` the backbone BNs stay in eval.

    Unfreezing restores requires_grad and puts the BN layers back in the model's current mode.
    """
    for p in backbone_parameters(model):
        p.requires_grad_(not freeze)
    for p in head_parameters(model):
        p.requires_grad_(True)
    frozen_bn = bool(freeze and bn_eval)
    if isinstance(model, GapClassifier):
        model.frozen_bn_eval = frozen_bn
    if frozen_bn:
        set_bn_eval(model)
    else:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.train(model.training)


def depth_units(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters by depth, input side first, for layer-wise LR decay.

    One unit per child of ``model.features``, a plain Sequential child split into its own children (so an
    EfficientNet's MBConv blocks are units one by one).  Parameters outside ``features`` and the head
    form one more unit beside the head; a model without ``features`` is a single unit.
    """
    features = getattr(model, "features", None)
    placed = {id(p) for p in head_parameters(model)}  # a parameter shared by two modules: its first unit
    units: list[list[nn.Parameter]] = []

    def take(params: Any) -> list[nn.Parameter]:
        fresh = [p for p in params if id(p) not in placed]
        placed.update(id(p) for p in fresh)
        return fresh

    if isinstance(features, nn.Module):
        for child in features.children():
            parts = list(child.children()) if type(child) is nn.Sequential else [child]  # not a subclass
            units.extend(params for part in parts if (params := take(part.parameters())))
    rest = take(model.parameters())
    return [*units, rest] if rest else units


def param_groups(
    model: nn.Module, lr: float, backbone_lr_scale: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups: the head at ``lr``, the backbone at ``lr * backbone_lr_scale``.

    With ``layer_decay < 1`` the backbone is split into :func:`depth_units` and the k-th unit below
    the head (k = 1 next to it) gets ``lr * backbone_lr_scale * layer_decay**k``: the early, generic
    ImageNet filters move least.  Frozen parameters are included too (optimizers skip params without grads),
    so unfreezing later needs no new optimizer.
    """
    if lr <= 0 or backbone_lr_scale < 0 or not 0 < layer_decay <= 1:
        raise ValueError(
            f"lr must be > 0, backbone_lr_scale >= 0 and layer_decay in (0, 1], got lr={lr}, "
            f"backbone_lr_scale={backbone_lr_scale}, layer_decay={layer_decay}"
        )
    head = {"name": "head", "params": head_parameters(model), "lr": lr}
    if layer_decay == 1.0:
        return [
            head,
            {"name": "backbone", "params": backbone_parameters(model), "lr": lr * backbone_lr_scale},
        ]
    units = depth_units(model)
    depth = len(units)
    return [head] + [
        {"name": f"backbone.{i}", "params": unit, "lr": lr * backbone_lr_scale * layer_decay ** (depth - i)}
        for i, unit in enumerate(units)
    ]
