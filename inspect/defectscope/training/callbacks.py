"""Training callbacks: the configured ones (conf/callbacks/) plus those the training code adds itself.

* :class:`BackboneWarmup`: train only the head for ``finetune.freeze_epochs`` epochs (pretrained
  backbones are not wrecked by the random head's first gradients), with backbone BatchNorm frozen.
* :class:`IndexDump`: ``debug.dump_indices=true`` writes the sample indices each rank trained on,
  per epoch, so a DDP run can be checked for disjoint shards.
* :class:`FiniteWeights`: ends a run whose weights turned NaN or infinite, before it validates or saves them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from .config import TrainingConfigError
from .targets import build_error, check_target_class


class BackboneWarmup(Callback):
    """Frozen backbone (head-only training) for the first ``freeze_epochs`` epochs, then unfrozen."""

    def __init__(self, freeze_epochs: int, bn_eval: bool = True) -> None:
        self.freeze_epochs = int(freeze_epochs)
        self.bn_eval = bool(bn_eval)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from defectscope.models.finetune import freeze_backbone

        model = pl_module.model
        assert isinstance(model, torch.nn.Module)
        freeze = trainer.current_epoch < self.freeze_epochs
        freeze_backbone(model, freeze, self.bn_eval)
        if freeze and self.bn_eval:
            from defectscope.models.finetune import set_bn_eval

            set_bn_eval(model)  # Lightning put the module in train mode just before this hook


class IndexDump(Callback):
    """Writes ``<out_dir>/train_indices_rank<r>_epoch<e>.json``: the dataset indices this rank saw."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._seen: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._seen.extend(int(i) for i in batch["index"].tolist())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"train_indices_rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        path.write_text(
            json.dumps(
                {
                    "rank": trainer.global_rank,
                    "world_size": trainer.world_size,
                    "epoch": trainer.current_epoch,
                    "indices": self._seen,
                }
            )
        )


def build_callbacks(
    callbacks_cfg: Mapping[str, Any] | None,
    *,
    freeze_epochs: int,
    bn_eval: bool,
    dump_dir: str | None,
    has_logger: bool = True,
    validation: bool = True,
    optimized_metric: str | None = None,
) -> list[Callback]:
    """Instantiate ``callbacks.*`` (entries set to null are skipped) and add the code-owned ones.

    Without a logger (logger=none) callbacks that only log (LearningRateMonitor) are left out. Without
    validation (``validation=False``) a callback watching a ``val/`` metric is refused now: Lightning
    would stop on it with a traceback after the first epoch. The metrics the callbacks and
    ``optimized_metric`` watch are checked before the first epoch (:class:`MonitoredNames`).
    """
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor

    out: list[Callback] = []
    watched: dict[str, str] = {}
    for key, spec in (callbacks_cfg or {}).items():
        if spec is None:
            continue
        callback = _configured_callback(key, spec)
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            continue
        watches = isinstance(callback, EarlyStopping) or (
            isinstance(callback, ModelCheckpoint) and callback.save_top_k != 0
        )
        monitor = str(getattr(callback, "monitor", None) or "")
        if not validation and watches and monitor.startswith("val/"):
            fix = (
                "=null"
                if isinstance(callback, EarlyStopping)
                else ".save_top_k=0 (last.ckpt is still written)"
            )
            raise TrainingConfigError(
                f"callbacks.{key} watches {monitor}, but trainer.limit_val_batches=0 runs no validation: "
                f"set callbacks.{key}{fix}, or let validation run"
            )
        if watches and monitor:
            watched[f"callbacks.{key}.monitor"] = monitor
        out.append(callback)
    if optimized_metric and optimized_metric.startswith("val/"):
        watched["optimized_metric"] = optimized_metric
    out.insert(0, MonitoredNames(watched))  # first: before a checkpoint looks for its metric
    if not any(isinstance(cb, ModelCheckpoint) for cb in out):
        raise TrainingConfigError(
            "callbacks: no ModelCheckpoint configured; training needs one (best.ckpt is tested, exported "
            "and logged; last.ckpt is what ckpt_path=last resumes) - see conf/callbacks/default.yaml"
        )
    if freeze_epochs > 0:
        out.append(BackboneWarmup(freeze_epochs, bn_eval))
    if dump_dir is not None:
        out.append(IndexDump(dump_dir))
    return out


def _configured_callback(key: str, spec: Any) -> Callback:
    """``callbacks.KEY`` built, when its ``_target_`` is a Lightning callback class: a function named there
    (``os.makedirs``) is refused before it is called, and a wrong argument is one line naming the key."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise TrainingConfigError(f"callbacks.{key}: expected a mapping with _target_, got {spec!r}")
    check_target_class(spec["_target_"], f"callbacks.{key}", (Callback,), "a Lightning Callback class", spec)
    try:
        return instantiate(spec)
    except Exception as exc:
        raise build_error(f"callbacks.{key}", exc) from None


class UnloggedMetricError(TrainingConfigError):
    """A watched metric that the run does not log; ``name`` and the ``logged`` ones, for a caller's own words."""

    def __init__(self, message: str, name: str, logged: list[str]) -> None:
        super().__init__(message)
        self.name, self.logged = name, logged


class MonitoredNames(Callback):
    """Every metric a setting watches (``callbacks.*.monitor``, ``optimized_metric``) is one this run logs.
    Checked on the sanity check's metrics, before the first epoch; a figure that needs good and defect
    images in the batches seen (:data:`~defectscope.evaluation.metrics.BOTH_KINDS_METRICS`) waits for the
    first whole validation, before a checkpoint looks. A misspelt name failed only after an epoch, or after
    the whole run."""

    def __init__(self, watched: Mapping[str, str]) -> None:
        self.watched = dict(watched)
        self.checked = False

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, whole=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, whole=True)

    def _check(self, trainer: pl.Trainer, whole: bool) -> None:
        from defectscope.evaluation.metrics import BOTH_KINDS_METRICS

        from ..hints import did_you_mean

        logged = sorted(str(k) for k in trainer.callback_metrics if str(k).startswith("val/"))
        if self.checked or not logged:
            return
        for key, name in self.watched.items():
            may_wait = not whole and name.removeprefix("val/") in BOTH_KINDS_METRICS
            if name.startswith("val/") and name not in logged and not may_wait:
                hint = did_you_mean(name, logged) or f"; logged: {', '.join(logged)}"
                raise UnloggedMetricError(f"{key}={name}: this run logs no such metric{hint}", name, logged)
        self.checked = whole


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is rewritten after every epoch, not only after an improvement.

    Lightning 2.6 writes last.ckpt only in an epoch that also wrote a top-k file, so a run killed after
    some epochs without improvement resumed from the last improvement and trained (and logged) those
    epochs again. The extra save runs at the end of each training epoch (after its validation, if any,
    so also with ``check_val_every_n_epoch`` > 1) and only for ``save_last: true``; ``"link"`` keeps
    Lightning's behaviour. The state key stays ModelCheckpoint's, so checkpoints of either class resume.
    """

    @property
    def state_key(self) -> str:
        return ModelCheckpoint.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        due = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if self.save_last is True and due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint:
    cb = trainer.checkpoint_callback
    if not isinstance(cb, ModelCheckpoint):
        raise TrainingConfigError("callbacks: no ModelCheckpoint configured")
    return cb


class Throughput(Callback):
    """Logs ``train/images_per_s``: training images per second of the epoch's training batches
    (data loading included, validation excluded), summed over ranks."""

    def __init__(self) -> None:
        self._images = 0
        self._seconds = 0.0
        self._t = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._seconds, self._t = 0, 0.0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._seconds += now - self._t
        self._t = now
        self._images += int(batch["label"].numel())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t += time.perf_counter() - getattr(self, "_pause", time.perf_counter())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seconds > 0:
            rate = self._images / self._seconds
            pl_module.log("train/images_per_s", rate, on_epoch=True, sync_dist=True, reduce_fx="sum")


class TrainingDivergedError(RuntimeError):
    """The weights became NaN or infinite: every later step, checkpoint and threshold would be worthless."""


class FiniteWeights(Callback):
    """Ends a diverged run at the first validation (or epoch end) after it happened, before the broken
    weights are validated or checkpointed; the checkpoints written before stay.

    One look per epoch at every floating tensor of the module's state (the weights, and the BatchNorm
    statistics a skipped mixed-precision step still updates): milliseconds, against a run that would
    otherwise train on for hours and end with "threshold: nan is not a finite number".  Under DDP the
    ranks decide together, so none waits for a rank that stopped.
    """

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bad = [
            name
            for name, t in pl_module.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            what = (
                f"{len(bad)} weight tensor(s) are NaN or infinite (first: {bad[0]})"
                if bad
                else ("the weights of another process are NaN or infinite")
            )
            raise TrainingDivergedError(
                f"training diverged in epoch {trainer.current_epoch}: {what}; lower optim.optimizer.lr (or "
                "optim.sam_rho) and start again: the checkpoints written before this epoch are kept"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)
