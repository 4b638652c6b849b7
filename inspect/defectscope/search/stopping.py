"""Early stopping for a two-objective search, which Optuna's pruners cannot do.

Optuna prunes single-objective studies only: a pruner ranks trials by one reported value. Here the
second objective, latency, does not depend on training at all: it is measured on the exported graph
before the first step. So at each rung epoch a trial can be judged on both objectives at once:

    stop trial T at rung e if a finished trial F measured no slower (latency_F <= latency_T) and had
    a better best-so-far validation metric at the same epoch (by more than ``min_delta``).

T then finishes normally with its best checkpoint so far, and its (honest, shorter-trained) values
are recorded. Because F's final metric is the best over all its epochs, it is at least F's value at
rung e, so F dominates T's recorded result too: a stopped trial never enters the Pareto front, and
the training time it would have spent goes to the next trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..hints import did_you_mean
from ..runtime.interrupts import check_interrupt
from .errors import SearchConfigError

log = logging.getLogger(__name__)

#: (latency_ms, curve) of each finished trial; a curve is [[epoch, best-so-far metric], ...]
Peers = Callable[[], Sequence[tuple[float, Sequence[Sequence[float]]]]]


def value_at(curve: Sequence[Sequence[float]], epoch: int) -> float | None:
    """Best-so-far metric at ``epoch`` (the last validation at or before it), None if none yet."""
    known = [v for e, v in curve if e <= epoch]
    return known[-1] if known else None


def dominated_by(
    latency: float,
    best: float,
    epoch: int,
    peers: Sequence[tuple[float, Sequence[Sequence[float]]]],
    *,
    maximize: bool,
    min_delta: float,
) -> tuple[float, float] | None:
    """The first finished trial (latency, metric at ``epoch``) that dominates, or None."""
    for peer_latency, curve in peers:
        peer = value_at(curve, epoch)
        if peer is None or max(e for e, _ in curve) < epoch or peer_latency > latency:
            continue
        better = peer - best > min_delta if maximize else best - peer > min_delta
        if better:
            return peer_latency, peer
    return None


class TrialMonitor(Callback):
    """Records a trial's best-so-far validation curve and stops it at a rung when it is dominated."""

    def __init__(
        self,
        metric: str,
        *,
        maximize: bool,
        latency_ms: float | None,
        rungs: Sequence[int],
        min_delta: float,
        peers: Peers,
    ) -> None:
        self.metric = metric
        self.maximize = maximize
        self.latency_ms = latency_ms
        self.rungs = set(rungs)
        self.min_delta = min_delta
        self.peers = peers
        self.curve: list[list[float]] = []
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self.best_score: float | None = None
        self.best_path: str | None = None
        self.interrupted = False

    def unlogged(self, logged: Iterable[str]) -> str:
        """The one line for a ``search.metric`` that training does not log."""
        names = sorted(logged)
        hint = did_you_mean(self.metric, names)
        return f"search.metric: training logs no {self.metric!r}{hint}; its validation metrics are {', '.join(names)}"

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        check_interrupt()  # a SIGTERM whose KeyboardInterrupt a garbage collector's callback swallowed

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.metric not in trainer.callback_metrics:  # a misspelt search.metric: no trial could score
            raise SearchConfigError(
                self.unlogged(k for k in trainer.callback_metrics if k.startswith("val/"))
            )
        value = float(trainer.callback_metrics[self.metric])
        best = value
        if self.curve:
            prev = self.curve[-1][1]
            best = max(prev, value) if self.maximize else min(prev, value)
        epoch = int(trainer.current_epoch) + 1
        if self.curve and self.curve[-1][0] == epoch:
            self.curve[-1] = [epoch, best]
        else:
            self.curve.append([epoch, best])
        last_epoch = int(trainer.max_epochs or 0)
        if self.latency_ms is None or epoch not in self.rungs or epoch >= last_epoch:
            return
        hit = dominated_by(
            self.latency_ms, best, epoch, self.peers(), maximize=self.maximize, min_delta=self.min_delta
        )
        if hit is not None:
            trainer.should_stop = True
            self.stopped_at = epoch
            self.stop_reason = (
                f"stopped at epoch {epoch}: a finished trial measured {hit[0]:.3f} ms <= {self.latency_ms:.3f} ms "
                f"and had {self.metric} {hit[1]:.4f} against {best:.4f} at that epoch"
            )
            log.info("trial %s", self.stop_reason)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        score = getattr(cb, "best_model_score", None)
        self.best_score = None if score is None else float(score)
        self.best_path = getattr(cb, "best_model_path", None) or None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Ctrl+C, or SIGTERM: Lightning's own handler ends the fit with SIGTERMException (a SystemExit, code 0)
        self.interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)

    def record(self) -> dict[str, Any]:
        return {"curve": self.curve, "stopped_at_epoch": self.stopped_at, "stop_reason": self.stop_reason}
