"""Multi-scale training (``data.multi_scale``): training batches resized by a factor drawn per batch,
validation and the exported loader untouched, config mistakes named before any work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Callback

from defectscope.data.multiscale import draw_scale, rescale_batch, scaled_size
from defectscope.data.settings import check_scales
from defectscope.training.train import train


def test_scaled_sizes_stay_on_the_bucket_grid() -> None:
    assert scaled_size((64, 96), 1.25, 32) == (96, 128)  # 80 = 2.5 steps -> 3 (half up), 120 -> 128
    assert scaled_size((64, 96), 0.75, 32) == (64, 64)  # 48 = 1.5 steps -> 2, 72 -> 64
    assert scaled_size((224, 224), 0.75, 32) == (160, 160)  # 168 = 5.25 steps -> 5
    assert scaled_size((32, 32), 0.25, 32) == (32, 32)  # never below one grid step
    batch = {"image": torch.randn(3, 1, 64, 96), "label": torch.tensor([0, 1, 0])}
    out = rescale_batch(batch, 1.5, 32)
    assert out["image"].shape == (3, 1, 96, 160) and out["label"] is batch["label"]
    assert rescale_batch(batch, 1.0, 32) is batch
    flat = {"image": torch.full((2, 1, 64, 64), 0.5)}
    torch.testing.assert_close(rescale_batch(flat, 0.5, 32)["image"], torch.full((2, 1, 32, 32), 0.5))


def test_scales_are_drawn_reproducibly_from_the_list() -> None:
    scales = (0.75, 1.0, 1.25)
    draws = [draw_scale(scales, 7, epoch, first) for epoch in range(4) for first in range(30)]
    assert set(draws) == set(scales)
    assert draws == [draw_scale(scales, 7, epoch, first) for epoch in range(4) for first in range(30)]
    assert draws != [draw_scale(scales, 8, epoch, first) for epoch in range(4) for first in range(30)]


@pytest.mark.parametrize("value", ["1.0", [], [0], [1.0, -1], [float("nan")], [5], [True], {"a": 1}])
def test_bad_scale_lists_are_refused_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError, match=r"data\.multi_scale must be null or a non-empty list"):
        check_scales(value)
    assert check_scales(None) == () and check_scales([1, 0.5]) == (1.0, 0.5)


class BatchShapes(Callback):
    """The image sizes each stage's batches reach the model with."""

    def __init__(self) -> None:
        self.seen: dict[str, set[tuple[int, int]]] = {"train": set(), "val": set()}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.seen["train"].add(tuple(batch["image"].shape[-2:]))

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.seen["val"].add(tuple(batch["image"].shape[-2:]))


def train_smoke_recording_shapes(
    compose_train: Callable[..., Any], data_dir: Path, out_dir: Path, epochs: int, *overrides: str
) -> tuple[BatchShapes, dict[str, float]]:
    """experiment=smoke trained for ``epochs`` with ``overrides``: the batch sizes seen, and the metrics."""
    shapes = BatchShapes()
    cfg = compose_train(
        [
            "experiment=smoke", "logger=none", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
            *overrides, f"paths.data_dir={data_dir}", f"paths.output_dir={out_dir}", "paths.launch_dir=.",
        ]
    )  # fmt: skip
    return shapes, train(cfg, extra_callbacks=[shapes])


def test_training_sees_the_scales_and_validation_the_loader_size(
    compose_train: Callable[..., Any], smoke_data_dir: Path, tmp_path: Path
) -> None:
    shapes, metrics = train_smoke_recording_shapes(
        compose_train, smoke_data_dir, tmp_path, 2, "data.multi_scale=[0.5,1.5]"
    )
    native = {(64, 64), (64, 96), (96, 64), (96, 96)}  # the smoke set's size buckets
    assert shapes.seen["val"] <= native
    halves = {(32, 32), (32, 64), (64, 32), (64, 64)}  # sides x 0.5 on the 32 px grid (48 -> 64)
    three_halves = {(96, 96), (96, 160), (160, 96), (160, 160)}  # x 1.5 (144 -> 160)
    assert shapes.seen["train"] <= halves | three_halves
    assert shapes.seen["train"] & (halves - native) and shapes.seen["train"] & (three_halves - native)
    assert "test/acc" in metrics
    info = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert info["defectscope"]["loader"]["max_side"] is None  # the exported loader is not scaled
