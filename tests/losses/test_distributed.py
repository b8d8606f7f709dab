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
from fewsight.losses.circle import circle_loss

SIZES = (5, 7)  # uneven local batches
D_IN, D = 6, 4
CASES = [
    # (pooling, reduction, block_size)
    ("anchor", "mean", None),
    ("anchor", "sum", None),
    ("anchor", "mean", 3),
    ("anchor", "none", None),
    ("batch", "mean", None),
    ("batch", "mean", 2),
]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    y[[1, 8]] = -1  # unknown samples on both ranks
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D).double()


def _run(model, x, y, case, gather):
    pooling, reduction, bs = case
    emb = model(x)
    emb.retain_grad()
    loss = circle_loss(emb, y, gamma=16.0, pooling=pooling, reduction=reduction, block_size=bs, gather=gather)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), emb.grad.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _problem()
        start = sum(SIZES[:rank])
        xl, yl = x[start : start + SIZES[rank]], y[start : start + SIZES[rank]]
        results = []
        for case in CASES:
            model = _model()
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
        loss, g_emb, g_params = _run(_model(), x, y, case, gather=False)
        per_rank = [r[i] for r in ranks]
        reduction = case[1]
        if reduction == "none":
            # local anchors' terms, unscaled; gradients of their sum reach every rank
            torch.testing.assert_close(torch.cat([r["loss"] for r in per_rank]), loss)
            scale = 1.0
        else:
            # the rank mean of the returned values is the single-process loss ...
            torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), loss)
            scale = float(world)
            # ... and DDP-averaged parameter gradients are the single-process gradients
            for r in per_rank:
                for a, b in zip(r["g_params"], g_params):
                    torch.testing.assert_close(a, b)
        # each rank's embedding gradient = world x (its rows of the single-process gradient)
        torch.testing.assert_close(torch.cat([r["g_emb"] for r in per_rank]), g_emb * scale, msg=str(case))


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
