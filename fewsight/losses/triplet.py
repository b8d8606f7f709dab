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
  is over all valid triplets. Dense: ``O(N²)`` memory, ``O(N² log N)`` time for the hinge
  (per-anchor sorted negatives count the active triplets, nothing ``N³`` is stored); the soft
  variant evaluates the ``N³`` triplets in anchor blocks.
* ``"semi_hard"`` (FaceNet, as TensorFlow Addons' ``triplet_semihard_loss``): for each (anchor,
  positive) pair, the nearest negative farther than the positive (``d(a, n) > d(a, p)``); when no
  negative is farther, the farthest negative (the least hard of the violating ones, which keeps
  early training from collapsing as FaceNet warns). The mean is over (anchor, positive) pairs
  whose anchor has a negative. Dense: ``O(N²)`` memory.

``reduction="sum"`` sums the counted terms (anchors, triplets or pairs as above); ``"none"``
returns ``Tensor[N]``, each anchor's sum of its terms (0 for unknown or invalid anchors), so
``none.sum() == sum``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, check_choice, check_real
from fewsight.losses._common import check_embeddings_labels, check_reduction, reduce_loss, upcast
from fewsight.losses._common import normalize as _normalize

__all__ = ["TRIPLET_MININGS", "TRIPLET_DISTANCES", "triplet_loss", "TripletLoss"]

TRIPLET_MININGS = ("batch_hard", "batch_all", "semi_hard")
TRIPLET_DISTANCES = ("euclidean", "squared_euclidean", "cosine")

# Batch-hard default tile side: measured fastest on CPU (4 MiB of float32 tiles stay in cache and are
# reused by the allocator); batches up to this many known samples are one dense tile.
_AUTO_BLOCK = 1024
_SOFT_ALL_ELEMENTS = 1 << 24  # soft batch-all: triplets evaluated at once


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
    """All-pairs distance ``Tensor[K, D] -> Tensor[K, K]`` with autograd (one matmul)."""
    if distance == "cosine":
        xn = _normalize(x, eps)
        return 1.0 - xn @ xn.t()
    sqn = x.pow(2).sum(dim=1)
    sq = torch.addmm(sqn.unsqueeze(1) + sqn.unsqueeze(0), x, x.t(), alpha=-2.0).clamp(min=0)
    return sq if distance == "squared_euclidean" else _safe_sqrt(sq)


@torch.no_grad()
def _hardest_indices(x: Tensor, groups: Tensor, distance: str, block: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per row, the column index of the farthest same-group and of the nearest other-group sample.

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
    best_pos = x.new_full((k,), float("-inf"))
    best_neg = x.new_full((k,), float("inf"))
    pos_idx = torch.zeros(k, dtype=torch.long, device=x.device)
    neg_idx = torch.zeros(k, dtype=torch.long, device=x.device)
    for r0 in range(0, k, block):
        r1 = min(r0 + block, k)
        xr, gr = x[r0:r1], groups[r0:r1].unsqueeze(1)
        for c0 in range(0, k, block):
            c1 = min(c0 + block, k)
            xc = x[c0:c1]
            if col_bias is None:
                key = torch.mm(xr, xc.t()).neg_()
            else:
                key = torch.addmm(col_bias[c0:c1].unsqueeze(0), xr, xc.t(), alpha=-2.0)
            same = gr == groups[c0:c1].unsqueeze(0)
            pos_key = torch.where(same, key, float("-inf"))
            if r0 == c0:
                pos_key.diagonal().fill_(float("-inf"))  # an anchor is not its own positive
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
    soft: bool, block: int, eps: float,
) -> Tensor:
    pos_local, neg_local = _hardest_indices(x.detach()[known_idx], groups, distance, block, eps)
    # Invalid anchors point at themselves: distance exactly 0 and no gradient through them.
    pos_local = torch.where(valid, pos_local, torch.arange(groups.shape[0], device=x.device))
    neg_local = torch.where(valid, neg_local, torch.arange(groups.shape[0], device=x.device))
    anchors = x.index_select(0, known_idx)
    d_ap = _row_distance(anchors, x.index_select(0, known_idx[pos_local]), distance, eps)
    d_an = _row_distance(anchors, x.index_select(0, known_idx[neg_local]), distance, eps)
    return _violation(d_ap, d_an, margin, soft)


def _batch_all(
    x: Tensor, known_idx: Tensor, groups: Tensor, distance: str, margin: float, soft: bool, eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-anchor sums over all valid triplets, and the number of counted triplets."""
    dist = _dense_distance(x.index_select(0, known_idx), distance, eps)  # [K, K]
    same = groups.unsqueeze(1) == groups.unsqueeze(0)
    pos_mask = same.clone()
    pos_mask.diagonal().fill_(False)
    neg_mask = ~same
    if soft:
        return _batch_all_soft(dist, pos_mask, neg_mask)
    with torch.no_grad():
        # Triplet (a, p, n) is active iff d_an < d_ap + margin. Sorting each anchor's negative
        # (and positive) distances turns the counts into binary searches: no N³ tensor.
        dd = dist.detach()
        inf = torch.tensor(float("inf"), dtype=dd.dtype, device=dd.device)
        neg_sorted = torch.where(neg_mask, dd, inf).sort(dim=1).values
        pos_sorted = torch.where(pos_mask, dd, inf).sort(dim=1).values
        coef_ap = torch.searchsorted(neg_sorted, dd + margin, side="left")
        coef_ap = coef_ap.masked_fill_(~pos_mask, 0).to(dd.dtype)
        below = torch.searchsorted(pos_sorted, dd - margin, side="right")
        coef_an = (pos_mask.sum(dim=1, keepdim=True) - below).masked_fill_(~neg_mask, 0).to(dd.dtype)
    # Σ_active (d_ap - d_an + m) = Σ_p c_ap (d_ap + m) - Σ_n c_an d_an: exact, with the relu's gradient.
    per_anchor = (coef_ap * (dist + margin)).sum(dim=1) - (coef_an * dist).sum(dim=1)
    return per_anchor, coef_ap.sum()


def _batch_all_soft(dist: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
    k = dist.shape[0]
    with torch.no_grad():
        dd = dist.detach()
        coef_ap = torch.zeros_like(dd)
        coef_an = torch.zeros_like(dd)
        value = dd.new_zeros(k)
        step = max(1, _SOFT_ALL_ELEMENTS // max(k * k, 1))
        for a0 in range(0, k, step):
            a1 = min(a0 + step, k)
            blk = dd[a0:a1]
            trip = blk.unsqueeze(2) - blk.unsqueeze(1)  # [b, p, n]: d_ap - d_an
            mask = pos_mask[a0:a1].unsqueeze(2) & neg_mask[a0:a1].unsqueeze(1)
            sig = torch.sigmoid(trip).mul_(mask)
            value[a0:a1] = F.softplus(trip).mul_(mask).sum(dim=(1, 2))
            coef_ap[a0:a1] = sig.sum(dim=2)
            coef_an[a0:a1] = sig.sum(dim=1)
        count = (pos_mask.sum(dim=1) * neg_mask.sum(dim=1)).sum().to(dd.dtype)
    # Linear in dist with the softplus' gradient; the detached offset makes the value exact.
    linear = (coef_ap * dist).sum(dim=1) - (coef_an * dist).sum(dim=1)
    return linear + (value - linear).detach(), count


def _semi_hard(
    x: Tensor, known_idx: Tensor, groups: Tensor, distance: str, margin: float, soft: bool, eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-anchor sums over (anchor, positive) pairs with their semi-hard negative, and the pair count."""
    dist = _dense_distance(x.index_select(0, known_idx), distance, eps)
    same = groups.unsqueeze(1) == groups.unsqueeze(0)
    pos_mask = same.clone()
    pos_mask.diagonal().fill_(False)
    with torch.no_grad():
        dd = dist.detach()
        num_neg = (~same).sum(dim=1)
        inf = torch.tensor(float("inf"), dtype=dd.dtype, device=dd.device)
        neg_sorted, neg_order = torch.where(same, inf, dd).sort(dim=1)
        # First negative strictly farther than the positive ...
        j = torch.searchsorted(neg_sorted.contiguous(), dd.contiguous(), side="right")
        # ... else the farthest negative.
        j = torch.where(j < num_neg.unsqueeze(1), j, (num_neg - 1).clamp(min=0).unsqueeze(1))
        neg_choice = neg_order.gather(1, j)
        pair_mask = pos_mask & (num_neg > 0).unsqueeze(1)
    d_an = dist.gather(1, neg_choice)
    per_pair = _violation(dist, d_an, margin, soft)
    per_pair = torch.where(pair_mask, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum(dim=1), pair_mask.sum().to(dist.dtype)


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
        block_size: batch-hard tile side (memory ``O(block_size²)``); ``None`` means 1024.
        eps: lower bound of norms when normalising.

    Returns:
        The loss (float32 for fp16/bf16 inputs). With no valid anchor, 0 with a gradient graph.

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

    known_idx = (labels >= 0).nonzero().squeeze(1)
    _, groups, group_count = torch.unique(labels.index_select(0, known_idx), return_inverse=True, return_counts=True)
    k = known_idx.shape[0]
    own = group_count[groups]
    valid = (own > 1) & (own < k)  # at least one positive and one negative

    if mining == "batch_hard":
        block = block_size if block_size is not None else _AUTO_BLOCK
        per_known = _batch_hard(x, known_idx, groups, valid, distance, margin, soft, block, eps)
        per_known = torch.where(valid, per_known, torch.zeros_like(per_known))
        normalizer = valid.sum().clamp(min=1).to(per_known.dtype)
    elif mining == "batch_all":
        per_known, count = _batch_all(x, known_idx, groups, distance, margin, soft, eps)
        normalizer = count.clamp(min=1)
    else:
        per_known, count = _semi_hard(x, known_idx, groups, distance, margin, soft, eps)
        normalizer = count.clamp(min=1)

    # Anchors back in input order; unknown ones are 0 (scatter into zeros keeps the graph).
    per_anchor = x.new_zeros(n).index_add(0, known_idx, per_known) + x.reshape(-1)[:0].sum()
    if reduction == "none":
        return per_anchor
    return reduce_loss(per_anchor, reduction, normalizer=normalizer if reduction == "mean" else None)


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
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, normalize={self.normalize}, "
            f"soft={self.soft}, reduction={self.reduction!r}"
        )
