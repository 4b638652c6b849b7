"""Weight averaging: the averaged weights (EMA by hand over the recorded steps) are the ones validation
sees, the checkpoint holds and export writes; the raw weights ride along only for resuming."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from defectscope.training.averaging import WeightAverage
from defectscope.training.config import TrainingConfigError
from defectscope.training.train import build_module

DECAY = 0.6


class Recorder(Callback):
    """The network's weights after every optimizer step, and what validation ran on."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.steps.append((trainer.current_epoch, state))

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.validated.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


def _ema_by_hand(start: dict[str, torch.Tensor], steps: list[tuple[int, dict[str, torch.Tensor]]]) -> dict:
    avg = {k: v.clone() for k, v in start.items()}
    for epoch, state in steps:
        for k, v in state.items():
            follow = epoch < 1 or not v.is_floating_point()  # start_epoch=1: follow until then
            avg[k] = v.clone() if follow else DECAY * avg[k] + (1 - DECAY) * v
    return avg


def test_averaged_weights_are_validated_checkpointed_and_exported(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    from defectscope.checkpoint import load_checkpoint
    from defectscope.export.onnx_export import export_model
    from defectscope.runtime.inspector import Inspector

    cfg = compose_train(
        [
            "experiment=smoke",
            f"paths.data_dir={smoke_data_dir}",
            f"paths.output_dir={tmp_path}",
            "logger=none",
            "paths.launch_dir=.",
        ]
    )
    pl.seed_everything(0)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    average, recorder = WeightAverage("ema", decay=DECAY, start_epoch=1), Recorder()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", filename="latest")  # no monitor: every epoch
    trainer = pl.Trainer(  # a 3-epoch schedule stopped after 2, so that resuming has one epoch left
        max_epochs=3, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[average, recorder, ckpt_cb, StopAfter(2)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)

    want = _ema_by_hand(start, recorder.steps)
    raw_last = recorder.steps[-1][1]
    key = "features.stage0.conv0.conv.weight"
    assert not torch.allclose(want[key], raw_last[key])  # the average really differs from the weights
    for k in want:  # validation ran on the average (after epoch 1: the average of epoch 1's steps)
        torch.testing.assert_close(recorder.validated[-1][k], want[k].to(recorder.validated[-1][k].dtype))
        torch.testing.assert_close(
            module.model.state_dict()[k], want[k].to(raw_last[k].dtype)
        )  # ends averaged

    last = torch.load(tmp_path / "ck" / "latest.ckpt", map_location="cpu", weights_only=True)
    for k in want:
        torch.testing.assert_close(last["state_dict"]["model." + k], want[k].to(raw_last[k].dtype))
        torch.testing.assert_close(last["weight_average"]["raw"][k], raw_last[k])
    assert last["weight_average"]["count"] == 3  # epoch 1's three steps

    exported, info = load_checkpoint(tmp_path / "ck" / "latest.ckpt")
    result = export_model(exported, info, tmp_path / "m.onnx", log=lambda _: None)
    raw_model, _ = load_checkpoint(tmp_path / "ck" / "latest.ckpt")
    raw_model.load_state_dict(raw_last)
    x = np.random.default_rng(0).standard_normal((2, 1, 64, 96)).astype(np.float32)
    got = Inspector(result.path, provider="cpu", threads=1).predict(x, cam=False)["probs"]
    with torch.inference_mode():
        avg_probs = exported(torch.from_numpy(x)).softmax(1).numpy()
        raw_probs = raw_model(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_allclose(got, avg_probs, atol=1e-4)
    assert np.abs(got - raw_probs).max() > 1e-3

    # resuming goes on from the raw weights, with the average restored beside them
    resumed, seen = WeightAverage("ema", decay=DECAY, start_epoch=1), Recorder()
    seen.on_train_epoch_start = lambda trainer, pl_module: seen.validated.append(  # type: ignore[method-assign]
        {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
    )
    again = pl.Trainer(
        max_epochs=3, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed, seen],
    )  # fmt: skip
    again.fit(build_module(cfg, dm), datamodule=dm, ckpt_path=str(tmp_path / "ck" / "latest.ckpt"))
    torch.testing.assert_close(seen.validated[0][key], raw_last[key])
    assert len(seen.steps) == 3 and resumed.count == 6


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(TrainingConfigError, match=r"weight_average\.kind must be one of ema, swa"):
        WeightAverage("mean")
    with pytest.raises(
        TrainingConfigError, match=r"weight_average\.decay must be a number in \(0, 1\), got 1\.0"
    ):
        WeightAverage("ema", decay=1.0)
    # words and fractions: a bare float() message, or a silently truncated epoch, before
    with pytest.raises(
        TrainingConfigError, match=r"weight_average\.decay must be a number in \(0, 1\), got 'abc'"
    ):
        WeightAverage("ema", decay="abc")  # type: ignore[arg-type]
    with pytest.raises(
        TrainingConfigError, match=r"weight_average\.start_epoch must be a whole number >= 0, got 1\.7"
    ):
        WeightAverage("ema", start_epoch=1.7)  # type: ignore[arg-type]
