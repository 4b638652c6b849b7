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
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from .config import TrainingConfigError
from .distill_settings import DistillSettings

log = logging.getLogger(__name__)


def teacher_gpu(device: torch.device) -> int | None:
    """The GPU index the teacher runs on for a process training on ``device``: that same GPU (one per
    DDP process, so the ranks do not all load GPU 0), when this ONNX Runtime has CUDA; else ``None``,
    the CPU.  No TensorRT: an engine build does not pay for a one-off pass."""
    from ..runtime.providers import import_ort

    if device.type != "cuda" or "CUDAExecutionProvider" not in import_ort().get_available_providers():
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def open_teacher(
    settings: DistillSettings, class_names: Sequence[str], threads: int | None, gpu: int | None = None
) -> Any:
    """The teacher as the line runtime opens it, on the CPU or GPU ``gpu``; one line when it cannot be a
    teacher for these classes."""
    from ..runtime.inspector import Inspector, MetadataError, ModelLoadError, ProviderError

    assert settings.teacher is not None
    path = settings.teacher
    try:
        try:
            provider = "cpu" if gpu is None else "cuda"
            teacher = Inspector(path, provider=provider, threads=threads, device_id=gpu or 0, log=log.info)
        except ProviderError as exc:
            if gpu is None:
                raise
            # ORT lists CUDA when its libraries are installed, not when they load: the CPU still scores it
            log.warning("distill: the teacher did not start on GPU %d (%s); scoring on the CPU", gpu, exc)
            teacher = Inspector(path, provider="cpu", threads=threads, log=log.info)
    except (ModelLoadError, MetadataError, ProviderError) as exc:
        raise TrainingConfigError(f"distill.teacher: {exc}") from None
    if list(teacher.class_names) != list(class_names):
        raise TrainingConfigError(
            f"distill.teacher: {settings.teacher} grades the classes {', '.join(teacher.class_names)} but the "
            f"data's are {', '.join(class_names)}; the teacher must be trained on the same classes, in the same order"
        )
    return teacher


def teacher_probabilities(teacher: Any, paths: Sequence[str]) -> np.ndarray:
    """The teacher's class probabilities for ``paths``, (N, K) float32 in their order.

    Any image it cannot read under its own loader (the files changed since the scan, or its loader
    refuses what training's accepts) is a :class:`TrainingConfigError`: the run cannot be taught it.
    """
    from ..evaluation.scoring import score_paths

    meta, name = teacher.metadata, teacher.model_path
    try:
        scored = score_paths(
            lambda b: teacher.predict(b, cam=False)["probs"], paths, meta.loader, meta.mean, meta.std
        )
    except Exception as exc:  # ONNX Runtime's own errors (out of memory, a graph it cannot run)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingConfigError(f"distill.teacher: {name} failed on the training images: {first}") from None
    if scored.failed:
        path, reason = scored.failed[0]
        raise TrainingConfigError(
            f"distill.teacher: the teacher cannot read the training image {path} under its own loader: {reason}"
        )
    probs = np.zeros((len(paths), len(teacher.class_names)), dtype=np.float32)
    probs[scored.index] = scored.probs
    if not np.isfinite(probs).all():
        raise TrainingConfigError(
            f"distill.teacher: {name} gave probabilities that are not finite numbers (NaN/inf)"
        )
    return probs


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
    """Share of training images whose label is the teacher's top class (the training split is never empty)."""
    return float(np.mean(teacher_probs.argmax(axis=1) == np.asarray(labels)))


def add_teacher(dm: Any, settings: DistillSettings, threads: Any, tracker: Any) -> list[Any]:
    """``distill.teacher``: checked now (it opens and grades the data's classes), scored by the returned
    callback once the processes exist; no callback without a teacher."""
    if settings.teacher is None:
        return []
    # checked on the CPU and let go: the pass opens its own session in each process, on that process's GPU
    # (not known yet), and a session must not cross a fork (ddp_fork) or be pickled (ddp_spawn)
    open_teacher(settings, list(dm.class_names), threads)
    train_set = dm.dataset("train")
    return [
        TeacherPass(
            settings, list(train_set.paths), list(train_set.labels), list(dm.class_names), threads, tracker
        )
    ]


class TeacherPass(pl.Callback):
    """Scores the training split with the teacher before the first step, and hands the module its rows.

    Under DDP each process scores every ``world_size``-th image from its rank on and the rows are
    gathered (tensors, no pickling), so the pass costs what it costs one process, not once per rank;
    an image one rank cannot score stops every rank with the same line.  Each process runs its teacher
    on its own GPU where it trains on one (:func:`teacher_gpu`), else on the CPU.
    """

    def __init__(
        self, settings: DistillSettings, paths: list[str], labels: list[int], class_names: list[str],
        threads: Any, tracker: Any,
    ) -> None:  # fmt: skip
        self.settings, self.paths, self.labels = settings, paths, labels
        self.class_names, self.threads, self.tracker = class_names, threads, tracker

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        started = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        share = list(range(rank, len(self.paths), world))
        teacher, error = None, ""
        part = np.zeros((len(share), len(self.class_names)), dtype=np.float32)
        device = trainer.strategy.root_device  # this process's device (its GPU under DDP)
        try:
            teacher = open_teacher(self.settings, self.class_names, self.threads, teacher_gpu(device))
            part = teacher_probabilities(teacher, [self.paths[i] for i in share])
        except Exception as exc:  # whatever it is, every rank must reach the gather, or the others wait
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            error = first if isinstance(exc, TrainingConfigError) else f"distill.teacher: {first}"
        probs, errors = _gathered(trainer, device, part, error, len(self.paths))
        if errors:
            raise TrainingConfigError(errors[0])
        assert teacher is not None
        agreement = teacher_agreement(probs, self.labels)
        log.info(
            "distill: teacher %s (%s, sha256 %s…) scored %d of the %d training images in this process (rank %d "
            "of %d) on %s in %.0f s; its top class is the label of %.1f %% of them all; weight %g, temperature %g",
            self.settings.teacher, teacher.metadata.variant, teacher.sha256[:12], len(share), len(self.paths),
            rank, world, _where(teacher), time.perf_counter() - started, 100 * agreement, self.settings.weight,
            self.settings.temperature,
        )  # fmt: skip
        if self.tracker is not None and trainer.is_global_zero:
            tags = {"distill.teacher_sha256": teacher.sha256, "distill.teacher_agreement": f"{agreement:.4f}"}
            self.tracker.set_tags(tags)
        module: Any = pl_module
        module.set_teacher(probs, self.settings.weight, self.settings.temperature, teacher.sha256)


def _where(teacher: Any) -> str:
    """``the CPU`` or ``GPU 1 (cuda)``: where the teacher's pass ran, for the log."""
    return "the CPU" if teacher.provider == "cpu" else f"GPU {teacher.device_id} ({teacher.provider})"


def _gathered(
    trainer: pl.Trainer, device: torch.device, part: np.ndarray, error: str, total: int
) -> tuple[np.ndarray, list[str]]:
    """Every rank's rows in path order, and the ranks' errors (UTF-8, cut at 2 KiB) in rank order.

    The tensors go through ``device``, the process's own (NCCL gathers CUDA tensors only)."""
    world = trainer.world_size
    if world == 1:
        return part, [error] if error else []
    rows = -(-total // world)  # the largest share: rank 0's
    padded = torch.zeros((rows, part.shape[1]), dtype=torch.float32)
    padded[: len(part)] = torch.from_numpy(part)
    message = torch.zeros(2048, dtype=torch.uint8)
    raw = error.encode("utf-8")[:2048].decode("utf-8", "ignore").encode("utf-8")  # whole characters only
    if raw:
        message[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    all_rows = trainer.strategy.all_gather(padded.to(device)).cpu()  # (world, rows, K)
    all_messages = trainer.strategy.all_gather(message.to(device)).cpu()  # (world, 2048)
    probs = np.zeros((total, part.shape[1]), dtype=np.float32)
    for r in range(world):
        share = range(r, total, world)
        probs[list(share)] = all_rows[r, : len(share)].numpy()
    errors = [bytes(m.numpy()).rstrip(b"\0").decode("utf-8", "replace") for m in all_messages]
    return probs, [e for e in errors if e]
