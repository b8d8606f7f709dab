"""Block-wise pairwise engine: per-anchor reductions over all pairs without the N x N matrix.

Many metric losses are functions of per-anchor reductions over pairs ``(i, j)``::

    r_c(i) = REDUCE_{j in M_c(i)}  v_c(s_ij)          s_ij = q_i . k_j   (unit rows -> cosine)

where ``M_c(i)`` is the anchor's positives (same label, ``j != i``) or negatives (different
label), both sides with a known label (``>= 0``), and ``REDUCE`` is a log-sum-exp (circle,
multi-similarity, NCA, supervised contrastive, ...) or a plain sum (contrastive). A
:class:`PairKernel` says what ``v_c`` and ``dv_c/ds`` are; :func:`pairwise_partials` returns
``r_c`` as ``Tensor[Nq]`` per channel and is differentiable with respect to ``q`` and ``k``.
Whatever the loss does with the partials afterwards is ordinary autograd.

Two execution paths, identical results (tests check fp64 equality, values and gradients):

* dense (automatic for small batches, see :func:`resolve_block_size`): one ``[Nq, Nk]`` tile
  built with one GEMM, saved for the backward pass (no recomputation); no host sync.
* blocked: the known rows are sorted by label on the host (one copy of the labels to the host
  per call, before the loop; no device sync inside the loop), cut into tiles of
  ``block_size x block_size`` pairs, and reduced with an online log-sum-exp (running value merged
  with ``logaddexp``). With sorted labels, tiles whose label ranges do not overlap hold only
  negative pairs: no mask and no positive channel are computed there. When ``k`` is ``q``
  (``k=None``), only tiles ``I <= J`` are visited and each off-diagonal tile feeds both its row
  and its column anchors (``v_c`` depends on ``s`` only, so ``v_ij = v_ji``), halving the work.
  The backward pass recomputes each tile, forms ``H = dL/dS`` for the tile (both orientations)
  and accumulates ``dQ_I += H @ K_J``, ``dK_J += H^T @ Q_I``. Memory ``O(N * D + block_size^2)``.

The kernel values must not depend on anything but ``s``; weights treated as constants (such as
circle loss's detached ``alpha``) enter ``dv/ds`` only.

Example:
    >>> import torch
    >>> class Sum(PairKernel):            # r_pos(i) = sum of cosines to the positives
    ...     channels = (Channel("pos", "sum"),)
    ...     def value(self, s, c): return s.clone()
    ...     def value_and_derivative(self, s, c): return s.clone(), torch.ones_like(s)
    >>> q = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    >>> y = torch.tensor([0, 0, 1, 1, 1])
    >>> (r,) = pairwise_partials(q, y, Sum())
    >>> (rb,) = pairwise_partials(q, y, Sum(), block_size=2)
    >>> torch.allclose(r, rb)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fewsight.errors import InvalidArgumentError, ShapeError

__all__ = [
    "Channel",
    "PairKernel",
    "pairwise_partials",
    "resolve_block_size",
    "DENSE_MAX_PAIRS",
    "DEFAULT_BLOCK_SIZE",
    "CPU_DENSE_MAX_PAIRS",
    "CPU_BLOCK_SIZE",
]

# Automatic tiling. On CUDA, eager elementwise kernels over big tiles keep the GPU busy and the
# launch count low: dense up to 4096 x 4096 pairs (64 MiB per fp32 temporary), 4096-wide tiles
# above. On CPU, cache-sized tiles win by far (a 512 x 512 fp32 tile is 1 MiB), and the
# label-sorted tiling skips masks: dense only for tiny batches.
DENSE_MAX_PAIRS = 4096 * 4096
DEFAULT_BLOCK_SIZE = 4096
CPU_DENSE_MAX_PAIRS = 256 * 256
CPU_BLOCK_SIZE = 512

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Channel:
    """One per-anchor reduction: over the anchor's ``"pos"`` or ``"neg"`` pairs, by ``"lse"`` or ``"sum"``.

    An empty set reduces to ``-inf`` (``"lse"``) or ``0`` (``"sum"``).
    """

    mask: str
    reduce: str

    def __post_init__(self) -> None:
        if self.mask not in ("pos", "neg"):
            raise InvalidArgumentError(f"mask: expected one of ('pos', 'neg'), got {self.mask!r}")
        if self.reduce not in ("lse", "sum"):
            raise InvalidArgumentError(f"reduce: expected one of ('lse', 'sum'), got {self.reduce!r}")


class PairKernel:
    """The per-pair part of a pairwise loss; subclass and set ``channels``.

    Both methods receive a similarity tile ``s: Tensor[Tq, Tk]`` (never to be modified) and a
    channel index, and must return NEW tensors of the same shape (the engine works in place on
    them). Values outside the channel's mask are ignored, so compute them unmasked.
    """

    channels: tuple[Channel, ...] = ()

    def value(self, s: Tensor, c: int) -> Tensor:
        """``v_c(s)`` elementwise."""
        raise NotImplementedError

    def value_and_derivative(self, s: Tensor, c: int) -> tuple[Tensor, Tensor]:
        """``(v_c(s), dv_c/ds)`` elementwise (the derivative with any detached weights held constant)."""
        raise NotImplementedError


def resolve_block_size(block_size: int | None, nq: int, nk: int, cuda: bool = False) -> int | None:
    """``None`` for the dense path, else the tile edge (automatic when ``block_size`` is None)."""
    if block_size is None:
        dense_max, block = (DENSE_MAX_PAIRS, DEFAULT_BLOCK_SIZE) if cuda else (CPU_DENSE_MAX_PAIRS, CPU_BLOCK_SIZE)
        return None if nq * nk <= dense_max else block
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(f"block_size: expected None or an int >= 1, got {block_size!r}")
    return block_size


# --------------------------------------------------------------------------------------------
# Masks. Each is an EXCLUSION mask (True = pair not in the set) so it feeds masked_fill_ directly;
# None = every pair of the tile is in the set, False = none is (the channel is skipped).
# --------------------------------------------------------------------------------------------


@dataclass
class _Masks:
    pos: Tensor | None | bool
    neg: Tensor | None | bool


def _dense_masks(lq: Tensor, lk: Tensor, qid: Tensor | None, kid: Tensor | None, self_mode: bool) -> _Masks:
    known = (lq >= 0)[:, None] & (lk >= 0)[None, :]
    same = lq[:, None] == lk[None, :]
    pos_excl = ~(same & known)
    if self_mode:
        pos_excl.fill_diagonal_(True)
    elif qid is not None and kid is not None:
        pos_excl |= qid[:, None] == kid[None, :]
    return _Masks(pos=pos_excl, neg=same | ~known)


@dataclass
class _Tile:
    r0: int
    r1: int
    c0: int
    c1: int
    diag: bool  # self mode, I == J: the tile holds every ordered pair of its rows
    cols_too: bool  # self mode, I < J: the tile also feeds its column anchors
    pos: str  # "none" | "mask"
    neg: str  # "none" | "all" | "mask"


def _tile_masks(tile: _Tile, lq: Tensor, lk: Tensor, qid: Tensor | None, kid: Tensor | None) -> _Masks:
    if tile.pos == "none":
        return _Masks(pos=False, neg=None if tile.neg == "all" else False)
    lr, lc = lq[tile.r0 : tile.r1], lk[tile.c0 : tile.c1]
    same = lr[:, None] == lc[None, :]
    pos_excl = ~same
    if tile.diag:
        pos_excl.fill_diagonal_(True)
    elif qid is not None and kid is not None:
        pos_excl |= qid[tile.r0 : tile.r1, None] == kid[None, tile.c0 : tile.c1]
    neg: Tensor | bool = same if tile.neg == "mask" else False
    return _Masks(pos=pos_excl, neg=neg)


def _plan(lq_sorted: list[int], lk_sorted: list[int], block: int, self_mode: bool) -> list[_Tile]:
    """Tiles over label-sorted known rows; label ranges decide which masks each tile needs."""
    nq, nk = len(lq_sorted), len(lk_sorted)
    rows = [(a, min(a + block, nq)) for a in range(0, nq, block)]
    cols = rows if self_mode else [(a, min(a + block, nk)) for a in range(0, nk, block)]
    tiles = []
    for i, (r0, r1) in enumerate(rows):
        rlo, rhi = lq_sorted[r0], lq_sorted[r1 - 1]
        for j, (c0, c1) in enumerate(cols):
            if self_mode and j < i:
                continue
            clo, chi = lk_sorted[c0], lk_sorted[c1 - 1]
            overlap = rlo <= chi and clo <= rhi
            if not overlap:
                pos, neg = "none", "all"
            else:
                pos = "mask"
                neg = "none" if rlo == rhi == clo == chi else "mask"
            diag = self_mode and i == j
            tiles.append(_Tile(r0, r1, c0, c1, diag, self_mode and not diag, pos, neg))
    return tiles


# --------------------------------------------------------------------------------------------
# Per-tile forward / backward, shared by both paths.
# --------------------------------------------------------------------------------------------


def _channel_excl(masks: _Masks, ch: Channel) -> Tensor | None | bool:
    return masks.pos if ch.mask == "pos" else masks.neg


def _tile_forward(kernel: PairKernel, s: Tensor, masks: _Masks, cols_too: bool) -> list[Any]:
    """Per channel: ``(row_partial[Tq], col_partial[Tk] | None)`` or None when the channel is empty here."""
    out: list[Any] = []
    for c, ch in enumerate(kernel.channels):
        excl = _channel_excl(masks, ch)
        if excl is False:
            out.append(None)
            continue
        v = kernel.value(s, c)
        if ch.reduce == "lse":
            if excl is not None:
                v.masked_fill_(excl, _NEG_INF)
            row = torch.logsumexp(v, dim=1)
            col = torch.logsumexp(v, dim=0) if cols_too else None
        else:
            if excl is not None:
                v.masked_fill_(excl, 0.0)
            row = v.sum(dim=1)
            col = v.sum(dim=0) if cols_too else None
        out.append((row, col))
    return out


def _tile_grad(
    kernel: PairKernel,
    s: Tensor,
    masks: _Masks,
    rows: tuple[int, int],
    cols: tuple[int, int] | None,
    results: list[Tensor],
    grads: list[Tensor | None],
) -> Tensor | None:
    """``H = dL/dS`` for the tile (row anchors, plus column anchors when ``cols`` is given)."""
    h: Tensor | None = None
    r0, r1 = rows
    for c, ch in enumerate(kernel.channels):
        g = grads[c]
        excl = _channel_excl(masks, ch)
        if g is None or excl is False:
            continue
        v, d = kernel.value_and_derivative(s, c)
        g_r = g[r0:r1, None]
        if ch.reduce == "lse":
            if excl is not None:
                v.masked_fill_(excl, _NEG_INF)
            # results hold finite-ized LSEs: exp(v - lse) = softmax weight, 0 where excluded.
            w = torch.exp(v - results[c][r0:r1, None]).mul_(g_r)
            if cols is not None:
                c0, c1 = cols
                w.add_(v.sub_(results[c][None, c0:c1]).exp_().mul_(g[None, c0:c1]))
        else:
            w = g_r.expand_as(s).clone() if cols is None else g_r + g[None, cols[0] : cols[1]]
            if excl is not None:
                w.masked_fill_(excl, 0.0)
        w.mul_(d)
        h = w if h is None else h.add_(w)
    return h


class _PairwisePartials(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        lq: Tensor,
        lk: Tensor,
        qid: Tensor | None,
        kid: Tensor | None,
        kernel: PairKernel,
        self_mode: bool,
        block: int | None,
    ) -> tuple[Tensor, ...]:
        ctx.kernel, ctx.self_mode, ctx.block = kernel, self_mode, block
        ctx.set_materialize_grads(False)
        chans = kernel.channels
        needs_grad = any(ctx.needs_input_grad[:2])
        if block is None:
            s = q @ k.T
            masks = _dense_masks(lq, lk, qid, kid, self_mode)
            parts = _tile_forward(kernel, s, masks, cols_too=False)
            results = []
            for c, ch in enumerate(chans):
                empty = _NEG_INF if ch.reduce == "lse" else 0.0
                results.append(parts[c][0] if parts[c] is not None else q.new_full((q.shape[0],), empty))
            if needs_grad:
                ctx.save_for_backward(q, k, *results)
                ctx.dense = (s, masks)
            return tuple(results)

        # Blocked path: sort known rows by label on the host (the only sync of the call).
        lq_h = lq.detach().cpu()
        perm_q = torch.argsort(torch.where(lq_h >= 0, lq_h, lq_h.new_tensor(torch.iinfo(lq_h.dtype).max)), stable=True)
        nq_known = int((lq_h >= 0).sum())
        perm_q = perm_q[:nq_known]
        lq_sorted = lq_h[perm_q].tolist()
        if self_mode:
            perm_k, lk_sorted = perm_q, lq_sorted
        else:
            lk_h = lk.detach().cpu()
            perm_k = torch.argsort(torch.where(lk_h >= 0, lk_h, lk_h.new_tensor(torch.iinfo(lk_h.dtype).max)), stable=True)
            perm_k = perm_k[: int((lk_h >= 0).sum())]
            lk_sorted = lk_h[perm_k].tolist()
        tiles = _plan(lq_sorted, lk_sorted, block, self_mode) if lq_sorted and lk_sorted else []
        pq = perm_q.to(q.device)
        pk = pq if self_mode else perm_k.to(q.device)
        qs = q.index_select(0, pq)
        ks = qs if self_mode else k.index_select(0, pk)
        lqs = lq.index_select(0, pq)
        lks = lqs if self_mode else lk.index_select(0, pk)
        qids = qid.index_select(0, pq) if (qid is not None and not self_mode) else None
        kids = kid.index_select(0, pk) if (kid is not None and not self_mode) else None

        acc = []
        for ch in chans:
            acc.append(qs.new_full((qs.shape[0],), _NEG_INF if ch.reduce == "lse" else 0.0))
        for t in tiles:
            s = qs[t.r0 : t.r1] @ ks[t.c0 : t.c1].T
            masks = _tile_masks(t, lqs, lks, qids, kids)
            parts = _tile_forward(kernel, s, masks, t.cols_too)
            for c, ch in enumerate(chans):
                if parts[c] is None:
                    continue
                row, col = parts[c]
                merge = torch.logaddexp if ch.reduce == "lse" else torch.add
                acc[c][t.r0 : t.r1] = merge(acc[c][t.r0 : t.r1], row)
                if col is not None:
                    acc[c][t.c0 : t.c1] = merge(acc[c][t.c0 : t.c1], col)

        results = []
        for c, ch in enumerate(chans):
            full = q.new_full((q.shape[0],), _NEG_INF if ch.reduce == "lse" else 0.0)
            results.append(full.index_copy_(0, pq, acc[c]))
        if needs_grad:
            ctx.save_for_backward(q, k, *results)
            ctx.blocked = (tiles, pq, pk, lqs, lks, qids, kids)
        return tuple(results)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        kernel, self_mode, block = ctx.kernel, ctx.self_mode, ctx.block
        q, k, *results = ctx.saved_tensors
        nones = (None,) * 7
        if all(g is None for g in grad_outputs) or not any(ctx.needs_input_grad[:2]):
            return (None, None) + nones
        # -inf LSE rows have all-excluded pairs; a finite stand-in keeps exp(v - lse) at 0, not NaN.
        safe = [torch.where(torch.isfinite(r), r, torch.zeros_like(r)) for r in results]

        if block is None:
            s, masks = ctx.dense
            h = _tile_grad(kernel, s, masks, (0, q.shape[0]), None, safe, list(grad_outputs))
            if h is None:
                return (torch.zeros_like(q), torch.zeros_like(k)) + nones
            if self_mode:
                dq = h @ q
                dq.addmm_(h.T, q)
                return (dq, None) + nones
            return (h @ k, h.T @ q) + nones

        tiles, pq, pk, lqs, lks, qids, kids = ctx.blocked
        qs = q.index_select(0, pq)
        ks = qs if self_mode else k.index_select(0, pk)
        safe_s = [r.index_select(0, pq) for r in safe]
        grads_s = [g.index_select(0, pq) if g is not None else None for g in grad_outputs]
        dqs = torch.zeros_like(qs)
        dks = dqs if self_mode else torch.zeros_like(ks)
        for t in tiles:
            qi, kj = qs[t.r0 : t.r1], ks[t.c0 : t.c1]
            s = qi @ kj.T
            masks = _tile_masks(t, lqs, lks, qids, kids)
            cols = (t.c0, t.c1) if t.cols_too else None
            h = _tile_grad(kernel, s, masks, (t.r0, t.r1), cols, safe_s, grads_s)
            if h is None:
                continue
            dqs[t.r0 : t.r1].addmm_(h, kj)
            dks[t.c0 : t.c1].addmm_(h.T, qi)
        dq = torch.zeros_like(q).index_copy_(0, pq, dqs)
        if self_mode:
            return (dq, None) + nones
        dk = torch.zeros_like(k).index_copy_(0, pk, dks)
        return (dq, dk) + nones


def pairwise_partials(
    q: Tensor,
    labels_q: Tensor,
    kernel: PairKernel,
    *,
    k: Tensor | None = None,
    labels_k: Tensor | None = None,
    ids_q: Tensor | None = None,
    ids_k: Tensor | None = None,
    block_size: int | None = None,
) -> tuple[Tensor, ...]:
    """Per-anchor pair reductions, one ``Tensor[Nq]`` per ``kernel.channels`` entry.

    Args:
        q: ``Tensor[Nq, D]`` anchor rows (normalise them first for cosine similarity).
        labels_q: ``Long[Nq]``; ``< 0`` = unknown (no partial: ``-inf`` / ``0``; never a pair member).
        kernel: the per-pair values and derivatives.
        k, labels_k: ``Tensor[Nk, D]`` / ``Long[Nk]`` column rows; ``None`` = ``q`` itself (self
            mode: ``j != i`` for positives, symmetric tiling).
        ids_q, ids_k: ``Long[Nq]`` / ``Long[Nk]`` sample ids; a pair with equal ids is never a
            positive (the anchor itself among gathered columns). Ignored in self mode.
        block_size: tile edge; ``None`` = automatic (CUDA: dense up to ``DENSE_MAX_PAIRS`` pairs,
            else ``DEFAULT_BLOCK_SIZE``; other devices: dense up to ``CPU_DENSE_MAX_PAIRS``, else
            ``CPU_BLOCK_SIZE``).

    Gradients flow to ``q`` and ``k``. In the blocked path the labels are copied to the host once.
    """
    self_mode = k is None
    if self_mode:
        k, labels_k = q, labels_q
    elif labels_k is None:
        raise InvalidArgumentError("labels_k: expected Long[Nk] with k, got None")
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ShapeError(f"q, k: expected Tensor[Nq, D] and Tensor[Nk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    block = resolve_block_size(block_size, q.shape[0], k.shape[0], q.is_cuda)
    if self_mode:
        ids_q = ids_k = None
    # Self mode passes q twice to the Function; its gradient comes back on the first slot only.
    return _PairwisePartials.apply(
        q, q.detach() if self_mode else k, labels_q, labels_k, ids_q, ids_k, kernel, self_mode, block
    )
