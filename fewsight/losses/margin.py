"""Additive margin softmax losses: ArcFace (Deng et al. 2019) and CosFace (Wang et al. 2018).

Both compare L2-normalised embeddings with L2-normalised class weights, ``cos θ_j = ê · ŵ_j``,
penalise the target class and apply a softmax cross-entropy on scaled logits:

* ArcFace: target logit ``s · cos(θ_y + m)``; where ``θ_y + m > π`` (``cos θ_y < cos(π - m)``)
  it becomes ``s · (cos θ_y - m · sin m)`` so the logit keeps decreasing with ``θ_y``
  (the official implementation's threshold handling; ``easy_margin`` instead keeps ``cos θ_y``
  whenever ``cos θ_y <= 0``).
* CosFace: target logit ``s · (cos θ_y - m)``.

Computation is in float32 for half-precision inputs; ``cos(θ + m)`` uses the expansion
``cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(1 - cos² θ)`` whose value is exact and whose
gradient is taken with ``1 - cos² θ >= 1e-6``, so nothing is infinite at ``cos θ = ±1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_finite, check_floating, check_ndim, check_real
from fewsight.losses._common import check_embeddings_labels, check_reduction, normalize, reduce_loss, upcast, zero_loss

__all__ = ["arcface_loss", "cosface_loss", "margin_cosine_logits", "ArcFaceLoss", "CosFaceLoss"]

_SIN_GRAD_FLOOR = 1e-6  # lower bound of 1 - cos² used for the gradient of sin θ only


def _validate(embeddings: Tensor, labels: Tensor, weight: Tensor, scale: float) -> None:
    check_ndim("weight", weight, 2, "Tensor[C, D]")
    check_floating("weight", weight)
    check_finite("weight", weight)
    check_embeddings_labels(embeddings, labels, weight.shape[0])
    if embeddings.shape[1] != weight.shape[1]:
        raise ShapeError(
            f"embeddings: expected Tensor[N, {weight.shape[1]}] matching weight's D, got shape {tuple(embeddings.shape)}"
        )
    check_real("scale", scale, low=0, low_open=True)


def margin_cosine_logits(embeddings: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine logits ``Tensor[N, D] x Tensor[C, D] -> Tensor[N, C]`` (no margin, no scale), float32 for half inputs.

    >>> margin_cosine_logits(torch.tensor([[2., 0.]]), torch.tensor([[1., 0.], [1., 1.]]))
    tensor([[1.0000, 0.7071]])
    """
    x, w = upcast(embeddings, weight)
    return normalize(x, eps) @ normalize(w, eps).t()


def _arcface_target(cos: Tensor, margin: float, easy_margin: bool) -> Tensor:
    one_minus_sq = 1.0 - cos * cos
    sin_value = one_minus_sq.clamp(min=0).sqrt()
    sin_grad = one_minus_sq.clamp(min=_SIN_GRAD_FLOOR).sqrt()
    sin = sin_grad + (sin_value - sin_grad).detach()
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return torch.where(cos > 0, phi, cos)
    # θ + m > π would make cos(θ + m) increase again; the official code switches to a linear penalty.
    return torch.where(cos > math.cos(math.pi - margin), phi, cos - margin * math.sin(margin))


def _margin_softmax(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    scale: float,
    penalise: Callable[[Tensor], Tensor],
    reduction: str,
    eps: float,
) -> Tensor:
    """Cross-entropy of ``scale * cos`` whose target entry is replaced by ``penalise(cos θ_y)``."""
    check_reduction(reduction)
    _validate(embeddings, labels, weight, scale)
    check_real("eps", eps, low=0, low_open=True)
    if weight.shape[0] == 0 or embeddings.shape[0] == 0:
        out = zero_loss(embeddings, weight)
        return out.expand(embeddings.shape[0]).clone() if reduction == "none" else out
    known = labels >= 0
    target = labels.clamp(min=0)
    cos = margin_cosine_logits(embeddings, weight, eps)  # [N, C]
    cos_y = cos.gather(1, target.unsqueeze(1)).squeeze(1)
    logits = cos.scatter(1, target.unsqueeze(1), penalise(cos_y).unsqueeze(1)) * scale
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return reduce_loss(per_sample, reduction, known)


def arcface_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    scale: float = 64.0,
    margin: float = 0.5,
    reduction: str = "mean",
    *,
    easy_margin: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """ArcFace loss ``-log softmax(s·[cos(θ_y + m), cos θ_j≠y])_y`` (Deng et al. 2019, eq. 3).

    Args:
        embeddings: ``Tensor[N, D]`` (normalised inside).
        labels: ``Long[N]`` in ``[0, C)``; ``< 0`` means unknown and is ignored.
        weight: ``Tensor[C, D]`` class weights (normalised inside).
        scale: ``s > 0``.
        margin: additive angular margin ``m`` in radians (pytorch-metric-learning takes degrees).
        reduction: ``"mean"`` over known samples, ``"sum"`` or ``"none"`` (``Tensor[N]``, 0 for unknown).
        easy_margin: apply the margin only where ``cos θ_y > 0`` (official ``easy_margin`` option).
        eps: lower bound of the norms.

    Returns:
        The loss (float32 for fp16/bf16 inputs); 0 with a gradient graph when no label is known.

    Example:
        >>> w = torch.eye(3)
        >>> arcface_loss(torch.eye(3), torch.tensor([0, 1, -1]), w, scale=4.0, margin=0.5).round(decimals=4)
        tensor(0.0581)
    """
    margin = check_real("margin", margin)
    return _margin_softmax(
        embeddings, labels, weight, scale, lambda cos_y: _arcface_target(cos_y, margin, easy_margin), reduction, eps
    )


def cosface_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    scale: float = 64.0,
    margin: float = 0.35,
    reduction: str = "mean",
    *,
    eps: float = 1e-8,
) -> Tensor:
    """CosFace (large margin cosine) loss ``-log softmax(s·[cos θ_y - m, cos θ_j≠y])_y`` (Wang et al. 2018, eq. 4).

    Arguments as in :func:`arcface_loss`; ``margin`` is the additive cosine margin.

    Example:
        >>> cosface_loss(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), scale=10.0).round(decimals=4)
        tensor(0.0015)
    """
    margin = check_real("margin", margin)
    return _margin_softmax(embeddings, labels, weight, scale, lambda cos_y: cos_y - margin, reduction, eps)


class _MarginSoftmaxLoss(nn.Module):
    """Class weights ``Parameter[C, D]`` + ``forward(embeddings, labels)`` calling ``_loss_fn``."""

    _loss_fn: Callable[..., Tensor]  # the functional form, called with the module's settings

    def __init__(self, num_classes: int, embedding_dim: int, scale: float, margin: float, reduction: str, eps: float):
        super().__init__()
        if num_classes < 1:
            raise InvalidArgumentError(f"num_classes: expected >= 1, got {num_classes}")
        if embedding_dim < 1:
            raise InvalidArgumentError(f"embedding_dim: expected >= 1, got {embedding_dim}")
        check_real("scale", scale, low=0, low_open=True)
        check_real("margin", margin)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.scale = scale
        self.margin = margin
        self.reduction = check_reduction(reduction)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Only directions matter (weights are normalised); the official code uses N(0, 0.01²).
        nn.init.normal_(self.weight, std=0.01)

    def _loss_options(self) -> dict[str, object]:
        return {}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._loss_fn(
            embeddings, labels, self.weight, self.scale, self.margin, self.reduction, eps=self.eps, **self._loss_options()
        )

    def logits(self, embeddings: Tensor) -> Tensor:
        """Scaled cosine logits ``s · cos θ`` without margin, ``Tensor[N, C]``: the inference-time classifier."""
        return margin_cosine_logits(embeddings, self.weight, self.eps) * self.scale

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, scale={self.scale}, "
            f"margin={self.margin}, reduction={self.reduction!r}"
        )


class ArcFaceLoss(_MarginSoftmaxLoss):
    """ArcFace with its own class weights ``Parameter[C, D]``: ``forward(embeddings, labels)``.

    Example:
        >>> loss = ArcFaceLoss(10, 16)
        >>> loss(torch.randn(4, 16), torch.tensor([0, 3, 9, -1])).shape
        torch.Size([])
    """

    _loss_fn = staticmethod(arcface_loss)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        reduction: str = "mean",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, reduction, eps)
        self.easy_margin = easy_margin

    def _loss_options(self) -> dict[str, object]:
        return {"easy_margin": self.easy_margin}


class CosFaceLoss(_MarginSoftmaxLoss):
    """CosFace with its own class weights ``Parameter[C, D]``: ``forward(embeddings, labels)``.

    Example:
        >>> loss = CosFaceLoss(10, 16)
        >>> loss(torch.randn(4, 16), torch.tensor([0, 3, 9, -1])).shape
        torch.Size([])
    """

    _loss_fn = staticmethod(cosface_loss)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        scale: float = 64.0,
        margin: float = 0.35,
        reduction: str = "mean",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, reduction, eps)
