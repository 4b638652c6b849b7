"""Distillation from a teacher model file into the network being trained (``distill.*``).

The teacher is an exported defectscope model (``.onnx``), read as data through the line runtime:
typically the same recipe exported with test-time views in its graph (``export --tta dihedral``),
which is more accurate than one view but 8 times slower to serve.  It scores every training image
once, before the first epoch, exactly as ``defectscope inspect`` would (its own loader and
normalisation); each training step then reads its batch's rows.  Scoring offline keeps training at
one forward pass per image, and it is exact for the views the student is shown: a teacher averaged
over the 8 dihedral views gives every dihedral view of an image the same probabilities.

The loss is ``(1 - weight) * objective + weight * T^2 * KL(teacher_T || student_T)``, both sides
softened by the temperature ``T`` (probabilities raised to ``1/T`` and renormalised), as in
Hinton et al.'s knowledge distillation.  Validation, the threshold and the test stay on the labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainingConfigError, config_number

log = logging.getLogger(__name__)


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
    from ..runtime.inspector import ModelLoadError, check_model_path

    try:
        check_model_path(teacher)
    except ModelLoadError as exc:
        raise TrainingConfigError(f"distill.teacher: {exc}") from None
    return DistillSettings(teacher, weight, temperature)


def teacher_probabilities(
    settings: DistillSettings, paths: Sequence[str], class_names: Sequence[str], threads: int | None
) -> tuple[np.ndarray, str]:
    """The teacher's class probabilities for every training image, (N, K) float32 in ``paths`` order,
    and the teacher file's sha256 (what the run was trained towards, for its tracking record).

    The teacher must grade the same classes in the same order; any image it cannot read stops the
    run (the training scan read them all a moment ago, so that means the files changed).
    """
    from ..evaluation.scoring import score_paths
    from ..runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError

    assert settings.teacher is not None
    try:
        teacher = Inspector(settings.teacher, threads=threads, log=log.info)
    except (ModelLoadError, MetadataError, ProviderError) as exc:
        raise TrainingConfigError(f"distill.teacher: {exc}") from None
    if list(teacher.class_names) != list(class_names):
        raise TrainingConfigError(
            f"distill.teacher: {settings.teacher} grades the classes {', '.join(teacher.class_names)} but the "
            f"data's are {', '.join(class_names)}; the teacher must be trained on the same classes, in the same order"
        )
    meta = teacher.metadata
    started = time.perf_counter()
    scored = score_paths(
        lambda b: teacher.predict(b, cam=False)["probs"], paths, meta.loader, meta.mean, meta.std
    )
    if scored.failed:
        path, reason = scored.failed[0]
        raise TrainingConfigError(f"distill.teacher: could not score the training image {path}: {reason}")
    probs = np.zeros((len(paths), len(class_names)), dtype=np.float32)
    probs[scored.index] = scored.probs
    log.info(
        "distill: teacher %s (%s, sha256 %s…) scored %d training images in %.0f s",
        settings.teacher, meta.variant, teacher.sha256[:12], len(paths), time.perf_counter() - started,
    )  # fmt: skip
    return probs, teacher.sha256


def distill_loss(
    student_log_probs: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)``, mean over the batch; ``_T``: probabilities softened by T.

    The student side takes log-probabilities (any link: softmax or CORN), the teacher side
    probabilities; ``T^2`` keeps the gradient's scale independent of ``T``.
    """
    t = float(temperature)
    student = F.log_softmax(student_log_probs.float() / t, dim=1)
    teacher = F.softmax(torch.log(teacher_probs.float().clamp_min(1e-8)) / t, dim=1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - student)).sum(dim=1)
    return (t * t) * kl.mean()


def teacher_agreement(teacher_probs: np.ndarray, labels: Sequence[int]) -> float:
    """Share of training images whose label is the teacher's top class (how much it disagrees)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(teacher_probs.argmax(axis=1) == np.asarray(labels)))
