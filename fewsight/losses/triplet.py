"""Triplet margin loss with in-batch mining (Schroff et al. 2015; Hermans et al. 2017).

For an anchor ``a``, a positive ``p`` (same label, ``p != a``) and a negative ``n`` (another
label): ``ℓ = max(d(a, p) - d(a, n) + margin, 0)``, or ``softplus(d(a, p) - d(a, n))`` for the
soft-margin variant (Hermans et al. 2017, "In Defense of the Triplet Loss"). Samples with a
label ``< 0`` are unknown: they are never anchors, positives or negatives.

Mining strategies:

* ``"batch_hard"`` (Hermans et al.): per anchor its farthest positive and nearest negative; the
  mean is over anchors that have at least one positive and one negative. Memory
  ``O(N·D + block²)``: the hardest indices are found under ``no_grad`` in ``block × block`` tiles of
  the distance matrix (running max / min), then ``d(a, p*)`` and ``d(a, n*)`` are recomputed with
  autograd from the gathered rows (the gradient of a max is the gradient at its argmax). With
  ``block_size=None`` the tiles are 1024 wide (one dense tile up to 1024 known samples; larger
  batches are tiled, which keeps the working set in cache); every tiling gives the
  same result.
* ``"batch_all"``: every valid triplet; the mean is over triplets with a positive loss (the
  "batch all +" of Hermans et al., also what pytorch-metric-learning's default
  ``AvgNonZeroReducer`` does); with ``soft=True`` every triplet has a positive loss, so the mean
  is over all valid triplets.
* ``"semi_hard"`` (FaceNet, as TensorFlow Addons' ``triplet_semihard_loss``): for each (anchor,
  positive) pair, the nearest negative farther than the positive (``d(a, n) > d(a, p)``); when no
  negative is farther, the farthest negative (the least hard of the violating ones, which keeps
  early training from collapsing as FaceNet warns). The mean is over (anchor, positive) pairs
  whose anchor has a negative.

Batch-all and semi-hard are block-wise: the known samples are sorted by label, so an anchor's
positives are a contiguous run gathered by index (``P`` = the largest class size − 1), and anchor
blocks of ``rows × K`` distances are visited one at a time. Every loss is, to first order,
``Σ_(a, j) W_aj d(a, j)``: the hinge batch-all weights a positive pair by its number of active
negatives and a negative by its number of active positives (``d_an < d_ap + margin``: per
negative, the count of the anchor's sorted ``d_ap + margin`` at or below it, so nothing
``K × P × K`` is formed), semi-hard weights the chosen pair by the hinge's slope. A custom
backward recomputes each block's distances and weights. Memory ``O(K·D + rows·K)``, with
``rows·K`` about 2²⁰ by default; nothing ``K × K`` is kept for backward. Time: the ``K² D`` of the
distance GEMMs plus ``K² P`` comparisons (``K² log P`` by binary search when ``P > 16``) for the
hinge batch-all and semi-hard; the soft batch-all evaluates its ``K² P`` triplets in sub-blocks.

``gather=True`` under ``torch.distributed`` (:mod:`fewsight.losses.distributed`): the LOCAL
samples are the anchors, their positives and negatives come from the batch gathered from all
ranks (gradients reach every rank). As for the circle loss, each rank returns ``world_size x`` its
share of the full-batch loss (``"mean"`` divides by the counted terms of ALL ranks), so the rank
mean of the values is the single-process loss on the concatenated batch and, after DDP's
gradient averaging, the gradients are the single-process ones. ``reduction="none"`` returns the
local anchors' terms, unscaled. Not distributed: ignored.

``reduction="sum"`` sums the counted terms (anchors, triplets or pairs as above); ``"none"``
returns ``Tensor[N]``, each anchor's sum of its terms (0 for unknown or invalid anchors), so
``none.sum() == sum``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fewsight.errors import InvalidArgumentError, check_choice, check_real
from fewsight.losses import distributed as _dist
from fewsight.losses._common import check_embeddings_labels, check_reduction, check_squared_distances, reduce_loss, upcast
from fewsight.losses._common import normalize as _normalize

__all__ = ["TRIPLET_MININGS", "TRIPLET_DISTANCES", "triplet_loss", "TripletLoss"]

TRIPLET_MININGS = ("batch_hard", "batch_all", "semi_hard")
TRIPLET_DISTANCES = ("euclidean", "squared_euclidean", "cosine")

# Batch-hard default tile side: measured fastest on CPU (4 MiB of float32 tiles stay in cache and are
# reused by the allocator); batches up to this many known samples are one dense tile.
_AUTO_BLOCK = 1024
_SOFT_ALL_ELEMENTS = 1 << 24  # soft batch-all: triplets evaluated at once
# Batch-all / semi-hard default anchor block: rows × K distances of about this many elements.
_ROW_ELEMENTS = 1 << 20
_COMPARE_MAX = 16  # up to this many positives per anchor, buckets by comparisons (else binary search)


def _safe_sqrt(sq: Tensor) -> Tensor:
    # sqrt's slope is infinite at 0 (coincident points): value 0 and gradient 0 there instead.
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _row_distance(a: Tensor, b: Tensor, distance: str, eps: float) -> Tensor:
    """Distance between matching rows ``Tensor[M, D] x Tensor[M, D] -> Tensor[M]`` (differences, not mm)."""
    if distance == "cosine":
        return 1.0 - (_normalize(a, eps) * _normalize(b, eps)).sum(dim=1)
    sq = (a - b).pow(2).sum(dim=1)
    return sq if distance == "squared_euclidean" else _safe_sqrt(sq)


def _dense_distance(x: Tensor, distance: str, eps: float) -> Tensor:
    """All-pairs distance ``Tensor[K, D] -> Tensor[K, K]`` with autograd (one matmul): the dense reference form."""
    if distance == "cosine":
        xn = _normalize(x, eps)
        return 1.0 - xn @ xn.t()
    sqn = x.pow(2).sum(dim=1)
    sq = torch.addmm(sqn.unsqueeze(1) + sqn.unsqueeze(0), x, x.t(), alpha=-2.0).clamp(min=0)
    return sq if distance == "squared_euclidean" else _safe_sqrt(sq)


@torch.no_grad()
def _hardest_indices(
    x: Tensor, groups: Tensor, distance: str, block: int, eps: float, anchors: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per anchor row (all rows, or ``anchors: Long[A]``), the column index of the farthest
    same-group and of the nearest other-group sample.

    Works in ``block × block`` tiles with a running max / min. For Euclidean distances the key is
    ``|x_c|² - 2 x_r·x_c``, which orders the columns of a row as the (squared) distance does; for
    cosine it is ``-x̂_r·x̂_c``. Rows without a positive / negative get an arbitrary index.
    """
    k = x.shape[0]
    if distance == "cosine":
        x = _normalize(x, eps)
        col_bias = None
    else:
        col_bias = x.pow(2).sum(dim=1)
    a = k if anchors is None else anchors.shape[0]
    best_pos = x.new_full((a,), float("-inf"))
    best_neg = x.new_full((a,), float("inf"))
    pos_idx = torch.zeros(a, dtype=torch.long, device=x.device)
    neg_idx = torch.zeros(a, dtype=torch.long, device=x.device)
    for r0 in range(0, a, block):
        r1 = min(r0 + block, a)
        if anchors is None:
            xr, gr = x[r0:r1], groups[r0:r1].unsqueeze(1)
        else:
            rid = anchors[r0:r1]
            xr, gr = x.index_select(0, rid), groups.index_select(0, rid).unsqueeze(1)
        for c0 in range(0, k, block):
            c1 = min(c0 + block, k)
            xc = x[c0:c1]
            if col_bias is None:
                key = torch.mm(xr, xc.t()).neg_()
            else:
                key = torch.addmm(col_bias[c0:c1].unsqueeze(0), xr, xc.t(), alpha=-2.0)
            same = gr == groups[c0:c1].unsqueeze(0)
            pos_key = torch.where(same, key, float("-inf"))
            if anchors is not None:  # an anchor is not its own positive
                pos_key.masked_fill_(rid.unsqueeze(1) == torch.arange(c0, c1, device=x.device), float("-inf"))
            elif r0 == c0:
                pos_key.diagonal().fill_(float("-inf"))
            neg_key = key.masked_fill_(same, float("inf"))
            pv, pi = pos_key.max(dim=1)
            nv, ni = neg_key.min(dim=1)
            if c0 == 0:
                best_pos[r0:r1], pos_idx[r0:r1] = pv, pi
                best_neg[r0:r1], neg_idx[r0:r1] = nv, ni
                continue
            # Strict comparisons keep the earlier column on ties, as one dense max / min would.
            better = pv > best_pos[r0:r1]
            best_pos[r0:r1] = torch.where(better, pv, best_pos[r0:r1])
            pos_idx[r0:r1] = torch.where(better, pi + c0, pos_idx[r0:r1])
            better = nv < best_neg[r0:r1]
            best_neg[r0:r1] = torch.where(better, nv, best_neg[r0:r1])
            neg_idx[r0:r1] = torch.where(better, ni + c0, neg_idx[r0:r1])
    return pos_idx, neg_idx


def _violation(d_ap: Tensor, d_an: Tensor, margin: float, soft: bool) -> Tensor:
    return F.softplus(d_ap - d_an) if soft else (d_ap - d_an + margin).clamp(min=0)


def _batch_hard(
    x: Tensor, known_idx: Tensor, groups: Tensor, valid: Tensor, distance: str, margin: float,
    soft: bool, block: int, eps: float, anchors: Tensor | None,
) -> Tensor:
    """Per anchor (every known sample, or ``anchors``: positions in ``known_idx``) its hardest triplet's term."""
    pos_local, neg_local = _hardest_indices(x.detach()[known_idx], groups, distance, block, eps, anchors)
    own = torch.arange(groups.shape[0], device=x.device) if anchors is None else anchors
    # Invalid anchors point at themselves: distance exactly 0 and no gradient through them.
    pos_local = torch.where(valid, pos_local, own)
    neg_local = torch.where(valid, neg_local, own)
    xa = x.index_select(0, known_idx[own])
    d_ap = _row_distance(xa, x.index_select(0, known_idx[pos_local]), distance, eps)
    d_an = _row_distance(xa, x.index_select(0, known_idx[neg_local]), distance, eps)
    return _violation(d_ap, d_an, margin, soft)


# --------------------------------------------------------------------------------------------
# Block-wise batch-all and semi-hard: anchor blocks of ``rows × K`` distances, no K × K matrix.
# Rows are sorted by label inside, so an anchor's positives are the contiguous run of its group:
# they are gathered by index (``Tensor[b, P]``) and its group's columns are set to +inf, which
# makes every remaining column a negative without any ``b × K`` mask.
# --------------------------------------------------------------------------------------------


def _block_distance(xr: Tensor, x: Tensor, sqn_r: Tensor | None, sqn: Tensor | None, distance: str) -> tuple[Tensor, Tensor]:
    """``(d, aux)`` for anchor rows ``xr: Tensor[b, D]`` against ``x: Tensor[K, D]``, both ``Tensor[b, K]``.

    ``x`` is already unit-norm for ``"cosine"`` (``aux`` = the cosine); otherwise ``aux`` is the
    squared distance before clamping at 0. Same formulas as :func:`_dense_distance`.
    """
    if distance == "cosine":
        s = xr @ x.t()
        return torch.sub(1.0, s), s
    sq_raw = torch.addmm(sqn.unsqueeze(0), xr, x.t(), alpha=-2.0).add_(sqn_r.unsqueeze(1))
    d = sq_raw.clamp(min=0)
    return (d if distance == "squared_euclidean" else d.sqrt_()), sq_raw


def _bucket(sorted_rows: Tensor, values: Tensor, right: bool) -> Tensor:
    """``searchsorted`` of ``values: Tensor[b, K]`` in ascending ``sorted_rows: Tensor[b, P]`` (int64).

    Few boundaries: ``P`` vectorised comparisons beat a binary search per element.
    """
    if sorted_rows.shape[1] > _COMPARE_MAX:
        return torch.searchsorted(sorted_rows.contiguous(), values.contiguous(), side="right" if right else "left")
    out = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)  # P <= _COMPARE_MAX < 256
    for i in range(sorted_rows.shape[1]):  # over positive slots, not anchors
        t = sorted_rows[:, i : i + 1]
        out += (t <= values) if right else (t < values)
    return out.long()


def _block_terms(
    d: Tensor, rows: Tensor, start: Tensor, size: Tensor, p_max: int, mining: str, margin: float, soft: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-anchor sums ``Tensor[b]``, the counted terms (0-dim), and ``W = d(sums)/d(d): Tensor[b, K]``.

    ``d`` (modified in place) holds the block's distances in label-sorted column order; ``rows``,
    ``start``, ``size``: ``Long[b]`` each anchor's column, group start and group size. Every loss
    here is first order ``Σ_j W_aj d_aj`` with per-pair weights (counts of active triplets, or
    the hinge / softplus slopes of the chosen pairs), so backward needs only a block's ``W``.
    """
    b, k = d.shape
    if p_max == 0:  # no anchor has a positive
        return d.new_zeros(b), d.new_zeros(()), d.new_zeros(b, k) if need_weights else None
    p = p_max
    inf = float("inf")
    # Positive slots j < size - 1: the group's columns, skipping the anchor's own.
    j = torch.arange(p, device=d.device)
    pcol = start.unsqueeze(1) + j
    pcol += pcol >= rows.unsqueeze(1)
    ok_pos = j < (size - 1).unsqueeze(1)
    pcol = torch.where(ok_pos, pcol, rows.unsqueeze(1))
    d_pos, order = torch.where(ok_pos, d.gather(1, pcol), inf).sort(dim=1)  # ascending, +inf pads last
    pcol, ok_pos = pcol.gather(1, order), ok_pos.gather(1, order)
    gj = torch.arange(p_max + 1, device=d.device)
    gcol = torch.where(gj < size.unsqueeze(1), start.unsqueeze(1) + gj, rows.unsqueeze(1))  # the whole group
    num_neg = k - size
    n_pos = ok_pos.sum(dim=1)
    w = None

    if mining == "batch_all" and soft:
        d.scatter_(1, gcol, inf)  # now d = negatives' distances, +inf elsewhere
        d_ap = torch.where(ok_pos, d_pos, torch.zeros_like(d_pos))
        value = d.new_zeros(b)
        w_pos = d.new_zeros(b, p)
        w_neg = d.new_zeros(b, k) if need_weights else None
        step = max(1, _SOFT_ALL_ELEMENTS // (p * k))
        for a0 in range(0, b, step):  # sub-blocks of anchors: Tensor[step, P, K] at a time
            a1 = min(a0 + step, b)
            trip = d_ap[a0:a1].unsqueeze(2) - d[a0:a1].unsqueeze(1)  # -inf at non-negatives
            okp = ok_pos[a0:a1].unsqueeze(2)
            value[a0:a1] = F.softplus(trip).mul_(okp).sum(dim=(1, 2))
            if w_neg is not None:
                sig = torch.sigmoid(trip).mul_(okp)
                w_pos[a0:a1] = sig.sum(dim=2)
                w_neg[a0:a1] = sig.sum(dim=1)
        count = (n_pos * num_neg).sum().to(d.dtype)
        if w_neg is not None:
            w = w_neg.neg_().scatter_add_(1, pcol, w_pos)
        return value, count, w

    if mining == "batch_all":
        # Triplet (a, p, n) active iff d_an < d_ap + m. With bucket(n) = #{p: d_ap + m <= d_an}, n is
        # active for c_an = P_a - bucket(n) positives, and c_ap(i) = #{n: d_an < d_ap(i) + m}. The
        # group's columns hold the largest finite value: bucket = P_a there, so c_an = 0 unmasked.
        d.scatter_(1, gcol, torch.finfo(d.dtype).max)
        thr = d_pos + margin  # ascending, +inf pads
        if p <= _COMPARE_MAX:
            acc = torch.zeros((b, k), dtype=torch.uint8, device=d.device)
            c_ap = d.new_empty(b, p)
            for i in range(p):  # over positive slots, not anchors
                ge = thr[:, i : i + 1] <= d
                acc += ge
                c_ap[:, i] = k - ge.sum(dim=1)
            c_an = acc.to(d.dtype)
        else:
            bucket = torch.searchsorted(thr, d, side="right")
            c_ap = d.new_zeros(b, p + 1).scatter_add_(1, bucket, torch.ones_like(d)).cumsum(dim=1)[:, :p]
            c_an = bucket.to(d.dtype)
        c_ap.masked_fill_(~ok_pos, 0)
        c_an.neg_().add_(n_pos.unsqueeze(1))
        if need_weights:
            return d.new_zeros(b), c_ap.sum(), c_an.neg_().scatter_add_(1, pcol, c_ap)
        d_ap = torch.where(ok_pos, d_pos, torch.zeros_like(d_pos))
        value = (c_ap * (d_ap + margin)).sum(dim=1) - torch.linalg.vecdot(c_an, d, dim=1)
        return value, c_ap.sum(), None

    # Semi-hard: the nearest negative strictly farther than the positive, else the farthest one.
    # bucket(n) = #{p: d_ap < d_an}: n is farther than the positive in slot i iff bucket(n) > i, so
    # slot i's answer is the minimum over buckets i+1..P (a suffix minimum of bucket minima).
    d.scatter_(1, gcol, inf)  # now d = negatives' distances, +inf elsewhere
    spare = p_max + 1  # bucket of the group's own columns
    bucket = _bucket(d_pos, d, right=False).scatter_(1, gcol, spare)
    bmin = d.new_full((b, spare + 1), inf).scatter_reduce_(1, bucket, d, "amin")
    cols = torch.arange(k, device=d.device).expand(b, k)
    bcol = torch.full((b, spare + 1), k, dtype=torch.long, device=d.device)
    at_min = d == bmin.gather(1, bucket)
    bcol.scatter_reduce_(1, bucket, torch.where(at_min, cols, k), "amin")  # first column at the minimum
    smin, sidx = bmin[:, :spare].flip(1).cummin(dim=1)
    smin, sidx = smin.flip(1)[:, 1:], (p_max - sidx).flip(1)[:, 1:]  # slot i: min over buckets > i
    far_d, far_col = d.scatter_(1, gcol, -inf).max(dim=1)
    has_far = torch.isfinite(smin)
    d_an = torch.where(has_far, smin, far_d.unsqueeze(1))
    n_col = torch.where(has_far, bcol.gather(1, sidx), far_col.unsqueeze(1))
    pair = ok_pos & (num_neg > 0).unsqueeze(1)
    zero = torch.zeros_like(d_pos)
    diff = torch.where(pair, d_pos - d_an, zero)
    if soft:
        term, slope = F.softplus(diff), torch.sigmoid(diff)
    else:
        term = (diff + margin).clamp(min=0)
        slope = (diff + margin > 0).to(d.dtype)  # clamp(min=0)'s gradient: 0 at the kink
    value = torch.where(pair, term, zero).sum(dim=1)
    if need_weights:
        slope = torch.where(pair, slope, zero)
        n_col = torch.where(pair, n_col.clamp(max=k - 1), rows.unsqueeze(1))
        w = d.new_zeros(b, k).scatter_add_(1, pcol, slope).scatter_add_(1, n_col, -slope)
    return value, pair.sum().to(d.dtype), w


def _sort_by_group(x: Tensor, groups: Tensor, distance: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """``(order, xs, |xs|² or None, group of each sorted row, group starts, group sizes)``."""
    order = torch.argsort(groups, stable=True)
    gs = groups.index_select(0, order)
    sizes = torch.bincount(gs)
    xs = x.index_select(0, order)
    return order, xs, None if distance == "cosine" else xs.pow(2).sum(dim=1), gs, sizes.cumsum(0) - sizes, sizes


class _BlockTriplets(torch.autograd.Function):
    """``(per-anchor sums Tensor[A], count)`` of batch-all / semi-hard over anchor blocks.

    ``anchors: Long[A]`` are rows of ``x`` (all of them when not gathering); the columns are every
    row of ``x``, sorted by label. Forward and backward visit ``rows × K`` distance blocks; the
    backward pass recomputes each block's distances and pair weights ``W`` and applies
    ``H = g_a W_aj ∂d_aj/∂(sq or s)``: ``dX_a += 2(Σ_j H_aj x_a − H X)``, ``dX_j += 2(Σ_a H_aj x_j − Hᵀ X_a)``
    (Euclidean) or ``−H X``, ``−Hᵀ X_a`` (cosine on unit rows). Saved for backward: ``X`` only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, groups: Tensor, anchors: Tensor, p_max: int, mining: str, distance: str, margin: float,
        soft: bool, rows: int,
    ) -> tuple[Tensor, Tensor]:
        ctx.args = (p_max, mining, distance, margin, soft, rows)
        ctx.save_for_backward(x, groups, anchors)
        order, xs, sqn, gs, starts, sizes = _sort_by_group(x, groups, distance)
        apos = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=x.device))[anchors]
        value = x.new_zeros(anchors.shape[0])
        count = x.new_zeros(())
        for r0 in range(0, apos.shape[0], rows):
            idx = apos[r0 : r0 + rows]  # the anchors' columns in sorted order
            g = gs[idx]
            d, _ = _block_distance(xs[idx], xs, None if sqn is None else sqn[idx], sqn, distance)
            v, c, _ = _block_terms(d, idx, starts[g], sizes[g], p_max, mining, margin, soft, need_weights=False)
            value[r0 : r0 + rows] = v
            count += c
        ctx.mark_non_differentiable(count)
        return value, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor | None, _grad_count: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, groups, anchors = ctx.saved_tensors
        p_max, mining, distance, margin, soft, rows = ctx.args
        nones = (None,) * 8
        if grad is None:
            return (torch.zeros_like(x),) + nones
        order, xs, sqn, gs, starts, sizes = _sort_by_group(x, groups, distance)
        apos = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=x.device))[anchors]
        dxs = torch.zeros_like(xs)
        for r0 in range(0, apos.shape[0], rows):
            idx = apos[r0 : r0 + rows]
            g, xr = gs[idx], xs[idx]
            d, aux = _block_distance(xr, xs, None if sqn is None else sqn[idx], sqn, distance)
            if distance == "euclidean":  # d sqrt(sq) / d sq = 1 / (2 d), 0 where sq <= 0
                inv = torch.where(aux > 0, d.reciprocal(), torch.zeros_like(d)).mul_(0.5)
            _, _, w = _block_terms(d, idx, starts[g], sizes[g], p_max, mining, margin, soft, need_weights=True)
            h = w.mul_(grad[r0 : r0 + rows].unsqueeze(1))
            if distance == "cosine":
                h.neg_()  # d = 1 - s
                d_rows = h @ xs
            else:
                if distance == "euclidean":
                    h.mul_(inv)
                else:  # clamp(min=0) passes the gradient where sq > 0
                    h.masked_fill_(aux <= 0, 0.0)
                h.mul_(2.0)
                # sq_aj = |x_a|² + |x_j|² - 2 x_a·x_j
                d_rows = h.sum(dim=1, keepdim=True) * xr
                dxs.addcmul_(h.sum(dim=0).unsqueeze(1), xs)
                h.neg_()
                d_rows.addmm_(h, xs)
            dxs.index_add_(0, idx, d_rows)
            dxs.addmm_(h.t(), xr)
        return (torch.empty_like(dxs).index_copy_(0, order, dxs),) + nones


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    mining: str = "batch_hard",
    distance: str = "euclidean",
    normalize: bool = False,
    soft: bool = False,
    reduction: str = "mean",
    block_size: int | None = None,
    *,
    eps: float = 1e-8,
    gather: bool = False,
) -> Tensor:
    """Triplet loss ``max(d(a, p) - d(a, n) + margin, 0)`` with in-batch mining (Schroff et al. 2015, eq. 1).

    See the module docstring for how each ``mining`` picks triplets and what the mean is over.

    Args:
        embeddings: ``Tensor[N, D]``.
        labels: ``Long[N]``; ``< 0`` means unknown (never anchor, positive or negative).
        margin: ``>= 0``; unused when ``soft``.
        mining: ``"batch_hard"`` (default), ``"batch_all"`` or ``"semi_hard"``.
        distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).
        normalize: L2-normalise the embeddings first.
        soft: soft-margin ``softplus(d_ap - d_an)`` instead of the hinge.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``Tensor[N]``, per-anchor sums).
        block_size: batch-hard tile side (memory ``O(block_size²)``; ``None``: 1024); batch-all and
            semi-hard anchor rows per block (memory ``O(block_size·N)``; ``None``: about 2²⁰ / N).
            Every value gives the same result.
        eps: lower bound of norms when normalising.
        gather: under DDP, mine over the batch gathered from all ranks (see the module docstring).

    Returns:
        The loss (float32 for fp16/bf16 inputs). With no valid anchor, 0 with a gradient graph.

    Raises:
        NonFiniteError: NaN/inf in ``embeddings``, or (Euclidean distances, without ``normalize``)
            ``4 max |x|²``, the bound of the squared distances, overflows the compute dtype, or
            (``"squared_euclidean"``) exceeds what a half-precision gradient can hold.

    Example:
        >>> e = torch.tensor([[0., 0.], [0., 1.], [3., 0.], [3., 2.]])
        >>> triplet_loss(e, torch.tensor([0, 0, 1, 1]), margin=1.0)  # every anchor: max(d_ap - d_an + 1, 0)
        tensor(0.)
        >>> triplet_loss(e, torch.tensor([0, 0, 1, 1]), margin=3.0)
        tensor(1.4189)
    """
    check_reduction(reduction)
    check_choice("mining", mining, TRIPLET_MININGS)
    check_choice("distance", distance, TRIPLET_DISTANCES)
    check_real("margin", margin, low=0)
    check_real("eps", eps, low=0, low_open=True)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise InvalidArgumentError(f"block_size: expected None or an int >= 1, got {block_size!r}")
    check_embeddings_labels(embeddings, labels)
    (x,) = upcast(embeddings)
    if normalize:
        x = _normalize(x, eps)
    n = x.shape[0]

    world = _dist.world_size() if gather else 1
    offset, x_all, y_all, anchors = 0, x, labels, None
    if world > 1:
        x_all, y_all, offset, world = _dist.gather_embeddings_and_labels(x, labels)
    known_idx = (y_all >= 0).nonzero().squeeze(1)
    _, groups, group_count = torch.unique(y_all.index_select(0, known_idx), return_inverse=True, return_counts=True)
    k = known_idx.shape[0]
    if distance != "cosine" and k:
        # Euclidean: every squared distance is at most 4 max |x|²; refuse batches where that bound (or
        # |x|² in the Gram form |a|² + |b|² - 2 a·b) overflows, instead of returning inf / NaN.
        bound = x_all.detach().index_select(0, known_idx).pow(2).sum(dim=1).max().mul(4).reshape(1)
        check_squared_distances("embeddings", bound, embeddings, squared=distance == "squared_euclidean")
    own = group_count[groups]
    valid = (own > 1) & (own < k)  # at least one positive and one negative
    if world > 1:  # this rank's samples are the anchors; positives and negatives come from every rank
        anchors = ((known_idx >= offset) & (known_idx < offset + n)).nonzero().squeeze(1)
        valid = valid.index_select(0, anchors)

    if mining == "batch_hard":
        block = block_size if block_size is not None else _AUTO_BLOCK
        per_known = _batch_hard(x_all, known_idx, groups, valid, distance, margin, soft, block, eps, anchors)
        per_known = torch.where(valid, per_known, torch.zeros_like(per_known))
        count = valid.sum().to(per_known.dtype)
    else:
        xk = x_all.index_select(0, known_idx)
        if distance == "cosine":
            xk = _normalize(xk, eps)
        p_max = int(group_count.max()) - 1 if k else 0  # most positives of an anchor
        rows = block_size if block_size is not None else max(1, _ROW_ELEMENTS // max(k, 1))
        a_idx = torch.arange(k, device=known_idx.device) if anchors is None else anchors
        per_known, count = _BlockTriplets.apply(xk, groups, a_idx, p_max, mining, distance, margin, soft, rows)

    # Anchors back in input order; unknown ones are 0 (scatter into zeros keeps the graph).
    rows_local = known_idx if anchors is None else known_idx.index_select(0, anchors) - offset
    per_anchor = x.new_zeros(n).index_add(0, rows_local, per_known) + x.reshape(-1)[:0].sum()
    if reduction == "none":
        return per_anchor
    if world == 1:
        return reduce_loss(per_anchor, reduction, normalizer=count.clamp(min=1) if reduction == "mean" else None)
    total = per_anchor.sum() * world
    if reduction == "sum":
        return total
    return total / _dist.all_reduce_sum(count).clamp(min=1)


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`: ``forward(embeddings, labels)``.

    Example:
        >>> loss = TripletLoss(margin=0.2, mining="batch_hard")
        >>> loss(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, -1, 3])).shape
        torch.Size([])
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        distance: str = "euclidean",
        normalize: bool = False,
        soft: bool = False,
        reduction: str = "mean",
        block_size: int | None = None,
        *,
        eps: float = 1e-8,
        gather: bool = False,
    ) -> None:
        super().__init__()
        check_choice("mining", mining, TRIPLET_MININGS)
        check_choice("distance", distance, TRIPLET_DISTANCES)
        if not margin >= 0:
            raise InvalidArgumentError(f"margin: expected a number >= 0, got {margin}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
            raise InvalidArgumentError(f"block_size: expected None or an int >= 1, got {block_size!r}")
        self.margin = margin
        self.mining = mining
        self.distance = distance
        self.normalize = normalize
        self.soft = soft
        self.reduction = check_reduction(reduction)
        self.block_size = block_size
        self.eps = eps
        self.gather = bool(gather)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return triplet_loss(
            embeddings,
            labels,
            self.margin,
            self.mining,
            self.distance,
            self.normalize,
            self.soft,
            self.reduction,
            self.block_size,
            eps=self.eps,
            gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, normalize={self.normalize}, "
            f"soft={self.soft}, reduction={self.reduction!r}"
        )
