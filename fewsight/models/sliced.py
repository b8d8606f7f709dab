"""Sliced inference for large images with small objects (SAHI-style): tiles, shift back, merge.

:func:`predict_sliced` runs a detector over overlapping tiles of one image (batched, in eval mode),
shifts each tile's boxes back to image coordinates, optionally adds a pass over the whole image
downscaled to one tile, and merges the detections of objects seen by several tiles with class-wise
NMS or with greedy merging of the boxes cut by tile borders (:func:`greedy_merge`, SAHI's GREEDYNMM). :class:`SlicedDetector` wraps a
detector so that anything taking a detector (``fewsight.eval.evaluate_model``, ``predict``) runs it
sliced.

Memory: each tile is a view of the image; only the batch being run is copied (and converted to
float), so a ``uint8`` image of ``H x W`` pixels costs ``3 H W`` bytes plus
``batch_size * 3 * tile**2`` floats, not the ``12 H W`` bytes of a float image.

Example:
    >>> from torch import nn
    >>> class OneBox(nn.Module):  # a stand-in detector: one box in the middle of every tile
    ...     def forward(self, images):
    ...         h, w = images.shape[-2:]
    ...         return [{"boxes": torch.tensor([[w / 4, h / 4, w * 3 / 4, h * 3 / 4]]), "scores": torch.tensor([0.9]),
    ...                  "labels": torch.tensor([0])} for _ in images]
    >>> out = predict_sliced(OneBox(), torch.rand(3, 100, 200), tile=100, overlap=0.0)
    >>> out["boxes"].tolist()
    [[25.0, 25.0, 75.0, 75.0], [125.0, 25.0, 175.0, 75.0]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, check_choice, check_real
from fewsight.geometry import tile_grid

__all__ = ["BORDER_PX", "MATCH_METRICS", "MERGES", "SlicedDetector", "detection_cap", "greedy_merge", "predict_sliced"]

MERGES = ("nms", "greedy")
MATCH_METRICS = ("iou", "ios")
# Candidate pairs per block of greedy merging: a few [P, 4] float buffers of ~16 MB.
_BLOCK = 1 << 20
# A box edge this close (pixels) to an inner tile border counts as cut by it: regression rarely
# lands exactly on the border.
BORDER_PX = 4.0


def _check_count(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}: expected an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


def _pair_overlap(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """``Tensor[P, 4] x Tensor[P, 4] -> Tensor[P]`` row by row: IoU, or intersection over the smaller area."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    denom = area_a + area_b - inter if metric == "iou" else torch.minimum(area_a, area_b)
    return inter / denom.clamp(min=torch.finfo(inter.dtype).tiny)


def _overlapping_pairs(boxes: Tensor, labels: Tensor, threshold: float, metric: str) -> tuple[Tensor, Tensor]:
    """The pairs ``(i, j)``, ``i < j``, of one label whose overlap is ``>= threshold``, sorted by ``(i, j)``.

    A sweep along x finds the candidates: in order of ``x1``, box ``p`` can only meet the boxes after it
    that start before its ``x2`` (one ``searchsorted``), so only boxes whose x-ranges overlap are
    compared; the candidates are expanded in blocks of at most ``_BLOCK`` pairs.
    """
    n = boxes.shape[0]
    device = boxes.device
    by_x = torch.sort(boxes[:, 0], stable=True)
    xo, x1 = by_x.indices, by_x.values
    end = torch.searchsorted(x1, boxes[xo, 2].contiguous(), side="left")  # first box starting at or after x2
    counts = (end - torch.arange(1, n + 1, device=device)).clamp_(min=0)
    rows, cols = [], []
    cum = torch.cumsum(counts, 0)
    start = 0
    while start < n:
        # as many boxes as fit in one block of candidate pairs (at least one)
        base = int(cum[start - 1]) if start > 0 else 0
        stop = max(start + 1, int(torch.searchsorted(cum, base + _BLOCK, side="right")))
        stop = min(stop, n)
        c = counts[start:stop]
        p = torch.repeat_interleave(torch.arange(start, stop, device=device), c)
        first = torch.cumsum(c, 0) - c
        q = p + 1 + torch.arange(p.numel(), device=device) - torch.repeat_interleave(first, c)
        a, b = xo[p], xo[q]
        keep = labels[a] == labels[b]
        a, b = a[keep], b[keep]
        keep = _pair_overlap(boxes[a], boxes[b], metric) >= threshold
        a, b = a[keep], b[keep]
        rows.append(torch.minimum(a, b))
        cols.append(torch.maximum(a, b))
        start = stop
    i = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
    j = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long, device=device)
    order = torch.sort(i * n + j).indices
    return i[order], j[order]


def greedy_merge(
    boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float = 0.5, *, metric: str = "ios",
    mergeable: Tensor | None = None,
) -> Tensor:
    """Greedy non-maximum merging (SAHI's GREEDYNMM) -> ``Long[K]``: for each box, the box it merges into.

    In decreasing score order, a box not yet merged keeps itself and absorbs every later box of the
    same label, not yet merged, whose overlap with it (``metric``: ``"iou"`` or ``"ios"``,
    intersection over the smaller area) is ``>= threshold``; an absorbed box absorbs nothing. A group
    is one detection with the keeper's score (the group's highest) and label (:func:`predict_sliced`
    gives it its box). Overlapping pairs come from a sweep along x (only boxes
    whose x-ranges overlap are compared, in blocks: memory ``O(block + pairs)``); only boxes that
    have a partner enter the Python loop. ``mergeable: Bool[K]`` restricts merging to pairs with at
    least one mergeable box (:func:`predict_sliced`: boxes cut by a tile border).

    Returns ``group: Long[K]`` with ``group[i] == i`` for the boxes kept.

    >>> b = torch.tensor([[0., 0., 10., 10.], [6., 0., 14., 10.], [30., 0., 40., 10.]])
    >>> greedy_merge(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0])).tolist()
    [0, 0, 2]
    """
    check_choice("metric", metric, MATCH_METRICS)
    threshold = check_real("threshold", threshold, low=0.0, high=1.0, low_open=True)
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    ei, ej = _overlapping_pairs(boxes[order].float(), labels[order], threshold, metric)
    if mergeable is not None and ei.numel():
        m = mergeable.to(boxes.device)[order]
        pair = m[ei] | m[ej]
        ei, ej = ei[pair], ej[pair]
    group = np.arange(n)
    if ei.numel():
        ei, ej = ei.cpu().numpy(), ej.cpu().numpy()  # sorted by ei, then ej
        merged = np.zeros(n, dtype=bool)
        bounds = np.searchsorted(ei, np.arange(n + 1))
        for i in np.unique(ei):  # score order; a merged box absorbs nothing
            if merged[i]:
                continue
            js = ej[bounds[i] : bounds[i + 1]]
            js = js[~merged[js]]
            merged[js] = True
            group[js] = i
    out = torch.empty(n, dtype=torch.long, device=boxes.device)
    out[order] = order[torch.from_numpy(group).to(boxes.device)]
    return out


def _merge(boxes: Tensor, scores: Tensor, labels: Tensor, cut: Tensor, merge: str, threshold: float, metric: str
           ) -> tuple[Tensor, Tensor, Tensor]:
    keep = torchvision.ops.batched_nms(boxes, scores, labels, threshold)
    boxes, scores, labels, cut = boxes[keep], scores[keep], labels[keep], cut[keep]
    if merge == "nms":
        return boxes, scores, labels
    # Only parts cut by a tile border merge: a union of two whole neighbours in a crowd is a wrong box.
    group = greedy_merge(boxes, scores, labels, threshold, metric=metric, mergeable=cut)
    n = len(group)
    union = torch.cat((boxes[:, :2], -boxes[:, 2:]), dim=1)  # amin of (x1, y1, -x2, -y2): one reduction
    union = union.new_full(union.shape, float("inf")).scatter_reduce_(
        0, group[:, None].expand(-1, 4), union, reduce="amin", include_self=True)
    union = torch.cat((union[:, :2], -union[:, 2:]), dim=1)
    # A group member its tile saw whole gives the group's box (the best-scoring one): a part's box,
    # regressed from a truncated view, often overshoots, and its union with the whole box is too big.
    by_rank = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty_like(by_rank)
    rank[by_rank] = torch.arange(n, device=group.device)
    whole_rank = torch.where(cut, torch.full_like(rank, n), rank)
    best = torch.full_like(rank, n).scatter_reduce_(0, group, whole_rank, reduce="amin", include_self=True)
    merged = torch.where((best < n)[:, None], boxes[by_rank[best.clamp(max=n - 1)]], union)
    keep = torch.nonzero(group == torch.arange(n, device=group.device)).squeeze(1)
    return merged[keep], scores[keep], labels[keep]


def _check_image(image: Any) -> Tensor:
    if not isinstance(image, Tensor):
        raise DTypeError(f"image: expected a Tensor[3, H, W] (float in [0, 1] or uint8), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ShapeError(f"image: expected Tensor[3, H, W] with H, W >= 1, got shape {tuple(image.shape)}")
    if not (image.is_floating_point() or image.dtype == torch.uint8):
        raise DTypeError(f"image: expected a float tensor in [0, 1] or uint8, got dtype {image.dtype}")
    return image


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


@contextmanager
def detection_cap(model: nn.Module, detections_per_image: int | None) -> Iterator[None]:
    """Set ``model``'s per-image detection cap for a ``with`` block, restored afterwards (``None``: unchanged).

    The cap is the detector's ``detections_per_image`` (:class:`~fewsight.models.DetectionPostprocess`,
    settable on every fewsight detector); a wrapper without one (a crop-rescored detector) caps
    through the detector it wraps (``model.detector``). Raises
    :class:`~fewsight.errors.InvalidArgumentError` when neither has the setting.

    >>> from fewsight.models import RetinaNet
    >>> m = RetinaNet(2, backbone="mobilenet_v2", levels=(3, 4, 5), fpn_channels=8)
    >>> with detection_cap(m, 500):
    ...     m.detections_per_image
    500
    >>> m.detections_per_image
    100
    """
    detections_per_image = _check_count("detections_per_image", detections_per_image, allow_none=True)
    if detections_per_image is None:
        yield
        return
    owner = next((c for c in (model, getattr(model, "detector", None)) if c is not None
                  and hasattr(c, "detections_per_image")), None)
    if owner is None:
        raise InvalidArgumentError(f"detections_per_image: expected a detector with a settable detections_per_image, "
                                   f"got {type(model).__name__}")
    saved = owner.detections_per_image
    owner.detections_per_image = detections_per_image
    try:
        yield
    finally:
        owner.detections_per_image = saved


@contextmanager
def _inference(model: nn.Module, detections_per_tile: int | None) -> Iterator[None]:
    """Eval mode, no autograd and the per-image cap ``detections_per_tile``; all restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), detection_cap(model, detections_per_tile):
            yield
    finally:
        model.train(was_training)


def _as_float(batch: Tensor) -> Tensor:
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch


def _downscaled(image: Tensor, longest: int) -> Tensor:
    """``image`` with its longer side ``longest`` as a float ``Tensor[1, 3, h, w]``, without a float
    copy of the whole image: a strided view first thins it to about twice the target, then an
    antialiased bilinear resize."""
    h, w = image.shape[-2:]
    scale = longest / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    step = max(1, int(max(h, w) // (2 * longest)))
    thin = _as_float(image[:, ::step, ::step].contiguous()).unsqueeze(0)
    return F.interpolate(thin, size=size, mode="bilinear", antialias=True, align_corners=False)


def predict_sliced(
    model: nn.Module,
    image: Tensor,
    *,
    tile: int | Sequence[int] = 512,
    overlap: float = 0.2,
    batch_size: int = 4,
    full_image: bool = False,
    merge: str = "nms",
    iou_threshold: float = 0.5,
    match_metric: str = "ios",
    max_detections: int | None = None,
    detections_per_tile: int | None = None,
) -> dict[str, Tensor]:
    """Detections of ``model`` on one large image, tile by tile -> ``{"boxes", "scores", "labels"}``.

    Steps: :func:`~fewsight.geometry.tile_grid` windows of ``tile`` pixels (an int or ``(h, w)``)
    overlapping by ``overlap``; ``batch_size`` tiles at a time through ``model`` in eval mode without
    autograd (tiles are views of ``image``: only the running batch is copied, moved to the model's
    device and converted to float); each tile's boxes shifted by its corner; with ``full_image=True``
    also one pass over the image downscaled so its longer side is the tile size (large objects no
    tile holds whole); then merged with ``merge``:

    * ``"nms"`` (default): class-wise NMS at ``iou_threshold`` (``torchvision.ops.batched_nms``): the
      same object seen whole by two tiles is one detection, but a part whose IoU with the whole box
      is at most the threshold stays a second, usually weaker, detection;
    * ``"greedy"``: that NMS, then greedy merging (:func:`greedy_merge`, SAHI's GREEDYNMM) restricted
      to boxes cut by a tile border (an edge within :data:`BORDER_PX` of a tile edge inside the
      image): such a box and a box of its class whose ``match_metric`` (``"ios"``: intersection over
      the smaller box, or ``"iou"``) with it is ``>= iou_threshold`` are one detection with the higher
      score, so an object cut by a border is counted once while neighbours in a crowd stay apart. Its
      box is the best-scoring member some tile saw whole, or the union of the parts when every member
      is cut. Choose it to count objects; NMS ranks detections slightly better for AP.

    ``detections_per_tile`` raises (or lowers) the model's own per-image cap for the call
    (``detections_per_image``; restored afterwards): a crowded tile needs more than the default 100.
    ``max_detections`` keeps the best after merging (``None``: all). The model's mode is restored.

    Args:
        model: a detector taking ``Tensor[B, 3, h, w]`` floats in ``[0, 1]`` and returning per-image
            ``{"boxes", "scores", "labels"}`` in those images' coordinates (every fewsight detector).
        image: ``Tensor[3, H, W]``, float in ``[0, 1]`` or ``uint8`` (divided by 255 per batch).

    Returns:
        ``boxes: Tensor[K, 4]`` float32 xyxy in ``image`` coordinates, ``scores: Tensor[K]``
        (decreasing), ``labels: Long[K]``, on ``image``'s device.

    Example:
        >>> from torch import nn
        >>> class Cut(nn.Module):  # sees the part of an object at x 50-80, y 10-30 inside each tile
        ...     def forward(self, images):
        ...         out, w = [], images.shape[-1]
        ...         for x in (images[:, 0, 0, 0] * 255).round().tolist():  # the tile's left edge (see img)
        ...             x1, x2 = max(50 - x, 0), min(80 - x, w)
        ...             b = torch.tensor([[x1, 10, x2, 30]]).float()[: int(x2 > x1)]
        ...             s = torch.tensor([0.9 if (x1, x2) == (50 - x, 80 - x) else 0.5])[: len(b)]
        ...             out.append({"boxes": b, "scores": s, "labels": torch.zeros(len(b), dtype=torch.long)})
        ...         return out
        >>> img = torch.arange(192, dtype=torch.uint8).expand(3, 64, 192)  # pixel value = its x
        >>> cut = predict_sliced(Cut(), img, tile=64, overlap=0.5, merge="greedy")  # tiles at x 0, 32, 64, ...
        >>> cut["boxes"].tolist(), round(cut["scores"].item(), 2)
        ([[50.0, 10.0, 80.0, 30.0]], 0.9)
        >>> len(predict_sliced(Cut(), img, tile=64, overlap=0.5, merge="nms")["boxes"])  # the part 50-64 stays
        2
    """
    image = _check_image(image)
    check_choice("merge", merge, MERGES)
    check_choice("match_metric", match_metric, MATCH_METRICS)
    iou_threshold = check_real("iou_threshold", iou_threshold, low=0.0, high=1.0, low_open=True)
    batch_size = _check_count("batch_size", batch_size)
    max_detections = _check_count("max_detections", max_detections, allow_none=True)
    detections_per_tile = _check_count("detections_per_tile", detections_per_tile, allow_none=True)
    if not isinstance(full_image, bool):
        raise InvalidArgumentError(f"full_image: expected a bool, got {full_image!r}")
    h, w = int(image.shape[1]), int(image.shape[2])
    windows = tile_grid(h, w, tile, overlap, dtype=torch.float64).long().tolist()
    device = _device_of(model, image.device)
    boxes, scores, labels, cut = [], [], [], []
    with _inference(model, detections_per_tile):
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            # All windows have one size (tile_grid), so a batch is one stack of views.
            batch = torch.stack([image[:, y1:y2, x1:x2] for x1, y1, x2, y2 in chunk]).to(device)
            preds = model(_as_float(batch))
            del batch
            for (x1, y1, x2, y2), p in zip(chunk, preds):
                b = p["boxes"].float()
                shift = torch.tensor([x1, y1, x1, y1], dtype=torch.float32, device=b.device)
                inner = torch.tensor([x1 > 0, y1 > 0, x2 < w, y2 < h], device=b.device)
                near = torch.stack((b[:, 0] <= BORDER_PX, b[:, 1] <= BORDER_PX, b[:, 2] >= x2 - x1 - BORDER_PX,
                                    b[:, 3] >= y2 - y1 - BORDER_PX), dim=1)
                cut.append((near & inner).any(dim=1))
                boxes.append(b + shift)
                scores.append(p["scores"].float())
                labels.append(p["labels"].long())
        if full_image and len(windows) > 1:
            longest = max(tile) if isinstance(tile, Sequence) else int(tile)
            small = _downscaled(image, longest).to(device)
            (p,) = model(small)
            sy, sx = h / small.shape[-2], w / small.shape[-1]
            scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=p["boxes"].device)
            boxes.append(p["boxes"].float() * scale)
            cut.append(torch.zeros(len(p["boxes"]), dtype=torch.bool, device=scale.device))
            scores.append(p["scores"].float())
            labels.append(p["labels"].long())
    all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    if len(windows) > 1 or full_image:
        all_boxes, all_scores, all_labels = _merge(all_boxes, all_scores, all_labels, torch.cat(cut), merge,
                                                   iou_threshold, match_metric)
    order = torch.sort(all_scores, descending=True, stable=True).indices
    if max_detections is not None:
        order = order[:max_detections]
    return {"boxes": all_boxes[order].to(image.device), "scores": all_scores[order].to(image.device),
            "labels": all_labels[order].to(image.device)}


class SlicedDetector(nn.Module):
    """A detector run sliced: ``forward(images)`` calls :func:`predict_sliced` on each image.

    Anything that takes a detector in eval mode (``fewsight.eval.evaluate_model``,
    ``fewsight.eval.predict``) then evaluates or predicts tile by tile. ``classes`` is the wrapped
    detector's; the settings are :func:`predict_sliced`'s keywords, kept as attributes. Inference
    only: training-mode calls are refused.

    >>> from torch import nn
    >>> class Empty(nn.Module):
    ...     classes = ["a"]
    ...     def forward(self, images):
    ...         return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ...                 for _ in images]
    >>> m = SlicedDetector(Empty(), tile=32).eval()
    >>> m.classes, m([torch.rand(3, 50, 70)])[0]["boxes"].shape
    (['a'], torch.Size([0, 4]))
    """

    def __init__(self, detector: nn.Module, **settings: Any) -> None:
        super().__init__()
        if not isinstance(detector, nn.Module):
            raise InvalidArgumentError(f"detector: expected an nn.Module, got {type(detector).__name__}")
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"SlicedDetector.__init__() got an unexpected keyword argument {unknown[0]!r}")
        self.detector = detector
        self.settings = dict(settings)

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.detector, "classes"))

    def forward(self, images: Tensor | Sequence[Tensor], targets: Any = None) -> list[dict[str, Tensor]]:
        if self.training or targets is not None:
            raise InvalidArgumentError("SlicedDetector: expected eval mode without targets (inference only), got a "
                                       "training call; train the wrapped detector on tiles instead")
        return [predict_sliced(self.detector, im, **self.settings) for im in images]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())


_SETTINGS = {"tile", "overlap", "batch_size", "full_image", "merge", "iou_threshold", "match_metric", "max_detections",
             "detections_per_tile"}
