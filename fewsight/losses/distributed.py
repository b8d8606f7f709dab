"""Gather embeddings and labels from every DDP rank, with gradients that reach every rank.

``all_gather_with_grad(x)`` concatenates ``x`` from all ranks (rank order; batch sizes may
differ). Its backward all-reduces (sums) the incoming gradient over the ranks and returns this
rank's rows: a row's gradient then holds the contributions of the losses computed on every
rank, as if one process had computed all of them.

Convention used by the fewsight losses with ``gather=True`` (same as pytorch-metric-learning's
``DistributedLossWrapper``): each rank returns ``world_size x`` its share of the full-batch
loss, so the rank mean of the returned values equals the single-process loss on the
concatenated batch, and after DDP's gradient AVERAGING the parameter gradients equal the
single-process gradients exactly.

Without an initialised process group (or with one rank) everything here is the identity.

Example:
    >>> import torch
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> g = all_gather_with_grad(x)          # not distributed: the same tensor
    >>> g.tensor.shape, g.offset, g.world_size
    (torch.Size([4, 3]), 0, 1)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "Gathered",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_sum",
    "gather_embeddings_and_labels",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if is_distributed() else 0


class Gathered(NamedTuple):
    """A gathered tensor, where this rank's rows start in it, and the number of ranks."""

    tensor: Tensor
    offset: int
    world_size: int


def _sizes(x: Tensor, group: Any) -> list[int]:
    # One small collective (and host read) per call so that ranks may hold different batch sizes.
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    out = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, n, group=group)
    return [int(t.item()) for t in out]


def _gather(x: Tensor, sizes: list[int], group: Any) -> Tensor:
    top = max(sizes)
    x = x.contiguous()
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], me: int, group: Any) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.me, ctx.group = sizes, me, group
        return _gather(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.me])
        return grad[start : start + ctx.sizes[ctx.me]], None, None, None


def all_gather_with_grad(x: Tensor, group: Any = None) -> Gathered:
    """``Tensor[n_r, ...]`` on each rank -> ``Tensor[sum n_r, ...]`` (rank order), differentiable.

    Every rank must call it (and, when gradients are needed, backward) in the same order.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return Gathered(x, 0, 1)
    sizes = _sizes(x, group)
    me = dist.get_rank(group)
    return Gathered(_AllGather.apply(x, sizes, me, group), sum(sizes[:me]), len(sizes))


def all_gather_no_grad(x: Tensor, group: Any = None) -> Gathered:
    """As :func:`all_gather_with_grad` for tensors that need no gradient (labels, ids)."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return Gathered(x, 0, 1)
    sizes = _sizes(x, group)
    me = dist.get_rank(group)
    return Gathered(_gather(x.detach(), sizes, group), sum(sizes[:me]), len(sizes))


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """Sum of ``x`` over the ranks (a new tensor, no gradient); ``x`` itself when not distributed."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def gather_embeddings_and_labels(
    embeddings: Tensor, labels: Tensor, group: Any = None
) -> tuple[Tensor, Tensor, int, int]:
    """``(all_embeddings, all_labels, offset, world_size)``: embeddings with gradient, labels without.

    ``offset`` is where this rank's rows start in the gathered batch.
    """
    e = all_gather_with_grad(embeddings, group)
    y = all_gather_no_grad(labels, group)
    return e.tensor, y.tensor, e.offset, e.world_size
