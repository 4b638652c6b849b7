"""Multi-scale training (``data.multi_scale``): each training batch resized by a factor drawn per batch.

The networks end in global average pooling, so one model takes any size; training at a few scales
around the line's own teaches it defects a little larger and smaller than the training images show
them, a regulariser that costs no extra images.  Validation and test (where the threshold and the cut
points are earned) and the exported model's preprocessing are untouched: the line PC sees the loader's
size, as validation does.

The factor is drawn from the configured list with a generator keyed on ``(seed, epoch, the batch's
first index)``, so a run and its resume draw the same scales.  Sides are rounded to the loader's
``size_multiple`` (the bucket grid) and never fall below it.  Downscaling is antialiased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def scaled_size(size: tuple[int, int], factor: float, multiple: int) -> tuple[int, int]:
    """(h, w) times ``factor``, each side rounded (half up) to ``multiple`` and at least ``multiple``."""
    step = max(int(multiple), 1)
    return tuple(max(step, math.floor(side * factor / step + 0.5) * step) for side in size)  # type: ignore[return-value]


def draw_scale(scales: Sequence[float], seed: int, epoch: int, first_index: int) -> float:
    """The factor of one batch: reproducible from the seed, the epoch and the batch's first image."""
    rng = np.random.default_rng([int(seed), int(epoch), int(first_index), 2])
    return float(scales[int(rng.integers(0, len(scales)))])


def rescale_batch(batch: dict[str, Any], factor: float, multiple: int) -> dict[str, Any]:
    """``batch["image"]`` (N, C, H, W) resized by ``factor`` (bilinear); the other entries unchanged."""
    images: torch.Tensor = batch["image"]
    h, w = int(images.shape[-2]), int(images.shape[-1])
    size = scaled_size((h, w), factor, multiple)
    if size == (h, w):
        return batch
    resized = F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h or size[1] < w
    )
    return {**batch, "image": resized}
