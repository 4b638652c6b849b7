"""Config helpers shared by the training pieces: plain containers, flattening, ranks, resume paths.

Kept free of Lightning (torch is imported inside the two functions that need it), so the Hydra
entry point and the tests can use it cheaply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.threshold import DEFAULT_WARN_FALSE_REJECT_RATE
from ..plain import as_class_name, to_plain
from ..runtime.decision import (
    DEFAULT_TARGET_RECALL,
    RECALL_EXPECTED,
    THRESHOLD_EXPECTED,
    DecisionRuleError,
    check_ng_spec,
    is_recall_target,
    is_threshold,
)
from ..runtime.files import checkpoint_file_problem
from ..runtime.grading import is_finite_number
from ..shift_consistency import ShiftProtocol

log = logging.getLogger(__name__)


class TrainingConfigError(ValueError):
    """A training setting is wrong; the message names the config key and what was expected."""


def config_number(
    value: Any, key: str, expected: str, ok: Callable[[float], bool], *, whole: bool = False
) -> float:
    """A numeric setting, or a :class:`TrainingConfigError` naming ``key`` and what was ``expected``."""
    valid = is_finite_number(value)
    if not valid or (whole and float(value) != int(value)) or not ok(float(value)):
        raise TrainingConfigError(f"{key} must be {expected}, got {value!r}")
    return float(value)


def check_seed(cfg: Mapping[str, Any]) -> None:
    """``seed`` is a whole number numpy accepts (Lightning's seed_everything fails on it otherwise)."""
    config_number(
        cfg.get("seed", 0), "seed", "a whole number in [0, 2**32)", lambda x: 0 <= x < 2**32, whole=True
    )


def ng_classes_setting(threshold: Mapping[str, Any]) -> Any:
    """``threshold.ng_classes`` as the NG rule takes it: Hydra reads a class folder named ``1`` as the number 1."""
    value = to_plain(threshold.get("ng_classes"))
    if isinstance(value, list):
        return [as_class_name(v) for v in value]
    return value


def check_model_settings(cfg: Mapping[str, Any], ordered: bool) -> None:
    """What the model module would refuse, checked before the data are read (a typo must not cost the
    scan): the NG classes' form (their names need the class list), the objective, the loss and SAM."""
    from .objectives import ObjectiveError, choose_objective

    for key in ("threshold", "loss", "ordinal", "optim"):
        group = to_plain(cfg.get(key))
        if group is not None and not isinstance(group, dict):
            raise TrainingConfigError(
                f"{key} must be a mapping of settings ({key}.NAME=VALUE), got {group!r}"
            )
    try:
        check_ng_spec(ng_classes_setting(cfg.get("threshold") or {}))
    except DecisionRuleError as exc:
        raise TrainingConfigError(f"threshold.ng_classes: {exc}") from None
    smoothing = loss_settings(to_plain(cfg.get("loss")) or {}).label_smoothing
    optim = to_plain(cfg.get("optim")) or {}
    sam_rho(optim)
    optimizer = optim.get("optimizer")
    optimizer_lr(
        optimizer if isinstance(optimizer, dict) else {}, to_plain(cfg.get("finetune"))
    )  # finetune.* too
    threshold_settings(to_plain(cfg.get("threshold")) or {}, DEFAULT_WARN_FALSE_REJECT_RATE)
    try:
        choose_objective(to_plain(cfg.get("ordinal")) or {}, ordered, smoothing)
    except ObjectiveError as exc:
        raise TrainingConfigError(str(exc)) from None


def sam_rho(optim: Mapping[str, Any]) -> float:
    """``optim.sam_rho``: the radius of sharpness-aware minimisation; 0 or null = plain steps."""
    rho = dict(optim).get("sam_rho")
    if rho is None:
        return 0.0
    return config_number(rho, "optim.sam_rho", "a number >= 0 (0 or null = off)", lambda x: x >= 0)


def lr_plan(finetune: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(finetune.backbone_lr_scale, finetune.layer_decay)``; every ``finetune.*`` number is checked
    when the module is built, before any work is done."""
    spec = dict(finetune or {})
    scale = config_number(
        spec.get("backbone_lr_scale", 1.0), "finetune.backbone_lr_scale", "a number >= 0", lambda x: x >= 0
    )
    decay = config_number(
        spec.get("layer_decay", 1.0),
        "finetune.layer_decay",
        "a number in (0, 1] (1 = off)",
        lambda x: 0 < x <= 1,
    )
    epochs = spec.get("freeze_epochs", 0)
    config_number(epochs, "finetune.freeze_epochs", "a whole number >= 0", lambda x: x >= 0, whole=True)
    return scale, decay


def grouped(scale: float, decay: float) -> bool:
    """Whether the finetune plan splits the parameters into LR groups (else one group)."""
    return scale != 1.0 or decay != 1.0


def optimizer_lr(spec: Mapping[str, Any], finetune: Mapping[str, Any] | None) -> float | None:
    """``optim.optimizer.lr``, checked with every ``finetune.*`` number; the LR groups of a finetune plan
    are scaled from it, so they need it."""
    plan = lr_plan(finetune)
    if "lr" not in spec:
        if grouped(*plan):
            raise TrainingConfigError(
                "optim.optimizer.lr must be given: finetune.backbone_lr_scale/layer_decay scale the LR groups from it"
            )
        return None
    return config_number(spec["lr"], "optim.optimizer.lr", "a number > 0", lambda x: x > 0)


def check_class_names(class_names: list[str], num_classes: int, good_class: str, ordered: bool) -> None:
    """The classes a model is built for agree with each other (ordered grades start at the good one)."""
    if len(class_names) != num_classes:
        raise TrainingConfigError(f"{len(class_names)} class names for num_classes={num_classes}")
    if good_class not in class_names:
        raise TrainingConfigError(f"good_class {good_class!r} is not one of {class_names}")
    if ordered and class_names[0] != good_class:
        raise TrainingConfigError(
            f"data.ordered: the classes {class_names} are grades best first, so the good class "
            f"{good_class!r} must come first (set data.source.classes in grade order)"
        )


def shift_protocol(spec: Any, total_stride: int | None = None) -> ShiftProtocol | None:
    """``shift_consistency`` -> the test stage's protocol; None when absent or ``copies: 0`` (off).  Before the
    model exists (``total_stride`` None) an unset ``max_shift`` is checked as unbounded; the model's total
    stride (every sub-stride phase of its feature grid) is the shift the run then uses."""
    cfg = to_plain(spec) or {}
    if not isinstance(cfg, dict):
        raise TrainingConfigError(f"shift_consistency must be a mapping of settings, got {cfg!r}")
    unknown = sorted(set(cfg) - {"copies", "max_shift", "seed", "padding"})
    if unknown:
        raise TrainingConfigError(
            f"shift_consistency: unknown key(s) {unknown}; valid keys: copies, max_shift, seed, padding"
        )
    copies = cfg.get("copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:  # here 0 is a setting: off
        raise TrainingConfigError(
            f"shift_consistency.copies must be an integer >= 0 (0: off), got {copies!r}"
        )
    if not cfg or copies == 0:
        return None
    if cfg.get("max_shift") is None:
        cfg["max_shift"] = int(total_stride) if total_stride is not None else 1 << 16
    try:
        return ShiftProtocol(**cfg)
    except ValueError as exc:
        raise TrainingConfigError(str(exc)) from None


def class_weights_form(spec: Any) -> str | list[float] | None:
    """``loss.class_weights``: null, ``balanced`` or a list of positive numbers; the count (one per class) is
    checked once the classes are known (train.resolve_class_weights)."""
    spec = to_plain(spec)
    if spec is None or spec == "balanced":
        return spec
    if isinstance(spec, list) and spec and all(is_finite_number(w) and w > 0 for w in spec):
        return [float(w) for w in spec]
    raise TrainingConfigError(
        f"loss.class_weights must be null, 'balanced' or a list of positive numbers (one per class), got {spec!r}"
    )


@dataclass(frozen=True)
class LossSettings:
    """The checked ``loss.*`` numbers (class weights are resolved against the data: train.resolve_class_weights)."""

    label_smoothing: float = 0.0
    mixup: float = 0.0
    ng_weight: float = 0.0


def loss_settings(loss: Mapping[str, Any]) -> LossSettings:
    """``loss.label_smoothing``, ``loss.mixup`` and ``loss.ng_weight``, checked (0 where unset), and the form
    of ``loss.class_weights``."""
    smoothing = config_number(
        loss.get("label_smoothing") or 0.0, "loss.label_smoothing", "a number in [0, 1)", lambda x: 0 <= x < 1
    )
    mixup = config_number(loss.get("mixup") or 0.0, "loss.mixup", "a number >= 0 (0 = off)", lambda x: x >= 0)
    ng_weight = config_number(
        loss.get("ng_weight") or 0.0, "loss.ng_weight", "a number >= 0 (0 = off)", lambda x: x >= 0
    )
    class_weights_form(loss.get("class_weights"))
    return LossSettings(smoothing, mixup, ng_weight)


def threshold_settings(thr: Mapping[str, Any], default_warn: float) -> tuple[float, float, float]:
    """``threshold.target_recall``, ``.warn_false_reject_rate`` and ``.default``, checked."""
    in_unit = "a number in [0, 1]"
    return (
        config_number(
            thr.get("target_recall", DEFAULT_TARGET_RECALL),
            "threshold.target_recall",
            RECALL_EXPECTED,
            is_recall_target,
        ),
        config_number(
            thr.get("warn_false_reject_rate", default_warn),
            "threshold.warn_false_reject_rate",
            in_unit,
            lambda x: 0 <= x <= 1,
        ),
        config_number(thr.get("default", 0.5), "threshold.default", THRESHOLD_EXPECTED, is_threshold),
    )


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        if not node and prefix:
            yield prefix, {}
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def flatten(cfg: Any) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole (``"[1, 2]"``), None -> ``"null"``."""
    out: dict[str, str] = {}
    for key, value in _walk(to_plain(cfg), ""):
        out[key] = "null" if value is None else str(value)
    return out


def find_keys(cfg: Any, name: str, prefix: str) -> list[str]:
    """Dotted paths of every key called ``name`` below ``cfg`` (to name config keys in errors)."""
    return [k for k, _ in _walk(to_plain(cfg), prefix) if k.rsplit(".", 1)[-1] == name]


def is_global_zero() -> bool:
    """Rank 0 of the whole job, also before Lightning has set up the process group.

    torchrun sets RANK; SLURM sets SLURM_PROCID; Lightning's own launcher sets NODE_RANK and
    LOCAL_RANK for the processes it starts.  Any non-zero value means "not rank 0".
    """
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return all(int(os.environ.get(var, "0")) == 0 for var in ("NODE_RANK", "GROUP_RANK", "LOCAL_RANK"))


def resolve_ckpt_path(ckpt_path: Any, ckpt_dir: str | os.PathLike[str]) -> str | None:
    """``null`` -> None; ``last`` -> ``<ckpt_dir>/last.ckpt`` (None with a warning if absent); else a file.

    ``last`` is meant for restartable jobs (SLURM requeue, a killed workstation run): the same command
    line with a stable ``hydra.run.dir`` resumes when there is something to resume and starts otherwise.
    """
    if ckpt_path is None or ckpt_path == "":
        return None
    if str(ckpt_path) == "last":
        last = Path(ckpt_dir) / "last.ckpt"
        if last.is_file():
            return str(last)
        log.warning(
            "ckpt_path=last: no %s yet, starting a new training. (Resuming needs the same run directory: "
            "pass the same hydra.run.dir=... as the run to continue.)",
            last,
        )
        return None
    path = Path(str(ckpt_path)).expanduser()
    problem = checkpoint_file_problem(path)  # the checkpoint reader's own first look: missing, ONNX, image
    if problem:
        raise TrainingConfigError(f"ckpt_path: {problem}; ckpt_path takes a .ckpt file, 'last' or null")
    return str(path.resolve())


MEMORY_FORMATS = ("channels_last", "contiguous")


def memory_format(value: Any) -> Any:
    """``memory_format``: the layout of the network's 4-D weights (and so its activations) in training.

    channels_last lets oneDNN run the convolutions without reordering each one's input and output:
    1.6-1.8x the training speed of EfficientNet-Lite on 2 CPU cores (docs/benchmarks.md). It is a
    layout only: the values, the checkpoint and the export are the same. Not the default: torch 2.13's
    CPU build crashed with it on some small architecture-search candidates (conf/train.yaml).
    """
    import torch

    return torch.channels_last if check_memory_format(value) == "channels_last" else torch.contiguous_format


def check_memory_format(value: Any) -> str:
    """``memory_format``'s name (null: contiguous), or one line naming the key; torch-free."""
    if value is None:
        return "contiguous"
    if not isinstance(value, str) or value not in MEMORY_FORMATS:
        raise TrainingConfigError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {value!r}")
    return value


def use_memory_format(model: Any, value: Any) -> None:
    """Put ``model``'s 4-D weights in the layout ``memory_format`` names (checked by :func:`memory_format`)."""
    model.to(memory_format=memory_format(value))


def model_layout(model: Any) -> str | None:
    """The layout ``model``'s first telling convolution kernel is in; ``None`` when none tells (a kernel of
    one pixel or one input channel reads the same in both layouts, so the layout cannot matter there)."""
    import torch

    for weight in model.parameters():
        if weight.dim() == 4 and weight.shape[1] > 1 and weight.shape[2] * weight.shape[3] > 1:
            nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            return "channels_last" if nhwc else "contiguous"
    return None


@contextmanager
def torch_threads(threads: Any) -> Iterator[None]:
    """``threads``: torch CPU threads for this call; the caller's setting is restored afterwards."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise TrainingConfigError(f"threads must be null or a positive integer, got {threads!r}")
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peer_left(exc: BaseException) -> bool:
    """A DDP collective failed because another rank's process ended (the backend's words, gloo's or NCCL's)."""
    return any(s in str(exc) for s in ("Connection closed by peer", "Connection reset by peer"))


def stop_cause(trainer: Any) -> str:
    """What ended an interrupted fit or test, for the one line train and evaluate print."""
    return "SIGTERM" if getattr(trainer, "received_sigterm", False) else "Ctrl+C"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    for key, value in metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, int | float):
            out[key] = float(value)
    return out
