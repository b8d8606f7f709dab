"""CCS loss: classification-vector-centred cosine similarity (Guo & Zhang 2017).

"One-shot Face Recognition by Promoting Underrepresented Classes": each embedding is pulled
towards the direction of its class vector, ``L_i = (1 - s_i · cos(e_i, w_{y_i})) / 2``.
The class vectors are detached by default (they are tracked means or a classifier trained by
another term); the soft variant weights each sample by ``s_i`` (for anchors: their IoU).

Both a classification form (:func:`ccs_loss`, :class:`CCSLoss`) and a detection form that
matches anchors to ground truth (:func:`ccs_detection_loss`, :class:`CCSDetectionLoss`) exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewsight.errors import DTypeError, ShapeError, check_choice, check_finite, check_floating, check_labels, check_ndim
from fewsight.losses._common import (
    check_embeddings_labels,
    check_reduction,
    cosine_similarity,
    reduce_loss,
    upcast,
    zero_loss,
)

__all__ = ["ccs_loss", "ccs_detection_loss", "CCSLoss", "CCSDetectionLoss"]

_NORMALIZATIONS = ("anchor", "image")


def ccs_loss(
    embeddings: Tensor,
    class_vectors: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    detach_class_vectors: bool = True,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> Tensor:
    """CCS loss ``(1 - s_i · cos(e_i, w_{y_i})) / 2`` (Guo & Zhang 2017, eq. 3).

    Args:
        embeddings: ``Tensor[N, D]``; need not be normalised.
        class_vectors: ``Tensor[C, D]`` class directions ``w`` (need not be normalised).
        labels: ``Long[N]`` in ``[0, C)``; ``< 0`` means unknown and is ignored.
        weights: optional ``Tensor[N]`` per-sample ``s_i`` (soft variant); ``None`` means 1.
            Used as given (detach it yourself if it should not receive gradient).
        detach_class_vectors: stop the gradient into ``class_vectors`` (default, as in the paper).
        reduction: ``"mean"`` over samples with a known label, ``"sum"``, or ``"none"``
            (``Tensor[N]``, 0 for unknown samples).
        eps: lower bound of each vector norm in the cosine.

    Returns:
        The loss, in float32 for fp16/bf16 inputs, else in the inputs' dtype. With no known
        label, ``0`` with a gradient graph.

    Raises:
        LabelError: a label ``>= C``.

    Example:
        >>> e = torch.tensor([[1., 0.], [0., 2.], [3., 3.]])
        >>> w = torch.tensor([[1., 0.], [0., 1.]])
        >>> ccs_loss(e, w, torch.tensor([0, 0, -1]))  # (0 + 0.5) / 2 samples
        tensor(0.2500)
    """
    check_reduction(reduction)
    check_ndim("class_vectors", class_vectors, 2, "Tensor[C, D]")
    check_floating("class_vectors", class_vectors)
    check_finite("class_vectors", class_vectors)
    num_classes, dim = class_vectors.shape
    check_embeddings_labels(embeddings, labels, num_classes)
    if embeddings.shape[1] != dim:
        raise ShapeError(
            f"embeddings: expected Tensor[N, {dim}] matching class_vectors' D, got shape {tuple(embeddings.shape)}"
        )
    if weights is not None:
        check_ndim("weights", weights, 1, f"Tensor[{embeddings.shape[0]}]")
        check_floating("weights", weights)
        check_finite("weights", weights)
        if weights.shape[0] != embeddings.shape[0]:
            raise ShapeError(
                f"weights: expected Tensor[{embeddings.shape[0]}] matching embeddings, got shape {tuple(weights.shape)}"
            )
    if detach_class_vectors:
        class_vectors = class_vectors.detach()
    if num_classes == 0:
        # Every label is then unknown (a known one would have raised above).
        out = zero_loss(embeddings, class_vectors)
        return out.expand(embeddings.shape[0]).clone() if reduction == "none" else out

    x, w = upcast(embeddings, class_vectors)
    known = labels >= 0
    target = w.index_select(0, labels.clamp(min=0))  # [N, D]: each sample's own class only
    cos = cosine_similarity(x, target, eps)
    if weights is not None:
        cos = cos * weights.to(cos.dtype)
    per_sample = (1.0 - cos) * 0.5
    return reduce_loss(per_sample, reduction, known)


def _as_padded(targets: Any, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    from fewsight.geometry import pad_targets

    boxes, labels, valid = pad_targets(targets, device=device)
    if boxes.shape[0] != batch:
        raise ShapeError(f"targets: expected {batch} images matching embeddings' B, got {boxes.shape[0]}")
    return boxes, labels, valid


def ccs_detection_loss(
    anchors: Tensor,
    embeddings: Tensor,
    class_vectors: Tensor,
    targets: Any,
    *,
    object_threshold: float = 0.5,
    background_threshold: float = 0.4,
    iou_weighted: bool = True,
    normalization: str = "anchor",
    detach_class_vectors: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """CCS loss over the positive anchors of a detection batch (Guo & Zhang 2017, soft variant).

    Anchors are matched to the ground truth with :func:`fewsight.geometry.match` (IoU
    ``>= object_threshold`` positive, ``< background_threshold`` background, in between ignored).
    Each positive anchor ``a`` with matched box label ``y`` and IoU ``u`` contributes
    ``(1 - s · cos(e_a, w_y)) / 2`` with ``s = u`` when ``iou_weighted`` else 1. Background and
    ignored anchors, and anchors matched to a box whose label is ``< 0``, contribute nothing.

    Batch normalisation:

    * ``"anchor"`` (default): the sum over every positive anchor of the batch divided by the
      number of positive anchors of the batch (at least 1), so each positive anchor weighs the
      same whatever its image.
    * ``"image"`` (the original project): per image, the mean over its positive anchors; then
      the mean over the images that have at least one positive anchor. Images without objects
      (or without positive anchors) add zero and are not counted in that mean.

    With no positive anchor in the batch the loss is ``0`` with a gradient graph.

    Args:
        anchors: ``Tensor[A, 4]`` shared by the batch, or ``Tensor[B, A, 4]`` (xyxy).
        embeddings: ``Tensor[B, A, D]`` per-anchor embeddings.
        class_vectors: ``Tensor[C, D]`` class directions.
        targets: a list of ``{"boxes": Tensor[N_i, 4], "labels": Long[N_i]}`` or a padded
            ``Tensor[B, M, 5]`` (label ``-1`` on unused rows); see :func:`fewsight.geometry.pad_targets`.
        object_threshold, background_threshold: matching thresholds.
        iou_weighted: weight each positive by its IoU (soft CCS).
        normalization: ``"anchor"`` or ``"image"``, see above.
        detach_class_vectors: stop the gradient into ``class_vectors``.
        eps: lower bound of each vector norm in the cosine.

    Returns:
        Scalar loss (float32 for fp16/bf16 embeddings).

    Raises:
        LabelError: a ground-truth label ``>= C``.

    Example:
        >>> anchors = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
        >>> emb = torch.tensor([[[1., 0.], [0., 1.]]])
        >>> targets = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([1])}]
        >>> ccs_detection_loss(anchors, emb, torch.eye(2), targets)  # one positive, cos 0
        tensor(0.5000)
    """
    from fewsight.geometry import match

    check_choice("normalization", normalization, _NORMALIZATIONS)
    check_ndim("embeddings", embeddings, 3, "Tensor[B, A, D]")
    check_floating("embeddings", embeddings)
    check_finite("embeddings", embeddings)
    check_ndim("class_vectors", class_vectors, 2, "Tensor[C, D]")
    check_floating("class_vectors", class_vectors)
    check_finite("class_vectors", class_vectors)
    check_ndim("anchors", anchors, (2, 3), "Tensor[A, 4] or Tensor[B, A, 4]")
    batch, num_anchors, dim = embeddings.shape
    if anchors.shape[-2] != num_anchors:
        raise ShapeError(
            f"anchors: expected {num_anchors} anchors matching embeddings' A, got shape {tuple(anchors.shape)}"
        )
    if class_vectors.shape[1] != dim:
        raise ShapeError(
            f"class_vectors: expected Tensor[C, {dim}] matching embeddings' D, got shape {tuple(class_vectors.shape)}"
        )
    gt_boxes, gt_labels, gt_valid = _as_padded(targets, batch, embeddings.device)
    if gt_labels.is_floating_point():
        raise DTypeError(f"targets: expected integer labels, got dtype {gt_labels.dtype}")
    check_labels("targets labels", gt_labels, class_vectors.shape[0])

    m = match(
        anchors.detach().to(embeddings.device),
        gt_boxes,
        gt_valid,
        object_threshold=object_threshold,
        background_threshold=background_threshold,
    )
    if gt_boxes.shape[1] == 0:
        return zero_loss(embeddings, None if detach_class_vectors else class_vectors)
    anchor_label = torch.gather(gt_labels, 1, m.indices.clamp(min=0))
    positive = (m.indices >= 0) & (anchor_label >= 0)
    image_index, anchor_index = positive.nonzero(as_tuple=True)
    if image_index.numel() == 0:
        return zero_loss(embeddings, None if detach_class_vectors else class_vectors)

    weights = m.iou[image_index, anchor_index] if iou_weighted else None
    per_anchor = ccs_loss(
        embeddings[image_index, anchor_index],
        class_vectors,
        anchor_label[image_index, anchor_index],
        None if weights is None else weights.detach(),
        detach_class_vectors=detach_class_vectors,
        reduction="none",
        eps=eps,
    )
    if normalization == "anchor":
        return per_anchor.sum() / per_anchor.shape[0]
    sums = per_anchor.new_zeros(batch).index_add(0, image_index, per_anchor)
    counts = torch.bincount(image_index, minlength=batch).to(per_anchor.dtype)
    has_pos = counts > 0
    per_image = sums / counts.clamp(min=1)
    return per_image.sum() / has_pos.sum().clamp(min=1).to(per_image.dtype)


class CCSLoss(nn.Module):
    """Module form of :func:`ccs_loss`: ``forward(embeddings, class_vectors, labels, weights=None)``.

    Example:
        >>> loss = CCSLoss()
        >>> loss(torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 2, -1, 1])).shape
        torch.Size([])
    """

    def __init__(self, *, detach_class_vectors: bool = True, reduction: str = "mean", eps: float = 1e-8) -> None:
        super().__init__()
        self.detach_class_vectors = detach_class_vectors
        self.reduction = check_reduction(reduction)
        self.eps = eps

    def forward(
        self, embeddings: Tensor, class_vectors: Tensor, labels: Tensor, weights: Tensor | None = None
    ) -> Tensor:
        return ccs_loss(
            embeddings,
            class_vectors,
            labels,
            weights,
            detach_class_vectors=self.detach_class_vectors,
            reduction=self.reduction,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"detach_class_vectors={self.detach_class_vectors}, reduction={self.reduction!r}"


class CCSDetectionLoss(nn.Module):
    """Module form of :func:`ccs_detection_loss`: ``forward(anchors, embeddings, class_vectors, targets)``.

    Example:
        >>> anchors = torch.tensor([[0., 0., 10., 10.]])
        >>> targets = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0])}]
        >>> CCSDetectionLoss()(anchors, torch.tensor([[[2., 0.]]]), torch.eye(2), targets)
        tensor(0.)
    """

    def __init__(
        self,
        *,
        object_threshold: float = 0.5,
        background_threshold: float = 0.4,
        iou_weighted: bool = True,
        normalization: str = "anchor",
        detach_class_vectors: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        check_choice("normalization", normalization, _NORMALIZATIONS)
        self.object_threshold = object_threshold
        self.background_threshold = background_threshold
        self.iou_weighted = iou_weighted
        self.normalization = normalization
        self.detach_class_vectors = detach_class_vectors
        self.eps = eps

    def forward(self, anchors: Tensor, embeddings: Tensor, class_vectors: Tensor, targets: Any) -> Tensor:
        return ccs_detection_loss(
            anchors,
            embeddings,
            class_vectors,
            targets,
            object_threshold=self.object_threshold,
            background_threshold=self.background_threshold,
            iou_weighted=self.iou_weighted,
            normalization=self.normalization,
            detach_class_vectors=self.detach_class_vectors,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"object_threshold={self.object_threshold}, background_threshold={self.background_threshold}, "
            f"iou_weighted={self.iou_weighted}, normalization={self.normalization!r}"
        )
