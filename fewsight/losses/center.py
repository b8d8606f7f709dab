"""Center loss (Wen et al. 2016), generalised as in pytorch-ood with a distance and a radius.

``L_i = max(d(x_i, μ_{y_i}) - r, 0)`` averaged over the samples with a known label. Only each
sample's own centre is read (a gather), so the cost is ``O(N·D)`` and no ``[N, C]`` matrix is
built; :func:`center_loss_from_distances` accepts a precomputed ``[N, C]`` matrix instead.

``gather=True`` under ``torch.distributed``: the mean runs over the known samples of ALL ranks
(the count is all-reduced; each sample only meets its own centre, so nothing else crosses ranks).
As for the circle loss (:mod:`fewsight.losses.distributed`), each rank returns ``world_size x``
its share of the full-batch loss: the rank mean of the values is the single-process loss on the
concatenated batch and, after DDP's gradient averaging, the gradients (centres included) are the
single-process ones. ``reduction="none"`` returns the local terms, unscaled. Not distributed: ignored.

Relation to pytorch-ood: ``pytorch_ood.loss.CenterLoss`` takes the mean over the ``N × C``
entries of its masked distance matrix, so its value equals ours divided by ``C`` (up to its
``1e-12`` clamp of every entry).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_choice, check_finite, check_floating, check_ndim, check_real
from fewsight.losses import distributed as _dist
from fewsight.losses._common import (
    check_embeddings_labels,
    check_squared_distances,
    check_reduction,
    cosine_similarity,
    reduce_loss,
    upcast,
    zero_loss,
)

__all__ = ["CENTER_DISTANCES", "center_loss", "center_loss_from_distances", "CenterLoss"]

CENTER_DISTANCES = ("squared_euclidean", "euclidean", "cosine")


def _check_radius(radius: float) -> None:
    check_real("radius", radius, low=0)


def _own_distance(x: Tensor, mu: Tensor, known: Tensor, distance: str, eps: float, inputs: tuple[Tensor, ...]) -> Tensor:
    if distance == "cosine":
        return 1.0 - cosine_similarity(x, mu, eps)
    # Unknown rows are compared with an arbitrary centre: zero their difference, so that one far from
    # it can neither overflow nor send 0 * inf = NaN back through the square.
    diff = torch.where(known.unsqueeze(1), x - mu, x.new_zeros(()))
    sq = diff.pow(2).sum(dim=-1)
    check_squared_distances("embeddings", sq, *inputs, squared=distance == "squared_euclidean")
    if distance == "squared_euclidean":
        return sq
    # sqrt has an infinite slope at 0: take it only where the distance is positive.
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def center_loss(
    embeddings: Tensor,
    labels: Tensor,
    centers: Tensor,
    radius: float = 0.0,
    distance: str = "squared_euclidean",
    reduction: str = "mean",
    *,
    eps: float = 1e-8,
    gather: bool = False,
) -> Tensor:
    """Generalised center loss ``max(d(x_i, μ_{y_i}) - r, 0)`` (Wen et al. 2016, eq. 2 with r = 0).

    With ``distance="squared_euclidean"`` and ``radius=0`` this is the original center loss
    without its 1/2 factor, averaged (not summed) over the batch.

    Args:
        embeddings: ``Tensor[N, D]``.
        labels: ``Long[N]`` in ``[0, C)``; ``< 0`` means unknown and is ignored.
        centers: ``Tensor[C, D]`` class centres μ (gradient flows into them if they require it).
        radius: ``r >= 0``; distances below it cost nothing.
        distance: ``"squared_euclidean"`` (default), ``"euclidean"`` or ``"cosine"`` (``1 - cos``).
        reduction: ``"mean"`` over known samples, ``"sum"``, or ``"none"`` (``Tensor[N]``, 0 for unknown).
        eps: lower bound of the norms in the cosine distance.
        gather: under DDP, average over the known samples of every rank (see the module docstring).

    Returns:
        The loss (float32 for fp16/bf16 inputs); ``0`` with a gradient graph when no label is known.

    Raises:
        NonFiniteError: NaN/inf in an argument, or (Euclidean distances) a squared distance of a
            known sample to its centre that overflows the compute dtype, or whose gradient
            ``2 (x - μ)`` would not fit a half-precision argument's dtype.
        pytorch-ood's ``CenterLoss`` gives this value divided by ``C``.

    Example:
        >>> centers = torch.tensor([[0., 0.], [1., 1.]])
        >>> center_loss(torch.tensor([[3., 4.], [1., 1.], [9., 9.]]), torch.tensor([0, 1, -1]), centers)
        tensor(12.5000)
    """
    check_reduction(reduction)
    check_choice("distance", distance, CENTER_DISTANCES)
    _check_radius(radius)
    check_ndim("centers", centers, 2, "Tensor[C, D]")
    check_floating("centers", centers)
    check_finite("centers", centers)
    num_classes, dim = centers.shape
    check_embeddings_labels(embeddings, labels, num_classes)
    if embeddings.shape[1] != dim:
        raise ShapeError(f"embeddings: expected Tensor[N, {dim}] matching centers' D, got shape {tuple(embeddings.shape)}")
    if num_classes == 0:
        out = zero_loss(embeddings, centers)
        return out.expand(embeddings.shape[0]).clone() if reduction == "none" else out
    x, mu = upcast(embeddings, centers)
    known = labels >= 0
    own = mu.index_select(0, labels.clamp(min=0))  # [N, D], never [N, C]
    per_sample = (_own_distance(x, own, known, distance, eps, (embeddings, centers)) - radius).clamp(min=0)
    world = _dist.world_size() if gather else 1
    if world == 1 or reduction == "none":
        return reduce_loss(per_sample, reduction, known)
    total = reduce_loss(per_sample, "sum", known) * world
    if reduction == "sum":
        return total
    count = _dist.all_reduce_sum(known.sum()).clamp(min=1)
    return total / count.to(total.dtype)


def center_loss_from_distances(
    distances: Tensor, labels: Tensor, radius: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Center loss from a precomputed distance matrix: ``max(distances[i, y_i] - r, 0)``.

    Args:
        distances: ``Tensor[N, C]`` distance of each sample to each centre (any dissimilarity).
        labels: ``Long[N]`` in ``[0, C)``; ``< 0`` ignored.
        radius: ``r >= 0``.
        reduction: ``"mean"`` over known samples, ``"sum"`` or ``"none"`` (``Tensor[N]``).

    Example:
        >>> d = torch.tensor([[1., 5.], [4., 2.]])
        >>> center_loss_from_distances(d, torch.tensor([0, 1]), radius=1.5)
        tensor(0.2500)
    """
    check_reduction(reduction)
    _check_radius(radius)
    check_ndim("distances", distances, 2, "Tensor[N, C]")
    check_floating("distances", distances)
    check_embeddings_labels(distances, labels, distances.shape[1], embeddings_name="distances")
    if distances.shape[1] == 0:
        out = zero_loss(distances)
        return out.expand(distances.shape[0]).clone() if reduction == "none" else out
    (d,) = upcast(distances)
    known = labels >= 0
    own = d.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return reduce_loss((own - radius).clamp(min=0), reduction, known)


class CenterLoss(nn.Module):
    """Center loss with its own class centres: ``forward(embeddings, labels)``.

    Centres ``Tensor[C, D]`` are initialised to ``magnitude · I`` when ``C == D`` (class anchor
    clustering style, the same as pytorch-ood), else drawn from ``N(0, magnitude²)``. Learnable
    centres are an ``nn.Parameter`` (give them to the optimiser); fixed ones are a buffer, so
    they still move with ``.to()`` and live in the ``state_dict``.

    The value equals pytorch-ood's ``CenterLoss`` times ``C`` (theirs averages over ``N × C``).

    Args:
        num_classes: ``C``.
        embedding_dim: ``D``.
        learnable: centres trained by gradient (``True``) or fixed.
        magnitude: scale of the initial centres.
        radius, distance, reduction, eps, gather: see :func:`center_loss`.

    Example:
        >>> loss = CenterLoss(3, 3, magnitude=2.0)
        >>> loss(torch.tensor([[2., 0., 0.]]), torch.tensor([0]))
        tensor(0., grad_fn=<DivBackward0>)
    """

    centers: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        learnable: bool = True,
        magnitude: float = 1.0,
        radius: float = 0.0,
        distance: str = "squared_euclidean",
        reduction: str = "mean",
        eps: float = 1e-8,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise InvalidArgumentError(f"num_classes: expected >= 1, got {num_classes}")
        if embedding_dim < 1:
            raise InvalidArgumentError(f"embedding_dim: expected >= 1, got {embedding_dim}")
        check_choice("distance", distance, CENTER_DISTANCES)
        _check_radius(radius)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.magnitude = magnitude
        self.radius = radius
        self.distance = distance
        self.reduction = check_reduction(reduction)
        self.eps = eps
        self.gather = bool(gather)
        centers = torch.empty(num_classes, embedding_dim)
        if learnable:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.reset_parameters()

    @property
    def learnable(self) -> bool:
        return isinstance(self.centers, nn.Parameter)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the centres (``magnitude · I`` when ``C == D``, else ``N(0, magnitude²)``)."""
        if self.num_classes == self.embedding_dim:
            nn.init.eye_(self.centers).mul_(self.magnitude)
        else:
            nn.init.normal_(self.centers, std=self.magnitude)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return center_loss(
            embeddings, labels, self.centers, self.radius, self.distance, self.reduction, eps=self.eps,
            gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, learnable={self.learnable}, "
            f"radius={self.radius}, distance={self.distance!r}, reduction={self.reduction!r}"
        )
