"""Cross-rank gathering: 2 CPU processes on gloo equal one process on the concatenated batch."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewsight.losses import distributed as fdist
from fewsight.losses.center import center_loss
from fewsight.losses.circle import circle_loss
from fewsight.losses.triplet import triplet_loss

SIZES = (5, 7)  # uneven local batches
D_IN, D, C = 6, 4, 3


def _circle(pooling, reduction, bs):
    def f(model, e, y, gather):
        return circle_loss(e, y, gamma=16.0, pooling=pooling, reduction=reduction, block_size=bs, gather=gather)

    return f"circle-{pooling}-{reduction}-{bs}", f, reduction


def _triplet(mining, reduction, bs=None, soft=False, distance="euclidean"):
    def f(model, e, y, gather):
        return triplet_loss(
            e, y, margin=0.5, mining=mining, distance=distance, soft=soft, reduction=reduction, block_size=bs, gather=gather
        )

    return f"triplet-{mining}-{reduction}-{bs}-{soft}-{distance}", f, reduction


def _center(reduction, distance="squared_euclidean"):
    def f(model, e, y, gather):
        return center_loss(e, y, model.centers, distance=distance, reduction=reduction, gather=gather)

    return f"center-{reduction}-{distance}", f, reduction


CASES = [
    _circle("anchor", "mean", None),
    _circle("anchor", "sum", None),
    _circle("anchor", "mean", 3),
    _circle("anchor", "none", None),
    _circle("batch", "mean", None),
    _circle("batch", "mean", 2),
    *[_triplet(m, r) for m in ("batch_hard", "batch_all", "semi_hard") for r in ("mean", "sum", "none")],
    _triplet("batch_hard", "mean", bs=2, soft=True, distance="cosine"),
    _triplet("batch_all", "mean", bs=2, soft=True),
    _triplet("batch_all", "mean", bs=3, distance="cosine"),
    _triplet("semi_hard", "mean", bs=1, distance="squared_euclidean"),
    _center("mean"),
    _center("sum", "euclidean"),
    _center("none", "cosine"),
]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (sum(SIZES),), generator=g)
    y[[1, 8]] = -1  # unknown samples on both ranks
    return x, y


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(D_IN, D).double()
        self.centers = torch.nn.Parameter(torch.randn(C, D, dtype=torch.float64))


def _run(model, x, y, case, gather):
    _, fn, reduction = case
    emb = model.lin(x)
    emb.retain_grad()
    loss = fn(model, emb, y, gather)
    (loss.sum() if reduction == "none" else loss).backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.detach(), emb.grad.detach(), grads


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _problem()
        start = sum(SIZES[:rank])
        xl, yl = x[start : start + SIZES[rank]], y[start : start + SIZES[rank]]
        results = []
        for case in CASES:
            model = _Model()
            loss, g_emb, g_params = _run(model, xl, yl, case, gather=True)
            for gp in g_params:  # what DDP does: average the parameter gradients over the ranks
                dist.all_reduce(gp)
                gp /= world
            results.append({"loss": loss, "g_emb": g_emb, "g_params": g_params})
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_gather_two_ranks_equals_single_process():
    world = len(SIZES)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    x, y = _problem()
    for i, case in enumerate(CASES):
        loss, g_emb, g_params = _run(_Model(), x, y, case, gather=False)
        per_rank = [r[i] for r in ranks]
        reduction = case[2]
        if reduction == "none":
            # local anchors' terms, unscaled; gradients of their sum reach every rank
            torch.testing.assert_close(torch.cat([r["loss"] for r in per_rank]), loss, msg=case[0])
            scale = 1.0
        else:
            # the rank mean of the returned values is the single-process loss ...
            torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), loss, msg=case[0])
            scale = float(world)
            # ... and DDP-averaged parameter gradients are the single-process gradients
            for r in per_rank:
                for a, b in zip(r["g_params"], g_params):
                    torch.testing.assert_close(a, b, msg=case[0])
        # each rank's embedding gradient = world x (its rows of the single-process gradient)
        torch.testing.assert_close(torch.cat([r["g_emb"] for r in per_rank]), g_emb * scale, msg=case[0])


def test_not_distributed_is_identity():
    assert not fdist.is_distributed() and fdist.world_size() == 1 and fdist.rank() == 0
    x = torch.randn(5, 3, requires_grad=True)
    g = fdist.all_gather_with_grad(x)
    assert g.tensor is x and g.offset == 0 and g.world_size == 1
    e, lab, off, w = fdist.gather_embeddings_and_labels(x, torch.arange(5))
    assert e is x and off == 0 and w == 1 and torch.equal(lab, torch.arange(5))
    assert fdist.all_reduce_sum(torch.tensor(3.0)).item() == 3.0
    y = torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(circle_loss(x, y, gather=True), circle_loss(x, y))
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        torch.testing.assert_close(triplet_loss(x, y, mining=mining, gather=True), triplet_loss(x, y, mining=mining))
    centers = torch.randn(3, 3)
    torch.testing.assert_close(center_loss(x, y, centers, gather=True), center_loss(x, y, centers))
