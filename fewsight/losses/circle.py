"""Circle loss (Sun et al. 2020, "Circle Loss: A Unified Perspective of Pair Similarity Optimization").

    L = softplus( logsumexp_n(γ α_n (s_n − Δ_n)) + logsumexp_p(−γ α_p (s_p − Δ_p)) ),
    α_p = [1 + m − s_p]_+,  α_n = [s_n + m]_+  (constants: no gradient),  Δ_p = 1 − m,  Δ_n = m

with ``s`` cosine similarities. Defaults ``m = 0.25``, ``γ = 256`` (the paper's face setting).

Forms:

* :func:`circle_loss` ``pooling="anchor"`` (default): per known anchor ``i`` the positives are the
  other samples with its label, the negatives the known samples with another label; one term per
  anchor, mean over anchors with at least one positive and one negative. Equal to
  pytorch-metric-learning's ``CircleLoss(m, gamma)`` (its ``AvgNonZeroReducer`` averages over the
  terms that are > 0: the same anchors, unless a term underflows to exactly 0 in float32).
* :func:`circle_loss` ``pooling="batch"``: one term over all unordered pairs ``i < j`` of the batch
  (the paper's batch form); ``reduction`` does not apply (a single term).
* :func:`circle_loss_from_similarities`: from precomputed ``s_p`` / ``s_n`` vectors.
* :func:`circle_loss_class_level`: class-level labels: the positive is the sample's own class
  proxy, the negatives the other proxies (the paper's classification form).

Labels ``< 0`` are unknown: never anchors, positives or negatives. Nothing valid gives a zero loss
that keeps its graph. Half-precision inputs are computed in float32 (logsumexp with running max),
finite at γ ≥ 512.

Large batches: the pairwise forms run on :mod:`fewsight.losses._blockwise`: above 4096 x 4096
pairs on CUDA (256 x 256 elsewhere), or with ``block_size``, the N x N matrix is never materialised (online logsumexp over
``block_size²`` tiles, custom backward recomputing each tile; memory ``O(N·D + block_size²)``);
results equal the dense path. In the blocked path the labels are read on the host once per call.

``gather=True`` under ``torch.distributed`` (:mod:`fewsight.losses.distributed`): the LOCAL
samples are the anchors, the positives/negatives come from the batch gathered from all ranks
(gradients reach every rank). Each rank returns ``world_size x`` its share of the full-batch loss
(``"mean"`` divides by the number of valid anchors of ALL ranks), so the rank mean of the values
equals the single-process loss on the concatenated batch and, after DDP's gradient averaging,
the gradients are exactly the single-process ones. ``pooling="batch"`` gathers the per-anchor
partial sums and returns the full-batch term itself on every rank (same gradient guarantee).
``reduction="none"`` returns the local anchors' terms, unscaled. Not distributed: ignored.

Example:
    >>> import torch
    >>> emb = torch.randn(8, 16, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, -1, 3])
    >>> loss = circle_loss(emb, labels, m=0.25, gamma=256)
    >>> loss.backward()
    >>> bool(torch.isfinite(emb.grad).all())
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, check_choice, check_finite, check_ndim
from fewsight.losses import distributed as _dist
from fewsight.losses._blockwise import Channel, PairKernel, pairwise_partials, resolve_block_size
from fewsight.losses._common import (
    check_embeddings,
    check_embeddings_labels,
    check_reduction,
    compute_dtype,
    normalize,
    reduce_loss,
    upcast,
    zero_loss,
)

__all__ = [
    "CIRCLE_POOLINGS",
    "circle_loss",
    "circle_loss_from_similarities",
    "circle_loss_class_level",
    "CircleLoss",
    "ClassCircleLoss",
]

CIRCLE_POOLINGS = ("anchor", "batch")
_EPS = 1e-8


def _check_params(m: float, gamma: float) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise InvalidArgumentError(f"m: expected a finite float, got {m!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        raise InvalidArgumentError(f"gamma: expected a finite float > 0, got {gamma!r}")


class _CircleKernel(PairKernel):
    """Channel 0: positives ``-γ α_p (s − Δ_p)``; channel 1: negatives ``γ α_n (s − Δ_n)``; both LSE."""

    channels = (Channel("pos", "lse"), Channel("neg", "lse"))

    def __init__(self, m: float, gamma: float) -> None:
        self.m, self.gamma = float(m), float(gamma)

    # Polynomial forms (exact for any s and m), two or three passes over a tile instead of five:
    #   positive: -γ α_p (s − Δ_p) = γ (t² − m²),  t = max(1 − s, −m)   (α_p = t + m)
    #   negative:  γ α_n (s − Δ_n) = γ (u² − m²),  u = max(s, −m)       (α_n = u + m)
    def _pos(self, s: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.rsub(s, 1.0).clamp_min_(-self.m)
        return torch.addcmul(s.new_full((), -self.gamma * self.m * self.m), t, t, value=self.gamma), t

    def _neg(self, s: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.clamp_min(s, -self.m)
        return torch.addcmul(s.new_full((), -self.gamma * self.m * self.m), u, u, value=self.gamma), u

    def value(self, s: Tensor, c: int) -> Tensor:
        return self._pos(s)[0] if c == 0 else self._neg(s)[0]

    def value_and_derivative(self, s: Tensor, c: int) -> tuple[Tensor, Tensor]:
        if c == 0:
            v, t = self._pos(s)  # dv/ds = -γ α_p = -γ (t + m)
            return v, torch.add(s.new_full((), -self.gamma * self.m), t, alpha=-self.gamma)
        v, u = self._neg(s)  # dv/ds = γ α_n = γ (u + m)
        return v, torch.add(s.new_full((), self.gamma * self.m), u, alpha=self.gamma)


def _anchor_terms(lse_p: Tensor, lse_n: Tensor) -> tuple[Tensor, Tensor]:
    """``softplus(lse_p + lse_n)`` where both are finite (else 0, gradient 0) and the validity mask."""
    valid = torch.isfinite(lse_p) & torch.isfinite(lse_n)
    z = torch.where(valid, lse_p + lse_n, torch.zeros_like(lse_p))
    return torch.where(valid, F.softplus(z), torch.zeros_like(z)), valid


def _safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over all of ``x`` that is ``-inf`` (with zero, not NaN, gradients) when all are ``-inf``."""
    top = x.detach().amax() if x.numel() else x.new_full((), float("-inf"))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum()
    positive = total > 0
    return torch.where(positive, top + torch.log(torch.where(positive, total, torch.ones_like(total))), total.new_full((), float("-inf")))


def circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    m: float = 0.25,
    gamma: float = 256.0,
    pooling: str = "anchor",
    reduction: str = "mean",
    block_size: int | None = None,
    gather: bool = False,
) -> Tensor:
    """Circle loss from embeddings and integer labels (pair-level labels).

    Args:
        embeddings: ``Tensor[N, D]`` (any scale: cosine similarities are used).
        labels: ``Long[N]``; ``< 0`` = unknown (ignored).
        m: relaxation margin. gamma: scale.
        pooling: ``"anchor"`` (one term per anchor, PML-compatible) or ``"batch"`` (one term over
            all pairs ``i < j``).
        reduction: ``"mean"`` over valid anchors, ``"sum"``, or ``"none"`` (``Tensor[N]``, 0 for
            anchors without a positive or a negative). Ignored by ``pooling="batch"``.
        block_size: tile edge of the block-wise path (``None``: automatic; CUDA: dense up to
            4096 x 4096 pairs, 4096-wide tiles above; CPU: 512-wide tiles above 256 x 256 pairs).
        gather: gather the batch from all DDP ranks (see the module docstring for the scaling).

    Returns:
        Scalar (``Tensor[N]`` for ``reduction="none"``), float32 for half inputs.

    Formula: ``L = softplus(LSE_n γ α_n (s_n − m) + LSE_p −γ α_p (s_p − 1 + m))`` (Sun et al. 2020, eq. 4).

    >>> e = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    >>> circle_loss(e, torch.tensor([0, 0, 0, 1, 1, 1]), gamma=64).shape
    torch.Size([])
    """
    _check_params(m, gamma)
    check_choice("pooling", pooling, CIRCLE_POOLINGS)
    check_reduction(reduction)
    check_embeddings_labels(embeddings, labels)
    resolve_block_size(block_size, 1, 1)
    kernel = _CircleKernel(m, gamma)
    labels = labels.to(embeddings.device)  # as PML: labels may live on the CPU
    x = embeddings.to(compute_dtype(embeddings.dtype))
    n = x.shape[0]
    xn = normalize(x, _EPS)

    world = _dist.world_size() if gather else 1
    if world > 1:
        all_x, all_y, offset, world = _dist.gather_embeddings_and_labels(xn, labels)
        ids_q = torch.arange(offset, offset + n, device=labels.device)
        ids_k = torch.arange(all_x.shape[0], device=labels.device)
        lse_p, lse_n = pairwise_partials(
            xn, labels, kernel, k=all_x, labels_k=all_y, ids_q=ids_q, ids_k=ids_k, block_size=block_size
        )
    else:
        if n == 0:
            return zero_loss(embeddings) if reduction != "none" or pooling == "batch" else x.sum(dim=1)
        lse_p, lse_n = pairwise_partials(xn, labels, kernel, block_size=block_size)

    if pooling == "batch":
        if world > 1:
            lse_p = _dist.all_gather_with_grad(lse_p).tensor
            lse_n = _dist.all_gather_with_grad(lse_n).tensor
        # Each unordered pair {i, j} appears in both rows i and j: log 2 removes the double count.
        bp = _safe_logsumexp(lse_p) - math.log(2.0)
        bn = _safe_logsumexp(lse_n) - math.log(2.0)
        return _anchor_terms(bp, bn)[0]

    per, valid = _anchor_terms(lse_p, lse_n)
    if reduction == "none":
        return per
    if world == 1:
        return reduce_loss(per, reduction, valid)
    total = per.sum() * world
    if reduction == "sum":
        return total
    count = _dist.all_reduce_sum(valid.sum()).clamp(min=1)
    return total / count.to(total.dtype)


def circle_loss_from_similarities(
    sp: Tensor,
    sn: Tensor,
    m: float = 0.25,
    gamma: float = 256.0,
    reduction: str = "mean",
) -> Tensor:
    """Circle loss from precomputed similarities (form c).

    Args:
        sp: ``Tensor[P]`` (or ``Tensor[B, P]``) positive-pair similarities.
        sn: ``Tensor[Q]`` (or ``Tensor[B, Q]``) negative-pair similarities, same leading dims.
        reduction: over the leading dims (a 1-D input gives one term whatever the reduction).

    Returns:
        Scalar (``Tensor[B]`` for ``reduction="none"`` with 2-D inputs); 0 with a graph when
        ``P`` or ``Q`` is 0.

    Formula: ``softplus(LSE_n γ α_n (s_n − m) + LSE_p −γ α_p (s_p − 1 + m))``, α detached (Sun et al. 2020).

    >>> circle_loss_from_similarities(torch.tensor([0.9, 0.8]), torch.tensor([0.1, -0.2]), gamma=32)
    tensor(0.3737)
    """
    _check_params(m, gamma)
    check_reduction(reduction)
    check_ndim("sp", sp, (1, 2), "Tensor[P] or Tensor[B, P]")
    check_ndim("sn", sn, (1, 2), "Tensor[Q] or Tensor[B, Q]")
    for name, t in (("sp", sp), ("sn", sn)):
        if not t.is_floating_point():
            raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        check_finite(name, t)
    if sp.shape[:-1] != sn.shape[:-1]:
        raise ShapeError(f"sp, sn: expected the same leading dims, got shapes {tuple(sp.shape)} and {tuple(sn.shape)}")
    p, q = upcast(sp, sn)
    if p.shape[-1] == 0 or q.shape[-1] == 0:
        z = zero_loss(sp, sn, dtype=p.dtype)
        if reduction == "none" and p.ndim == 2:
            return z + p.new_zeros(p.shape[0])
        return z
    alpha_p = (1.0 + m - p.detach()).clamp_min(0.0)
    alpha_n = (q.detach() + m).clamp_min(0.0)
    lse_p = torch.logsumexp(-gamma * alpha_p * (p - (1.0 - m)), dim=-1)
    lse_n = torch.logsumexp(gamma * alpha_n * (q - m), dim=-1)
    per = F.softplus(lse_p + lse_n)
    if per.ndim == 0:
        return per
    return reduce_loss(per, reduction)


def circle_loss_class_level(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    m: float = 0.25,
    gamma: float = 256.0,
    reduction: str = "mean",
    block_size: int | None = None,
) -> Tensor:
    """Circle loss with class-level labels (form d): own proxy positive, other proxies negative.

    Args:
        embeddings: ``Tensor[N, D]``. labels: ``Long[N]`` in ``[0, C)``, ``< 0`` = unknown (ignored).
        proxies: ``Tensor[C, D]`` class proxies (receive gradients).
        reduction: ``"mean"`` over known samples (needs ``C >= 2``), ``"sum"``, ``"none"`` (``Tensor[N]``).
        block_size: as in :func:`circle_loss` (``N x C`` similarity tiles).

    Raises:
        LabelError: a label ``>= C``.

    Formula: ``ℓ_i = softplus(LSE_{c≠y_i} γ α_n (s_ic − m) − γ α_p (s_iy_i − 1 + m))`` (Sun et al. 2020, eq. 3).

    >>> e, w = torch.randn(5, 8), torch.randn(3, 8)
    >>> circle_loss_class_level(e, torch.tensor([0, 1, 2, 1, -1]), w, gamma=32).shape
    torch.Size([])
    """
    _check_params(m, gamma)
    check_reduction(reduction)
    check_embeddings("proxies", proxies, "Tensor[C, D]")
    check_embeddings_labels(embeddings, labels, num_classes=proxies.shape[0])
    if proxies.shape[1] != embeddings.shape[1]:
        raise ShapeError(
            f"proxies: expected Tensor[C, {embeddings.shape[1]}] matching embeddings, got shape {tuple(proxies.shape)}"
        )
    resolve_block_size(block_size, 1, 1)
    x, w = upcast(embeddings, proxies)
    labels = labels.to(embeddings.device)
    if x.shape[0] == 0 or w.shape[0] == 0:
        z = zero_loss(embeddings, proxies, dtype=x.dtype)
        return z + x.new_zeros(x.shape[0]) if reduction == "none" else z
    class_ids = torch.arange(w.shape[0], device=labels.device, dtype=labels.dtype)
    lse_p, lse_n = pairwise_partials(
        normalize(x, _EPS), labels, _CircleKernel(m, gamma), k=normalize(w, _EPS), labels_k=class_ids,
        block_size=block_size,
    )
    per, valid = _anchor_terms(lse_p, lse_n)
    if reduction == "none":
        return per
    return reduce_loss(per, reduction, valid)


class CircleLoss(nn.Module):
    """Module form of :func:`circle_loss`; ``forward(embeddings, labels)``.

    >>> loss_fn = CircleLoss(m=0.25, gamma=256)
    >>> loss_fn(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])).ndim
    0
    """

    def __init__(
        self,
        m: float = 0.25,
        gamma: float = 256.0,
        pooling: str = "anchor",
        reduction: str = "mean",
        block_size: int | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__()
        _check_params(m, gamma)
        check_choice("pooling", pooling, CIRCLE_POOLINGS)
        check_reduction(reduction)
        resolve_block_size(block_size, 1, 1)
        self.m, self.gamma, self.pooling, self.reduction = float(m), float(gamma), pooling, reduction
        self.block_size, self.gather = block_size, bool(gather)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return circle_loss(
            embeddings, labels, self.m, self.gamma, self.pooling, self.reduction, self.block_size, self.gather
        )

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, pooling={self.pooling!r}, reduction={self.reduction!r}"


class ClassCircleLoss(nn.Module):
    """Class-level circle loss owning learnable proxies ``Tensor[num_classes, embedding_dim]``.

    Proxies start as random unit vectors; ``forward(embeddings, labels)`` calls
    :func:`circle_loss_class_level`.

    >>> loss_fn = ClassCircleLoss(num_classes=3, embedding_dim=4, gamma=64)
    >>> loss_fn(torch.randn(5, 4), torch.tensor([0, 1, 2, 2, -1])).ndim
    0
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        m: float = 0.25,
        gamma: float = 256.0,
        reduction: str = "mean",
        block_size: int | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name}: expected an int >= 1, got {v!r}")
        _check_params(m, gamma)
        check_reduction(reduction)
        resolve_block_size(block_size, 1, 1)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.m, self.gamma, self.reduction, self.block_size = float(m), float(gamma), reduction, block_size
        w = torch.randn(num_classes, embedding_dim, device=device, dtype=dtype)
        self.proxies = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp_min(_EPS))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return circle_loss_class_level(
            embeddings, labels, self.proxies, self.m, self.gamma, self.reduction, self.block_size
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, m={self.m}, gamma={self.gamma}"
