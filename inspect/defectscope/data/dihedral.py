"""90° rotations, transposes and flips in training (``data.dihedral: true``) without mixing sizes.

The 8 symmetries of a square (the dihedral group D4) are the identity and the 7 extra views of the
runtime's ``dihedral`` test-time option (:data:`defectscope.runtime.metadata.TTA_VIEWS`), so training
and the exported model's test-time views draw from one table.  Half of them transpose the image, which
turns an H x W image into W x H.  Bucket batches need one size per batch, so the batch sampler picks
the views (:func:`assign_views`): in a square bucket each image gets any of the 8; in a non-square one
the batch shares one transpose decision and each image gets its own flip, so every batch still has
one size, keyed on the size after the transform, and every image still meets all 8 views over the
epochs.  The dataset then applies the view an image was given (:func:`apply_view`) before the
albumentations pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..runtime.metadata import TTA_VIEWS, View

#: element e of D4 -> (transposed, flipped NCHW axes); 0 is the identity
D4_VIEWS: tuple[View, ...] = ((False, ()), *TTA_VIEWS["dihedral"])
_PLAIN = [e for e, (t, _) in enumerate(D4_VIEWS) if not t]
_TRANSPOSED = [e for e, (t, _) in enumerate(D4_VIEWS) if t]


def apply_view(image: np.ndarray, element: int) -> np.ndarray:
    """HWC image -> its D4 view ``element`` (transpose first, then flips; as the runtime's views)."""
    transposed, axes = D4_VIEWS[element]
    out = image.transpose(1, 0, *range(2, image.ndim)) if transposed else image
    for axis in axes:  # NCHW axis 2 (height) / 3 (width) -> HWC axis 0 / 1
        out = np.flip(out, axis - 2)
    return np.ascontiguousarray(out)


def view_size(size: tuple[int, int], element: int) -> tuple[int, int]:
    """(h, w) after the view: swapped when it transposes."""
    return (size[1], size[0]) if D4_VIEWS[element][0] else size


def assign_views(
    batches: Sequence[list[int]], sizes: Sequence[tuple[int, int]], rng: np.random.Generator
) -> list[list[tuple[int, int]]]:
    """Each batch's indices paired with a D4 element, one output size per batch (see module doc)."""
    out: list[list[tuple[int, int]]] = []
    for batch in batches:
        h, w = sizes[batch[0]]
        if h == w:
            elements = rng.integers(0, len(D4_VIEWS), size=len(batch))
        else:
            pool = _TRANSPOSED if rng.integers(0, 2) else _PLAIN
            elements = np.asarray(pool)[rng.integers(0, len(pool), size=len(batch))]
        out.append([(int(i), int(e)) for i, e in zip(batch, elements)])
    return out
