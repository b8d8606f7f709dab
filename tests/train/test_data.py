"""Deterministic loading: per-epoch permutations, DDP shards, per-sample seeding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from fewsight.errors import InvalidArgumentError
from fewsight.train.data import EpochSampler, SeededDataset, sample_seed


def _decode(sampler, n):
    return [k - sampler.epoch * n for k in sampler]


def test_epoch_permutations_are_seeded_and_differ_between_epochs():
    a, b = EpochSampler(20, seed=1), EpochSampler(20, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert sorted(_decode(a, 20)) == list(range(20))
    first = _decode(a, 20)
    a.set_epoch(4)
    assert _decode(a, 20) != first
    assert _decode(EpochSampler(20, seed=2), 20) != _decode(EpochSampler(20, seed=1), 20)
    assert _decode(EpochSampler(5, shuffle=False), 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [10, 11, 1])
def test_ddp_shards_cover_the_data(n):
    world = 3
    train = [EpochSampler(n, seed=0, rank=r, world_size=world, pad=True) for r in range(world)]
    parts = [_decode(s, n) for s in train]
    assert len({len(p) for p in parts}) == 1 and all(len(p) == len(s) for p, s in zip(parts, train))
    assert set().union(*map(set, parts)) == set(range(n))
    evals = [EpochSampler(n, shuffle=False, rank=r, world_size=world, pad=False) for r in range(world)]
    flat = sorted(i for s in evals for i in _decode(s, n))
    assert flat == list(range(n))  # every image exactly once across ranks
    assert all(len(s) == len(_decode(s, n)) for s in evals)
    with pytest.raises(InvalidArgumentError, match="rank"):
        EpochSampler(n, rank=3, world_size=3)


class _RandomItems(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3)


def test_seeded_dataset_draws_depend_only_on_seed_epoch_index():
    ds = SeededDataset(_RandomItems(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x = ds[2]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    torch.manual_seed(999)
    assert torch.equal(ds[2], x)
    assert not torch.equal(ds[4 + 2], x)  # same index, next epoch
    assert not torch.equal(SeededDataset(_RandomItems(), seed=8)[2], x)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)
