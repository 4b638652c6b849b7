"""Resuming a run: the checkpoint is read by the one checkpoint reader and must be one that this run
continues (same optimizer, LR groups, teacher and schedule), or the run stops with one line before any data is read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..plain import to_plain
from .config import TrainingConfigError
from .distill import DistillSettings, resume_problem
from .optimization import lr_plan, schedule_changes


def read_resume(
    ckpt_path: str,
    finetune: Any = None,
    distill: DistillSettings | None = None,
    horizon: Mapping[str, Any] | None = None,
    optimizer: Any = None,
) -> dict[str, Any]:
    """The checked ``defectscope`` entry of a checkpoint to resume, read by the one checkpoint reader.

    Lightning then loads the same file (``weights_only=True``) and restores callback state from it,
    so the file names ModelCheckpoint will delete or load are checked here too.  It also restores the
    optimizer with its LR groups, so the ``finetune`` LR plan must be the one the run started with, the
    objective, so the ``distill`` settings must be too, and the scheduler, so the settings of its
    ``horizon`` (:data:`~.optimization.HORIZON_SETTINGS`, this run's values) must be too, and so must the
    ``optimizer`` (this run's ``optim.optimizer._target_``): torch loads another optimizer's state
    without a word and fails in the first step, or drops it.
    """
    from defectscope.checkpoint import check_resume_state, read_info, recorded_run_config

    ckpt, info = read_info(ckpt_path)
    check_resume_state(ckpt, ckpt_path)
    hparams = ckpt.get("hyper_parameters")
    then = hparams.get("finetune") if isinstance(hparams, Mapping) else None
    if isinstance(then, Mapping):
        try:
            before = lr_plan(then)
        except TrainingConfigError as exc:
            raise TrainingConfigError(f"{ckpt_path}: hyper_parameters: {exc}") from None
        now = lr_plan(to_plain(finetune))
        if now != before:
            raise TrainingConfigError(
                f"finetune.backbone_lr_scale, finetune.layer_decay are {now[0]:g}, {now[1]:g} but {ckpt_path} "
                f"was trained with {before[0]:g}, {before[1]:g}: a resumed run keeps its optimizer's LR "
                "groups; resume with the checkpoint's values or start a new run"
            )
    _check_same_optimizer(recorded_run_config(ckpt), optimizer, ckpt_path)
    if distill is not None:
        then = recorded_run_config(ckpt).get("distill")
        problem = resume_problem(then, distill, ckpt_path, info.get("teacher_sha256"))
        if problem:
            raise TrainingConfigError(problem)
    changes = schedule_changes(recorded_run_config(ckpt), horizon) if horizon is not None else []
    if changes:
        raise TrainingConfigError(
            f"ckpt_path: {ckpt_path} was trained on a schedule that this run changes ({'; '.join(changes)}): "
            "a resumed run continues its own schedule; resume with the settings it started with, or start a new run"
        )
    return info


def _check_same_optimizer(recorded: Mapping[str, Any], optimizer: Any, ckpt_path: str) -> None:
    """The recorded ``optim.optimizer._target_`` (a string compared, never imported) against this run's."""
    optim = recorded.get("optim")
    spec = optim.get("optimizer") if isinstance(optim, Mapping) else None
    then = spec.get("_target_") if isinstance(spec, Mapping) else None
    if optimizer is None or then is None or then == optimizer:
        return
    raise TrainingConfigError(
        f"optim.optimizer is {str(optimizer)[:80]} but {ckpt_path} was trained with {str(then)[:80]}: a resumed "
        "run restores its optimizer's state; resume with that optimizer or start a new run"
    )
