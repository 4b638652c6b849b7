"""BucketBatchSampler invariants: one size per batch, exactly-once coverage, seeds, DDP shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from defectscope.data.sampler import BucketBatchSampler


def _sizes(n: int = 203, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    choices = [(64, 64), (64, 96), (96, 64), (128, 96), (160, 160), (32, 224)]
    # uneven bucket populations, including a bucket of one
    picks = rng.choice(len(choices) - 1, size=n - 1, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    return [choices[int(k)] for k in picks] + [choices[-1]]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("batch_size", [1, 7, 16, 500])
def test_single_size_per_batch_and_exactly_once(batch_size: int) -> None:
    sizes = _sizes()
    sampler = BucketBatchSampler(sizes, batch_size, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for b in batches:
        assert len({sizes[i] for i in b}) == 1
        assert 1 <= len(b) <= batch_size
    assert sorted(_flat(batches)) == list(range(len(sizes)))


def test_reproducible_from_seed_and_epoch() -> None:
    sizes = _sizes()
    a = BucketBatchSampler(sizes, 8, seed=11)
    b = BucketBatchSampler(sizes, 8, seed=11)
    c = BucketBatchSampler(sizes, 8, seed=12)
    assert list(a) == list(b)
    assert list(a) != list(c)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first
    assert a.sampler is a  # Lightning calls set_epoch via batch_sampler.sampler


def test_shuffle_mixes_buckets_and_order() -> None:
    sizes = _sizes()
    batches = list(BucketBatchSampler(sizes, 8, seed=1))
    bucket_sequence = [sizes[b[0]] for b in batches]
    assert bucket_sequence != sorted(bucket_sequence)  # buckets interleaved, not one after another


def test_no_shuffle_is_ordered_and_stable() -> None:
    sizes = _sizes()
    s = BucketBatchSampler(sizes, 8, shuffle=False, seed=1)
    first = list(s)
    s.set_epoch(5)
    assert list(s) == first
    for b in first:
        assert b == sorted(b)


def test_drop_last_drops_only_partial_batches() -> None:
    sizes = _sizes()
    batches = list(BucketBatchSampler(sizes, 8, seed=0, drop_last=True))
    assert all(len(b) == 8 for b in batches)
    per_bucket = Counter(sizes)
    assert len(_flat(batches)) == sum(n // 8 * 8 for n in per_bucket.values())
    assert len(set(_flat(batches))) == len(_flat(batches))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch_size", [5, 16])
def test_ddp_shares_disjoint_covering_and_equal_length(world: int, batch_size: int) -> None:
    sizes = _sizes()
    for epoch in (0, 1):
        shares = []
        for rank in range(world):
            s = BucketBatchSampler(sizes, batch_size, seed=4, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            shares.append(list(s))
            assert len(shares[-1]) == len(s)
        assert len({len(sh) for sh in shares}) == 1, "ranks must get the same number of batches"
        flat = [_flat(sh) for sh in shares]
        for r in range(world):
            for q in range(r + 1, world):
                assert not set(flat[r]) & set(flat[q])
        assert sorted(i for f in flat for i in f) == list(range(len(sizes)))
        for sh in shares:
            for b in sh:
                assert len({sizes[i] for i in b}) == 1 and len(b) >= 1


def test_ddp_equalising_splits_batches_not_samples() -> None:
    sizes = [(64, 64)] * 10 + [(96, 96)] * 4  # 3 batches of <=4 + 1 batch -> 4 batches; world 3 needs 6
    world = 3
    shares = [list(BucketBatchSampler(sizes, 4, seed=0, num_replicas=world, rank=r)) for r in range(world)]
    assert [len(s) for s in shares] == [2, 2, 2]
    assert sorted(_flat([b for s in shares for b in s])) == list(range(14))


def test_ddp_impossible_plan_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="same number of batches"):
        BucketBatchSampler([(64, 64), (96, 96)], 4, num_replicas=3, rank=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([(1, 1)], 0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([(1, 1)], 1, num_replicas=2, rank=2)
