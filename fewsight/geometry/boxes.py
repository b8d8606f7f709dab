"""Box primitives: formats, areas, batched IoU, clipping and sanitising.

All boxes are ``(x1, y1, x2, y2)`` absolute pixels unless a function says otherwise. Every function
broadcasts over leading dimensions, so a batch of images is one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fewsight.errors import (
    InvalidArgumentError,
    ShapeError,
    as_floating,
    as_tensor,
    check_choice,
    check_finite,
    check_last_dim,
    check_real,
)

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

# Coordinates above these make a product of two (an area) overflow the dtype: sqrt(3.4e38) ~ 1.8e19
# for float32, sqrt(1.8e308) ~ 1.3e154 for float64 (margins for the sums in unions).
_F32_SAFE = 1e18
_F64_SAFE = 1e150


def _boxes_arg(name: str, boxes: object, expected: str = "Tensor[..., 4]") -> Tensor:
    """The one entry check for box tensors: list -> tensor, last dim 4, integer -> float, finite."""
    boxes = as_tensor(name, boxes, expected=expected)
    check_last_dim(name, boxes, 4, expected)
    boxes = as_floating(name, boxes)
    check_finite(name, boxes)
    return boxes


def coordinate_work(named: Sequence[tuple[str, Tensor, Tensor | None]], dtype: torch.dtype) -> tuple[torch.dtype, float]:
    """Check box coordinates are finite and pick a work dtype in which their areas cannot overflow.

    ``named``: ``(argument name, Tensor[..., 4], optional Bool[...] row mask)``; rows outside the mask
    (padding) are not read. Returns ``(work dtype, scale)``: float32 inputs with coordinates beyond
    ``1e18`` are computed in float64, and float64 ones beyond ``1e150`` are multiplied by ``scale``
    (< 1) first, which leaves every IoU unchanged. Costs one reduction and one sync per tensor.
    Raises :class:`~fewsight.errors.NonFiniteError` naming the argument for NaN / +-inf.
    """
    top = 0.0
    for name, t, mask in named:
        if t.numel() == 0:
            continue
        mag = t.detach().abs()
        if mask is not None:
            mag = torch.where(mask.unsqueeze(-1), mag, mag.new_zeros(()))
        m = float(mag.amax())  # amax propagates NaN, so this one sync also tests finiteness
        if not math.isfinite(m):
            check_finite(name, t if mask is None else t[mask])
        top = max(top, m)
    work = dtype
    if work != torch.float64 and top > _F32_SAFE:
        work = torch.float64
    scale = 1.0 if top <= _F64_SAFE else 1.0 / top
    return work, scale


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``Tensor[..., 4]`` xyxy boxes -> ``Tensor[...]``; inverted boxes have area 0.

    Integer boxes give float32 areas (as do half-precision ones); an area beyond the dtype's range
    saturates at its largest finite value. NaN / +-inf coordinates raise ``NonFiniteError``.

    >>> box_area(torch.tensor([[0., 0., 2., 3.]]))
    tensor([6.])
    """
    boxes = _boxes_arg("boxes", boxes)
    return _area(boxes)


def _area(boxes: Tensor) -> Tensor:
    if boxes.dtype in (torch.float16, torch.bfloat16) or not boxes.is_floating_point():
        boxes = boxes.float()  # a 4000 px box's area overflows fp16; integer areas would truncate IoUs
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    # Finite but huge boxes saturate at the dtype's largest value instead of becoming inf.
    return area.clamp_(max=torch.finfo(area.dtype).max)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``Tensor[..., 4]`` boxes between ``"xyxy"``, ``"cxcywh"`` and ``"xywh"``.

    >>> box_convert(torch.tensor([1., 1., 2., 4.]), "cxcywh", "xyxy")
    tensor([ 0., -1.,  2.,  3.])
    """
    check_choice("in_fmt", in_fmt, BOX_FORMATS)
    check_choice("out_fmt", out_fmt, BOX_FORMATS)
    boxes = _boxes_arg("boxes", boxes)
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    elif in_fmt == "xywh":
        c, d = a + c, b + d
    # now xyxy; halves before adding so that coordinates near the dtype's maximum do not overflow
    if out_fmt == "cxcywh":
        a, b, c, d = a / 2 + c / 2, b / 2 + d / 2, c - a, d - b
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


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("boxes1", "boxes2")) -> tuple[Tensor, Tensor]:
    a = as_tensor(names[0], a, expected="Tensor[..., N, 4]")
    b = as_tensor(names[1], b, expected="Tensor[..., M, 4]")
    check_last_dim(names[0], a, 4, "Tensor[..., N, 4]")
    check_last_dim(names[1], b, 4, "Tensor[..., M, 4]")
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
    return a, b


def _result_dtypes(a: Tensor, b: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, working dtype): integer boxes give float32 IoUs; halves are computed in float32."""
    out = torch.promote_types(a.dtype, b.dtype)
    if not out.is_floating_point:
        out = torch.float32
    return out, (torch.float64 if out == torch.float64 else torch.float32)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, batched: ``Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M]``.

    Leading dimensions broadcast. Half-precision inputs are computed in float32 (areas of
    large boxes overflow fp16) and returned in the input dtype; integer boxes give float32.
    Coordinates whose areas would overflow the dtype are computed in float64 (and rescaled
    beyond that), so every IoU is finite. Pairs whose union is empty (two degenerate boxes) have
    IoU 0, not NaN. NaN / +-inf coordinates raise ``NonFiniteError`` naming the argument.

    IoU(a, b) = |a ∩ b| / |a ∪ b|.

    >>> box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.], [5., 5., 6., 6.]]))
    tensor([[0.1429, 0.0000]])
    """
    boxes1, boxes2 = _check_pair(boxes1, boxes2)
    out_dtype, work = _result_dtypes(boxes1, boxes2)
    work, scale = coordinate_work((("boxes1", boxes1, None), ("boxes2", boxes2, None)), work)
    a, b = _scaled(boxes1, work, scale), _scaled(boxes2, work, scale)
    inter = _intersection(a, b)
    union = _area(a).unsqueeze(-1) + _area(b).unsqueeze(-2)
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
    boxes, regions = _check_pair(boxes, regions, ("boxes", "regions"))
    out_dtype, work = _result_dtypes(boxes, regions)
    work, scale = coordinate_work((("boxes", boxes, None), ("regions", regions, None)), work)
    a, b = _scaled(boxes, work, scale), _scaled(regions, work, scale)
    inter = _intersection(a, b)
    return inter.div_(_area(a).unsqueeze(-1).clamp(min=torch.finfo(work).tiny)).to(out_dtype)


def _scaled(boxes: Tensor, work: torch.dtype, scale: float) -> Tensor:
    boxes = boxes.to(work)
    return boxes if scale == 1.0 else boxes * scale


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``Tensor[..., 4]`` xyxy boxes to an image of ``(H, W)`` pixels.

    >>> clip_boxes(torch.tensor([[-5., 2., 50., 9.]]), (8, 40))
    tensor([[ 0.,  2., 40.,  8.]])
    """
    boxes = _boxes_arg("boxes", boxes)
    h, w = _image_size(image_size)
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        values = tuple(image_size)
    except TypeError:
        raise InvalidArgumentError(f"image_size: expected (H, W), got {image_size!r}") from None
    if len(values) != 2:
        raise InvalidArgumentError(f"image_size: expected (H, W), got {image_size!r}")
    h, w = (int(check_real("image_size", v)) for v in values)
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
    ``min_size`` pixels (this includes boxes entirely outside the image). This is the one function
    that accepts NaN / +-inf coordinates: it exists to remove them and report which rows it removed
    (every other op raises ``NonFiniteError``). Integer boxes are promoted to the default float dtype.

    >>> r = sanitize_boxes(torch.tensor([[5., 5., 1., 1.], [0., 0., 0., 9.]]), image_size=(8, 8))
    >>> r.boxes, r.keep
    (tensor([[1., 1., 5., 5.]]), tensor([ True, False]))
    """
    boxes = as_tensor("boxes", boxes, expected="Tensor[N, 4]")
    check_last_dim("boxes", boxes, 4, "Tensor[N, 4]")
    boxes = as_floating("boxes", boxes)
    if boxes.ndim != 2:
        raise ShapeError(f"boxes: expected Tensor[N, 4], got shape {tuple(boxes.shape)}")
    if labels is not None:
        labels = as_tensor("labels", labels, expected="Tensor[N]")
    if labels is not None and labels.shape != boxes.shape[:1]:
        raise ShapeError(
            f"labels: expected Tensor[{boxes.shape[0]}] matching boxes, got shape {tuple(labels.shape)}"
        )
    min_size = check_real("min_size", min_size, low=0)
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
