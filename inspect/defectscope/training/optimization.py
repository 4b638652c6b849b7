"""Optimizer and scheduler from the config partials, with the fine-tuning LR groups (finetune.*).

The settings are checked by :func:`lr_plan` and :func:`scheduler_interval` when the module is built,
so a wrong value stops the run before any training, naming the config key.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from .config import TrainingConfigError, grouped
from .targets import build_error, check_target_class


def build_optimizer(
    spec: Mapping[str, Any], model: torch.nn.Module, backbone_lr_scale: float, layer_decay: float = 1.0
) -> Any:
    """The optimizer partial over all parameters, or over head/backbone groups (finetune.*)."""
    cfg = dict(spec)
    params: Any = list(model.parameters())
    if grouped(backbone_lr_scale, layer_decay):
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
    parameter group's own LR, or a given scalar scaled by each group's share of ``optim.optimizer.lr``,
    so the backbone and layer-decay groups keep their ratio to the head.
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
    groups = optimizer.param_groups
    if "max_lr" in accepted and "max_lr" not in given:
        extra["max_lr"] = [group["lr"] for group in groups]
    elif isinstance(given.get("max_lr"), int | float) and len(groups) > 1:
        base = float(optimizer.defaults["lr"])  # a scalar max_lr scales every group alike
        extra["max_lr"] = [float(given["max_lr"]) * group["lr"] / base for group in groups]
    return factory(optimizer, **extra), interval


#: the settings that fix a scheduled run's horizon: its epochs and its optimizer steps per epoch
HORIZON_SETTINGS = (
    "scheduler",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.limit_train_batches",
    "trainer.accumulate_grad_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "data.batch_size",
)


def _setting(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def schedule_changes(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What a resumed run with a schedule changed in its horizon (``key then -> now``): ``then`` is the
    recorded config, ``now`` maps each of :data:`HORIZON_SETTINGS` to this run's value. The checkpoint's
    scheduler state, horizon included, replaces the new one, so these must stay."""
    scheduler = then.get("scheduler")
    if not isinstance(scheduler, Mapping) or "_target_" not in scheduler:
        return []
    changes = []
    for key in HORIZON_SETTINGS:
        was, is_ = _setting(then, key), now.get(key)
        if was == is_:
            continue
        if key == "scheduler":
            target = is_.get("_target_") if isinstance(is_, Mapping) else None
            same = target == scheduler["_target_"]
            was, is_ = ("its settings", "others") if same else (scheduler["_target_"], target or "none")
        changes.append(f"{key} {was} -> {is_}")
    return changes


#: the scheduler state that fixes where a schedule ends (one-cycle, cosine, linear/constant warm-ups)
HORIZON_KEYS = ("total_steps", "T_max", "total_iters")


def check_resumed_horizon(saved: Any, scheduler: Any, ckpt_path: Any) -> None:
    """A resumed run restores its scheduler's state over the new one, horizon included, so a run resumed
    with more epochs or batches would step past the end of its schedule (one-cycle fails mid-epoch).
    Refused when the optimizers are built, before any step."""
    if not isinstance(saved, list | tuple) or not saved or not isinstance(saved[0], Mapping):
        return
    then = {
        k: saved[0][k] for k in HORIZON_KEYS if isinstance(saved[0].get(k), int | float)
    }  # data: numbers only
    now = {k: getattr(scheduler, k) for k in then if hasattr(scheduler, k)}
    changed = [k for k in then if k in now and then[k] != now[k]]
    if changed:
        key = changed[0]
        raise TrainingConfigError(
            f"ckpt_path: {ckpt_path} holds a {type(scheduler).__name__} schedule of {key}={then[key]} but this "
            f"run's is {key}={now[key]} (trainer.max_epochs, trainer.limit_train_batches or the batch count "
            "changed): a resumed run continues its own schedule; resume with the settings it started with, "
            "or start a new run"
        )


#: optimizers whose per-parameter state tensors are element-wise, shaped like their parameter
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.Adadelta, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD,
)  # fmt: skip


def _state_problem(slot: Any, param: torch.Tensor, elementwise: bool) -> str | None:
    """What torch would fail on (mid-step) in one parameter's saved state, or None."""
    if not isinstance(slot, Mapping):
        return f" is a {type(slot).__name__}, expected a dict"
    for name, value in slot.items():
        if not isinstance(value, torch.Tensor):
            continue
        if str(name) == "step" and value.numel() != 1:
            return f".step holds {value.numel()} numbers, expected one"
        if elementwise and value.dim() > 0 and value.shape != param.shape:  # 0-dim: NAdam's mu_product
            return (
                f".{str(name)[:40]} is shaped {list(value.shape)}, but its parameter is {list(param.shape)}"
            )
    return None


def check_resumed_optimizer(saved: Any, optimizer: torch.optim.Optimizer, ckpt_path: Any) -> None:
    """torch restores a saved optimizer state by position and only fails in the first step (or with a
    bare ValueError) when it does not fit: the groups, their sizes and each state's shapes are compared
    with this run's optimizer when it is built, before any step.  The file's structure (lists, numbers)
    is checked earlier by the checkpoint reader."""
    if not isinstance(saved, list | tuple) or not saved or not isinstance(saved[0], Mapping):
        return
    where = f"ckpt_path: {ckpt_path}: optimizer_states[0]"
    then = [len(g.get("params") or []) for g in saved[0].get("param_groups") or []]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if then != now:
        raise TrainingConfigError(
            f"{where} holds parameter groups of sizes {then}, but this run's optimizer has {now} (the model or "
            "finetune.* changed): resume with the settings the run started with, or start a new run"
        )
    ids = [i for g in saved[0]["param_groups"] for i in g["params"]]
    params = dict(zip(ids, (p for g in optimizer.param_groups for p in g["params"]), strict=True))
    elementwise = isinstance(getattr(optimizer, "base", optimizer), ELEMENTWISE_OPTIMIZERS)
    for key, slot in (saved[0].get("state") or {}).items():
        param = params.get(key)
        problem = (
            " names no parameter of its groups" if param is None else _state_problem(slot, param, elementwise)
        )
        if problem:
            raise TrainingConfigError(f"{where}.state[{str(key)[:20]}]{problem}")


def check_optimization(optim: Mapping[str, Any], scheduler: Mapping[str, Any] | None) -> None:
    """The optimizer and scheduler settings, tried on a one-weight probe before any data is read: a bad
    value (a negative weight decay, ``betas`` past 1, one-cycle's ``pct_start`` 2, an unknown key) was a
    traceback after the data scan, and a learning rate the schedule drives below 0 (cosine ``eta_min: -1``)
    was trained with silently. Each refusal is one line naming ``optim.optimizer`` or ``scheduler``."""
    import warnings

    spec = dict(optim.get("optimizer") or {})
    check_target_class(
        spec.get("_target_"),
        "optim.optimizer",
        (torch.optim.Optimizer,),
        "a torch.optim optimizer class",
        spec,
    )
    probe = torch.nn.Linear(1, 1)
    try:
        optimizer = build_optimizer(spec, probe, 1.0)
    except Exception as exc:
        raise build_error("optim.optimizer", exc) from None
    sched = dict(scheduler or {})
    if "_target_" not in sched:
        return
    bases = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    check_target_class(sched.get("_target_"), "scheduler", bases, "a torch.optim.lr_scheduler class", sched)
    try:
        built, _ = build_scheduler(sched, optimizer, steps=20, epochs=20)
    except TrainingConfigError:
        raise
    except Exception as exc:
        raise build_error("scheduler", exc) from None
    if isinstance(built, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20):
            try:  # the probe's 20 steps may pass a schedule's own shorter horizon: that is the run's to meet
                optimizer.step(lambda: 0.0)  # a closure, for LBFGS
                built.step()
            except Exception:
                break
            lrs = [float(group["lr"]) for group in optimizer.param_groups]
            if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
                raise TrainingConfigError(
                    f"scheduler: it drives the learning rate to {min(lrs)!r}; check its settings (for example "
                    "eta_min, which must not be negative)"
                )
