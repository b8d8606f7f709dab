"""Recall@k and MAP@R: naive loops, pytorch-metric-learning's AccuracyCalculator, blocks, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.retrieval import mean_average_precision_at_r, ordered_topk, recall_at_k
from tests._helpers import MaxNumel

D64 = torch.float64


# ----------------------------------------------------------------------------- references


def ref_metrics(q, ql, g=None, gl=None, ks=(1, 5, 10)):
    """Explicit loops in float64: ranking by (cosine desc, gallery index asc)."""
    loo = g is None
    if loo:
        g, gl = q, ql
    qn = [row / row.norm() if row.norm() > 0 else row for row in q.double()]
    gn = [row / row.norm() if row.norm() > 0 else row for row in g.double()]
    recalls = {k: [] for k in ks}
    aps = []
    for i in range(len(qn)):
        if int(ql[i]) < 0:
            continue
        cand = [j for j in range(len(gn)) if not (loo and j == i)]
        r = sum(1 for j in cand if int(gl[j]) == int(ql[i]))
        if r == 0:
            continue
        sims = {j: float(qn[i] @ gn[j]) for j in cand}
        ranked = sorted(cand, key=lambda j: (-sims[j], j))
        rel = [int(gl[j]) == int(ql[i]) for j in ranked]
        for k in ks:
            recalls[k].append(float(any(rel[:k])))
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        aps.append(ap / r)
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {k: mean(v) for k, v in recalls.items()}, mean(aps)


def clustered(n, d, classes, noise=0.9, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    x = centres[labels] + noise * torch.randn(n, d, generator=gen)
    return x.to(dtype), labels


def pml_scores(q, ql, g=None, gl=None):
    """PML's precision_at_1 and MAP@R; unknown labels become unique singleton labels (never matched)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    def unique_unknowns(labels, offset):
        labels = labels.clone()
        unknown = labels < 0
        labels[unknown] = -(torch.arange(int(unknown.sum())) + 1 + offset)
        return labels

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=torch.device("cpu"))
    qn = F.normalize(q.float(), dim=1)
    if g is None:
        out = calc.get_accuracy(qn, unique_unknowns(ql, 0))
    else:
        out = calc.get_accuracy(qn, unique_unknowns(ql, 0), F.normalize(g.float(), dim=1), unique_unknowns(gl, 10_000))
    return out["precision_at_1"], out["mean_average_precision_at_r"]


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_matches_naive_reference(seed):
    x, y = clustered(120, 8, 7, seed=seed, dtype=D64)
    y[::11] = -1
    ks = (1, 2, 5, 10, 500)
    ref_r, ref_map = ref_metrics(x, y, ks=ks)
    assert recall_at_k(x, y, k=ks) == pytest.approx(ref_r, abs=1e-12)
    assert mean_average_precision_at_r(x, y) == pytest.approx(ref_map, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_separate_gallery_matches_naive_reference(seed):
    q, ql = clustered(60, 8, 6, seed=seed, dtype=D64)
    g, gl = clustered(150, 8, 6, seed=seed + 10, dtype=D64)
    ql[::7] = -1
    gl[::9] = -3
    gl[gl == 5] = 4  # class 5 queries have no gallery item: excluded
    ks = (1, 3, 10, 1000)
    ref_r, ref_map = ref_metrics(q, ql, g, gl, ks=ks)
    assert recall_at_k(q, ql, g, gl, k=ks) == pytest.approx(ref_r, abs=1e-12)
    assert mean_average_precision_at_r(q, ql, g, gl) == pytest.approx(ref_map, abs=1e-12)


def test_float32_matches_reference():
    x, y = clustered(100, 16, 5, seed=3)
    ref_r, ref_map = ref_metrics(x, y)
    assert recall_at_k(x, y) == pytest.approx(ref_r, abs=1e-12)
    assert mean_average_precision_at_r(x, y) == pytest.approx(ref_map, abs=1e-12)


def test_leave_one_out_matches_pml():
    x, y = clustered(300, 16, 10, seed=4)
    y[::13] = -1
    p1, pmap = pml_scores(x, y)
    assert recall_at_k(x, y, k=1)[1] == pytest.approx(p1, abs=1e-12)
    assert mean_average_precision_at_r(x, y) == pytest.approx(pmap, abs=1e-9)
    assert 0.2 < pmap < 0.95  # a non-trivial value


def test_separate_gallery_matches_pml():
    q, ql = clustered(120, 16, 8, seed=5)
    g, gl = clustered(400, 16, 8, seed=6)
    ql[::10] = -1
    gl[::17] = -1
    gl[gl == 7] = 6  # lone query class: PML excludes it too
    p1, pmap = pml_scores(q, ql, g, gl)
    assert recall_at_k(q, ql, g, gl, k=1)[1] == pytest.approx(p1, abs=1e-12)
    assert mean_average_precision_at_r(q, ql, g, gl) == pytest.approx(pmap, abs=1e-9)


def test_block_size_one_equals_one_block_and_default():
    x, y = clustered(90, 8, 4, seed=7)
    g, gl = clustered(70, 8, 4, seed=8)
    for args in ((x, y), (x, y, g, gl)):
        r1 = recall_at_k(*args, k=(1, 4, 100), block_size=1)
        r_all = recall_at_k(*args, k=(1, 4, 100), block_size=10**6)
        assert r1 == r_all == recall_at_k(*args, k=(1, 4, 100))
        m1 = mean_average_precision_at_r(*args, block_size=1)
        assert m1 == pytest.approx(mean_average_precision_at_r(*args, block_size=10**6), abs=1e-14)
        assert m1 == pytest.approx(mean_average_precision_at_r(*args, block_size=7), abs=1e-14)


def test_never_materialises_the_full_matrix():
    q, ql = clustered(128, 8, 4, seed=9)
    g, gl = clustered(300, 8, 4, seed=10)
    with MaxNumel() as mode:
        recall_at_k(q, ql, g, gl, block_size=16)
        mean_average_precision_at_r(q, ql, g, gl, block_size=16)
    assert mode.max_numel <= 16 * 300


# ----------------------------------------------------------------------------- conventions


def test_ties_broken_by_gallery_index():
    q = torch.tensor([[1.0, 0.0]])
    same = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # identical directions: exact tie
    assert recall_at_k(q, torch.tensor([0]), same, torch.tensor([1, 0]), k=1) == {1: 0.0}
    assert recall_at_k(q, torch.tensor([0]), same, torch.tensor([0, 1]), k=1) == {1: 1.0}
    assert mean_average_precision_at_r(q, torch.tensor([0]), same, torch.tensor([1, 0])) == 0.0


def test_ties_many_items_match_reference():
    # Integer directions on few axes: many exactly equal similarities.
    gen = torch.Generator().manual_seed(11)
    x = F.one_hot(torch.randint(0, 3, (60,), generator=gen), 3).double() + F.one_hot(
        torch.randint(0, 3, (60,), generator=gen), 3
    ).double()
    y = torch.randint(0, 4, (60,), generator=gen)
    ks = (1, 2, 3, 7, 20)
    ref_r, ref_map = ref_metrics(x, y, ks=ks)
    assert recall_at_k(x, y, k=ks, block_size=5) == pytest.approx(ref_r, abs=1e-12)
    assert mean_average_precision_at_r(x, y, block_size=5) == pytest.approx(ref_map, abs=1e-12)
    ref_r, ref_map = ref_metrics(x[:20], y[:20], x[20:], y[20:], ks=ks)
    assert recall_at_k(x[:20], y[:20], x[20:], y[20:], k=ks) == pytest.approx(ref_r, abs=1e-12)
    assert mean_average_precision_at_r(x[:20], y[:20], x[20:], y[20:]) == pytest.approx(ref_map, abs=1e-12)


def test_unknown_queries_excluded_and_unknown_gallery_items_are_distractors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    g = torch.tensor([[0.95, 0.05], [0.9, 0.3], [0.1, 1.0]])
    gl = torch.tensor([-1, 0, 1])
    # query 2 is unknown: ignored; query 0's nearest item is the unknown distractor.
    out = recall_at_k(q, torch.tensor([0, 1, -1]), g, gl, k=(1, 2))
    assert out == {1: 0.5, 2: 1.0}
    assert recall_at_k(q[:2], torch.tensor([0, 1]), g, gl, k=(1, 2)) == out
    assert mean_average_precision_at_r(q, torch.tensor([0, 1, -1]), g, gl) == 0.5


def test_queries_without_gallery_class_are_excluded():
    q, ql = clustered(40, 8, 4, seed=12)
    g, gl = clustered(80, 8, 4, seed=13)
    extra = torch.randn(5, 8)
    q2, ql2 = torch.cat([q, extra]), torch.cat([ql, torch.full((5,), 99)])
    assert recall_at_k(q2, ql2, g, gl) == recall_at_k(q, ql, g, gl)
    assert mean_average_precision_at_r(q2, ql2, g, gl) == pytest.approx(mean_average_precision_at_r(q, ql, g, gl))


def test_leave_one_out_singletons_excluded_and_k_beyond_gallery():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])  # class 1 is a singleton
    assert recall_at_k(x, y, k=(1, 100)) == {1: 1.0, 100: 1.0}
    # Only the two class-0 queries count; the self-match is never a neighbour, even at k >= N.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    assert recall_at_k(x, y, k=(1, 2, 3)) == {1: 0.0, 2: 1.0, 3: 1.0}


def test_duplicates_are_neighbours_in_leave_one_out():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.99, 0.1]])
    y = torch.tensor([0, 0, 1])
    assert recall_at_k(x, y, k=1) == {1: 1.0}


# ----------------------------------------------------------------------------- edge cases


def test_no_query_to_evaluate_is_an_error():
    e = torch.empty(0, 4)
    l0 = torch.empty(0, dtype=torch.long)
    q = torch.randn(3, 4)
    ql = torch.tensor([0, 1, 1])
    cases = [
        (e, l0, None, None),  # empty
        (q, ql, e, l0),  # empty gallery
        (q, torch.full((3,), -1), None, None),  # all unknown
        (q, torch.tensor([0, 1, 2]), None, None),  # all singletons
        (q[:1], ql[:1], None, None),  # leave-one-out with one item
    ]
    for args in cases:
        with pytest.raises(InvalidArgumentError, match="query_labels: expected at least one query to evaluate"):
            recall_at_k(*args, k=1)
        with pytest.raises(InvalidArgumentError, match="query_labels: expected at least one query to evaluate"):
            mean_average_precision_at_r(*args)


def test_half_precision_and_zero_vectors():
    x, y = clustered(64, 8, 4, seed=14)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        assert recall_at_k(xh, y) == recall_at_k(xh.float(), y)
        assert mean_average_precision_at_r(xh, y) == pytest.approx(mean_average_precision_at_r(xh.float(), y))
    x[0] = 0
    value = mean_average_precision_at_r(x, y)
    assert math.isfinite(value)


def test_k_forms_and_order():
    x, y = clustered(30, 4, 3, seed=15)
    assert list(recall_at_k(x, y, k=[10, 1, 10, 5])) == [10, 1, 5]
    assert list(recall_at_k(x, y, k=3)) == [3]


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda x, y: recall_at_k(x[0], y), ShapeError, "queries"),
        (lambda x, y: recall_at_k(x, y[:-1]), ShapeError, "query_labels"),
        (lambda x, y: recall_at_k(x, y.float()), DTypeError, "query_labels"),
        (lambda x, y: recall_at_k(x.long(), y), DTypeError, "queries"),
        (lambda x, y: recall_at_k(x, y, x), InvalidArgumentError, "gallery_labels"),
        (lambda x, y: recall_at_k(x, y, x[:, :2], y), ShapeError, "gallery"),
        (lambda x, y: recall_at_k(x, y, x, y[:2]), ShapeError, "gallery_labels"),
        (lambda x, y: recall_at_k(x, y, k=0), InvalidArgumentError, "k"),
        (lambda x, y: recall_at_k(x, y, k=[]), InvalidArgumentError, "k"),
        (lambda x, y: recall_at_k(x, y, k=1.5), InvalidArgumentError, "k"),
        (lambda x, y: recall_at_k(x, y, block_size=0), InvalidArgumentError, "block_size"),
        (lambda x, y: mean_average_precision_at_r(x * math.nan, y), InvalidArgumentError, "queries"),
    ],
)
def test_errors_name_the_argument(call, exc, text):
    x, y = clustered(10, 4, 2, seed=16)
    with pytest.raises(exc, match=text):
        call(x, y)


def test_ordered_topk_matches_sorted_reference():
    gen = torch.Generator().manual_seed(17)
    s = torch.randint(0, 4, (6, 15), generator=gen).float()
    for k in (1, 3, 8, 15, 40):
        vals, idx = ordered_topk(s, k)
        for row in range(s.shape[0]):
            ref = sorted(range(15), key=lambda j: (-float(s[row, j]), j))[: min(k, 15)]
            assert idx[row].tolist() == ref
            assert vals[row].tolist() == s[row, ref].tolist()
    assert ordered_topk(s, 0)[1].shape == (6, 0)
    assert ordered_topk(s[:0], 3)[1].shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    q, ql = clustered(200, 16, 6, seed=18)
    g, gl = clustered(500, 16, 6, seed=19)
    ref_r = recall_at_k(q, ql, g, gl, block_size=32)
    ref_m = mean_average_precision_at_r(q, ql, g, gl, block_size=32)
    qc, qlc, gc, glc = (t.cuda() for t in (q, ql, g, gl))
    assert recall_at_k(qc, qlc, gc, glc, block_size=32) == ref_r
    assert mean_average_precision_at_r(qc, qlc, gc, glc, block_size=32) == pytest.approx(ref_m, abs=1e-6)
    assert recall_at_k(qc.half(), qlc) == recall_at_k(q.half(), ql)
