"""Optimizer and scheduler from the config partials, with the fine-tuning LR groups (finetune.*).

The settings are checked by :func:`lr_plan` and :func:`scheduler_interval` when the module is built,
so a wrong value stops the run before any training, naming the config key.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from .config import TrainingConfigError


def lr_plan(finetune: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(finetune.backbone_lr_scale, finetune.layer_decay)``, checked before any work is done."""
    spec = dict(finetune or {})
    scale, decay = spec.get("backbone_lr_scale", 1.0), spec.get("layer_decay", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or scale < 0:
        raise TrainingConfigError(f"finetune.backbone_lr_scale must be a number >= 0, got {scale!r}")
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0 < decay <= 1:
        raise TrainingConfigError(f"finetune.layer_decay must be a number in (0, 1] (1 = off), got {decay!r}")
    return float(scale), float(decay)


def build_optimizer(
    spec: Mapping[str, Any], model: torch.nn.Module, backbone_lr_scale: float, layer_decay: float = 1.0
) -> Any:
    """The optimizer partial over all parameters, or over head/backbone groups (finetune.*)."""
    cfg = dict(spec)
    params: Any = list(model.parameters())
    if backbone_lr_scale != 1.0 or layer_decay != 1.0:
        from defectscope.models.finetune import param_groups

        params = param_groups(model, float(cfg["lr"]), backbone_lr_scale, layer_decay)
    return instantiate(cfg)(params)


def scheduler_interval(spec: Mapping[str, Any] | None) -> str:
    """``scheduler.interval`` (``step`` by default), checked before any work is done."""
    interval = str(dict(spec or {}).get("interval", "step"))
    if interval not in ("step", "epoch"):
        raise TrainingConfigError(f"scheduler.interval must be 'step' or 'epoch', got {interval!r}")
    return interval


def build_scheduler(
    spec: Mapping[str, Any], optimizer: torch.optim.Optimizer, steps: int, epochs: int
) -> tuple[Any, str]:
    """Instantiate a scheduler partial, filling in the horizon the config cannot know.

    ``T_max`` / ``total_steps`` / ``total_iters`` (when not given) = optimizer steps of the whole
    run for ``interval: step``, epochs for ``interval: epoch``; ``max_lr`` (one-cycle) = each
    parameter group's own LR, so a scaled backbone LR keeps its ratio to the head.
    """
    cfg = dict(spec)
    interval = scheduler_interval(cfg)
    cfg.pop("interval", None)
    factory = instantiate(cfg)
    horizon = steps if interval == "step" else epochs
    accepted = inspect.signature(factory.func).parameters
    given = factory.keywords
    extra: dict[str, Any] = {}
    for key in ("T_max", "total_steps", "total_iters"):
        if key in accepted and key not in given and not (key == "total_steps" and "epochs" in given):
            extra[key] = horizon
    if "max_lr" in accepted and "max_lr" not in given:
        extra["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    return factory(optimizer, **extra), interval
