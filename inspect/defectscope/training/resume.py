"""Resuming a run: the checkpoint is read by the one checkpoint reader and must be one that this run
continues (same network, optimizer, LR groups, teacher and schedule), or the run stops with one line before any data is
read; its classes are checked when the data's are listed (:func:`check_same_classes`), before the scan and the MLflow run.
What Lightning restores from it is checked too: the file paths of the checkpoint callbacks' state and the
optimizer's numeric settings (:func:`check_resume_state`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, model_state, read_info, recorded_run_config
from ..plain import to_plain
from ..runtime.grading import is_finite_number
from .config import TrainingConfigError, lr_plan
from .distill_settings import DistillSettings, resume_problem
from .optimization import schedule_changes


def read_resume(
    ckpt_path: str,
    finetune: Any = None,
    distill: DistillSettings | None = None,
    horizon: Mapping[str, Any] | None = None,
    optimizer: Any = None,
    network: tuple[Mapping[str, Any] | None, Any] | None = None,
) -> dict[str, Any]:
    """The checked ``defectscope`` entry of a checkpoint to resume, read by the one checkpoint reader.

    Lightning then loads the same file (``weights_only=True``) and restores callback state from it,
    so the file names ModelCheckpoint will delete or load are checked here too.  It also restores the
    optimizer with its LR groups, so the ``finetune`` LR plan must be the one the run started with, the
    objective, so the ``distill`` settings must be too, and the scheduler, so the settings of its
    ``horizon`` (:data:`~.optimization.HORIZON_SETTINGS`, this run's values) must be too, and so must the
    ``optimizer`` (this run's ``optim.optimizer._target_``): torch loads another optimizer's state
    without a word and fails in the first step, or drops it. ``network``: this run's ``model`` settings and
    ``data.loader.channels`` (:func:`check_same_network`).
    """
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
    if network is not None:
        check_same_network(ckpt, info, *network, ckpt_path)
    changes = schedule_changes(recorded_run_config(ckpt), horizon) if horizon is not None else []
    if changes:
        raise TrainingConfigError(
            f"ckpt_path: {ckpt_path} was trained on a schedule that this run changes ({'; '.join(changes)}): "
            "a resumed run continues its own schedule; resume with the settings it started with, or start a new run"
        )
    return info


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _changed_settings(recorded: Mapping[str, Any], model: Mapping[str, Any] | None) -> list[str]:
    """The ``model.*`` settings this run gives otherwise than the checkpoint recorded (a hint, not the rule)."""
    then = recorded.get("model")
    if not isinstance(then, Mapping) or not isinstance(model, Mapping):
        return []
    keys = sorted(set(then) | set(model), key=lambda k: (k != "name", str(k)))
    return [f"model.{k}" for k in keys if then.get(k) != model.get(k)]


def check_same_network(
    ckpt: dict[str, Any],
    info: Mapping[str, Any],
    model: Mapping[str, Any] | None,
    channels: Any,
    ckpt_path: str,
) -> None:
    """The network this run builds takes the checkpoint's weights: the same input channels, and every weight
    of the same name and shape (a setting that changes no weight, ``model.drop_rate`` or ``model.weights``,
    may change). Another one was a size-mismatch traceback after the data scan, and the finished MLflow run
    it reopened was marked FAILED."""
    loader = info.get("loader")
    trained = loader.get("channels") if isinstance(loader, Mapping) else None
    if trained is not None and channels is not None and trained != channels:
        raise TrainingConfigError(
            f"data.loader.channels is {_shown(channels)} but {ckpt_path} was trained on {trained}-channel images: "
            f"a resumed run continues its own network; resume with data.loader.channels={trained} or start a new run"
        )
    from .model_probe import check_model_builds

    outputs = info["model_kwargs"].get("num_classes")
    built = check_model_builds(
        model, channels, int(outputs) if isinstance(outputs, int) else len(info["class_names"])
    )
    want = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model_state(ckpt, ckpt_path).items()}
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not differ:
        return
    first = differ[0]
    settings = _changed_settings(recorded_run_config(ckpt), model)
    said = f"; the settings that differ: {', '.join(settings[:4])}" if settings else ""
    raise TrainingConfigError(
        f"ckpt_path: {ckpt_path} was trained with another network ({len(differ)} weight(s) differ, e.g. {first}: "
        f"{list(have[first]) if first in have else 'none'} in the checkpoint, {list(want[first]) if first in want else 'none'} "
        f"here{said}): a resumed run continues its own network; resume with the checkpoint's model settings or "
        "start a new run"
    )


def check_same_classes(
    info: Mapping[str, Any], class_names: list[str], good_class: str, ckpt_path: str
) -> None:
    """The data's classes (listed, before the scan) are the checkpoint's, by name and order: its output
    units are those classes, so other ones (a renamed folder too) would train the wrong unit or fail to load."""
    then, then_good = list(info.get("class_names") or []), info.get("good_class")
    if then == list(class_names) and then_good == good_class:
        return
    fix = (
        f"set data.source.classes=[{','.join(then)}] for the checkpoint's order"
        if sorted(then) == sorted(class_names) and then_good == good_class
        else "resume on data with those class folders or labels, or start a new run"
    )
    raise TrainingConfigError(
        f"ckpt_path: {ckpt_path} was trained on classes {then} (good: {then_good}) but the data give "
        f"{list(class_names)} (good: {good_class}): a resumed run continues the checkpoint's classes; {fix}"
    )


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


#: what a ModelCheckpoint (or subclass) state holds; any callback state with one of these is checked
CHECKPOINT_STATE_KEYS = frozenset(
    {"dirpath", "best_model_path", "kth_best_model_path", "last_model_path", "best_k_models"}
)


#: optimizer hyperparameters that torch multiplies with: numbers (or tuples of numbers, ``betas``)
NUMERIC_GROUP_KEYS = frozenset(
    {"lr", "initial_lr", "max_lr", "min_lr", "weight_decay", "eps", "momentum", "dampening", "alpha",
     "betas", "base_momentum", "max_momentum", "lr_decay", "initial_accumulator_value"}
)  # fmt: skip


def _check_optimizer_states(ckpt: Mapping[str, Any], source: str) -> None:
    """The optimizer settings a resume hands torch: a word where a learning rate belongs was a TypeError
    inside the first step, after the data were read."""
    states = ckpt.get("optimizer_states") or []
    if not isinstance(states, list):
        raise CheckpointError(f"{source}: optimizer_states is a {type(states).__name__}, expected a list")
    for i, state in enumerate(states):
        groups = state.get("param_groups") if isinstance(state, Mapping) else None
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise CheckpointError(f"{source}: optimizer_states[{i}] needs a list of param_groups")
        slots = state.get("state", {})
        if not isinstance(slots, Mapping) or not all(isinstance(k, int) for k in slots):
            raise CheckpointError(
                f"{source}: optimizer_states[{i}].state must map parameter numbers to states"
            )
        for j, group in enumerate(groups):
            ids = group.get("params", [])
            if not isinstance(ids, list) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in ids
            ):
                raise CheckpointError(
                    f"{source}: optimizer_states[{i}].param_groups[{j}].params: expected a list of parameter numbers"
                )
            for key in NUMERIC_GROUP_KEYS & set(group):
                value = group[key]
                parts = value if isinstance(value, list | tuple) else [value]
                if not parts or not all(is_finite_number(v) for v in parts):
                    raise CheckpointError(
                        f"{source}: optimizer_states[{i}].param_groups[{j}].{key}: expected a number, "
                        f"got {value!r:.60}"
                    )


def check_resume_state(ckpt: Mapping[str, Any], source: str) -> None:
    """Lightning restores callback state on resume, and ModelCheckpoint later deletes or loads the files
    it names: each must be a ``.ckpt`` directly inside the recorded checkpoint folder, without ``..``.
    The optimizer's settings must be numbers where torch computes with them."""
    _check_optimizer_states(ckpt, source)
    callbacks = ckpt.get("callbacks") or {}
    if not isinstance(callbacks, Mapping):
        raise CheckpointError(f"{source}: 'callbacks' is a {type(callbacks).__name__}, expected a dict")
    for name, state in callbacks.items():
        where = f"{source}: callbacks[{str(name)[:60]!r}]"
        named = str(name).startswith("ModelCheckpoint")
        if named and not isinstance(state, Mapping):
            raise CheckpointError(f"{where} is a {type(state).__name__}, expected a dict")
        if not isinstance(state, Mapping) or not (named or CHECKPOINT_STATE_KEYS & set(state)):
            continue  # not a checkpoint callback's state, by its key or by what it holds
        folder = state.get("dirpath")
        if not isinstance(folder, str) or ".." in Path(folder).parts:
            raise CheckpointError(f"{where}.dirpath: expected a folder path without '..', got {folder!r}")
        best_k = state.get("best_k_models") or {}
        if not isinstance(best_k, Mapping):
            raise CheckpointError(f"{where}.best_k_models: expected a dict of checkpoint paths")
        paths = [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
        for p in [*paths, *best_k]:
            if p in (None, ""):
                continue
            if (
                not isinstance(p, str)
                or ".." in Path(p).parts
                or Path(p).suffix != ".ckpt"
                or (Path(p).parent != Path(folder))
            ):
                raise CheckpointError(
                    f"{where}: names {str(p)[:200]!r}; a resumed checkpoint may only name .ckpt files in its "
                    f"own folder {folder!r}"
                )
