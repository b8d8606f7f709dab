"""Box-regression losses for the dense detectors: smooth-L1, L1 and GIoU.

Pure functions on matched pairs; :func:`box_regression_loss` wraps them the way a detector head
uses them (encode targets against anchors, or decode predictions for GIoU, over a positive mask).

Smooth-L1 ``beta`` (the L2-to-L1 switch point) defaults to ``1.0``, the value of
``torch.nn.functional.smooth_l1_loss`` and of SSD (Liu et al. 2016) -- torchvision's SSD uses it.
Detectron's RPN / Faster R-CNN use ``beta = 1/9`` (``0.11``); torchvision's RetinaNet uses plain
L1 (``beta = 0``, or :func:`l1_loss`), and Detectron2's RetinaNet ``beta = 0.1``. Pass the value
of the recipe being reproduced.

Half-precision inputs are computed in float32 and the loss is returned in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, check_choice, check_finite, check_floating, check_last_dim, check_real
from fewsight.losses._common import check_reduction, reduce_loss, upcast

__all__ = ["BOX_LOSSES", "box_regression_loss", "giou_loss", "l1_loss", "smooth_l1_loss"]

BOX_LOSSES = ("smooth_l1", "l1", "giou")


def _check_pair(pred: Tensor, target: Tensor, pred_name: str, target_name: str) -> tuple[Tensor, Tensor]:
    check_floating(pred_name, pred)
    check_finite(pred_name, pred)
    check_finite(target_name, target)
    if target.shape != pred.shape:
        raise ShapeError(f"{target_name}: expected shape {tuple(pred.shape)} (same as {pred_name}), got {tuple(target.shape)}")
    if not target.is_floating_point():
        target = target.to(pred.dtype)
    return upcast(pred, target)  # type: ignore[return-value]


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "mean") -> Tensor:
    """Smooth-L1 (Huber with slope 1) elementwise loss (Girshick 2015, Fast R-CNN, Eq. 3).

    ``l = 0.5 * d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``, with ``d = pred - target``;
    ``beta = 0`` is L1.

    Args:
        pred: ``Tensor[...]`` (e.g. ``Tensor[N, 4]`` predicted deltas).
        target: ``Tensor[...]`` of the same shape.
        beta: switch point ``>= 0`` (default 1.0; see the module docstring for other recipes).
        reduction: ``"mean"`` over all elements, ``"sum"`` or ``"none"``.

    >>> smooth_l1_loss(torch.tensor([0.5, 3.0]), torch.zeros(2), reduction="none")
    tensor([0.1250, 2.5000])
    """
    check_reduction(reduction)
    check_real("beta", beta, low=0)
    pred, target = _check_pair(pred, target, "pred", "target")
    return reduce_loss(F.smooth_l1_loss(pred, target, beta=float(beta), reduction="none"), reduction)


def l1_loss(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Elementwise ``|pred - target|`` (torchvision RetinaNet's box loss).

    >>> l1_loss(torch.tensor([0.5, -3.0]), torch.zeros(2), reduction="sum")
    tensor(3.5000)
    """
    check_reduction(reduction)
    pred, target = _check_pair(pred, target, "pred", "target")
    return reduce_loss((pred - target).abs(), reduction)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, reduction: str = "mean", eps: float = 1e-7) -> Tensor:
    """Generalised-IoU loss ``1 - GIoU`` of paired xyxy boxes (Rezatofighi et al. 2019, Alg. 1).

    ``GIoU = IoU - (|C| - |A u B|) / |C|`` with ``C`` the smallest enclosing box.

    Args:
        pred_boxes: ``Tensor[..., 4]`` xyxy.
        target_boxes: ``Tensor[..., 4]`` xyxy, paired with ``pred_boxes``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``Tensor[...]``).
        eps: added to the union and enclosing areas.

    Equals ``torchvision.ops.generalized_box_iou_loss`` for well-formed boxes. Degenerate boxes
    (zero or negative width/height) are given zero area, so the loss stays finite and in ``[0, 2]``
    with finite gradients (torchvision lets inverted boxes have negative areas).

    >>> giou_loss(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.]]))
    tensor(1.0794)
    """
    check_reduction(reduction)
    check_last_dim("pred_boxes", pred_boxes, 4)
    check_last_dim("target_boxes", target_boxes, 4)
    pred_boxes, target_boxes = _check_pair(pred_boxes, target_boxes, "pred_boxes", "target_boxes")
    x1, y1, x2, y2 = pred_boxes.unbind(-1)
    u1, v1, u2, v2 = target_boxes.unbind(-1)
    area_p = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area_t = (u2 - u1).clamp(min=0) * (v2 - v1).clamp(min=0)
    inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * (
        torch.minimum(y2, v2) - torch.maximum(y1, v1)
    ).clamp(min=0)
    union = area_p + area_t - inter
    enclose = (torch.maximum(x2, u2) - torch.minimum(x1, u1)).clamp(min=0) * (
        torch.maximum(y2, v2) - torch.minimum(y1, v1)
    ).clamp(min=0)
    giou = inter / (union + eps) - (enclose - union) / (enclose + eps)
    return reduce_loss(1.0 - giou, reduction)


def box_regression_loss(
    deltas: Tensor,
    target_boxes: Tensor,
    anchors: Tensor,
    *,
    coder,
    kind: str = "smooth_l1",
    beta: float = 1.0,
    positive: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Detector box loss over anchors: ``Tensor[..., A, 4]`` deltas against matched GT boxes.

    ``"smooth_l1"`` / ``"l1"`` compare ``deltas`` with ``coder.encode(target_boxes, anchors)``;
    ``"giou"`` compares ``coder.decode(deltas, anchors)`` with ``target_boxes`` (as torchvision's
    ``_box_loss``). Per anchor the coordinate losses are summed.

    Args:
        deltas: ``Tensor[..., A, 4]`` predicted regression.
        target_boxes: ``Tensor[..., A, 4]`` xyxy GT box matched to each anchor (any value where
            ``positive`` is False: it is replaced by the anchor itself, so padding never yields inf).
        anchors: ``Tensor[A, 4]`` or ``Tensor[..., A, 4]`` (broadcast against ``deltas``).
        coder: a :class:`fewsight.geometry.BoxCoder`.
        kind: one of ``"smooth_l1"``, ``"l1"``, ``"giou"``.
        beta: smooth-L1 switch point.
        positive: ``Bool[..., A]`` anchors that count (default: all).
        reduction: ``"sum"`` over positive anchors (default; detectors divide by their own
            normaliser), ``"mean"`` per positive anchor (at least 1), ``"none"`` (``Tensor[..., A]``,
            0 where not positive).

    >>> from fewsight.geometry import BoxCoder
    >>> a = torch.tensor([[0., 0., 10., 10.]])
    >>> box_regression_loss(torch.zeros(1, 4), torch.tensor([[1., 0., 11., 10.]]), a, coder=BoxCoder(), kind="l1")
    tensor(0.1000)
    """
    check_choice("kind", kind, BOX_LOSSES)
    check_reduction(reduction)
    check_last_dim("deltas", deltas, 4, "Tensor[..., A, 4]")
    check_last_dim("target_boxes", target_boxes, 4, "Tensor[..., A, 4]")
    check_last_dim("anchors", anchors, 4, "Tensor[A, 4] or Tensor[..., A, 4]")
    check_floating("deltas", deltas)
    if target_boxes.shape != deltas.shape:
        raise ShapeError(f"target_boxes: expected shape {tuple(deltas.shape)} (same as deltas), got {tuple(target_boxes.shape)}")
    check_finite("deltas", deltas)
    check_finite("anchors", anchors)
    if positive is None:
        check_finite("target_boxes", target_boxes)
    anchors = anchors.to(device=deltas.device)
    deltas_w, target_w, anchors_w = upcast(deltas, target_boxes.to(deltas.device), anchors)
    anchors_w = anchors_w.expand_as(deltas_w)
    if positive is not None:
        if positive.shape != deltas.shape[:-1]:
            raise ShapeError(f"positive: expected Bool{list(deltas.shape[:-1])} (deltas without the 4), got {tuple(positive.shape)}")
        positive = positive.to(device=deltas.device, dtype=torch.bool)
        check_finite("target_boxes (positive rows)", target_boxes[positive.to(target_boxes.device)])
        target_w = torch.where(positive.unsqueeze(-1), target_w, anchors_w)
    if kind == "giou":
        per = giou_loss(coder.decode(deltas_w, anchors_w), target_w, reduction="none")
    else:
        encoded = coder.encode(target_w, anchors_w).detach()
        if kind == "l1":
            per = (deltas_w - encoded).abs().sum(-1)
        else:
            per = smooth_l1_loss(deltas_w, encoded, beta=beta, reduction="none").sum(-1)
    return reduce_loss(per, reduction, valid_mask=positive)
