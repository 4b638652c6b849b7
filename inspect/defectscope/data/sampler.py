"""Batches of identically sized images, reproducible per epoch, shared exactly once across DDP ranks.

Our models end in global average pooling, so they take any input size; what they cannot take is
a batch of mixed sizes.  Instead of squashing, cropping or padding images to one size, the
sampler groups samples by their exact preprocessed (height, width) — the loader's
``size_multiple`` keeps the number of groups small — and forms batches inside each group.

Epoch plan (identical on every rank, computed from ``(seed, epoch)`` only):

1. shuffle the indices inside each size bucket and cut them into batches of ``batch_size``
   (the last batch of a bucket may be smaller; ``drop_last`` drops it instead);
2. shuffle the order of all batches;
3. **equalise for DDP**: if the number of batches ``B`` is not a multiple of the number of ranks
   ``N``, split the largest batch in two, repeatedly, until it is.  This adds at most ``N - 1``
   smaller batches per epoch, instead of padding by repetition (which would show some samples
   twice) or dropping batches (which would skip samples);
4. deal the batches round-robin: rank ``r`` gets batches ``r, r + N, r + 2N, ...``.

With ``dihedral=True`` (training's ``data.dihedral``) each index comes paired with the D4 view the
dataset applies to it, chosen per batch so that the batch keeps one size (:mod:`.dihedral`); the
batches themselves are the same as without it.

So every rank gets exactly ``ceil(B / N)`` batches — Lightning DDP never waits on a rank that ran
out — and, without ``drop_last``, every sample is in exactly one batch on exactly one rank per
epoch.  The split batches carry the same weight as full ones in DDP's gradient average, a small
bias on at most ``N - 1`` batches per epoch.  Only when a dataset has fewer samples than the
equalised batch count (tiny data, many ranks) is there no valid plan; the sampler then refuses
at construction with a clear error instead of hanging later.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .dihedral import assign_views


class BucketBatchSampler(Sampler[list[Any]]):
    """Yields lists of dataset indices (or ``(index, view)`` pairs with ``dihedral``); all images in
    one list share the same (height, width) after their view."""

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        dihedral: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid DDP rank {rank} of {num_replicas} replicas")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.dihedral = bool(dihedral)
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.epoch = 0
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(sizes):
            buckets.setdefault((int(hw[0]), int(hw[1])), []).append(i)
        self.buckets = dict(sorted(buckets.items()))
        full = sum(len(v) // batch_size for v in self.buckets.values())
        partial = 0 if drop_last else sum(1 for v in self.buckets.values() if len(v) % batch_size)
        n_batches = full + partial
        self._total_batches = -(-n_batches // num_replicas) * num_replicas
        used = (
            sum((len(v) // batch_size) * batch_size for v in self.buckets.values())
            if drop_last
            else len(sizes)
        )
        if n_batches == 0:
            raise ValueError(
                f"no batches: {len(sizes)} samples in {len(self.buckets)} size buckets with batch_size "
                f"{batch_size} and drop_last={drop_last}"
            )
        if self._total_batches > used:
            raise ValueError(
                f"cannot give {num_replicas} ranks the same number of batches: {used} samples in "
                f"{len(self.buckets)} size buckets need {self._total_batches} non-empty batches; "
                "use fewer devices or more data"
            )

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``; that is us."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle to produce (call before iterating, on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._total_batches // self.num_replicas

    def plan(self) -> list[list[Any]]:
        """All ranks' batches for the current epoch, in dealing order (rank r takes ``[r::N]``)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for members in self.buckets.values():
            order = (
                [members[int(j)] for j in rng.permutation(len(members))] if self.shuffle else list(members)
            )
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[int(j)] for j in rng.permutation(len(batches))]
        if self.dihedral:  # a stream of its own: the batches are the same with or without views
            views = np.random.default_rng([self.seed, self.epoch, 1])
            batches = assign_views(batches, self.sizes, views)  # type: ignore[assignment]
        while len(batches) < self._total_batches:
            k = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))  # largest, earliest
            big = batches[k]
            half = (len(big) + 1) // 2
            batches[k : k + 1] = [big[:half], big[half:]]
        return batches

    def __iter__(self) -> Iterator[list[Any]]:
        yield from self.plan()[self.rank :: self.num_replicas]
