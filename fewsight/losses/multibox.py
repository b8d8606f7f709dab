"""SSD MultiBox loss with batched hard-negative mining (Liu et al. 2016, "SSD", Sec. 2.2).

Per image ``i``: ``L_i = ((2 - alpha) * L_loc_i + alpha * L_cls_i) / max(1, N_i)`` with ``N_i`` its
positive default boxes; the loss is the mean of ``L_i`` over the batch (``alpha = 1`` gives the
paper's ``L_conf + L_loc``; this weighting is super-gradients' ``SSDLoss``).

Background convention: the SSD classification head has ``C + 1`` outputs and **index 0 is the
background logit**; a user label ``c`` in ``0..C-1`` is logit ``c + 1``. The public API never
treats background as a class: targets carry labels ``0..C-1`` and predictions are decoded with
``c = argmax - 1`` by the model.

Everything is batched: one :func:`fewsight.geometry.match` call for the batch, one cross-entropy
over all default boxes, and hard-negative mining by a per-image top-k threshold, with no Python
loop over images. Gradients are computed only on the rows that carry loss (positives and mined
negatives), not on a dense ``[B, A, C + 1]`` softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_finite, check_floating, check_labels, check_last_dim, check_ndim, check_real
from fewsight.geometry.coder import BoxCoder
from fewsight.geometry.matching import BACKGROUND, match
from fewsight.geometry.targets import pad_targets
from fewsight.losses._common import check_reduction, compute_dtype, reduce_loss

__all__ = ["MultiBoxLoss", "check_multibox_options", "hard_negative_mask", "multibox_loss"]

Targets = Sequence[Mapping[str, Tensor]] | Tensor


def check_multibox_options(iou_threshold: float, neg_pos_ratio: float, alpha: float, min_negatives: int, beta: float) -> None:
    """Validate MultiBox options (for modules that store them and must reject bad ones at construction).

    ``iou_threshold`` in ``(0, 1]``, ``neg_pos_ratio >= 0``, ``alpha`` in ``[0, 2]``, ``min_negatives`` an
    int ``>= 0``, ``beta >= 0``.

    Raises:
        InvalidArgumentError: the first value out of range.

    >>> check_multibox_options(0.5, 3.0, 1.0, 0, 1.0)
    """
    for name, value in (("iou_threshold", iou_threshold), ("neg_pos_ratio", neg_pos_ratio), ("alpha", alpha), ("beta", beta)):
        check_real(name, value)
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise InvalidArgumentError(f"iou_threshold: expected a float in (0, 1], got {iou_threshold!r}")
    if not float(neg_pos_ratio) >= 0.0:
        raise InvalidArgumentError(f"neg_pos_ratio: expected a number >= 0, got {neg_pos_ratio!r}")
    if not 0.0 <= float(alpha) <= 2.0:
        raise InvalidArgumentError(f"alpha: expected a float in [0, 2] (weights 2 - alpha and alpha), got {alpha!r}")
    if isinstance(min_negatives, bool) or not isinstance(min_negatives, int) or min_negatives < 0:
        raise InvalidArgumentError(f"min_negatives: expected an int >= 0, got {min_negatives!r}")
    if not float(beta) >= 0.0:
        raise InvalidArgumentError(f"beta: expected a float >= 0, got {beta!r}")


def _unknown_boxes(targets: Targets, width: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """List-form boxes with a label ``< 0`` as ``(Tensor[B, G, 4], Bool[B, G])``, or ``None`` when there are none."""
    if isinstance(targets, Tensor) or not any(bool((t["labels"] < 0).any()) for t in targets if len(t["labels"])):
        return None
    unknown = pad_targets(
        [{"boxes": t["boxes"], "labels": torch.where(torch.as_tensor(t["labels"]) < 0, 0, -1)} for t in targets],
        device=device, dtype=dtype,
    )
    boxes = unknown.boxes
    valid = unknown.valid & torch.isfinite(boxes).all(-1) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return boxes, valid


def hard_negative_mask(
    scores: Tensor,
    positive: Tensor,
    negative: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives: int = 0,
) -> Tensor:
    """Per image, the ``k_i`` available negatives with the highest ``scores`` -> ``Bool[B, A]``.

    ``k_i = min(floor(neg_pos_ratio * #positive_i), #negative_i)``, raised to
    ``min(min_negatives, #negative_i)``. Only anchors in ``negative`` can be chosen, so a positive
    is never counted twice and nothing beyond the available negatives is requested. Ties are broken
    by the lower anchor index. No gradient flows through the selection. Cost: one ``topk`` of the
    largest ``k_i`` and a few ``O(B * A)`` passes (no full sort).

    Args:
        scores: ``Tensor[B, A]`` hardness (e.g. background cross-entropy).
        positive: ``Bool[B, A]``.
        negative: ``Bool[B, A]`` anchors that may be mined (background, not ignored).

    >>> hard_negative_mask(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), torch.tensor([[True, False, False, False]]),
    ...                    torch.tensor([[False, True, True, True]]), neg_pos_ratio=2)
    tensor([[False,  True, False,  True]])
    """
    available = negative.sum(dim=1)
    num_pos = positive.sum(dim=1)
    if float(neg_pos_ratio).is_integer():
        wanted = num_pos * int(neg_pos_ratio)
    else:
        wanted = (num_pos.double() * float(neg_pos_ratio)).floor().long()
    k = torch.minimum(wanted, available)
    if min_negatives > 0:
        k = torch.maximum(k, available.clamp(max=min_negatives))
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(negative)
    # A top-k threshold instead of a full sort: O(A) per image, with k_max << A in practice.
    hardness = scores.detach().masked_fill(~negative, float("-inf"))
    top = torch.topk(hardness, k_max, dim=1).values  # sorted, descending
    threshold = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # k_i-th largest
    above = hardness > threshold
    # Fill the rest from the entries equal to the threshold, lowest anchor index first.
    missing = k.unsqueeze(1) - above.sum(dim=1, keepdim=True)
    at = hardness == threshold
    chosen = above | (at & (at.cumsum(dim=1) <= missing))
    return chosen & negative & (k > 0).unsqueeze(1)


def multibox_loss(
    cls_logits: Tensor,
    bbox_deltas: Tensor,
    default_boxes: Tensor,
    targets: Targets,
    *,
    iou_threshold: float = 0.5,
    neg_pos_ratio: float = 3.0,
    alpha: float = 1.0,
    min_negatives: int = 0,
    beta: float = 1.0,
    coder: BoxCoder | None = None,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """SSD MultiBox loss: smooth-L1 on positives + cross-entropy with hard-negative mining.

    ``L = mean_i [((2 - alpha) * sum_{pos_i} smoothL1(d, g^) + alpha * (sum_{pos_i} CE + sum_{hard neg_i} CE))
    / max(1, N_i)]`` (Liu et al. 2016, Eq. 1-2, normalised per image).

    Matching: :func:`fewsight.geometry.match` with ``object_threshold = background_threshold =
    iou_threshold`` and ``force_best=True`` (every GT gets its best default box). Regression targets
    use SSD coding (variances 0.1, 0.2). Per image the ``k_i = min(neg_pos_ratio * N_i, available)``
    background boxes with the highest background cross-entropy are mined (see
    :func:`hard_negative_mask`); ``min_negatives`` raises ``k_i`` to at least that many so images
    without objects still teach background.

    Images without positives: their localisation term is 0 and their classification term (only
    mined negatives, if ``min_negatives > 0``) is divided by 1; they count in the batch mean, as in
    super-gradients' ``SSDLoss``. Ground-truth boxes of zero width/height or non-finite coordinates
    are dropped before matching (they overlap nothing, so they could never be matched anyway).
    GT rows with a label ``< 0`` are padding (padded form) or, in the list form, objects of unknown
    class: they are not matched, and default boxes with IoU ``>= iou_threshold`` with an unknown
    object are excluded from the negatives (ignored, never taught background).

    Args:
        cls_logits: ``Tensor[B, A, C + 1]``; index 0 is the background logit, label ``c`` is ``c + 1``.
        bbox_deltas: ``Tensor[B, A, 4]`` SSD-coded regression.
        default_boxes: ``Tensor[A, 4]`` (or ``Tensor[B, A, 4]``) xyxy pixels, as the targets.
        targets: a list of ``{"boxes": Tensor[N_i, 4], "labels": Tensor[N_i]}`` (labels ``0..C-1``)
            or a padded ``Tensor[B, M, 5]`` (label ``-1`` in unused rows).
        iou_threshold: matching threshold (0.5).
        neg_pos_ratio: mined negatives per positive (3).
        alpha: weight ``(2 - alpha)`` of localisation and ``alpha`` of classification, in ``[0, 2]``.
        min_negatives: per image, at least this many mined negatives (when available).
        beta: smooth-L1 switch point (1.0, as SSD).
        coder: box coder; default ``BoxCoder.from_variances((0.1, 0.2))``.
        reduction: over images: ``"mean"`` (default), ``"sum"``, ``"none"`` (``Tensor[B]`` each).

    Returns:
        ``{"loss": ..., "loss_loc": ..., "loss_cls": ...}`` with ``loss = (2 - alpha) * loss_loc +
        alpha * loss_cls``; ``loss_loc`` and ``loss_cls`` are the per-image normalised terms, reduced
        the same way. Float32 for half-precision inputs.

    Raises:
        LabelError: a target label ``>= C``.

    Example:
        >>> from fewsight.geometry import default_boxes
        >>> boxes = default_boxes((300, 300), [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
        >>> logits, deltas = torch.zeros(2, 8732, 4), torch.zeros(2, 8732, 4)  # 3 classes + background
        >>> targets = [{"boxes": torch.tensor([[20., 30., 120., 160.]]), "labels": torch.tensor([2])},
        ...            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
        >>> out = multibox_loss(logits, deltas, boxes, targets)
        >>> sorted(out), out["loss"] > 0
        (['loss', 'loss_cls', 'loss_loc'], tensor(True))
    """
    check_multibox_options(iou_threshold, neg_pos_ratio, alpha, min_negatives, beta)
    check_reduction(reduction)
    check_ndim("cls_logits", cls_logits, 3, "Tensor[B, A, C + 1]")
    check_floating("cls_logits", cls_logits)
    batch, num_anchors, num_logits = cls_logits.shape
    if num_logits < 2:
        raise ShapeError(f"cls_logits: expected Tensor[B, A, C + 1] with C >= 1 (index 0 = background), got shape {tuple(cls_logits.shape)}")
    check_ndim("bbox_deltas", bbox_deltas, 3, "Tensor[B, A, 4]")
    check_floating("bbox_deltas", bbox_deltas)
    if bbox_deltas.shape != (batch, num_anchors, 4):
        raise ShapeError(f"bbox_deltas: expected Tensor[{batch}, {num_anchors}, 4], got shape {tuple(bbox_deltas.shape)}")
    check_last_dim("default_boxes", default_boxes, 4, "Tensor[A, 4]")
    if default_boxes.shape[-2:] != (num_anchors, 4) or default_boxes.ndim not in (2, 3) or (
        default_boxes.ndim == 3 and default_boxes.shape[0] != batch
    ):
        raise ShapeError(f"default_boxes: expected Tensor[{num_anchors}, 4] (A of cls_logits), got shape {tuple(default_boxes.shape)}")
    for name, t in (("cls_logits", cls_logits), ("bbox_deltas", bbox_deltas), ("default_boxes", default_boxes)):
        check_finite(name, t)
    coder = BoxCoder.from_variances((0.1, 0.2)) if coder is None else coder

    work = compute_dtype(torch.promote_types(cls_logits.dtype, bbox_deltas.dtype))
    device = cls_logits.device
    padded = pad_targets(targets, device=device, dtype=work)
    if padded.boxes.shape[0] != batch:
        raise ShapeError(f"targets: expected {batch} images (batch of cls_logits), got {padded.boxes.shape[0]}")
    check_labels("targets labels", padded.labels, num_logits - 1)
    gt = padded.boxes
    # Degenerate / non-finite GT would give inf regression targets; they overlap nothing anyway.
    gt_valid = (
        padded.valid
        & torch.isfinite(gt).all(dim=-1)
        & (gt[..., 2] > gt[..., 0])
        & (gt[..., 3] > gt[..., 1])
    )
    priors = default_boxes.to(device=device, dtype=work)
    m = match(
        priors,
        gt,
        gt_valid,
        object_threshold=iou_threshold,
        background_threshold=iou_threshold,
        force_best=True,
    )
    positive = m.indices >= 0
    negative = m.indices == BACKGROUND
    unknown = _unknown_boxes(targets, gt.shape[1], device, work)
    if unknown is not None:
        # An object of unknown class is not background: its default boxes are never mined.
        u_boxes, u_valid = unknown
        on_unknown = match(priors, u_boxes, u_valid, object_threshold=iou_threshold,
                           background_threshold=iou_threshold).indices >= 0
        negative = negative & ~on_unknown
    safe_idx = m.indices.clamp(min=0)
    num_pos = positive.sum(dim=1)

    # Classification. Mining needs the CE of every default box but no gradient; the gradient is
    # needed only on positives and mined negatives (~4 per positive), so the differentiable CE is
    # recomputed on those rows alone instead of back-propagating a dense [B, A, C + 1] softmax.
    if padded.labels.shape[1] > 0:
        cls_target = torch.where(positive, padded.labels.gather(1, safe_idx) + 1, 0)
    else:
        cls_target = torch.zeros_like(m.indices)
    flat_logits = cls_logits.reshape(-1, num_logits)
    flat_target = cls_target.reshape(-1)
    with torch.no_grad():
        ce_all = F.cross_entropy(flat_logits.to(work), flat_target, reduction="none").view(batch, num_anchors)
    mined = hard_negative_mask(ce_all, positive, negative, neg_pos_ratio, min_negatives)
    rows = (positive | mined).reshape(-1).nonzero().squeeze(1)
    image_of_row = torch.div(rows, num_anchors, rounding_mode="floor")
    ce = F.cross_entropy(flat_logits[rows].to(work), flat_target[rows], reduction="none")
    cls_sum = ce.new_zeros(batch).index_add(0, image_of_row, ce)

    # Localisation: smooth-L1 on SSD-coded deltas of the positives only.
    pos_rows = positive.reshape(-1).nonzero().squeeze(1)
    pos_image = torch.div(pos_rows, num_anchors, rounding_mode="floor")
    pos_anchor = pos_rows - pos_image * num_anchors
    priors_rows = priors[pos_image, pos_anchor] if priors.ndim == 3 else priors[pos_anchor]
    gt_rows = gt[pos_image, safe_idx.reshape(-1)[pos_rows]] if gt.shape[1] > 0 else priors_rows
    loc_target = coder.encode(gt_rows, priors_rows)
    loc_el = F.smooth_l1_loss(
        bbox_deltas.reshape(-1, 4)[pos_rows].to(work), loc_target, beta=float(beta), reduction="none"
    ).sum(dim=-1)
    loc_sum = loc_el.new_zeros(batch).index_add(0, pos_image, loc_el)
    # With nothing selected both sums are 0 and still reach the inputs through the (empty) indexing,
    # so backward works and gives zero gradients.

    denom = num_pos.clamp(min=1).to(work)
    loss_loc = loc_sum / denom
    loss_cls = cls_sum / denom
    loss = (2.0 - alpha) * loss_loc + alpha * loss_cls
    return {
        "loss": reduce_loss(loss, reduction),
        "loss_loc": reduce_loss(loss_loc, reduction),
        "loss_cls": reduce_loss(loss_cls, reduction),
    }


class MultiBoxLoss(nn.Module):
    """Module form of :func:`multibox_loss`; ``forward(cls_logits, bbox_deltas, default_boxes, targets)``.

    Returns the same dict ``{"loss", "loss_loc", "loss_cls"}`` (``out["loss"]`` is what to
    backpropagate; the dict can go straight to Lightning's ``log_dict``).

    >>> crit = MultiBoxLoss(neg_pos_ratio=3, min_negatives=8)
    >>> priors = torch.tensor([[0., 0., 10., 10.], [10., 0., 20., 10.], [0., 10., 10., 20.]])
    >>> out = crit(torch.zeros(1, 3, 2), torch.zeros(1, 3, 4), priors, torch.tensor([[[0., 0., 10., 9., 0.]]]))
    >>> round(out["loss"].item(), 4)
    2.3432
    """

    def __init__(
        self,
        *,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        alpha: float = 1.0,
        min_negatives: int = 0,
        beta: float = 1.0,
        coder: BoxCoder | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_multibox_options(iou_threshold, neg_pos_ratio, alpha, min_negatives, beta)
        self.iou_threshold = float(iou_threshold)
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = float(alpha)
        self.min_negatives = min_negatives
        self.beta = float(beta)
        self.coder = BoxCoder.from_variances((0.1, 0.2)) if coder is None else coder
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return (
            f"iou_threshold={self.iou_threshold}, neg_pos_ratio={self.neg_pos_ratio}, alpha={self.alpha}, "
            f"min_negatives={self.min_negatives}, beta={self.beta}, coder={self.coder!r}, reduction={self.reduction!r}"
        )

    def forward(self, cls_logits: Tensor, bbox_deltas: Tensor, default_boxes: Tensor, targets: Targets) -> dict[str, Tensor]:
        return multibox_loss(
            cls_logits,
            bbox_deltas,
            default_boxes,
            targets,
            iou_threshold=self.iou_threshold,
            neg_pos_ratio=self.neg_pos_ratio,
            alpha=self.alpha,
            min_negatives=self.min_negatives,
            beta=self.beta,
            coder=self.coder,
            reduction=self.reduction,
        )
