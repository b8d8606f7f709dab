"""Retrieval metrics on embeddings: Recall@k and MAP@R, cosine similarity, computed in query blocks.

    Recall@k = mean_q 1[∃ j ∈ top-k(q): y_j = y_q]            (Song et al. 2016, CVPR, "Deep Metric
                                                               Learning via Lifted Structured Feature
                                                               Embedding"; Recall@1 = PML precision_at_1)
    MAP@R    = mean_q (1/R_q) Σ_{i ≤ R_q} P_q(i) · rel_q(i)   (Musgrave et al. 2020, ECCV, "A Metric
                                                               Learning Reality Check")

with ``R_q`` the number of gallery items that share the query's label and ``P_q(i)`` the precision of
the first ``i`` neighbours. Embeddings are L2-normalised and compared by cosine similarity.

Conventions (equal to pytorch-metric-learning's ``AccuracyCalculator`` on the same inputs):

* ``gallery=None``: leave-one-out — every query searches the other queries (itself excluded).
* Queries with a label ``< 0`` (unknown) are not evaluated. Gallery items with a label ``< 0``
  stay in the gallery as distractors: they take ranks but never count as a match.
* Queries whose class has no gallery item (``R_q = 0``; in leave-one-out: singleton classes) are
  excluded, as PML does: they have nothing to retrieve, so counting them as failures would mix
  recognition with open-set rejection (see :mod:`fewsight.retrieval.openset` for that).
* No query left to evaluate: :class:`~fewsight.errors.InvalidArgumentError` saying why (PML returns
  ``nan``, which a report then prints as a result).
* Ties in similarity are broken by gallery index (the lower index ranks first), so results are
  deterministic and independent of ``block_size`` and the device.

Memory: the queries are processed ``block_size`` at a time against the whole gallery, so the largest
buffer is ``Tensor[block_size, G]`` (never ``Q x G``); only per-query hits / precisions are kept.
The default ``block_size`` keeps ``block_size * G`` near 4M elements. Half-precision inputs are
computed in float32, float64 inputs in float64. The result is read back to the host (a sync).

Example:
    >>> import torch
    >>> emb = torch.tensor([[1., 0.], [0.9, 0.1], [0., 1.], [0.1, 0.9], [0.7, 0.7]])
    >>> labels = torch.tensor([0, 0, 1, 1, -1])
    >>> recall_at_k(emb, labels, k=(1, 2))
    {1: 1.0, 2: 1.0}
    >>> mean_average_precision_at_r(emb, labels)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import (
    InvalidArgumentError,
    ShapeError,
    check_floating,
    check_labels,
    check_ndim,
)

__all__ = ["mean_average_precision_at_r", "ordered_topk", "recall_at_k"]

# Elements of one [block, G] similarity block when block_size is not given (~60 MB of buffers).
_BLOCK_ELEMENTS = 1 << 22


def ordered_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each row of ``scores: Tensor[B, G]``, ordered by (value desc, column index asc).

    Unlike :func:`torch.topk`, equal values are resolved deterministically: the lower column index
    ranks first, both inside the result and at the k-th place. ``k`` is clamped to ``G``.

    Returns ``(values: Tensor[B, k], indices: Long[B, k])``.

    Example:
        >>> ordered_topk(torch.tensor([[1., 3., 3., 2., 3.]]), 2)
        (tensor([[3., 3.]]), tensor([[1, 2]]))
    """
    check_ndim("scores", scores, 2, "Tensor[B, G]")
    b, g = scores.shape
    k = min(int(k), g)
    if k <= 0 or b == 0:
        return scores.new_empty(b, max(k, 0)), torch.empty(b, max(k, 0), dtype=torch.long, device=scores.device)
    if k == g:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    # Among the items tied with the k-th value, keep the lowest-index ones that still fit.
    room = k - above.sum(dim=1, keepdim=True)
    selected = above | (tied & (tied.cumsum(dim=1) <= room))
    # Exactly k per row; nonzero is row-major, so each row's indices come out ascending.
    indices = selected.nonzero()[:, 1].view(b, k)
    values = scores.gather(1, indices)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


class _Prepared(NamedTuple):
    queries: Tensor  # [V, D] normalised, the evaluated queries only
    labels: Tensor  # [V]
    relevant: Tensor  # [V] R_q >= 1
    self_index: Tensor | None  # [V] gallery index of each query (leave-one-out) or None
    gallery: Tensor  # [G, D] normalised
    gallery_labels: Tensor  # [G]


def _resolve_block_size(block_size: int | None, gallery_size: int) -> int:
    if block_size is None:
        return max(1, _BLOCK_ELEMENTS // max(gallery_size, 1))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(f"block_size: expected None or an int >= 1, got {block_size!r}")
    return block_size


def _prepare(
    queries: Tensor, query_labels: Tensor, gallery: Tensor | None, gallery_labels: Tensor | None
) -> _Prepared:
    check_ndim("queries", queries, 2, "Tensor[Q, D]")
    check_floating("queries", queries)
    check_labels("query_labels", query_labels)
    if query_labels.shape != (queries.shape[0],):
        raise ShapeError(
            f"query_labels: expected Tensor[Q] with Q={queries.shape[0]}, got shape {tuple(query_labels.shape)}"
        )
    if (gallery is None) != (gallery_labels is None):
        raise InvalidArgumentError(
            "gallery, gallery_labels: expected both or neither, got "
            f"gallery={'None' if gallery is None else 'Tensor'}, "
            f"gallery_labels={'None' if gallery_labels is None else 'Tensor'}"
        )
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    else:
        check_ndim("gallery", gallery, 2, "Tensor[G, D]")
        check_floating("gallery", gallery)
        check_labels("gallery_labels", gallery_labels)
        if gallery.shape[1] != queries.shape[1]:
            raise ShapeError(
                f"gallery: expected Tensor[G, {queries.shape[1]}] (the queries' D), got shape {tuple(gallery.shape)}"
            )
        if gallery_labels.shape != (gallery.shape[0],):
            raise ShapeError(
                f"gallery_labels: expected Tensor[G] with G={gallery.shape[0]}, "
                f"got shape {tuple(gallery_labels.shape)}"
            )
    for name, t in (("query_labels", query_labels), ("gallery", gallery), ("gallery_labels", gallery_labels)):
        if t.device != queries.device:
            raise InvalidArgumentError(
                f"{name}: expected a tensor on {queries.device} (the queries' device), got {t.device}"
            )

    dtype = torch.float64 if torch.float64 in (queries.dtype, gallery.dtype) else torch.float32
    q = queries.detach().to(dtype)
    g = q if leave_one_out else gallery.detach().to(dtype)
    for name, t in (("queries", q), ("gallery", g)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise InvalidArgumentError(f"{name}: expected finite embeddings, got NaN or inf values")
    q = F.normalize(q, dim=1)
    g = q if leave_one_out else F.normalize(g, dim=1)
    ql = query_labels.detach().long()
    gl = gallery_labels.detach().long()

    # R_q: gallery items with the query's label (minus the query itself when it is in the gallery).
    classes, counts = torch.unique(gl[gl >= 0], return_counts=True)
    if classes.numel():
        pos = torch.searchsorted(classes, ql).clamp_max(classes.numel() - 1)
        relevant = torch.where(classes[pos] == ql, counts[pos], 0)
    else:
        relevant = torch.zeros_like(ql)
    if leave_one_out:
        relevant = relevant - 1
    keep = (ql >= 0) & (relevant > 0)
    rows = keep.nonzero().squeeze(1)
    return _Prepared(
        queries=q[rows],
        labels=ql[rows],
        relevant=relevant[rows],
        self_index=rows if leave_one_out else None,
        gallery=g,
        gallery_labels=gl,
    )


def _similarity_block(p: _Prepared, start: int, stop: int) -> Tensor:
    sims = p.queries[start:stop] @ p.gallery.T
    if p.self_index is not None:
        # -inf ranks the query itself after every finite similarity: it is never a neighbour.
        sims[torch.arange(stop - start, device=sims.device), p.self_index[start:stop]] = -math.inf
    return sims


def _check_k(k: int | Sequence[int]) -> list[int]:
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else k
    try:
        ks = list(ks)
    except TypeError:
        raise InvalidArgumentError(f"k: expected an int >= 1 or a sequence of them, got {k!r}") from None
    if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
        raise InvalidArgumentError(f"k: expected an int >= 1 or a non-empty sequence of them, got {k!r}")
    return list(dict.fromkeys(ks))


def _no_query(query_labels: Tensor) -> None:
    raise InvalidArgumentError(
        f"query_labels: expected at least one query to evaluate (label >= 0 with a same-label gallery item), "
        f"got none among {len(query_labels)} queries"
    )


def recall_at_k(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    k: int | Sequence[int] = (1, 5, 10),
    *,
    block_size: int | None = None,
) -> dict[int, float]:
    """Recall@k: the fraction of queries with at least one same-label item among their k nearest.

    ``Recall@k = mean_q 1[∃ j ∈ top-k(q): y_j = y_q]`` (Song et al. 2016), cosine similarity.

    Args:
        queries: ``Tensor[Q, D]`` embeddings (normalised here).
        query_labels: ``Long[Q]``; ``< 0`` = unknown, not evaluated.
        gallery: ``Tensor[G, D]``, or ``None`` for leave-one-out on the queries.
        gallery_labels: ``Long[G]`` (with ``gallery``); ``< 0`` = distractor.
        k: one ``k`` or several; ``k > G`` means the whole gallery.
        block_size: queries per block (default: about 4M similarities per block).

    Returns:
        ``{k: recall}`` in the order of ``k`` (see module docstring: unknown queries and queries
        without any same-label gallery item are excluded; none left is an error).

    Example:
        >>> q = torch.tensor([[1., 0.], [0., 1.]])
        >>> g = torch.tensor([[0.6, 0.8], [1., 0.1], [0.1, 1.]])
        >>> recall_at_k(q, torch.tensor([0, 1]), g, torch.tensor([1, 0, 0]), k=[1, 3])
        {1: 0.5, 3: 1.0}
    """
    ks = _check_k(k)
    p = _prepare(queries, query_labels, gallery, gallery_labels)
    n = p.queries.shape[0]
    if n == 0:
        _no_query(query_labels)
    bs = _resolve_block_size(block_size, p.gallery.shape[0])
    # The query itself sits last (at -inf) in leave-one-out: never search that deep.
    k_max = min(max(ks), p.gallery.shape[0] - (p.self_index is not None))
    hits = torch.zeros(len(ks), dtype=torch.long, device=p.queries.device)
    kk = torch.tensor(ks, device=p.queries.device)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        _, idx = ordered_topk(_similarity_block(p, start, stop), k_max)
        match = p.gallery_labels[idx] == p.labels[start:stop, None]
        # Rank of the first match (k_max+1 if none), compared to every k at once.
        ranks = torch.arange(1, k_max + 1, device=match.device)
        first = torch.where(match, ranks, k_max + 1).amin(dim=1)
        hits += (first[None, :] <= kk[:, None]).sum(dim=1)
    return {kv: float(h) / n for kv, h in zip(ks, hits.tolist())}


def mean_average_precision_at_r(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    *,
    block_size: int | None = None,
) -> float:
    """MAP@R: mean over queries of the average precision within the first ``R_q`` neighbours.

    ``MAP@R = mean_q (1/R_q) Σ_{i ≤ R_q} P_q(i) · rel_q(i)`` (Musgrave et al. 2020), ``R_q`` = number
    of same-label gallery items (leave-one-out: minus the query), cosine similarity.

    Arguments and exclusions as :func:`recall_at_k`. Each block searches as deep as the largest
    ``R_q`` in it, so a class holding most of the gallery makes that block ``Tensor[block, G]``.

    Returns:
        MAP@R in ``[0, 1]``; no query to evaluate is an error (see :func:`recall_at_k`).

    Example:
        >>> emb = torch.tensor([[1., 0.], [0.9, 0.1], [0.8, 0.3], [0., 1.]])
        >>> mean_average_precision_at_r(emb, torch.tensor([0, 0, 1, 1]))  # [0.8, 0.3] misses
        0.75
    """
    p = _prepare(queries, query_labels, gallery, gallery_labels)
    n = p.queries.shape[0]
    if n == 0:
        _no_query(query_labels)
    # Grouping queries of similar R_q keeps each block's search depth close to what it needs.
    order = torch.argsort(p.relevant, stable=True)
    p = p._replace(
        queries=p.queries[order],
        labels=p.labels[order],
        relevant=p.relevant[order],
        self_index=None if p.self_index is None else p.self_index[order],
    )
    bs = _resolve_block_size(block_size, p.gallery.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=p.queries.device)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        r = p.relevant[start:stop]
        _, idx = ordered_topk(_similarity_block(p, start, stop), int(r.max()))
        ranks = torch.arange(1, idx.shape[1] + 1, device=idx.device)
        rel = (p.gallery_labels[idx] == p.labels[start:stop, None]) & (ranks[None, :] <= r[:, None])
        precision = rel.cumsum(dim=1).double() / ranks
        total += ((precision * rel).sum(dim=1) / r).sum()
    return float(total) / n
