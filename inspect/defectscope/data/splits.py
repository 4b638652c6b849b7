"""Deterministic stratified splits.

Quotas use largest-remainder apportionment, so the split sizes are exact (2,624 ELPV cells at
25 % give exactly 656 test cells) and every stratum is represented in proportion.  The shuffle
inside each stratum depends only on the seed and the sorted sample order, never on the order
in which a source listed its files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from .records import Sample


def apportion(counts: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over strata in proportion to ``counts`` (largest remainder, ties by position)."""
    n = sum(counts)
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} items")
    if n == 0:
        return [0 for _ in counts]
    exact = [c * total / n for c in counts]
    quota = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[: total - sum(quota)]:
        quota[i] += 1
    return quota


def stratified_pick(strata: Sequence[str], keys: Sequence[str], fraction: float, seed: int) -> set[int]:
    """Positions (into ``strata``) of a ``fraction`` of the items, stratified on ``strata``.

    ``keys`` (e.g. file paths) fix the order inside a stratum before the seeded shuffle.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    names = sorted(groups)
    quotas = apportion([len(groups[s]) for s in names], round(len(strata) * fraction))
    rng = np.random.default_rng(seed)
    picked: set[int] = set()
    for name, quota in zip(names, quotas):
        members = sorted(groups[name], key=lambda i: keys[i])
        perm = rng.permutation(len(members))
        picked.update(members[int(j)] for j in perm[:quota])
    return picked


def assign_splits(
    splits: Sequence[str | None],
    strata: Sequence[str],
    keys: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Fill in missing splits: ``test`` first, then ``val`` carved from what is left for training.

    Items whose split is already set keep it.  If no item has a split, ``test_fraction`` of all
    items go to test and ``val_fraction`` of the remaining (train+val) part goes to val.  If the
    source fixed some splits but no item is in ``val``, val is carved from ``train`` the same way;
    a missing test split stays missing (no silent shrinking of a curated training set).
    """
    out: list[str | None] = list(splits)
    if all(s is None for s in out):
        idx = list(range(len(out)))
        test = stratified_pick(strata, keys, test_fraction, seed)
        for i in test:
            out[i] = "test"
        rest = [i for i in idx if i not in test]
        _carve_val(out, rest, strata, keys, val_fraction, seed)
    else:
        for i, s in enumerate(out):
            if s is None:
                out[i] = "train"
        if "val" not in out:
            _carve_val(out, [i for i, s in enumerate(out) if s == "train"], strata, keys, val_fraction, seed)
    return [s or "train" for s in out]


def _carve_val(
    out: list[str | None],
    pool: list[int],
    strata: Sequence[str],
    keys: Sequence[str],
    val_fraction: float,
    seed: int,
) -> None:
    val = stratified_pick([strata[i] for i in pool], [keys[i] for i in pool], val_fraction, seed + 1)
    for j, i in enumerate(pool):
        out[i] = "val" if j in val else "train"


def spread_samples(samples: Sequence[Sample], limit: int, seed: int = 0) -> list[Sample]:
    """Up to ``limit`` samples, classes taken in turn (each class shuffled with ``seed``).

    Why: export checks parity on the first few paths, calibrates int8 on a few hundred and
    re-derives the threshold on all of them; a prefix of a class-sorted list would be one class only.
    Per-class rates (recall, false-reject rate) are unaffected by taking classes in turn.
    """
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    queues = [rng.sample(items, len(items)) for _, items in sorted(by_class.items())]
    out: list[Sample] = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out
