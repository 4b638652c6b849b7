"""Weight averaging as a training callback: the averaged weights are the model that ships.

``kind: ema`` keeps an exponential moving average of the network's weights (``decay`` per optimizer
step); ``kind: swa`` an equal-weight average of every step's weights.  Both start at ``start_epoch``
(until then the average follows the weights) and include the BatchNorm statistics, so the averaged
network needs no extra pass over the data.

The average is what everything after a step sees: validation runs on it (so the threshold, the cut
points and the best-checkpoint choice are the averaged model's), ``best.ckpt`` and ``last.ckpt`` hold
it as their weights (so test, ``evaluate`` and ``export`` use it without knowing), and the trained
module ends with it.  The raw weights ride along in the checkpoint under ``weight_average`` for
``ckpt_path=last`` to resume from.  Plain tensors only: checkpoints still load with weights_only.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from .config import TrainingConfigError, config_number

KINDS = ("ema", "swa")
STATE_KEY = "weight_average"
PREFIX = "model."


class WeightAverage(Callback):
    """EMA or SWA of ``pl_module.model``; see the module docstring for what uses the average."""

    def __init__(self, kind: str = "ema", decay: float = 0.99, start_epoch: int = 0) -> None:
        if kind not in KINDS:
            raise TrainingConfigError(
                f"callbacks.weight_average.kind must be one of {', '.join(KINDS)}, got {kind!r}"
            )
        config_number(decay, "callbacks.weight_average.decay", "a number in (0, 1)", lambda x: 0.0 < x < 1.0)
        config_number(
            start_epoch,
            "callbacks.weight_average.start_epoch",
            "a whole number >= 0",
            lambda x: x >= 0,
            whole=True,
        )
        self.kind = kind
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self.averaged: dict[str, torch.Tensor] | None = None
        self.count = 0  # updates folded into the average since start_epoch
        self._raw: dict[str, torch.Tensor] | None = None  # the training weights while validation runs

    # ---------------------------------------------------------------- the average

    @staticmethod
    def _live(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The network's parameters and buffers, by name (the tensors themselves, for in-place copies)."""
        model: Any = pl_module.model
        return dict(model.state_dict(keep_vars=True))

    def _ensure(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        if self.averaged is None:
            self.averaged = {k: v.detach().clone() for k, v in self._live(pl_module).items()}
        return self.averaged

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, epoch: int) -> None:
        """Fold the current weights in (before ``start_epoch``: follow them)."""
        avg = self._ensure(pl_module)
        follow = epoch < self.start_epoch
        for name, value in self._live(pl_module).items():
            target, current = avg[name], value.detach()
            if follow or not target.is_floating_point():
                target.copy_(current)
            elif self.kind == "ema":
                target.lerp_(current, 1.0 - self.decay)
            else:
                target.add_(current - target, alpha=1.0 / (self.count + 1))
        if not follow:
            self.count += 1

    @torch.no_grad()
    def _swap(self, pl_module: pl.LightningModule) -> None:
        avg = self._ensure(pl_module)
        for name, value in self._live(pl_module).items():
            held = value.detach().clone()
            value.data.copy_(avg[name])
            avg[name].copy_(held)

    # ---------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.update(pl_module, trainer.current_epoch)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._raw is None:
            self._swap(pl_module)  # the average in the model, the raw weights in self.averaged
            self._raw = self.averaged

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._raw is not None:
            self._swap(pl_module)
            self._raw = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trained module ends with the averaged weights."""
        if self.averaged is not None:
            with torch.no_grad():
                for name, value in self._live(pl_module).items():
                    value.data.copy_(self.averaged[name])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's weights are the average; the raw ones are kept for resuming."""
        if self.averaged is None or self._raw is not None:
            return
        state = checkpoint["state_dict"]
        raw = {k[len(PREFIX) :]: state[k] for k in list(state) if k.startswith(PREFIX)}
        for name, value in self.averaged.items():
            state[PREFIX + name] = value.detach().clone()
        checkpoint[STATE_KEY] = {"kind": self.kind, "count": self.count, "raw": raw}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming a fit: the average from the weights, the training weights from ``raw``."""
        saved = checkpoint.get(STATE_KEY)
        if trainer.state.fn != TrainerFn.FITTING or not isinstance(saved, dict):
            return
        state = checkpoint["state_dict"]
        self.averaged = {
            k[len(PREFIX) :]: v.detach().clone() for k, v in state.items() if k.startswith(PREFIX)
        }
        self.count = int(saved.get("count", 0))
        with torch.no_grad():
            live = self._live(pl_module)
            for name, value in saved["raw"].items():
                live[name].data.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "decay": self.decay, "start_epoch": self.start_epoch}
