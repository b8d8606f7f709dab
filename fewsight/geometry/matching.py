"""Anchor-to-ground-truth matching for a whole batch in one call.

The IoU tensor ``[B, G, A]`` is never built whole when it is large: anchors are processed in
chunks of at most ``max_block_elements`` IoU values, keeping per-anchor best matches and a running
per-GT best. The result is identical to the dense computation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, as_tensor, check_last_dim, check_real
from fewsight.geometry.boxes import coordinate_work

__all__ = ["BACKGROUND", "IGNORE", "Match", "match"]

BACKGROUND = -1
"""``Match.indices`` value of an anchor whose best IoU is below the background threshold."""
IGNORE = -2
"""``Match.indices`` value of an anchor in the ignore band or in an ignore region."""

# IoU values per chunk. On CPU a chunk whose three work buffers stay in cache is about twice as fast
# per value as a large one; on GPU one launch per op over a large block is what matters.
_CPU_BLOCK = 1 << 19
_GPU_BLOCK = 1 << 25


class Match(NamedTuple):
    """Per-anchor matching result.

    ``indices``: ``Long[B, A]``, a GT index ``>= 0`` (into the padded ``G`` axis), :data:`BACKGROUND`
    or :data:`IGNORE`. ``iou``: ``Tensor[B, A]``, the anchor's best IoU with any valid GT (0 when
    there is none; for anchors forced by ``force_best``, the IoU with the forced GT).
    """

    indices: Tensor
    iou: Tensor

    @property
    def positive(self) -> Tensor:
        """``Bool[B, A]``: anchors matched to a GT."""
        return self.indices >= 0


def _corners(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


class _IoUBlock:
    """IoU of anchor chunks against padded GT, laid out ``[B, G, a]``.

    Anchor coordinates are stored as contiguous planes ``[4, 1|B, A]`` and the three ``[B, G, a]``
    work buffers are reused across chunks: on CPU most of a naive IoU's time goes to page faults of
    freshly allocated matrices, not arithmetic.
    """

    def __init__(self, anchors: Tensor, gt: Tensor, gt_valid: Tensor, chunk: int) -> None:
        self.planes = anchors.permute(2, 0, 1).contiguous()  # [4, 1|B, A]
        # Flooring the anchor area bounds every union away from 0 (union >= anchor area), so the
        # [B, G, a] division needs no clamp of its own.
        tiny = torch.finfo(anchors.dtype).tiny
        self.area = ((self.planes[2] - self.planes[0]).clamp_(min=0) * (self.planes[3] - self.planes[1]).clamp_(min=0)).clamp_(min=tiny)
        # Padding rows become empty boxes far outside any image: IoU exactly 0, no masking pass.
        far = torch.tensor(-1e30, dtype=gt.dtype, device=gt.device)
        gt = torch.where(gt_valid.unsqueeze(-1), gt, far)
        self.gt = gt.permute(2, 0, 1).unsqueeze(-1)  # [4, B, G, 1]
        gx1, gy1, gx2, gy2 = self.gt
        self.gt_area = (gx2 - gx1).clamp(min=0) * (gy2 - gy1).clamp(min=0)
        batch, num_gt = gt.shape[:2]
        width = min(chunk, anchors.shape[1])
        self.buffers = [gt.new_empty((batch, num_gt, width)) for _ in range(3)]

    def __call__(self, start: int, stop: int) -> Tensor:
        a = stop - start
        w, h, tmp = (b[..., :a] for b in self.buffers)
        ax1, ay1, ax2, ay2 = (p[:, None, start:stop] for p in self.planes)  # [1|B, 1, a]
        gx1, gy1, gx2, gy2 = self.gt
        torch.minimum(ax2, gx2, out=w)
        w.sub_(torch.maximum(ax1, gx1, out=tmp)).clamp_(min=0)
        torch.minimum(ay2, gy2, out=h)
        h.sub_(torch.maximum(ay1, gy1, out=tmp)).clamp_(min=0)
        inter = w.mul_(h)
        union = torch.add(self.area[:, None, start:stop], self.gt_area, out=tmp)
        return inter.div_(union.sub_(inter))

    def rows(self, start: int, stop: int, image: Tensor, slot: Tensor) -> Tensor:
        """IoU of a few GT rows ``(image[k], slot[k])`` against one chunk -> ``Tensor[K, a]``."""
        planes = self.planes[:, :, start:stop]
        planes = planes[:, image] if planes.shape[1] > 1 else planes[:, 0].unsqueeze(1)  # [4, K|1, a]
        ax1, ay1, ax2, ay2 = planes
        gx1, gy1, gx2, gy2 = self.gt[:, image, slot]  # [4, K, 1]
        w = (torch.minimum(ax2, gx2) - torch.maximum(ax1, gx1)).clamp_(min=0)
        h = (torch.minimum(ay2, gy2) - torch.maximum(ay1, gy1)).clamp_(min=0)
        inter = w.mul_(h)
        area = self.area[:, start:stop]
        area = area[image] if area.shape[0] > 1 else area
        return inter.div_((area + self.gt_area[image, slot]).sub_(inter))


def _validate(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    anchors = as_tensor("anchors", anchors, expected="Tensor[A, 4] or Tensor[B, A, 4]")
    gt_boxes = as_tensor("gt_boxes", gt_boxes, expected="Tensor[B, G, 4]")
    gt_valid = None if gt_valid is None else as_tensor("gt_valid", gt_valid, expected="Bool[B, G]")
    check_last_dim("anchors", anchors, 4, "Tensor[A, 4] or Tensor[B, A, 4]")
    check_last_dim("gt_boxes", gt_boxes, 4, "Tensor[B, G, 4]")
    if anchors.ndim not in (2, 3):
        raise ShapeError(f"anchors: expected Tensor[A, 4] or Tensor[B, A, 4], got shape {tuple(anchors.shape)}")
    if gt_boxes.ndim != 3:
        raise ShapeError(f"gt_boxes: expected Tensor[B, G, 4], got shape {tuple(gt_boxes.shape)}")
    batch = gt_boxes.shape[0]
    if anchors.ndim == 3 and anchors.shape[0] != batch:
        raise ShapeError(
            f"anchors: expected Tensor[{batch}, A, 4] to match gt_boxes' batch, got shape {tuple(anchors.shape)}"
        )
    if gt_valid is None:
        gt_valid = torch.ones(gt_boxes.shape[:2], dtype=torch.bool, device=gt_boxes.device)
    if gt_valid.shape != gt_boxes.shape[:2]:
        raise ShapeError(
            f"gt_valid: expected Bool[{batch}, {gt_boxes.shape[1]}] matching gt_boxes, got shape {tuple(gt_valid.shape)}"
        )
    if gt_valid.dtype != torch.bool:
        raise DTypeError(f"gt_valid: expected a bool tensor, got dtype {gt_valid.dtype}")
    work = torch.float64 if torch.float64 in (anchors.dtype, gt_boxes.dtype) else torch.float32
    # Padding rows (gt_valid False) may hold anything; a NaN in a real row is an error, not a row to
    # match against (it would make every IoU of its image NaN and shadow the valid rows).
    work, scale = coordinate_work((("anchors", anchors, None), ("gt_boxes", gt_boxes, gt_valid)), work)
    anchors = anchors.to(device=gt_boxes.device, dtype=work)
    gt_boxes = torch.where(gt_valid.unsqueeze(-1), gt_boxes.to(work), gt_boxes.new_zeros((), dtype=work))
    if scale != 1.0:
        anchors, gt_boxes = anchors * scale, gt_boxes * scale
    if anchors.ndim == 2:
        anchors = anchors.unsqueeze(0)
    return anchors, gt_boxes, gt_valid


def match(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor | None = None,
    *,
    object_threshold: float = 0.5,
    background_threshold: float = 0.4,
    low_quality: bool = False,
    force_best: bool = False,
    ignore_regions: Tensor | None = None,
    ignore_valid: Tensor | None = None,
    ignore_threshold: float = 0.5,
    max_block_elements: int | None = None,
) -> Match:
    """Match every anchor of every image to its best ground-truth box, in one batched call.

    Args:
        anchors: ``Tensor[A, 4]`` shared by the batch, or ``Tensor[B, A, 4]``.
        gt_boxes: ``Tensor[B, G, 4]`` padded ground truth (see :func:`pad_targets`).
        gt_valid: ``Bool[B, G]``, which rows of ``gt_boxes`` are real (default: all).
        object_threshold: IoU ``>=`` this makes an anchor positive.
        background_threshold: IoU ``<`` this makes an anchor background; in between it is
            :data:`IGNORE`.
        low_quality: also make positive, for each GT, the anchors with that GT's highest IoU (ties
            included; they are assigned their own best GT, as in torchvision's ``Matcher``). A GT that
            overlaps no anchor at all (best IoU 0) turns no anchor positive, unlike torchvision where
            every anchor then ties at 0 and becomes positive.
        force_best: SSD matching: every valid GT with a positive best IoU takes its best anchor (the
            lowest anchor index among ties), whatever the thresholds. When several GTs pick the same
            anchor, the GT with the highest IoU wins, then the lowest GT index.
        ignore_regions: ``Tensor[B, R, 4]``; anchors not positive whose intersection over their own area
            with a region is ``>= ignore_threshold`` become :data:`IGNORE`.
        ignore_valid: ``Bool[B, R]`` (default: all).
        max_block_elements: largest number of IoU values held at once; bounds memory to
            ``O(B * A + max_block_elements)``. Default: 2**19 on CPU (cache-sized), 2**25 on GPU.

    Returns:
        :class:`Match` with ``indices: Long[B, A]`` and ``iou: Tensor[B, A]``.

    Example:
        >>> anchors = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.], [0., 0., 9., 9.]])
        >>> gt = torch.tensor([[[0., 0., 10., 10.]]])
        >>> match(anchors, gt).indices
        tensor([[ 0, -1,  0]])
    """
    object_threshold = check_real("object_threshold", object_threshold)
    background_threshold = check_real("background_threshold", background_threshold)
    ignore_threshold = check_real("ignore_threshold", ignore_threshold)
    if not 0.0 < object_threshold <= 1.0:
        # 0 would make IoU-0 anchors positive, matched to whichever row (padding included) comes first.
        raise InvalidArgumentError(f"object_threshold: expected a value in (0, 1], got {object_threshold}")
    if not 0.0 < ignore_threshold <= 1.0:
        raise InvalidArgumentError(f"ignore_threshold: expected a value in (0, 1], got {ignore_threshold}")
    if not 0.0 <= background_threshold <= object_threshold:
        raise InvalidArgumentError(
            "background_threshold/object_threshold: expected 0 <= background_threshold <= object_threshold, "
            f"got {background_threshold} and {object_threshold}"
        )
    gt_boxes = as_tensor("gt_boxes", gt_boxes, expected="Tensor[B, G, 4]")
    if max_block_elements is None:
        max_block_elements = _CPU_BLOCK if gt_boxes.device.type == "cpu" else _GPU_BLOCK
    if max_block_elements < 1:
        raise InvalidArgumentError(f"max_block_elements: expected >= 1, got {max_block_elements}")
    anchors, gt, gt_valid = _validate(anchors, gt_boxes, gt_valid)
    batch, num_gt = gt.shape[:2]
    num_anchors = anchors.shape[1]
    device, work = gt.device, anchors.dtype

    indices = torch.full((batch, num_anchors), BACKGROUND, dtype=torch.long, device=device)
    best_iou = torch.zeros((batch, num_anchors), dtype=work, device=device)
    if num_anchors == 0 or batch == 0:
        return Match(indices, best_iou)
    if num_gt == 0:
        if ignore_regions is not None:
            indices = _apply_ignore_regions(indices, anchors, ignore_regions, ignore_valid, ignore_threshold, max_block_elements)
        return Match(indices, best_iou)

    chunk = max(1, max_block_elements // (batch * num_gt))
    starts = range(0, num_anchors, chunk)
    block = _IoUBlock(anchors, gt, gt_valid, chunk)
    need_gt_best = low_quality or force_best
    gt_best = torch.full((batch, num_gt), -1.0, dtype=work, device=device)
    gt_best_anchor = torch.zeros((batch, num_gt), dtype=torch.long, device=device)
    chunk_best = []  # per chunk, each GT's best IoU inside it: [B, G] each
    single_iou: Tensor | None = None

    for start in starts:
        stop = min(start + chunk, num_anchors)
        iou = block(start, stop)  # [B, G, a]
        torch.max(iou, dim=1, out=(best_iou[:, start:stop], indices[:, start:stop]))
        if force_best:
            best_here, arg_here = iou.max(dim=2)  # first maximum: the lowest anchor index
            better = best_here > gt_best  # strict, so an earlier chunk keeps ties
            gt_best_anchor = torch.where(better, arg_here + start, gt_best_anchor)
        elif low_quality:
            best_here = iou.amax(dim=2)
        if need_gt_best:
            gt_best = torch.maximum(gt_best, best_here)
            chunk_best.append(best_here)
        if len(starts) == 1:
            single_iou = iou

    # An image without valid GT has no best match: -1 keeps its anchors background even when
    # background_threshold is 0.
    best_iou.masked_fill_(~gt_valid.any(dim=1, keepdim=True), -1.0)
    positive = best_iou >= object_threshold
    if low_quality:
        positive |= _low_quality(block, starts, chunk, num_anchors, gt_best, chunk_best, gt_valid, single_iou)

    labels = torch.where(
        positive,
        indices,
        torch.where(best_iou < background_threshold, BACKGROUND, IGNORE),
    )

    if ignore_regions is not None:
        labels = _apply_ignore_regions(
            labels, anchors, ignore_regions, ignore_valid, ignore_threshold, max_block_elements
        )

    if force_best:
        labels, best_iou = _force_best(labels, best_iou, gt_best, gt_best_anchor, gt_valid)

    return Match(labels, best_iou.clamp(min=0))


def _low_quality(
    block: _IoUBlock,
    starts: range,
    chunk: int,
    num_anchors: int,
    gt_best: Tensor,
    chunk_best: list[Tensor],
    gt_valid: Tensor,
    single_iou: Tensor | None,
) -> Tensor:
    """``Bool[B, A]``: anchors that reach some GT's highest IoU (ties included), for GTs with IoU > 0."""
    usable = gt_valid & (gt_best > 0)
    if single_iou is not None:
        return ((single_iou == gt_best.unsqueeze(2)) & usable.unsqueeze(2)).any(dim=1)
    # Ties are exact, so they need the final per-GT maxima. Only the GT rows whose maximum lies in a
    # chunk are recomputed there: about one chunk's worth of IoU in all instead of a second full pass.
    batch = gt_best.shape[0]
    out = torch.zeros((batch, num_anchors), dtype=torch.bool, device=gt_best.device)
    for start, best_here in zip(starts, chunk_best):
        stop = min(start + chunk, num_anchors)
        image, slot = torch.nonzero(usable & (best_here == gt_best), as_tuple=True)
        if image.numel() == 0:
            continue
        ties = block.rows(start, stop, image, slot) == gt_best[image, slot].unsqueeze(1)  # [K, a]
        hits = torch.zeros((batch, stop - start), dtype=torch.int32, device=out.device)
        hits.index_add_(0, image, ties.to(torch.int32))
        out[:, start:stop] = hits > 0
    return out


def _force_best(
    labels: Tensor, best_iou: Tensor, gt_best: Tensor, gt_best_anchor: Tensor, gt_valid: Tensor
) -> tuple[Tensor, Tensor]:
    batch, num_gt = gt_best.shape
    claims = gt_valid & (gt_best > 0)
    claim_iou = torch.where(claims, gt_best, torch.full_like(gt_best, -1.0))
    # Per anchor, the highest IoU among the GTs that claim it ...
    top = torch.full_like(best_iou, -1.0).scatter_reduce(1, gt_best_anchor, claim_iou, "amax")
    winner = claims & (claim_iou == top.gather(1, gt_best_anchor))
    # ... and among equal IoUs the lowest GT index.
    gt_index = torch.arange(num_gt, device=labels.device).expand(batch, num_gt)
    key = torch.where(winner, gt_index, torch.full_like(gt_index, num_gt))
    owner = torch.full_like(labels, num_gt).scatter_reduce(1, gt_best_anchor, key, "amin")
    forced = owner < num_gt
    labels = torch.where(forced, owner, labels)
    forced_iou = torch.gather(gt_best, 1, owner.clamp(max=num_gt - 1))
    best_iou = torch.where(forced, forced_iou, best_iou)
    return labels, best_iou


def _apply_ignore_regions(
    labels: Tensor,
    anchors: Tensor,
    regions: Tensor,
    regions_valid: Tensor | None,
    threshold: float,
    max_block_elements: int,
) -> Tensor:
    regions = as_tensor("ignore_regions", regions, expected="Tensor[B, R, 4]")
    check_last_dim("ignore_regions", regions, 4, "Tensor[B, R, 4]")
    batch = labels.shape[0]
    if regions.ndim != 3 or regions.shape[0] != batch:
        raise ShapeError(f"ignore_regions: expected Tensor[{batch}, R, 4], got shape {tuple(regions.shape)}")
    if regions_valid is None:
        regions_valid = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
    if regions_valid.dtype != torch.bool:
        raise DTypeError(f"ignore_valid: expected a bool tensor, got dtype {regions_valid.dtype}")
    if regions_valid.shape != regions.shape[:2]:
        raise ShapeError(
            f"ignore_valid: expected Bool{list(regions.shape[:2])} matching ignore_regions, "
            f"got shape {tuple(regions_valid.shape)}"
        )
    if regions.shape[1] == 0:
        return labels
    coordinate_work((("ignore_regions", regions, regions_valid),), regions.dtype if regions.is_floating_point() else torch.float32)
    regions = torch.where(regions_valid.unsqueeze(-1), regions.to(anchors.dtype), regions.new_zeros((), dtype=anchors.dtype))
    num_anchors = labels.shape[1]
    step = max(1, max_block_elements // (batch * regions.shape[1]))
    hit_parts = []
    rx1, ry1, rx2, ry2 = (c.unsqueeze(2) for c in _corners(regions))  # [B, R, 1]
    for start in range(0, num_anchors, step):
        a = anchors[:, start : start + step]
        ax1, ay1, ax2, ay2 = (c.unsqueeze(1) for c in _corners(a))
        w = (torch.minimum(ax2, rx2) - torch.maximum(ax1, rx1)).clamp_(min=0)
        h = (torch.minimum(ay2, ry2) - torch.maximum(ay1, ry1)).clamp_(min=0)
        area = ((ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)).clamp_(min=torch.finfo(a.dtype).tiny)
        ioa = (w * h) / area
        hit_parts.append(((ioa >= threshold) & regions_valid.unsqueeze(2)).any(dim=1))
    hit = torch.cat(hit_parts, dim=1)
    return torch.where(hit & (labels < 0), IGNORE, labels)
