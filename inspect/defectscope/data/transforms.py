"""Augmentation pipelines from config, and the guard that keeps them size-preserving.

Pipelines act on HWC uint8 images *before* normalisation, so they see what the loader produced.
Bucket batches need every image to keep its preprocessed size, so a transform that changes it
(``RandomRotate90`` on a non-square image, a crop, a resize) is rejected at setup, before the
first step, instead of failing inside a worker in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

Transform = Callable[..., Any]


def build_transform(spec: Any) -> Transform | None:
    """``None``, a ready callable (e.g. an ``albumentations.Compose``), or a ``_target_`` mapping."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(
                f"a transform config needs a _target_ (e.g. albumentations.Compose), got keys {list(spec)}"
            )
        from hydra.utils import instantiate

        spec = instantiate(spec)
    if not callable(spec):
        raise ValueError(f"a transform must be callable as transform(image=array), got {type(spec).__name__}")
    return spec


def apply_transform(transform: Transform | None, image: np.ndarray) -> np.ndarray:
    """Run an albumentations-style transform on HWC uint8 and give HWC back (grey stays (H, W, 1))."""
    if transform is None:
        return image
    out = transform(image=image)["image"]
    out = np.asarray(out)
    if out.ndim == 2:
        out = out[:, :, None]
    return out


def seed_transform(transform: Transform | None, seed: int) -> None:
    """albumentations keeps its own RNG (not numpy's or torch's global one); seed it explicitly."""
    setter = getattr(transform, "set_random_seed", None)
    if callable(setter):
        setter(int(seed) % 2**32)


def check_size_preserving(
    transform: Transform | None, sizes: Iterable[tuple[int, int]], channels: int, name: str, tries: int = 8
) -> None:
    """Raise if ``transform`` changes the (H, W, C) shape of images of the given (h, w) sizes.

    Probes one square and one non-square size (if present) ``tries`` times each with a private
    seed, then leaves the transform's RNG re-seeded by the caller.
    """
    if transform is None:
        return
    distinct = sorted(set(sizes))
    probes = [s for s in distinct if s[0] == s[1]][:1] + [s for s in distinct if s[0] != s[1]][:1]
    seed_transform(transform, 12345)
    rng = np.random.default_rng(0)
    for h, w in probes:
        img = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        for _ in range(tries):
            out = apply_transform(transform, img)
            if out.shape != img.shape or out.dtype != np.uint8:
                raise ValueError(
                    f"data.{name} changed an image of shape {img.shape} (uint8) into {out.shape} ({out.dtype}); "
                    "bucket batches need transforms that keep size and dtype (RandomRotate90/Transpose only "
                    "for square images: data.dihedral=true rotates any size; no crops or resizes, no "
                    "normalisation — that comes after)"
                )
