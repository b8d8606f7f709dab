"""Tests of fewsight.losses.triplet: mining strategies, block-wise batch-hard, PML comparison."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fewsight.losses.triplet as triplet_mod
from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.losses import TripletLoss
from fewsight.losses.functional import triplet_loss

MININGS = ("batch_hard", "batch_all", "semi_hard")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def ref_dist(x: torch.Tensor, i: int, j: int, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1 - F.cosine_similarity(x[i], x[j], dim=0)
    sq = ((x[i] - x[j]) ** 2).sum()
    return sq if distance == "squared_euclidean" else sq.sqrt()


def ref_triplet(x, labels, margin, mining, distance, normalize, soft):
    """Explicit-loop reference; returns (per-anchor sums list, number of counted terms)."""
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    n = x.shape[0]
    lab = labels.tolist()
    zero = x.sum() * 0
    per = [zero for _ in range(n)]
    count = 0

    def f(dap, dan):
        return F.softplus(dap - dan) if soft else torch.clamp(dap - dan + margin, min=0)

    for a in range(n):
        if lab[a] < 0:
            continue
        pos = [p for p in range(n) if p != a and lab[p] == lab[a]]
        neg = [q for q in range(n) if lab[q] >= 0 and lab[q] != lab[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            dap = max((ref_dist(x, a, p, distance) for p in pos), key=lambda t: t.item())
            dan = min((ref_dist(x, a, q, distance) for q in neg), key=lambda t: t.item())
            per[a] = per[a] + f(dap, dan)
            count += 1
        elif mining == "batch_all":
            for p in pos:
                for q in neg:
                    v = f(ref_dist(x, a, p, distance), ref_dist(x, a, q, distance))
                    per[a] = per[a] + v
                    count += 1 if soft else int(v.item() > 0)
        else:
            dns = [ref_dist(x, a, q, distance) for q in neg]
            for p in pos:
                dap = ref_dist(x, a, p, distance)
                farther = [d for d in dns if d.item() > dap.item()]
                dan = (
                    min(farther, key=lambda t: t.item()) if farther else max(dns, key=lambda t: t.item())
                )
                per[a] = per[a] + f(dap, dan)
                count += 1
    return torch.stack(per), count


def random_batch(n=14, d=5, classes=4, unknown=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if unknown:
        labels[torch.randperm(n, generator=g)[:3]] = -1
    return x, labels


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
def test_matches_loop_reference(mining, distance, soft):
    for seed, normalize in ((0, False), (1, True), (2, False)):
        x, labels = random_batch(seed=seed)
        margin = 0.5 if distance != "cosine" else 0.1
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        per_ref, count = ref_triplet(x2, labels, margin, mining, distance, normalize, soft)
        kw = dict(margin=margin, mining=mining, distance=distance, normalize=normalize, soft=soft)
        got_none = triplet_loss(x1, labels, reduction="none", **kw)
        torch.testing.assert_close(got_none, per_ref.detach(), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(triplet_loss(x, labels, reduction="sum", **kw), per_ref.sum().detach())
        mean = triplet_loss(x1, labels, **kw)
        mean_ref = per_ref.sum() / max(count, 1)
        torch.testing.assert_close(mean, mean_ref.detach(), rtol=1e-9, atol=1e-10)
        mean.backward()
        mean_ref.backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(mining, soft):
    x, labels = random_batch(n=8, d=3, classes=3, seed=3)
    x.requires_grad_(True)
    for distance in DISTANCES:
        assert torch.autograd.gradcheck(
            lambda t: triplet_loss(t, labels, margin=0.3, mining=mining, distance=distance, soft=soft), (x,)
        )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_blocks_equal_dense(distance, soft):
    x, labels = random_batch(n=130, d=16, classes=12, seed=4, dtype=torch.float32)
    ref_x = x.clone().requires_grad_(True)
    ref = triplet_loss(ref_x, labels, distance=distance, soft=soft, normalize=True)
    ref.backward()
    for block in (3, 17, 64, 129, 130, 1000):
        xb = x.clone().requires_grad_(True)
        got = triplet_loss(xb, labels, distance=distance, soft=soft, normalize=True, block_size=block)
        got.backward()
        assert got.item() == ref.item()
        assert torch.equal(xb.grad, ref_x.grad)


def test_batch_hard_auto_blocks_above_threshold(monkeypatch):
    x, labels = random_batch(n=200, d=8, classes=9, seed=5, dtype=torch.float32)
    dense = triplet_loss(x, labels)
    monkeypatch.setattr(triplet_mod, "_AUTO_BLOCK", 32)
    tiles = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        tiles.append(out.numel())
        return out

    def no_dense(*args, **kwargs):
        raise AssertionError("batch_hard must not build the dense distance matrix")

    monkeypatch.setattr(torch, "addmm", spy)
    monkeypatch.setattr(triplet_mod, "_dense_distance", no_dense)
    assert triplet_loss(x, labels).item() == dense.item()
    assert tiles and max(tiles) <= 32 * 32


# --- block-wise batch-all / semi-hard vs the dense forms -------------------------------------------


def dense_triplet(x, labels, margin, mining, distance, normalize, soft, eps=1e-8):
    """The former dense implementation (K × K distances, per-anchor sorted rows); returns (per-anchor, count)."""
    if normalize:
        x = F.normalize(x, dim=1, eps=eps)
    known = (labels >= 0).nonzero().squeeze(1)
    _, groups = torch.unique(labels[known], return_inverse=True)
    dist = triplet_mod._dense_distance(x[known], distance, eps)
    same = groups.unsqueeze(1) == groups.unsqueeze(0)
    pos_mask = same.clone()
    pos_mask.diagonal().fill_(False)
    neg_mask = ~same
    dd = dist.detach()
    inf = torch.tensor(float("inf"), dtype=dd.dtype)
    if mining == "batch_all" and soft:
        trip = dist.unsqueeze(2) - dist.unsqueeze(1)  # [a, p, n]
        mask = pos_mask.unsqueeze(2) & neg_mask.unsqueeze(1)
        per = (F.softplus(trip) * mask).sum(dim=(1, 2))
        count = mask.sum().to(dd.dtype)
    elif mining == "batch_all":
        trip = dist.unsqueeze(2) - dist.unsqueeze(1) + margin
        mask = pos_mask.unsqueeze(2) & neg_mask.unsqueeze(1)
        v = trip.clamp(min=0) * mask
        per, count = v.sum(dim=(1, 2)), (v > 0).sum().to(dd.dtype)
    else:
        num_neg = neg_mask.sum(dim=1)
        neg_sorted, neg_order = torch.where(same, inf, dd).sort(dim=1)
        j = torch.searchsorted(neg_sorted.contiguous(), dd.contiguous(), side="right")
        j = torch.where(j < num_neg.unsqueeze(1), j, (num_neg - 1).clamp(min=0).unsqueeze(1))
        pair_mask = pos_mask & (num_neg > 0).unsqueeze(1)
        d_an = dist.gather(1, neg_order.gather(1, j))
        v = F.softplus(dist - d_an) if soft else (dist - d_an + margin).clamp(min=0)
        per = torch.where(pair_mask, v, torch.zeros_like(v)).sum(dim=1)
        count = pair_mask.sum().to(dd.dtype)
    out = x.new_zeros(x.shape[0]).index_add(0, known, per)
    return out, count


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
def test_blockwise_equals_dense(mining, distance, soft):
    x, labels = random_batch(n=130, d=16, classes=9, seed=13)
    labels[:40] = labels[:40] % 2  # two big classes: many positives per anchor
    margin = 0.1 if distance == "cosine" else 1.0
    for normalize in (False, True):
        xr = x.clone().requires_grad_(True)
        per_ref, count = dense_triplet(xr, labels, margin, mining, distance, normalize, soft)
        ref = per_ref.sum() / count.clamp(min=1)
        ref.backward()
        for block in (None, 1, 7, 64, 129, 500):
            xb = x.clone().requires_grad_(True)
            kw = dict(margin=margin, mining=mining, distance=distance, normalize=normalize, soft=soft, block_size=block)
            torch.testing.assert_close(triplet_loss(x, labels, reduction="none", **kw), per_ref.detach(), rtol=1e-10, atol=1e-11)
            got = triplet_loss(xb, labels, **kw)
            torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-11)
            got.backward()
            torch.testing.assert_close(xb.grad, xr.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mining", MININGS)
def test_no_n_by_n_tensor_saved_or_built(mining, monkeypatch):
    x, labels = random_batch(n=300, d=8, classes=20, unknown=True, seed=14, dtype=torch.float32)
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense distance matrix must not be built")

    blocks = []
    real_block = triplet_mod._block_distance

    def spy(xr, *args):
        out = real_block(xr, *args)
        blocks.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(triplet_mod, "_dense_distance", no_dense)
    monkeypatch.setattr(triplet_mod, "_block_distance", spy)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = triplet_loss(x, labels, mining=mining, block_size=16)
    loss.backward()
    assert max(saved) <= 300 * 8  # X (and per-sample vectors), never N × N
    if mining != "batch_hard":
        assert blocks and all(r <= 16 for r, _ in blocks)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_blockwise(mining, soft):
    x, labels = random_batch(n=10, d=3, classes=3, seed=15)
    x.requires_grad_(True)
    for distance in DISTANCES:
        assert torch.autograd.gradcheck(
            lambda t: triplet_loss(t, labels, margin=0.3, mining=mining, distance=distance, soft=soft, block_size=3), (x,)
        )


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("mining", MININGS)
def test_overflowing_euclidean_distances_are_refused(distance, mining):
    from fewsight.errors import NonFiniteError

    x = torch.tensor([[3e38, 0.0], [-3e38, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(NonFiniteError, match="embeddings"):
        triplet_loss(x, labels, mining=mining, distance=distance)
    loss = triplet_loss(x.requires_grad_(True), labels, mining=mining, distance=distance, normalize=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_unknown_labels_are_ignored_everywhere():
    x, labels = random_batch(n=16, unknown=False, seed=6)
    labels[[2, 5, 11]] = -1
    keep = labels >= 0
    for mining in MININGS:
        full = triplet_loss(x, labels, mining=mining, margin=1.0)
        sub = triplet_loss(x[keep], labels[keep], mining=mining, margin=1.0)
        torch.testing.assert_close(full, sub)
        per = triplet_loss(x, labels, mining=mining, margin=1.0, reduction="none")
        assert per.shape == (16,) and (per[~keep] == 0).all()


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize(
    "labels",
    [[], [-1, -1, -1], [0, 1, 2], [3, 3, 3], [0, -1, 0]],
    ids=["empty", "all-unknown", "no-positive", "no-negative", "unknown-negative"],
)
def test_nothing_valid_gives_zero_with_graph(mining, labels):
    labels = torch.tensor(labels, dtype=torch.long)
    x = torch.randn(len(labels), 4, requires_grad=True)
    for soft in (False, True):
        loss = triplet_loss(x, labels, mining=mining, soft=soft)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()
        x.grad = None


def test_coincident_points_have_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for mining in MININGS:
        loss = triplet_loss(x, labels, mining=mining)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        x.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mining", MININGS)
def test_half_precision(dtype, mining):
    x, labels = random_batch(n=32, d=8, seed=7, dtype=torch.float32)
    x = x * 100  # large distances
    ref = triplet_loss(x, labels, mining=mining, margin=1.0)
    xh = x.to(dtype).requires_grad_(True)
    loss = triplet_loss(xh, labels, mining=mining, margin=1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-1)


def test_module_equals_function():
    x, labels = random_batch(seed=8)
    for mining in MININGS:
        module = TripletLoss(margin=0.3, mining=mining, distance="cosine", soft=False, reduction="sum")
        assert torch.equal(module(x, labels), triplet_loss(x, labels, 0.3, mining, "cosine", reduction="sum"))
    assert "batch_hard" in repr(TripletLoss())


def test_bad_arguments():
    x, labels = random_batch()
    with pytest.raises(InvalidArgumentError, match="mining"):
        triplet_loss(x, labels, mining="hard")
    with pytest.raises(InvalidArgumentError, match="distance"):
        triplet_loss(x, labels, distance="l1")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        triplet_loss(x, labels, reduction="avg")
    with pytest.raises(InvalidArgumentError, match="margin"):
        triplet_loss(x, labels, margin=-0.1)
    with pytest.raises(InvalidArgumentError, match="block_size"):
        triplet_loss(x, labels, block_size=0)
    with pytest.raises(ShapeError, match="labels"):
        triplet_loss(x, labels[:-1])
    with pytest.raises(ShapeError, match="embeddings"):
        triplet_loss(x[0], labels)
    with pytest.raises(DTypeError, match="labels"):
        triplet_loss(x, labels.float())
    with pytest.raises(DTypeError, match="embeddings"):
        triplet_loss(labels.unsqueeze(1), labels)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        TripletLoss(reduction="avg")


# --- pytorch-metric-learning -------------------------------------------------------------------
# Definitions that match (PML 2.x):
#   batch_hard: TripletMarginLoss(margin, distance=D, reducer=MeanReducer()) + BatchHardMiner(distance=D)
#               == ours (mean over anchors that have a positive and a negative).
#               With PML's default AvgNonZeroReducer the value is ours' "sum" / #(anchors with loss > 0).
#   batch_all:  TripletMarginLoss(margin, distance=D) without a miner (all triplets) and its default
#               AvgNonZeroReducer == ours (mean over triplets with positive loss).
#   soft:       TripletMarginLoss(margin=0, smooth_loss=True) == ours with soft=True.
#   D: LpDistance(normalize_embeddings=False) == "euclidean"; LpDistance(normalize_embeddings=True)
#      == "euclidean" with normalize=True; LpDistance(power=2, ...) == "squared_euclidean";
#      CosineSimilarity() == "cosine" (PML's inverted margin gives the same d_ap - d_an).
#   semi_hard: PML's semihard miner keeps every triplet with d_ap < d_an < d_ap + margin, a different
#      definition from FaceNet/TF's one-negative-per-pair rule used here; checked against the loop reference.

pml = pytest.importorskip("pytorch_metric_learning")


def _pml_distance(distance: str, normalize: bool):
    from pytorch_metric_learning import distances

    if distance == "cosine":
        return distances.CosineSimilarity()
    power = 2 if distance == "squared_euclidean" else 1
    return distances.LpDistance(normalize_embeddings=normalize, power=power)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [False, True])
def test_pml_batch_hard(distance, normalize):
    from pytorch_metric_learning import losses, miners, reducers

    x, labels = random_batch(n=64, d=8, classes=6, unknown=False, seed=9, dtype=torch.float32)
    d = _pml_distance(distance, normalize)
    margin = 0.2
    ours = triplet_loss(x, labels, margin, "batch_hard", distance, normalize=normalize)
    loss = losses.TripletMarginLoss(margin=margin, distance=d, reducer=reducers.MeanReducer())
    theirs = loss(x, labels, miners.BatchHardMiner(distance=d)(x, labels))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Their default reducer averages over non-zero anchors only.
    per = triplet_loss(x, labels, margin, "batch_hard", distance, normalize=normalize, reduction="none")
    theirs_default = losses.TripletMarginLoss(margin=margin, distance=d)(
        x, labels, miners.BatchHardMiner(distance=d)(x, labels)
    )
    torch.testing.assert_close(per.sum() / (per > 0).sum(), theirs_default, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
def test_pml_batch_all(distance):
    from pytorch_metric_learning import losses

    x, labels = random_batch(n=40, d=6, classes=5, unknown=False, seed=10, dtype=torch.float64)
    d = _pml_distance(distance, False)
    margin = 0.3
    ours = triplet_loss(x, labels, margin, "batch_all", distance)
    theirs = losses.TripletMarginLoss(margin=margin, distance=d)(x, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("block", [None, 7])
def test_pml_batch_all_blocks_and_gradients(block):
    """Several anchor blocks, PML's default (normalised) distance, values and gradients."""
    from pytorch_metric_learning import losses

    x, labels = random_batch(n=150, d=8, classes=6, unknown=False, seed=16, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = triplet_loss(x1, labels, 0.2, "batch_all", normalize=True, block_size=block)
    theirs = losses.TripletMarginLoss(margin=0.2)(x2, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_pml_soft_margin(mining):
    from pytorch_metric_learning import losses, miners, reducers

    x, labels = random_batch(n=40, d=6, classes=5, unknown=False, seed=11, dtype=torch.float64)
    d = _pml_distance("euclidean", False)
    loss = losses.TripletMarginLoss(margin=0.0, smooth_loss=True, distance=d, reducer=reducers.MeanReducer())
    tuples = miners.BatchHardMiner(distance=d)(x, labels) if mining == "batch_hard" else None
    theirs = loss(x, labels, tuples)
    ours = triplet_loss(x, labels, mining=mining, soft=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    assert math.isfinite(ours.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, labels = random_batch(n=300, d=16, classes=20, seed=12, dtype=torch.float64)
    for mining in MININGS:
        for soft in (False, True):
            cpu = triplet_loss(x, labels, mining=mining, soft=soft, block_size=64)
            xc = x.cuda().requires_grad_(True)
            gpu = triplet_loss(xc, labels.cuda(), mining=mining, soft=soft, block_size=64)
            gpu.backward()
            assert gpu.device.type == "cuda" and xc.grad.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), cpu)
