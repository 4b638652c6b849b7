"""Map-style dataset over scanned samples, and the collate that stacks equally sized images.

Items are decoded with the shared runtime loader, augmented as HWC uint8, then normalised with the
runtime's own :func:`normalize_batch`, so a trained model sees exactly what the line PC feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..runtime.image import LoaderConfig, load_image, normalize_batch
from .dihedral import apply_view
from .records import Sample
from .transforms import Transform, apply_transform, seed_transform


class DefectDataset(Dataset[dict[str, Any]]):
    """``ds[i]`` -> ``{"image": CHW float32, "label": int, "index": i, "path": str[, "meta": dict]}``.

    ``index`` is the position in this split's dataset; ``ds[(i, view)]`` gives image i in D4 view
    ``view`` (the batch sampler's ``dihedral`` option).  ``sizes[i]`` is the (h, w) the scan
    measured; a file that changed size since then is an error, not a silently mixed batch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        sizes: Sequence[tuple[int, int]],
        loader: LoaderConfig,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Transform | None = None,
        with_meta: bool = False,
    ) -> None:
        if len(samples) != len(sizes):
            raise ValueError(f"{len(samples)} samples but {len(sizes)} sizes")
        self.samples = list(samples)
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.loader = loader
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.transform = transform
        self.with_meta = with_meta
        self.rank = 0  # mixed into worker augmentation seeds so DDP ranks do not augment alike

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, view = key if isinstance(key, tuple) else (key, 0)
        sample = self.samples[index]
        arr = load_image(sample.path, self.loader)
        if arr.shape[:2] != self.sizes[index]:
            raise RuntimeError(
                f"{sample.path}: preprocessed size {arr.shape[0]}x{arr.shape[1]} differs from the "
                f"{self.sizes[index][0]}x{self.sizes[index][1]} measured by the scan; the file changed "
                "during training"
            )
        if view:
            arr = apply_view(arr, view)
        out = apply_transform(self.transform, arr)
        if out.shape != arr.shape:
            raise RuntimeError(
                f"{sample.path}: the transform changed the image shape {arr.shape} -> {out.shape}"
            )
        image = torch.from_numpy(normalize_batch([out], self.mean, self.std)[0])
        item: dict[str, Any] = {"image": image, "label": sample.label, "index": index, "path": sample.path}
        if self.with_meta:
            item["meta"] = dict(sample.meta)
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a bucket batch; images are equally sized by construction (the sampler guarantees it)."""
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "path": [it["path"] for it in items],
    }
    if "meta" in items[0]:
        batch["meta"] = [it["meta"] for it in items]
    return batch


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker (and rank) its own augmentation stream.

    Forked workers would otherwise inherit one albumentations RNG state and repeat each other's
    augmentations.  ``info.seed`` derives from the main process's torch RNG, so runs seeded with
    ``seed_everything`` stay reproducible.
    """
    info = get_worker_info()
    if info is None:
        return
    ds = info.dataset
    if isinstance(ds, DefectDataset):
        seed = int(np.random.SeedSequence([info.seed % 2**63, ds.rank]).generate_state(1)[0])
        seed_transform(ds.transform, seed)
