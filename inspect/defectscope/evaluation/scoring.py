"""Run a model over image files the way a line PC does: the runtime loader, batches of equal size.

Shared by export (re-deriving the threshold on the ONNX Runtime session of the graph it writes) and
``defectscope evaluate MODEL.onnx`` (auditing an exported model), so both see exactly the scores
``defectscope inspect`` would produce.  numpy/Pillow only; the model is a ``predict`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..runtime.image import ImageLoadError, LoaderConfig, load_image, normalize_batch

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Scored:
    """Class probabilities of the images that loaded (``index`` into the given paths) and the failures."""

    probs: np.ndarray
    index: list[int]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, "kind: reason")

    def not_finite(self, paths: Sequence[str], model: str) -> str | None:
        """Why these scores cannot be used (a NaN would read as OK or sort as caught), or None."""
        broken = [paths[i] for i, row in zip(self.index, self.probs) if not np.isfinite(row).all()]
        if not broken:
            return None
        return (
            f"{model} gave probabilities that are not finite (NaN or infinite) for {len(broken)} of "
            f"{len(self.index)} images, e.g. {broken[0]}: its graph or preprocessing is broken"
        )


def score_paths(
    predict: Predict,
    paths: Sequence[str],
    loader: LoaderConfig,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 16,
) -> Scored:
    """``predict`` (NCHW float32 -> N x classes probabilities) over every readable image of ``paths``.

    Images are decoded one at a time and batched by size; a batch runs as soon as it is full, so
    memory holds at most one pending batch per distinct size.
    """
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    index: list[int] = []
    chunks: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []

    def run(group: list[tuple[int, np.ndarray]]) -> None:
        index.extend(i for i, _ in group)
        batch = normalize_batch([a for _, a in group], mean, std)
        chunks.append(np.asarray(predict(batch), dtype=np.float64))

    for i, path in enumerate(paths):
        try:
            arr = load_image(path, loader)
        except ImageLoadError as exc:
            failed.append((str(path), f"{exc.kind}: {exc.reason}"))
            continue
        group = pending.setdefault(arr.shape, [])
        group.append((i, arr))
        if len(group) >= batch_size:
            run(pending.pop(arr.shape))
    for group in pending.values():
        run(group)
    probs = np.concatenate(chunks) if chunks else np.zeros((0, 0))
    order = np.argsort(index, kind="stable")
    return Scored(probs[order] if len(index) else probs, sorted(index), failed)
