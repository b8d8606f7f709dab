"""ClassBalancedBatchSampler: P x K batches, cross-domain pairs, seeded epochs, disjoint DDP shards."""

from __future__ import annotations

import numpy as np
import pytest

from fewsight.data.samplers import ClassBalancedBatchSampler
from fewsight.errors import InvalidArgumentError, ShapeError

LABELS = np.repeat(np.arange(10), 6)  # 10 classes x 6 items
DOMAINS = np.tile([0, 0, 0, 1, 1, 1], 10)  # 3 items per class in each domain


def _classes(batch):
    return LABELS[np.asarray(batch)]


def test_every_batch_has_p_classes_of_k_items():
    s = ClassBalancedBatchSampler(LABELS, 4, 3, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == s.passes * (10 // 4)
    for b in batches:
        classes, counts = np.unique(_classes(b), return_counts=True)
        assert len(b) == 12 and len(classes) == 4 and set(counts) == {3}


def test_items_of_a_class_are_used_evenly_before_repeating():
    s = ClassBalancedBatchSampler(LABELS, 5, 2, passes=3, seed=1)
    seen = np.concatenate([np.asarray(b) for b in s])
    assert sorted(seen.tolist()) == list(range(60))  # 3 passes x 10 classes x 2 = all 60 items once


def test_k_is_split_across_domains_so_every_anchor_has_a_cross_domain_positive():
    s = ClassBalancedBatchSampler(LABELS, 4, 2, domains=DOMAINS, seed=0)
    for b in s:
        b = np.asarray(b)
        for c in np.unique(LABELS[b]):
            assert set(DOMAINS[b[LABELS[b] == c]]) == {0, 1}
    # a class present in one domain only still gets K items
    one = DOMAINS.copy()
    one[LABELS == 0] = 0
    for b in ClassBalancedBatchSampler(LABELS, 10, 4, domains=one, seed=0):
        assert (LABELS[np.asarray(b)] == 0).sum() == 4


def test_batches_depend_only_on_seed_and_epoch():
    a, b = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3), ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    first = list(a)
    assert first != list(b)
    b.set_epoch(1)
    assert list(b) == first
    assert list(ClassBalancedBatchSampler(LABELS, 4, 2, seed=4)) != list(ClassBalancedBatchSampler(LABELS, 4, 2, seed=3))
    enc = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3, encode_epoch=True)
    enc.set_epoch(1)
    assert [[k - 60 for k in batch] for batch in enc] == first


def test_ddp_shards_are_disjoint_and_cover_the_epoch():
    full = ClassBalancedBatchSampler(LABELS, 2, 2, seed=0)  # 3 passes x 5 batches
    full.set_epoch(2)
    expected = [tuple(b) for b in full]
    shards = []
    for rank in range(3):
        s = ClassBalancedBatchSampler(LABELS, 2, 2, seed=0, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append([tuple(b) for b in s])
    assert [len(x) for x in shards] == [5, 5, 5]
    assert sorted(b for sh in shards for b in sh) == sorted(expected)
    # with a count that does not divide, every rank still gets as many batches (leading ones repeated)
    uneven = [list(ClassBalancedBatchSampler(LABELS, 2, 2, passes=1, rank=r, world_size=2)) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 3 and not {tuple(b) for b in uneven[0][:2]} & {tuple(b) for b in uneven[1][:2]}


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="classes_per_batch"):
        ClassBalancedBatchSampler(LABELS, 0, 2)
    with pytest.raises(InvalidArgumentError, match="rank"):
        ClassBalancedBatchSampler(LABELS, 2, 2, rank=2, world_size=2)
    with pytest.raises(ShapeError, match="domains"):
        ClassBalancedBatchSampler(LABELS, 2, 2, domains=DOMAINS[:5])
    with pytest.raises(InvalidArgumentError, match="labels"):
        ClassBalancedBatchSampler(np.full(4, -1), 2, 2)
