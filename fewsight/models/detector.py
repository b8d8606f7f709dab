"""Parts shared by the dense one-stage detectors (RetinaNet, DLDENet).

* :func:`preprocess_images` -- a batch (``Tensor[B, 3, H, W]`` or a list of ``Tensor[3, H_i, W_i]``,
  floats in ``[0, 1]``) -> optional resize, ImageNet normalisation, zero padding to a common size.
* :func:`prepare_targets` -- targets (list of dicts or padded ``Tensor[B, M, 5]``) -> padded tensors in
  network coordinates, degenerate boxes dropped.
* :func:`assign_anchors` -- one batched :func:`fewsight.geometry.match` call for the whole batch ->
  per-anchor class labels (``BACKGROUND`` / ``IGNORE`` codes), matched boxes and IoU.
* :func:`detection_box_loss` -- box regression summed over the positive anchors of the batch.
* :func:`postprocess_detections` -- score threshold, per-level top-k batched over the images,
  decoding, clipping, one ``torchvision.ops.batched_nms`` call over the whole batch (image-offset
  group ids), per-image cap, rescaling to the original image coordinates.
* :class:`DenseDetector` -- the ``nn.Module`` base: backbone + FPN, anchors, ``forward`` that returns
  named losses in training and per-image detections in eval, class names in the ``state_dict``.

Coordinates: targets are given, and detections returned, in the coordinates of the images passed to
the model; resizing (``min_size`` / ``max_size`` / ``image_size``) is internal.

Example:
    >>> import torch
    >>> from fewsight.models.detector import preprocess_images
    >>> batch = preprocess_images([torch.rand(3, 50, 60), torch.rand(3, 40, 70)], min_size=80)
    >>> tuple(batch.tensor.shape), batch.image_sizes
    ((2, 3, 80, 140), [(80, 96), (80, 140)])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fewsight.errors import (
    CheckpointError,
    DTypeError,
    InvalidArgumentError,
    ShapeError,
    check_labels,
)
from fewsight.geometry import AnchorGenerator, BoxCoder, PaddedTargets, match, pad_targets
from fewsight.losses.box import BOX_LOSSES, box_regression_loss
from fewsight.losses.focal import anchor_labels
from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone

__all__ = [
    "AnchorAssignment",
    "DenseDetector",
    "HeadOutput",
    "ImageBatch",
    "assign_anchors",
    "detection_box_loss",
    "postprocess_detections",
    "prepare_targets",
    "preprocess_images",
]


# --- images ----------------------------------------------------------------------------------------


class ImageBatch(NamedTuple):
    """A preprocessed batch.

    ``tensor``: ``Tensor[B, 3, H, W]`` normalised, zero-padded at the bottom/right;
    ``image_sizes``: ``(h_i, w_i)`` of each resized image inside ``tensor``;
    ``original_sizes``: ``(H_i, W_i)`` as given; ``scales``: ``Tensor[B, 2]`` float32 ``(s_y, s_x)``
    = resized / original, on the images' device.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    scales: Tensor

    def sizes_tensor(self) -> Tensor:
        """``Tensor[B, 2]`` float32 ``(h_i, w_i)`` on the batch's device."""
        return torch.tensor(self.image_sizes, dtype=torch.float32, device=self.tensor.device).reshape(-1, 2)

    def original_sizes_tensor(self) -> Tensor:
        """``Tensor[B, 2]`` float32 ``(H_i, W_i)`` on the batch's device."""
        return torch.tensor(self.original_sizes, dtype=torch.float32, device=self.tensor.device).reshape(-1, 2)


def _check_resize_args(min_size: Any, max_size: Any, image_size: Any, size_divisible: Any) -> tuple:
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name}: expected None or an int >= 1, got {value!r}")
    if image_size is not None:
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            image_size = (image_size, image_size)
        try:
            image_size = tuple(int(v) for v in image_size)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"image_size: expected None, an int or (H, W), got {image_size!r}") from None
        if len(image_size) != 2 or min(image_size) < 1:
            raise InvalidArgumentError(f"image_size: expected None, an int or positive (H, W), got {image_size!r}")
        if min_size is not None or max_size is not None:
            raise InvalidArgumentError(
                f"image_size: expected None when min_size/max_size are given, got image_size={image_size} with "
                f"min_size={min_size}, max_size={max_size}"
            )
    if isinstance(size_divisible, bool) or not isinstance(size_divisible, int) or size_divisible < 1:
        raise InvalidArgumentError(f"size_divisible: expected an int >= 1, got {size_divisible!r}")
    return min_size, max_size, image_size, size_divisible


def _resized_size(
    h: int, w: int, min_size: int | None, max_size: int | None, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    if image_size is not None:
        return image_size
    if min_size is None and max_size is None:
        return h, w
    scale = float("inf")
    if min_size is not None:
        scale = min_size / min(h, w)
    if max_size is not None:
        scale = min(scale, max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _check_image(name: str, image: Any, ndim: int) -> None:
    expected = "Tensor[B, 3, H, W]" if ndim == 4 else "Tensor[3, H, W]"
    if not isinstance(image, Tensor):
        raise DTypeError(f"{name}: expected a float {expected} in [0, 1], got {type(image).__name__}")
    if image.ndim != ndim or image.shape[-3] != 3 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ShapeError(f"{name}: expected {expected} with H, W >= 1, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise DTypeError(f"{name}: expected a floating tensor in [0, 1], got dtype {image.dtype}")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.ndim == 3
    y = F.interpolate(x.unsqueeze(0) if squeeze else x, size=size, mode="bilinear", align_corners=False)
    return y.squeeze(0) if squeeze else y


def preprocess_images(
    images: Tensor | Sequence[Tensor],
    *,
    mean: Sequence[float] | Tensor = IMAGENET_MEAN,
    std: Sequence[float] | Tensor = IMAGENET_STD,
    min_size: int | None = None,
    max_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    size_divisible: int = 1,
) -> ImageBatch:
    """Resize, normalise and batch images (torchvision's ``GeneralizedRCNNTransform`` semantics).

    Resizing (bilinear), per image of size ``(H, W)``:

    * all of ``min_size``, ``max_size``, ``image_size`` None: no resize;
    * ``min_size`` / ``max_size``: aspect-preserving scale ``min(min_size / min(H, W), max_size / max(H, W))``
      (each bound used only when given);
    * ``image_size = (h, w)``: every image to exactly that size (aspect not kept).

    Then ``(x - mean) / std`` and zero padding (the mean colour) at the bottom/right to the largest
    ``(h, w)`` rounded up to ``size_divisible``. A ``Tensor[B, 3, H, W]`` batch is resized in one call.

    Args:
        images: ``Tensor[B, 3, H, W]`` or a non-empty list of ``Tensor[3, H_i, W_i]``, float in ``[0, 1]``.
        mean, std: per-channel normalisation (ImageNet by default).

    Returns:
        :class:`ImageBatch`.

    Example:
        >>> batch = preprocess_images(torch.rand(2, 3, 30, 40), max_size=80)
        >>> tuple(batch.tensor.shape), batch.scales[0].tolist()
        ((2, 3, 60, 80), [2.0, 2.0])
    """
    min_size, max_size, image_size, size_divisible = _check_resize_args(min_size, max_size, image_size, size_divisible)
    if isinstance(images, Tensor):
        _check_image("images", images, 4)
        if images.shape[0] == 0:
            raise ShapeError(f"images: expected at least one image, got shape {tuple(images.shape)}")
        h, w = int(images.shape[-2]), int(images.shape[-1])
        originals = [(h, w)] * images.shape[0]
        first = images
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
            raise InvalidArgumentError(
                f"images: expected Tensor[B, 3, H, W] or a non-empty list of Tensor[3, H, W], got {type(images).__name__}"
                + (" of length 0" if isinstance(images, Sequence) else "")
            )
        for i, im in enumerate(images):
            _check_image(f"images[{i}]", im, 3)
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        first = images[0]
        if any(im.device != first.device for im in images):
            raise InvalidArgumentError(
                f"images: expected every image on one device, got {sorted({str(im.device) for im in images})}"
            )
    device, dtype = first.device, first.dtype
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1, 1, 1)
    sizes = [_resized_size(h, w, min_size, max_size, image_size) for h, w in originals]

    if isinstance(images, Tensor) or len(set(originals)) == 1:
        # Uniform batch: one resize and one normalisation for all images.
        batch = images if isinstance(images, Tensor) else torch.stack([im.to(dtype) for im in images])
        tensor = (_resize(batch, sizes[0]) - mean_t) / std_t
    else:
        tensor = None
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    height = -(-height // size_divisible) * size_divisible
    width = -(-width // size_divisible) * size_divisible
    if tensor is not None:
        if tensor.shape[-2:] != (height, width):
            tensor = F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))
    else:
        tensor = torch.zeros((len(sizes), 3, height, width), dtype=dtype, device=device)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):  # ragged sizes: one copy per image
            tensor[i, :, :h, :w] = (_resize(im.to(dtype), (h, w)) - mean_t) / std_t
    scales = torch.tensor(
        [(h / oh, w / ow) for (h, w), (oh, ow) in zip(sizes, originals)], dtype=torch.float32, device=device
    )
    return ImageBatch(tensor, sizes, originals, scales)


# --- targets -----------------------------------------------------------------------------------------


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
        boxes, labels, valid = pad_targets(targets, device=device)
        counts = torch.tensor([t["boxes"].shape[0] for t in targets], device=boxes.device)
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


# --- post-processing -------------------------------------------------------------------------------------


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

    Per level, the ``topk_per_level`` highest ``(anchor, class)`` scores ``> score_threshold`` of each
    image (threshold first and one sort of the candidates; or, when very many pass the threshold,
    one ``topk`` over ``[B, A_l * C]`` per level); their boxes decoded and clipped to the image;
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


# --- the module base -----------------------------------------------------------------------------------------


class HeadOutput(NamedTuple):
    """What :meth:`DenseDetector.forward_head` returns.

    ``outputs``: the head's dict (``Tensor[B, A, ...]`` values); ``anchors``: ``Tensor[A, 4]`` float32
    in network coordinates; ``level_sizes``: anchors per level; ``batch``: the :class:`ImageBatch`.
    """

    outputs: dict[str, Tensor]
    anchors: Tensor
    level_sizes: list[int]
    batch: ImageBatch


def _check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidArgumentError(f"{name}: expected a float in [0, 1], got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


_DEFAULT_LEVELS = (3, 4, 5, 6, 7)


class DenseDetector(nn.Module):
    """Base of the one-stage detectors: backbone + FPN, anchors, batching, dispatch, class names.

    Subclasses build ``self.head`` (a module mapping the list of level features to a dict of
    ``Tensor[B, A, ...]``) and implement :meth:`compute_loss` and :meth:`scores_from_outputs`.

    ``forward(images, targets=None)``: in training mode returns the dict of named (weighted) losses
    (``sum(losses.values())`` is the total); in eval mode a list of per-image
    ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Long[K]}`` in the input images'
    coordinates. :meth:`losses` and :meth:`detect` do either one in any mode.

    The class names travel in the ``state_dict`` (``get_extra_state``).
    """

    default_loss_weights: dict[str, float] = {}

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str | nn.Module = "resnet18",
        weights: Any = None,
        levels: Sequence[int] = _DEFAULT_LEVELS,
        fpn_channels: int = 256,
        frozen_bn: bool = False,
        trainable_layers: int | None = None,
        p6_from: str = "p5",
        anchor_generator: AnchorGenerator | None = None,
        coder: BoxCoder | None = None,
        object_threshold: float = 0.5,
        background_threshold: float = 0.4,
        low_quality: bool = True,
        min_size: int | None = None,
        max_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        size_divisible: int = 1,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        score_threshold: float = 0.05,
        topk_per_level: int = 1000,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        loss_weights: Mapping[str, float] | None = None,
        class_names: Sequence[str] | None = None,
        min_classes: int = 1,
    ) -> None:
        super().__init__()
        num_classes = _check_count("num_classes", num_classes, min_classes)
        if class_names is None:
            self.classes: list[str] = [str(i) for i in range(num_classes)]
        else:
            if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
                raise InvalidArgumentError(f"class_names: expected a sequence of str, got {class_names!r}")
            if len(class_names) != num_classes:
                raise InvalidArgumentError(
                    f"class_names: expected {num_classes} names (num_classes), got {len(class_names)}"
                )
            if len(set(class_names)) != len(class_names):
                raise InvalidArgumentError(f"class_names: expected unique names, got {list(class_names)}")
            self.classes = list(class_names)

        # Backbone: a name (built here) or an injected module exposing .levels and .out_channels.
        levels = tuple(int(v) for v in levels)
        if isinstance(backbone, str):
            self.backbone = build_backbone(
                backbone, weights=weights, levels=levels, out_channels=fpn_channels, frozen_bn=frozen_bn,
                trainable_layers=trainable_layers, p6_from=p6_from,
            )
        elif isinstance(backbone, nn.Module):
            if weights is not None:
                raise InvalidArgumentError(
                    f"weights: expected None with an injected backbone module, got {weights!r}"
                )
            own = getattr(backbone, "levels", None)
            if own is None or not hasattr(backbone, "out_channels"):
                raise InvalidArgumentError(
                    f"backbone: expected a module with .levels and .out_channels (e.g. build_backbone(...)), "
                    f"got {type(backbone).__name__}"
                )
            own = tuple(int(v) for v in own)
            if levels != own and levels != _DEFAULT_LEVELS:
                raise InvalidArgumentError(f"levels: expected the injected backbone's levels {own}, got {levels}")
            levels = own
            self.backbone = backbone
        else:
            raise InvalidArgumentError(f"backbone: expected a backbone name or an nn.Module, got {backbone!r}")
        self.levels = levels
        self.in_channels = int(self.backbone.out_channels)

        if anchor_generator is None:
            anchor_generator = AnchorGenerator(levels=levels)
        elif tuple(anchor_generator.levels) != levels:
            raise InvalidArgumentError(
                f"anchor_generator: expected levels {levels} (the backbone's), got {tuple(anchor_generator.levels)}"
            )
        self.anchor_generator = anchor_generator
        self.coder = coder if coder is not None else BoxCoder((1.0, 1.0, 1.0, 1.0))

        self.object_threshold = _check_probability("object_threshold", object_threshold)
        self.background_threshold = _check_probability("background_threshold", background_threshold)
        if self.background_threshold > self.object_threshold:
            raise InvalidArgumentError(
                f"background_threshold: expected <= object_threshold ({object_threshold}), got {background_threshold}"
            )
        self.low_quality = bool(low_quality)

        self.min_size, self.max_size, self.image_size, self.size_divisible = _check_resize_args(
            min_size, max_size, image_size, size_divisible
        )
        if len(image_mean) != 3 or len(image_std) != 3 or min(float(s) for s in image_std) <= 0:
            raise InvalidArgumentError(
                f"image_mean/image_std: expected 3 values each (std > 0), got {tuple(image_mean)} and {tuple(image_std)}"
            )
        # Not persistent: they are configuration, and follow .to(device) like the weights.
        self.register_buffer("image_mean", torch.tensor([float(v) for v in image_mean]), persistent=False)
        self.register_buffer("image_std", torch.tensor([float(v) for v in image_std]), persistent=False)

        self.score_threshold = _check_probability("score_threshold", score_threshold)
        self.topk_per_level = _check_count("topk_per_level", topk_per_level)
        self.nms_threshold = _check_probability("nms_threshold", nms_threshold)
        self.detections_per_image = _check_count("detections_per_image", detections_per_image)
        if box_loss not in BOX_LOSSES:
            raise InvalidArgumentError(f"box_loss: expected one of {BOX_LOSSES}, got {box_loss!r}")
        self.box_loss = box_loss
        if isinstance(smooth_l1_beta, bool) or not isinstance(smooth_l1_beta, (int, float)) or smooth_l1_beta < 0:
            raise InvalidArgumentError(f"smooth_l1_beta: expected a float >= 0, got {smooth_l1_beta!r}")
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_weights = self._check_loss_weights(loss_weights)

    # --- configuration helpers ---

    def _check_loss_weights(self, loss_weights: Mapping[str, float] | None) -> dict[str, float]:
        out = dict(self.default_loss_weights)
        if loss_weights is None:
            return out
        if not isinstance(loss_weights, Mapping):
            raise InvalidArgumentError(f"loss_weights: expected a mapping of loss name -> weight, got {loss_weights!r}")
        for key, value in loss_weights.items():
            if key not in out:
                raise InvalidArgumentError(f"loss_weights: expected keys among {tuple(out)}, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(f"loss_weights[{key!r}]: expected a float >= 0, got {value!r}")
            out[key] = float(value)
        return out

    def _check_head(self, expected_anchors: int) -> None:
        k = getattr(self.head, "num_anchors", None)
        if k is not None and k != expected_anchors:
            raise InvalidArgumentError(
                f"head: expected {expected_anchors} anchors per location (the anchor generator's), got {k}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # --- pipeline ---

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> ImageBatch:
        """Images -> :class:`ImageBatch` with this model's resizing and normalisation."""
        return preprocess_images(
            images,
            mean=self.image_mean,
            std=self.image_std,
            min_size=self.min_size,
            max_size=self.max_size,
            image_size=self.image_size,
            size_divisible=self.size_divisible,
        )

    def anchors_for(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device | None = None) -> Tensor:
        """``Tensor[A, 4]`` float32 anchors for the given per-level feature sizes (cached)."""
        return self.anchor_generator.grid_anchors(feature_sizes, torch.float32, device)

    def forward_head(self, images: Tensor | Sequence[Tensor]) -> HeadOutput:
        """Preprocess, backbone, head, anchors -> :class:`HeadOutput` (no loss, no post-processing)."""
        batch = self.preprocess(images)
        features = self.backbone(batch.tensor)
        if len(features) != len(self.levels):
            raise ShapeError(f"backbone: expected {len(self.levels)} feature maps (levels {self.levels}), got {len(features)}")
        outputs = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        anchors, level_sizes = self._anchors_and_level_sizes(sizes, batch)
        self._check_head_outputs(outputs, batch.tensor.shape[0], anchors.shape[0])
        return HeadOutput(outputs, anchors, level_sizes, batch)

    def _anchors_and_level_sizes(self, sizes: list[tuple[int, int]], batch: ImageBatch) -> tuple[Tensor, list[int]]:
        """``Tensor[A, 4]`` anchors for the per-level feature ``sizes`` and the anchors per level."""
        k = self.anchor_generator.num_anchors_per_location
        return self.anchors_for(sizes, batch.tensor.device), [h * w * k for h, w in sizes]

    def _check_head_outputs(self, outputs: Mapping[str, Tensor], batch_size: int, num_anchors: int) -> None:
        for name, value in outputs.items():
            if value.ndim != 3 or value.shape[:2] != (batch_size, num_anchors):
                raise ShapeError(
                    f"head output {name!r}: expected Tensor[{batch_size}, {num_anchors}, ...] "
                    f"(one row per anchor), got shape {tuple(value.shape)}"
                )

    def prepare_targets(self, targets: Any, batch: ImageBatch) -> PaddedTargets:
        """Targets in input-image coordinates -> padded, scaled to the network input, labels checked."""
        return prepare_targets(
            targets, batch.tensor.shape[0], scales=batch.scales, num_classes=self.num_classes, device=batch.tensor.device
        )

    def assign(self, anchors: Tensor, targets: PaddedTargets) -> AnchorAssignment:
        """This model's matching (thresholds, low-quality matches) for a batch."""
        return assign_anchors(
            anchors,
            targets,
            object_threshold=self.object_threshold,
            background_threshold=self.background_threshold,
            low_quality=self.low_quality,
        )

    def _padded(self, targets: Any, outputs: Mapping[str, Tensor]) -> PaddedTargets:
        ref = next(iter(outputs.values()))
        return prepare_targets(targets, ref.shape[0], num_classes=self.num_classes, device=ref.device)

    def _box_term(self, deltas: Tensor, anchors: Tensor, targets: PaddedTargets, assignment: AnchorAssignment) -> Tensor:
        return detection_box_loss(
            deltas, anchors, targets, assignment, coder=self.coder, kind=self.box_loss, beta=self.smooth_l1_beta
        )

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Named losses from head outputs, anchors and targets in network coordinates."""
        raise NotImplementedError

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        """``Tensor[B, A, C]`` class probabilities from the head outputs."""
        raise NotImplementedError

    def losses(self, images: Tensor | Sequence[Tensor], targets: Any) -> dict[str, Tensor]:
        """Named losses for a batch (whatever the module's mode; BatchNorm follows the mode)."""
        out = self.forward_head(images)
        return self.compute_loss(out.outputs, out.anchors, self.prepare_targets(targets, out.batch))

    def postprocess(self, out: HeadOutput) -> list[dict[str, Tensor]]:
        """:class:`HeadOutput` -> per-image detections in the input images' coordinates."""
        return postprocess_detections(
            self.scores_from_outputs(out.outputs),
            out.outputs["bbox_regression"],
            out.anchors,
            out.level_sizes,
            coder=self.coder,
            image_sizes=out.batch.sizes_tensor(),
            scales=out.batch.scales,
            original_sizes=out.batch.original_sizes_tensor(),
            score_threshold=self.score_threshold,
            topk_per_level=self.topk_per_level,
            nms_threshold=self.nms_threshold,
            detections_per_image=self.detections_per_image,
        )

    def detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "scores", "labels"}`` (whatever the module's mode)."""
        return self.postprocess(self.forward_head(images))

    def forward(self, images: Tensor | Sequence[Tensor], targets: Any = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise InvalidArgumentError(
                    "targets: expected a list of {'boxes', 'labels'} dicts or Tensor[B, M, 5] in training mode, got None"
                )
            return self.losses(images, targets)
        return self.detect(images)

    # --- class names in the state_dict ---

    def get_extra_state(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "classes" not in state:
            raise CheckpointError(f"extra_state: expected a dict with 'classes', got {type(state).__name__}")
        names = state["classes"]
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"extra_state['classes']: expected a list of str, got {names!r}")
        self._check_loaded_classes(list(names))
        self.classes = list(names)

    def _check_loaded_classes(self, names: list[str]) -> None:
        if len(names) != self.num_classes:
            raise CheckpointError(
                f"state_dict: expected {self.num_classes} class names (this model's num_classes), got {len(names)}: "
                f"build the model with num_classes={len(names)}"
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, box_loss={self.box_loss!r}, "
            f"loss_weights={self.loss_weights}"
        )

