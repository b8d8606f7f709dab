"""The dense detectors' post-processing: per-anchor scores and deltas -> per-image detections.

:func:`postprocess_detections` is the pure function (also used on exported graphs' outputs);
:class:`DetectionPostprocess` holds a detector's inference settings and is the component a detector
receives (``postprocessor=``). Score threshold, per-level top-k batched over the images, decoding,
clipping, one ``torchvision.ops.batched_nms`` call over the whole batch (image-offset group ids),
per-image cap, rescaling to the original image coordinates: no per-image Python loop.

Example:
    >>> from fewsight.geometry import BoxCoder
    >>> a = torch.tensor([[0., 0., 10., 10.], [0., 0., 11., 10.]])
    >>> out = postprocess_detections(torch.tensor([[[0.9], [0.8]]]), torch.zeros(1, 2, 4), a, [2],
    ...                              coder=BoxCoder(), image_sizes=torch.tensor([[20., 20.]]))
    >>> out[0]["scores"], out[0]["labels"]
    (tensor([0.9000]), tensor([0]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.geometry import BoxCoder
from fewsight.models.assignment import _check_probability
from fewsight.models.transform import ImageBatch

__all__ = ["DetectionPostprocess", "postprocess_detections"]


def postprocess_detections(
    scores: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    level_sizes: Sequence[int],
    *,
    coder: BoxCoder,
    image_sizes: Tensor,
    scales: Tensor | None = None,
    original_sizes: Tensor | None = None,
    score_threshold: float = 0.05,
    topk_per_level: int = 1000,
    nms_threshold: float = 0.5,
    detections_per_image: int = 100,
) -> list[dict[str, Tensor]]:
    """Dense per-anchor scores and deltas -> per-image ``{"boxes", "scores", "labels"}``.

    Per level, the ``k = max(topk_per_level, 10 * detections_per_image)`` highest ``(anchor, class)``
    scores ``> score_threshold`` of each image (torchvision's 1,000 for its 100 detections; an image
    allowed more detections, large or crowded, gets as many more candidates, or they run out before
    the detections do: several anchors and classes score each object), by thresholding and one sort
    of the candidates, or, when very many pass the threshold, one ``topk`` over ``[B, A_l * C]`` per
    level; their boxes decoded and clipped to the image;
    one class-wise NMS over the whole batch (``torchvision.ops.batched_nms`` with group id
    ``image * C + class``); the ``detections_per_image`` best per image; boxes divided by ``scales``
    and clipped to ``original_sizes``. Same result as torchvision's per-image loop.

    Args:
        scores: ``Tensor[B, A, C]`` probabilities; deltas: ``Tensor[B, A, 4]``; anchors: ``Tensor[A, 4]``.
        level_sizes: anchors per level (summing to ``A``), in the anchors' order.
        image_sizes: ``Tensor[B, 2]`` ``(h, w)`` of each image in network coordinates.
        scales: ``Tensor[B, 2]`` ``(s_y, s_x)`` network / original (default 1).
        original_sizes: ``Tensor[B, 2]`` ``(H, W)`` to clip the rescaled boxes to (default: ``image_sizes / scales``).

    Returns:
        ``B`` dicts: ``boxes: Tensor[K, 4]`` (float32, xyxy), ``scores: Tensor[K]`` (decreasing),
        ``labels: Long[K]``.

    Example:
        >>> a = torch.tensor([[0., 0., 10., 10.], [0., 0., 11., 10.]])
        >>> s = torch.tensor([[[0.9], [0.8]]])
        >>> out = postprocess_detections(s, torch.zeros(1, 2, 4), a, [2], coder=BoxCoder(),
        ...                              image_sizes=torch.tensor([[20., 20.]]))
        >>> out[0]["scores"], out[0]["labels"]
        (tensor([0.9000]), tensor([0]))
    """
    batch, num_anchors, num_classes = scores.shape
    if sum(level_sizes) != num_anchors:
        raise ShapeError(f"level_sizes: expected sizes summing to {num_anchors} (scores' A), got {list(level_sizes)}")
    scores = scores.detach().float()
    topk_per_level = max(int(topk_per_level), 10 * int(detections_per_image))
    num_levels = len(level_sizes)
    above = scores > score_threshold
    num_above = int(above.sum())
    if num_above <= 4 * batch * num_levels * topk_per_level:
        # Few candidates (the usual case): threshold first, then the per-(image, level) top-k by one
        # sort of the candidates -- cheaper than top-k over every [B, A_l * C] score.
        image, anchor, label = above.nonzero(as_tuple=True)
        score = scores[image, anchor, label]
        starts = torch.tensor(list(level_sizes), device=scores.device).cumsum(0)
        group = image * num_levels + torch.bucketize(anchor, starts, right=True)
        order = torch.sort(score, descending=True, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]  # by group, score-descending inside
        group = group[order]
        counts = torch.bincount(group, minlength=batch * num_levels)
        rank = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[group]
        order = order[rank < topk_per_level]
        image, anchor, label, score = image[order], anchor[order], label[order], score[order]
        flat_index = anchor * num_classes + label
    else:
        cand_scores, cand_index = [], []
        start = 0
        for n in level_sizes:  # a handful of levels; every image at once
            flat = scores[:, start : start + n].reshape(batch, n * num_classes)
            top, index = flat.topk(min(topk_per_level, n * num_classes), dim=1)
            cand_scores.append(top)
            cand_index.append(index + start * num_classes)
            start += n
        top = torch.cat(cand_scores, dim=1)  # [B, K]
        index = torch.cat(cand_index, dim=1)
        image, slot = (top > score_threshold).nonzero(as_tuple=True)
        flat_index = index[image, slot]
        score = top[image, slot]
    anchor, label = flat_index // num_classes, flat_index % num_classes
    boxes = coder.decode(deltas.detach()[image, anchor].float(), anchors[anchor].float())
    size = image_sizes.to(boxes)[image]  # [N, 2] (h, w)
    upper = torch.stack((size[:, 1], size[:, 0], size[:, 1], size[:, 0]), dim=1)
    boxes = torch.minimum(boxes.clamp(min=0), upper)

    keep = torchvision.ops.batched_nms(boxes, score, image * num_classes + label, nms_threshold)
    # keep is sorted by decreasing score; a stable sort by image keeps that order inside each image.
    kept_image = image[keep]
    order = torch.sort(kept_image, stable=True).indices
    keep, kept_image = keep[order], kept_image[order]
    counts = torch.bincount(kept_image, minlength=batch)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - first[kept_image]
    top_rank = rank < detections_per_image
    keep, kept_image = keep[top_rank], kept_image[top_rank]
    boxes, score, label = boxes[keep], score[keep], label[keep]
    if scales is not None:
        s = scales.to(boxes)[kept_image]
        boxes = boxes / torch.stack((s[:, 1], s[:, 0], s[:, 1], s[:, 0]), dim=1)
        if original_sizes is None:
            original_sizes = image_sizes.to(boxes) / scales.to(boxes)
    if original_sizes is not None:
        size = original_sizes.to(boxes)[kept_image]
        boxes = torch.minimum(boxes.clamp(min=0), torch.stack((size[:, 1], size[:, 0], size[:, 1], size[:, 0]), dim=1))
    split = counts.clamp(max=detections_per_image).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(boxes.split(split), score.split(split), label.split(split))
    ]


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class DetectionPostprocess:
    """A detector's inference settings: ``postprocess(scores, deltas, anchors, level_sizes, batch, coder=...)``.

    Args:
        score_threshold: keep ``(anchor, class)`` scores above it (0.05).
        topk_per_level: candidates per image and pyramid level before NMS (1000; at least ten per
            detection allowed, see :func:`postprocess_detections`).
        nms_threshold: class-wise NMS IoU (0.5).
        detections_per_image: the cap after NMS (100).

    The settings are plain attributes: a caller may change them between calls (e.g. a lower threshold
    to collect proposals).

    Shapes:
        ``scores: Tensor[B, A, C]``, ``deltas: Tensor[B, A, 4]``, ``anchors: Tensor[A, 4]`` in network
        coordinates, ``batch`` the :class:`~fewsight.models.transform.ImageBatch` they came from ->
        ``B`` dicts ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Long[K]}`` in the input
        images' coordinates.

    Example:
        >>> DetectionPostprocess(score_threshold=0.3)
        DetectionPostprocess(score_threshold=0.3, topk_per_level=1000, nms_threshold=0.5, detections_per_image=100)
    """

    def __init__(
        self,
        *,
        score_threshold: float = 0.05,
        topk_per_level: int = 1000,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
    ) -> None:
        self.score_threshold = _check_probability("score_threshold", score_threshold)
        self.topk_per_level = _check_count("topk_per_level", topk_per_level)
        self.nms_threshold = _check_probability("nms_threshold", nms_threshold)
        self.detections_per_image = _check_count("detections_per_image", detections_per_image)

    def __call__(
        self,
        scores: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        level_sizes: Sequence[int],
        batch: ImageBatch,
        *,
        coder: BoxCoder,
    ) -> list[dict[str, Tensor]]:
        return postprocess_detections(
            scores,
            deltas,
            anchors,
            level_sizes,
            coder=coder,
            image_sizes=batch.sizes_tensor(),
            scales=batch.scales,
            original_sizes=batch.original_sizes_tensor(),
            score_threshold=self.score_threshold,
            topk_per_level=self.topk_per_level,
            nms_threshold=self.nms_threshold,
            detections_per_image=self.detections_per_image,
        )

    def __repr__(self) -> str:
        return (
            f"DetectionPostprocess(score_threshold={self.score_threshold}, topk_per_level={self.topk_per_level}, "
            f"nms_threshold={self.nms_threshold}, detections_per_image={self.detections_per_image})"
        )
