"""``distill.*`` checked without torch: the settings, the teacher file, and whether a resumed run may
continue with them (the distillation itself: :mod:`.distill`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..runtime.files import TEACHER, file_sha256
from .config import TrainingConfigError, config_number


@dataclass(frozen=True)
class DistillSettings:
    """``distill.*``, checked: no teacher means no distillation."""

    teacher: str | None = None
    weight: float = 0.5
    temperature: float = 2.0


def distill_settings(spec: Mapping[str, Any] | None) -> DistillSettings:
    """``distill.*`` -> :class:`DistillSettings`; errors name the key and what was expected.

    The teacher file itself is checked here too (cheap), so a wrong path stops the run before the
    data are scanned.
    """
    if spec is not None and not isinstance(spec, Mapping):
        raise TrainingConfigError(
            f"distill must be a group of teacher, weight and temperature (distill.teacher=model.onnx), got {spec!r}"
        )
    cfg = dict(spec or {})
    unknown = sorted(set(cfg) - {"teacher", "weight", "temperature"})
    if unknown:
        raise TrainingConfigError(
            f"distill.{unknown[0]} is not a setting; distill takes teacher, weight and temperature"
        )
    weight = config_number(
        cfg.get("weight", 0.5), "distill.weight", "a number in (0, 1]", lambda x: 0 < x <= 1
    )
    temperature = config_number(
        cfg.get("temperature", 2.0), "distill.temperature", "a number > 0", lambda x: x > 0
    )
    teacher = cfg.get("teacher")
    if teacher is None:
        return DistillSettings(None, weight, temperature)
    if not isinstance(teacher, str) or not teacher:
        raise TrainingConfigError(
            f"distill.teacher must be the path of an exported model (.onnx), got {teacher!r}"
        )
    problem = teacher_file_problem(teacher)
    if problem:
        raise TrainingConfigError(f"distill.teacher: {problem}")
    return DistillSettings(teacher, weight, temperature)


def resume_problem(
    then: Any, now: DistillSettings, ckpt_path: str, then_sha256: str | None = None
) -> str | None:
    """Why ``now`` cannot continue a run trained with the ``distill`` settings ``then`` (its run config) and
    the teacher file ``then_sha256`` (its checkpoint), or ``None``: a resumed run keeps its objective, so the
    teacher, weight and temperature must be the same, and so must the teacher file's content."""
    spec = dict(then) if isinstance(then, Mapping) else {}
    default = DistillSettings()
    before = tuple(spec.get(key, getattr(default, key)) for key in ("teacher", "weight", "temperature"))
    after = (now.teacher, now.weight, now.temperature)
    if before[0] is None and after[0] is None:  # no distillation either time
        return None
    if before == after:
        return _replaced_teacher(now.teacher, ckpt_path, then_sha256)

    def shown(values: tuple[Any, ...]) -> str:
        return (
            "no teacher"
            if values[0] is None
            else f"teacher {values[0]}, weight {values[1]:g}, temperature {values[2]:g}"
        )

    return (
        f"distill.* give {shown(after)} but {ckpt_path} was trained with {shown(before)}: a resumed run keeps its "
        "objective; resume with the checkpoint's distill settings or start a new run"
    )


def _replaced_teacher(teacher: str | None, ckpt_path: str, then_sha256: str | None) -> str | None:
    """A teacher file replaced under the same path since the run started (the checkpoint keeps its sha256)."""
    if teacher is None or then_sha256 is None:
        return None
    now_sha256 = file_sha256(teacher)
    if now_sha256 == then_sha256:
        return None
    return (
        f"distill.teacher: {teacher} is not the file {ckpt_path} was trained towards (sha256 {now_sha256[:12]}…, "
        f"the run's teacher {then_sha256[:12]}…): a resumed run keeps its objective; put that teacher file back "
        "or start a new run"
    )


def teacher_file_problem(teacher: str) -> str | None:
    """Why ``teacher`` cannot be a teacher model file (the runtime's rule, worded for this key); ``None``
    if it may be one."""
    from ..runtime.inspector import ModelLoadError, check_model_path

    try:
        check_model_path(teacher, TEACHER)
    except ModelLoadError as exc:
        return str(exc)
    return None
