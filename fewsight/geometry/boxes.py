"""Box primitives: formats, areas, batched IoU, clipping and sanitising.

All boxes are ``(x1, y1, x2, y2)`` absolute pixels unless a function says otherwise. Every function
broadcasts over leading dimensions, so a batch of images is one call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, check_choice, check_last_dim

__all__ = [
    "BOX_FORMATS",
    "box_area",
    "box_convert",
    "box_iou",
    "box_ioa",
    "clip_boxes",
    "sanitize_boxes",
    "SanitizedBoxes",
]

BOX_FORMATS = ("xyxy", "cxcywh", "xywh")


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``Tensor[..., 4]`` xyxy boxes -> ``Tensor[...]``; inverted boxes have area 0.

    >>> box_area(torch.tensor([[0., 0., 2., 3.]]))
    tensor([6.])
    """
    check_last_dim("boxes", boxes, 4)
    if boxes.dtype in (torch.float16, torch.bfloat16) or not boxes.is_floating_point():
        boxes = boxes.float()  # a 4000 px box's area overflows fp16; integer areas would truncate IoUs
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``Tensor[..., 4]`` boxes between ``"xyxy"``, ``"cxcywh"`` and ``"xywh"``.

    >>> box_convert(torch.tensor([1., 1., 2., 4.]), "cxcywh", "xyxy")
    tensor([ 0., -1.,  2.,  3.])
    """
    check_last_dim("boxes", boxes, 4)
    check_choice("in_fmt", in_fmt, BOX_FORMATS)
    check_choice("out_fmt", out_fmt, BOX_FORMATS)
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    elif in_fmt == "xywh":
        c, d = a + c, b + d
    # now xyxy
    if out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    elif out_fmt == "xywh":
        c, d = c - a, d - b
    return torch.stack((a, b, c, d), dim=-1)


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    # [..., N, 1] against [..., 1, M]; the width and height are built in place so that only two
    # [..., N, M] buffers exist at a time (torchvision's version holds several [N, M, 2] ones).
    ax1, ay1, ax2, ay2 = (a[..., i].unsqueeze(-1) for i in range(4))
    bx1, by1, bx2, by2 = (b[..., i].unsqueeze(-2) for i in range(4))
    w = torch.minimum(ax2, bx2)
    w.sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    h = torch.minimum(ay2, by2)
    h.sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    return w.mul_(h)


def _check_pair(a: Tensor, b: Tensor) -> None:
    check_last_dim("boxes1", a, 4, "Tensor[..., N, 4]")
    check_last_dim("boxes2", b, 4, "Tensor[..., M, 4]")
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(
            f"boxes1/boxes2: expected Tensor[..., N, 4] and Tensor[..., M, 4], "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ShapeError(
            f"boxes1/boxes2: expected broadcastable leading dimensions, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        ) from None


def _result_dtypes(a: Tensor, b: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, working dtype): integer boxes give float32 IoUs; halves are computed in float32."""
    out = torch.promote_types(a.dtype, b.dtype)
    if not out.is_floating_point:
        out = torch.float32
    return out, (torch.float64 if out == torch.float64 else torch.float32)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, batched: ``Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M]``.

    Leading dimensions broadcast. Half-precision inputs are computed in float32 (areas of
    large boxes overflow fp16) and returned in the input dtype. Pairs whose union is empty
    (two degenerate boxes) have IoU 0, not NaN.

    IoU(a, b) = |a ∩ b| / |a ∪ b|.

    >>> box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.], [5., 5., 6., 6.]]))
    tensor([[0.1429, 0.0000]])
    """
    _check_pair(boxes1, boxes2)
    out_dtype, work = _result_dtypes(boxes1, boxes2)
    a, b = boxes1.to(work), boxes2.to(work)
    inter = _intersection(a, b)
    union = box_area(a).unsqueeze(-1) + box_area(b).unsqueeze(-2)
    union.sub_(inter)
    iou = inter.div_(union.clamp_(min=torch.finfo(work).tiny))
    return iou.to(out_dtype)


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of ``boxes``: ``Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M]``.

    Used for ignore regions: an anchor mostly inside a region has IoA close to 1 even when the region
    is much larger than the anchor.

    >>> box_ioa(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[0., 0., 10., 10.]]))
    tensor([[1.]])
    """
    _check_pair(boxes, regions)
    out_dtype, work = _result_dtypes(boxes, regions)
    a, b = boxes.to(work), regions.to(work)
    inter = _intersection(a, b)
    return inter.div_(box_area(a).unsqueeze(-1).clamp(min=torch.finfo(work).tiny)).to(out_dtype)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``Tensor[..., 4]`` xyxy boxes to an image of ``(H, W)`` pixels.

    >>> clip_boxes(torch.tensor([[-5., 2., 50., 9.]]), (8, 40))
    tensor([[ 0.,  2., 40.,  8.]])
    """
    check_last_dim("boxes", boxes, 4)
    h, w = _image_size(image_size)
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"image_size: expected (H, W), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise InvalidArgumentError(f"image_size: expected positive (H, W), got {(h, w)}")
    return h, w


class SanitizedBoxes(NamedTuple):
    """Result of :func:`sanitize_boxes`. ``keep[i]`` tells whether input row ``i`` survived."""

    boxes: Tensor
    labels: Tensor | None
    keep: Tensor

    @property
    def num_dropped(self) -> int:
        return int((~self.keep).sum())


def sanitize_boxes(
    boxes: Tensor,
    labels: Tensor | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    min_size: float = 1.0,
) -> SanitizedBoxes:
    """Repair or drop degenerate boxes: ``Tensor[N, 4]`` -> kept rows, and a ``Bool[N]`` report.

    Repairs: swapped corners are reordered; with ``image_size`` boxes are clipped to the image.
    Drops: rows with a non-finite coordinate, or whose width or height (after repair) is below
    ``min_size`` pixels (this includes boxes entirely outside the image).

    >>> r = sanitize_boxes(torch.tensor([[5., 5., 1., 1.], [0., 0., 0., 9.]]), image_size=(8, 8))
    >>> r.boxes, r.keep
    (tensor([[1., 1., 5., 5.]]), tensor([ True, False]))
    """
    check_last_dim("boxes", boxes, 4, "Tensor[N, 4]")
    if boxes.ndim != 2:
        raise ShapeError(f"boxes: expected Tensor[N, 4], got shape {tuple(boxes.shape)}")
    if labels is not None and labels.shape != boxes.shape[:1]:
        raise ShapeError(
            f"labels: expected Tensor[{boxes.shape[0]}] matching boxes, got shape {tuple(labels.shape)}"
        )
    if min_size < 0:
        raise InvalidArgumentError(f"min_size: expected >= 0, got {min_size}")
    finite = torch.isfinite(boxes).all(dim=-1)
    safe = torch.where(finite.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    x1 = torch.minimum(safe[:, 0], safe[:, 2])
    x2 = torch.maximum(safe[:, 0], safe[:, 2])
    y1 = torch.minimum(safe[:, 1], safe[:, 3])
    y2 = torch.maximum(safe[:, 1], safe[:, 3])
    fixed = torch.stack((x1, y1, x2, y2), dim=-1)
    if image_size is not None:
        fixed = clip_boxes(fixed, image_size)
    wide = (fixed[:, 2] - fixed[:, 0]) >= min_size
    tall = (fixed[:, 3] - fixed[:, 1]) >= min_size
    # min_size 0 must still drop zero-area boxes: they can never be matched and give inf deltas.
    nonempty = (fixed[:, 2] > fixed[:, 0]) & (fixed[:, 3] > fixed[:, 1])
    keep = finite & wide & tall & nonempty
    return SanitizedBoxes(fixed[keep], None if labels is None else labels[keep], keep)
