"""Training speed: the real `defectscope train` app (Hydra + Lightning) against a plain PyTorch loop.

Both run in this process on the same composed config: same synthetic set and DataModule (bucket
batches, augmentation, workers), same model, optimiser, scheduler, loss and thread count.  The app
gets :class:`EpochTimer` through its own ``callbacks`` config group; validation, checkpoints, the
test pass and the logger are switched off so both sides do the same work.  Epoch 1 (worker and
allocator start-up) is left out of both rates.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from bench_common import REPO


class EpochTimer(Callback):
    """Wall time and image count of every training epoch, written to ``out`` as JSON after each."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.epochs: list[dict[str, float]] = []
        self._t0 = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = 0
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += int(batch["label"].numel())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._t0
        self.epochs.append({"epoch": trainer.current_epoch, "seconds": seconds, "images": self._images})
        self.out.write_text(json.dumps(self.epochs), encoding="utf-8")


def overrides(
    preset: str,
    model_cfg: dict[str, Any],
    workdir: Path,
    *,
    images: int,
    epochs: int,
    threads: int,
    quick: bool,
    timer_out: Path,
) -> list[str]:
    """Hydra overrides: experiment=synthetic with the chosen model, and nothing but training."""
    lo, hi = (64, 96) if quick else (96, 384)
    out = workdir / "train_run"
    o = [
        "experiment=synthetic",
        f"model={preset}",
        "logger=none",
        "callbacks=minimal",
        "callbacks.model_checkpoint.save_top_k=0",
        "callbacks.model_checkpoint.save_last=false",
        "test=false",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"threads={threads}",
        f"paths.data_dir={workdir}",
        f"paths.output_dir={out}",
        f"paths.launch_dir={out}",
        f"data.source.root={workdir / f'train_synth_{images}_{lo}_{hi}'}",
        f"data.source.n={images}",
        f"data.source.min_size={lo}",
        f"data.source.max_size={hi}",
        "finetune.freeze_epochs=0",
        "+callbacks.bench_epoch_timer._target_=bench_train.EpochTimer",
        f"+callbacks.bench_epoch_timer.out={timer_out}",
    ]
    if "weights" in model_cfg:
        o.append("model.weights=null")
    if quick:
        o += ["data.loader.size_multiple=32", "data.batch_size=16", "data.num_workers=0"]
        o += ["data.persistent_workers=false", "data.scan_workers=1"]
    return o


def compose(overrides_: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides_)


def steady_rate(epochs: list[dict[str, float]]) -> dict[str, Any]:
    """Images/s over epochs 2..N (all epochs when there is only one)."""
    timed = epochs[1:] if len(epochs) > 1 else epochs
    images = sum(e["images"] for e in timed)
    seconds = sum(e["seconds"] for e in timed)
    return {
        "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
        "timed_epochs": [int(e["epoch"]) + 1 for e in timed],
        "epoch_seconds": [round(e["seconds"], 3) for e in epochs],
        "images_per_epoch": int(timed[0]["images"]) if timed else 0,
    }


def run_app(cfg: Any, timer_out: Path) -> dict[str, Any]:
    """``defectscope.training.train.train(cfg)``: the function behind `defectscope train`."""
    from defectscope.training.train import train

    timer_out.unlink(missing_ok=True)
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        metrics = train(cfg)
    total = time.perf_counter() - t0
    epochs = json.loads(timer_out.read_text(encoding="utf-8"))
    logged = metrics.get("train/images_per_s")
    return {
        **steady_rate(epochs),
        "total_seconds": round(total, 1),
        "app_logged_images_per_s_last_epoch": round(float(logged), 2) if logged is not None else None,
    }


def run_plain(cfg: Any) -> dict[str, Any]:
    """The same training, written as the shortest honest PyTorch loop over the same DataModule."""
    from hydra.utils import instantiate

    from defectscope.models import create_model
    from defectscope.models.agc import adaptive_grad_clip, agc_parameters
    from defectscope.plain import to_plain
    from defectscope.training.config import lr_plan, use_memory_format
    from defectscope.training.optimization import build_optimizer, build_scheduler
    from defectscope.training.train import resolve_class_weights

    t_start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(int(cfg.threads))
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        spec = dict(to_plain(cfg.model))
        name = spec.pop("name")
        model = create_model(name, num_classes=len(dm.class_names), in_chans=int(dm.channels), **spec)
        use_memory_format(model, cfg.get("memory_format"))  # the app's layout
        optim = dict(to_plain(cfg.optim))
        optimizer = build_optimizer(optim["optimizer"], model, *lr_plan(to_plain(cfg.finetune)))
        loader = dm.train_dataloader()
        n_epochs = int(cfg.trainer.max_epochs)
        scheduler, interval = None, "step"
        sched_cfg = to_plain(cfg.get("scheduler")) or {}
        if "_target_" in sched_cfg:
            scheduler, interval = build_scheduler(sched_cfg, optimizer, len(loader) * n_epochs, n_epochs)
        weights = resolve_class_weights(cfg.loss.get("class_weights"), dm)
        weight = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        smoothing = float(cfg.loss.get("label_smoothing", 0.0) or 0.0)
        agc = optim.get("agc_clip")
        model.train()
        epochs: list[dict[str, float]] = []
        for epoch in range(n_epochs):
            loader.batch_sampler.set_epoch(epoch)
            images = 0
            t0 = time.perf_counter()
            for batch in loader:
                x, y = batch["image"], batch["label"]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).float(), y, weight=weight, label_smoothing=smoothing)
                loss.backward()
                if agc:
                    adaptive_grad_clip(agc_parameters(model), float(agc))
                optimizer.step()
                if scheduler is not None and interval == "step":
                    scheduler.step()
                images += int(y.numel())
            if scheduler is not None and interval == "epoch":
                scheduler.step()
            epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "images": images})
    finally:
        torch.set_num_threads(before)
    return {**steady_rate(epochs), "total_seconds": round(time.perf_counter() - t_start, 1)}


def run_train(
    preset: str,
    model_cfg: dict[str, Any],
    workdir: Path,
    *,
    images: int,
    epochs: int,
    threads: int,
    quick: bool,
) -> dict[str, Any]:
    """App and plain loop on one composed config; the ratio is app / plain steady-state images/s."""
    workdir.mkdir(parents=True, exist_ok=True)
    timer_out = workdir / "train_epochs.json"
    ov = overrides(
        preset,
        model_cfg,
        workdir,
        images=images,
        epochs=epochs,
        threads=threads,
        quick=quick,
        timer_out=timer_out,
    )
    cfg = compose(ov)
    app = run_app(cfg, timer_out)
    plain = run_plain(cfg)
    ratio = (
        app["images_per_s"] / plain["images_per_s"] if app["images_per_s"] and plain["images_per_s"] else None
    )
    return {
        "overrides": ov,
        "batch_size": int(cfg.data.batch_size),
        "num_workers": int(cfg.data.num_workers),
        "optimizer": str(cfg.optim.optimizer._target_),
        "scheduler": str(cfg.scheduler.get("_target_", "none")),
        "epochs": epochs,
        "app": app,
        "plain": plain,
        "ratio_app_vs_plain": round(ratio, 3) if ratio else None,
    }
