"""Shift consistency: does a model give the same answer when the part sits a few pixels elsewhere?

A CNN that ends in global average pooling is meant to find a defect wherever it lies, but strided
layers alias (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again") and zero padding
tells a network where the border is, so moving an image by a few pixels can change its answer.

Protocol (one rule, used by the PyTorch test stage and by any ONNX Runtime evaluation alike):

1. Offsets: ``copies`` distinct offsets (dy, dx) ≠ (0, 0), drawn once with
   ``numpy.random.default_rng(seed)`` uniformly from the integers in [−max_shift, max_shift]²;
   every image gets the same offsets.  ``max_shift`` defaults to the model's total stride, so
   every sub-stride phase of the feature grid can be hit.
2. Translated copy: the preprocessed image (C, H, W) is padded by |dy| rows and |dx| columns on
   every side (``padding``: ``reflect`` by default, so the surface continues instead of a border
   appearing; ``replicate`` repeats the edge pixel, ``zeros`` fills with 0, the mean after
   normalisation) and cropped back to H × W so that its content moves by dy rows
   down and dx columns right.  The size stays the image's own, so it is valid for the model;
   |dy| rows and |dx| columns of the far side leave the frame.
3. The model's class probabilities of the image and of each copy give, per image: the original's
   top-1 class and P(defect) (the NG classes' summed probability, the runtime's one rule in
   :mod:`defectscope.runtime.decision`), and those of every copy.
4. Figures (over N images and K copies):

   * ``top1_consistency``: share of images whose top-1 class is the same in all K copies;
   * ``pair_consistency``: share of (image, copy) pairs with the same top-1 (Zhang's per-pair figure);
   * ``dp_mean`` / ``dp_max``: mean and maximum over pairs of |P(defect, copy) − P(defect, image)|;
   * ``verdict_flip_rate``: share of images whose OK/NG verdict (:func:`~defectscope.runtime.decision.is_ng`) differs
     in at least one copy.

numpy only (no torch), so the line runtime and the training side share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .runtime.decision import defect_probability, is_ng

#: (N, C, H, W) float32 preprocessed batch -> (N, num_classes) class probabilities
PredictFn = Callable[[np.ndarray], np.ndarray]
#: fill of the uncovered strip -> numpy.pad mode (names as the models' padding_mode)
PADDINGS = {"reflect": "reflect", "replicate": "edge", "zeros": "constant"}
FIGURES = ("top1_consistency", "pair_consistency", "dp_mean", "dp_max", "verdict_flip_rate")


@dataclass(frozen=True)
class ShiftProtocol:
    """How many translated copies, how far (pixels), which RNG seed and which fill (see module doc)."""

    copies: int = 8
    max_shift: int = 32
    seed: int = 0
    padding: str = "reflect"

    def __post_init__(self) -> None:
        for key in ("copies", "max_shift", "seed"):
            value = getattr(self, key)
            least = 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"shift_consistency.{key} must be an integer >= {least}, got {value!r}")
        if self.copies > (2 * self.max_shift + 1) ** 2 - 1:
            raise ValueError(
                f"shift_consistency.copies={self.copies}: only {(2 * self.max_shift + 1) ** 2 - 1} distinct "
                f"offsets lie within max_shift={self.max_shift}"
            )
        if self.padding not in PADDINGS:
            raise ValueError(
                f"shift_consistency.padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}"
            )

    def offsets(self) -> list[tuple[int, int]]:
        """The ``copies`` distinct non-zero (dy, dx), the same for every image and every runtime."""
        rng = np.random.default_rng(self.seed)
        chosen: list[tuple[int, int]] = []
        while len(chosen) < self.copies:
            dy, dx = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, size=2))
            if (dy, dx) != (0, 0) and (dy, dx) not in chosen:
                chosen.append((dy, dx))
        return chosen


def translate(batch: np.ndarray, dy: int, dx: int, padding: str = "reflect") -> np.ndarray:
    """(N, C, H, W) with its content moved ``dy`` rows down and ``dx`` columns right; size kept."""
    _, _, h, w = batch.shape
    py, px = abs(dy), abs(dx)
    mode = PADDINGS[padding]
    padded = np.pad(batch, ((0, 0), (0, 0), (py, py), (px, px)), mode=mode)  # type: ignore[call-overload]
    return np.ascontiguousarray(padded[:, :, py - dy : py - dy + h, px - dx : px - dx + w])


@dataclass
class ShiftRecord:
    """Per image: the original's top-1 and P(defect) (N,), and each copy's (N, K)."""

    top1: np.ndarray
    p_defect: np.ndarray
    top1_copies: np.ndarray
    p_defect_copies: np.ndarray

    @classmethod
    def concat(cls, records: Sequence[ShiftRecord]) -> ShiftRecord:
        return cls(*(np.concatenate([getattr(r, f) for r in records]) for f in cls.__dataclass_fields__))


def measure(
    predict: PredictFn, batch: np.ndarray, ng_indices: Sequence[int], protocol: ShiftProtocol
) -> ShiftRecord:
    """Run ``predict`` on a batch and on its translated copies (step 2 and 3 of the protocol)."""
    x = np.asarray(batch, dtype=np.float32)
    probs = np.asarray(predict(x), dtype=np.float64)
    copies = [
        np.asarray(predict(translate(x, dy, dx, protocol.padding)), dtype=np.float64)
        for dy, dx in protocol.offsets()
    ]
    stacked = np.stack(copies, axis=1)  # (N, K, classes)
    return ShiftRecord(
        top1=probs.argmax(axis=1),
        p_defect=defect_probability(probs, ng_indices),
        top1_copies=stacked.argmax(axis=2),
        p_defect_copies=defect_probability(stacked.reshape(-1, stacked.shape[2]), ng_indices).reshape(
            stacked.shape[:2]
        ),
    )


def summarise(record: ShiftRecord, threshold: float) -> dict[str, float]:
    """The figures of step 4 (empty dict for no images)."""
    if len(record.top1) == 0:
        return {}
    same = record.top1_copies == record.top1[:, None]
    dp = np.abs(record.p_defect_copies - record.p_defect[:, None])
    ng = is_ng(record.p_defect, threshold)
    ng_copies = is_ng(record.p_defect_copies, threshold)
    return {
        "top1_consistency": float(same.all(axis=1).mean()),
        "pair_consistency": float(same.mean()),
        "dp_mean": float(dp.mean()),
        "dp_max": float(dp.max()),
        "verdict_flip_rate": float((ng_copies != ng[:, None]).any(axis=1).mean()),
    }
