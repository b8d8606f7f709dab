"""Training targets of the dense detectors: targets at the model boundary, anchor assignment, box loss.

* :func:`prepare_targets` -- targets (list of dicts or padded ``Tensor[B, M, 5]``) -> padded tensors in
  network coordinates, degenerate boxes dropped.
* :func:`assign_anchors` / :class:`AnchorAssigner` (the component a detector receives, ``assigner=``) --
  one batched :func:`fewsight.geometry.match` call for the whole batch -> per-anchor class labels
  (``BACKGROUND`` / ``IGNORE`` codes), matched boxes and IoU.
* :func:`detection_box_loss` -- box regression summed over the positive anchors of the batch.

The classification losses take the assignment's labels directly
(:func:`fewsight.losses.functional.focal_loss_detection`, :func:`~fewsight.losses.functional.directional_focal_loss`).

Example:
    >>> t = prepare_targets([{"boxes": torch.tensor([[0., 0., 10., 12.]]), "labels": torch.tensor([3])}], 1)
    >>> AnchorAssigner()(torch.tensor([[0., 0., 10., 10.], [50., 50., 60., 60.]]), t).labels
    tensor([[ 3, -1]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, check_labels, check_real
from fewsight.geometry import BoxCoder, PaddedTargets, match, pad_targets
from fewsight.losses.functional import box_regression_loss
from fewsight.losses.focal import anchor_labels

__all__ = ["AnchorAssigner", "AnchorAssignment", "assign_anchors", "detection_box_loss", "prepare_targets"]


def prepare_targets(
    targets: Sequence[Mapping[str, Tensor]] | Tensor | PaddedTargets,
    batch_size: int,
    *,
    scales: Tensor | None = None,
    num_classes: int | None = None,
    device: torch.device | None = None,
) -> PaddedTargets:
    """Targets at the model boundary -> :class:`~fewsight.geometry.PaddedTargets` in network coordinates.

    * A list of ``{"boxes": Tensor[N_i, 4], "labels": Long[N_i]}`` or a padded ``Tensor[B, M, 5]``
      (label ``-1`` on unused rows) goes through :func:`fewsight.geometry.pad_targets`.
    * Boxes are multiplied by ``scales`` (``Tensor[B, 2]``, ``(s_y, s_x)``) when given.
    * Boxes that are not finite or have zero/negative width or height are dropped (invalid).
    * A list box with a label ``< 0`` (unknown object) stays valid with label ``-1``: its anchors are
      ignored by the losses instead of being taught background. (In the padded tensor form, label
      ``-1`` marks unused rows, so such a box is dropped.)
    * A list target's ``"ignore_boxes"`` (``Tensor[R, 4]``: regions that are neither object nor
      background, e.g. objects cut by a tile border) become such rows, after the image's boxes (so box
      indices are unchanged): an anchor matched to one is neither positive nor negative.

    Raises:
        ShapeError: not ``batch_size`` images of targets. LabelError: a label ``>= num_classes``.

    Example:
        >>> t = prepare_targets([{"boxes": torch.tensor([[0., 0., 4., 4.], [1., 1., 1., 5.]]),
        ...                       "labels": torch.tensor([0, 1])}], 1)
        >>> t.valid.tolist()
        [[True, False]]
    """
    if isinstance(targets, PaddedTargets):
        boxes, labels, valid = targets
        present = valid
    elif isinstance(targets, Tensor):
        boxes, labels, valid = pad_targets(targets, device=device)
        present = valid
    else:
        if any(isinstance(t, Mapping) and t.get("ignore_boxes") is not None for t in targets):
            targets = [_with_ignore_rows(i, t) for i, t in enumerate(targets)]
        boxes, labels, valid = pad_targets(targets, device=device)
        counts = torch.tensor([len(t["boxes"]) for t in targets], device=boxes.device)
        present = torch.arange(boxes.shape[1], device=boxes.device) < counts.unsqueeze(1)
    if boxes.ndim != 3 or boxes.shape[0] != batch_size:
        raise ShapeError(f"targets: expected {batch_size} images (one per input image), got {boxes.shape[0]}")
    if device is not None:
        boxes, labels, valid, present = (t.to(device) for t in (boxes, labels, valid, present))
    boxes = boxes.float() if boxes.dtype != torch.float64 else boxes
    if scales is not None and boxes.shape[1] > 0:
        boxes = boxes * scales.to(boxes).flip(-1).repeat(1, 2).unsqueeze(1)  # (s_x, s_y, s_x, s_y)
    well_formed = torch.isfinite(boxes).all(-1) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    valid = present & well_formed
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    if num_classes is not None:
        check_labels("targets labels", labels, num_classes)
    return PaddedTargets(boxes, labels, valid)


def _with_ignore_rows(i: int, target: Any) -> Any:
    """``target`` with its ``ignore_boxes`` appended to ``boxes`` as label ``-1`` rows (other keys dropped)."""
    if not isinstance(target, Mapping) or target.get("ignore_boxes") is None or "boxes" not in target:
        return target  # pad_targets reports malformed targets
    ignore = torch.as_tensor(target["ignore_boxes"])
    if ignore.numel() == 0:
        return target
    if ignore.ndim != 2 or ignore.shape[-1] != 4:
        raise ShapeError(f"targets[{i}]['ignore_boxes']: expected Tensor[R, 4], got shape {tuple(ignore.shape)}")
    boxes = torch.as_tensor(target["boxes"])
    labels = torch.as_tensor(target["labels"])
    boxes = boxes.reshape(-1, 4) if boxes.numel() == 0 else boxes
    ignore = ignore.to(device=boxes.device, dtype=boxes.dtype if boxes.is_floating_point() else ignore.dtype)
    return {
        "boxes": torch.cat((boxes.to(ignore.dtype), ignore)),
        "labels": torch.cat((labels, torch.full((ignore.shape[0],), -1, dtype=labels.dtype, device=labels.device))),
    }


class AnchorAssignment(NamedTuple):
    """Per-anchor training targets of a batch.

    ``labels``: ``Long[B, A]`` class of the matched box, ``BACKGROUND`` or ``IGNORE`` (also for
    anchors of boxes with an unknown label); ``matched``: ``Long[B, A]`` matched GT index (the raw
    :attr:`fewsight.geometry.Match.indices`); ``iou``: ``Tensor[B, A]`` best IoU; ``positive``:
    ``Bool[B, A]`` = ``labels >= 0``.
    """

    labels: Tensor
    matched: Tensor
    iou: Tensor
    positive: Tensor


def assign_anchors(
    anchors: Tensor,
    targets: PaddedTargets,
    *,
    object_threshold: float = 0.5,
    background_threshold: float = 0.4,
    low_quality: bool = True,
) -> AnchorAssignment:
    """Match every anchor of every image in one :func:`fewsight.geometry.match` call.

    ``IoU >= object_threshold`` positive, ``< background_threshold`` background, in between ignored;
    with ``low_quality`` each box's best anchors are positive too (torchvision RetinaNet: 0.5 / 0.4,
    ``allow_low_quality_matches=True``).

    Args:
        anchors: ``Tensor[A, 4]`` shared by the batch.
        targets: padded targets (see :func:`prepare_targets`).

    Example:
        >>> a = torch.tensor([[0., 0., 10., 10.], [50., 50., 60., 60.]])
        >>> t = PaddedTargets(torch.tensor([[[0., 0., 10., 12.]]]), torch.tensor([[3]]), torch.tensor([[True]]))
        >>> assign_anchors(a, t).labels
        tensor([[ 3, -1]])
    """
    m = match(
        anchors,
        targets.boxes,
        targets.valid,
        object_threshold=object_threshold,
        background_threshold=background_threshold,
        low_quality=low_quality,
    )
    labels = anchor_labels(m.indices, targets.labels)
    return AnchorAssignment(labels, m.indices, m.iou, labels >= 0)


def detection_box_loss(
    deltas: Tensor,
    anchors: Tensor,
    targets: PaddedTargets,
    assignment: AnchorAssignment,
    *,
    coder: BoxCoder,
    kind: str = "smooth_l1",
    beta: float = 0.11,
) -> Tensor:
    """Box regression loss summed over the positive anchors of the batch (divide by their count).

    ``L = sum_{b, a positive} l(deltas[b, a], encode(gt[b, matched[b, a]], anchors[a]))``, ``l`` smooth-L1
    (Girshick 2015), L1, or GIoU on decoded boxes (Rezatofighi et al. 2019); see
    :func:`fewsight.losses.box.box_regression_loss`. Only the positive rows are gathered (one
    ``nonzero`` for the batch). No positive anchor: 0 with a gradient graph.

    Shapes: ``deltas: Tensor[B, A, 4]``, ``anchors: Tensor[A, 4]``.

    Example:
        >>> a = torch.tensor([[0., 0., 10., 10.]])
        >>> t = PaddedTargets(torch.tensor([[[1., 0., 11., 10.]]]), torch.tensor([[0]]), torch.tensor([[True]]))
        >>> asg = assign_anchors(a, t)
        >>> detection_box_loss(torch.zeros(1, 1, 4), a, t, asg, coder=BoxCoder(), kind="l1")
        tensor(0.1000)
    """
    image, anchor = assignment.positive.nonzero(as_tuple=True)
    matched = assignment.matched[image, anchor]
    return box_regression_loss(
        deltas[image, anchor],
        targets.boxes[image, matched].to(deltas.device),
        anchors[anchor],
        coder=coder,
        kind=kind,
        beta=beta,
        reduction="sum",
    )


def _check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name}: expected a float in [0, 1], got {value!r}")
    return check_real(name, value, low=0.0, high=1.0)


class AnchorAssigner:
    """A detector's matching rule: ``assigner(anchors, targets) -> AnchorAssignment`` (see :func:`assign_anchors`).

    Args:
        object_threshold: IoU at or above which an anchor is positive (0.5).
        background_threshold: IoU below which it is background (0.4); in between it is ignored.
        low_quality: each box's best anchors are positive too, so no box goes untaught (RetinaNet: True;
            SSD uses its force-best match inside the MultiBox loss instead).

    Example:
        >>> AnchorAssigner(object_threshold=0.6, background_threshold=0.3)
        AnchorAssigner(object_threshold=0.6, background_threshold=0.3, low_quality=True)
    """

    def __init__(self, *, object_threshold: float = 0.5, background_threshold: float = 0.4, low_quality: bool = True) -> None:
        self.object_threshold = _check_probability("object_threshold", object_threshold)
        self.background_threshold = _check_probability("background_threshold", background_threshold)
        if self.background_threshold > self.object_threshold:
            raise InvalidArgumentError(
                f"background_threshold: expected <= object_threshold ({object_threshold}), got {background_threshold}"
            )
        self.low_quality = bool(low_quality)

    def __call__(self, anchors: Tensor, targets: PaddedTargets) -> AnchorAssignment:
        return assign_anchors(
            anchors,
            targets,
            object_threshold=self.object_threshold,
            background_threshold=self.background_threshold,
            low_quality=self.low_quality,
        )

    def __repr__(self) -> str:
        return (
            f"AnchorAssigner(object_threshold={self.object_threshold}, "
            f"background_threshold={self.background_threshold}, low_quality={self.low_quality})"
        )
