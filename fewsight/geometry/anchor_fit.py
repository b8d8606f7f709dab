"""Anchors fitted to a dataset: best-possible recall of an anchor set, IoU k-means, a proposed set.

* :func:`best_anchor_iou` / :func:`best_possible_recall`: for each ground-truth box, its best IoU with
  the anchors an :class:`~fewsight.geometry.AnchorGenerator` lays over its image (every level, every
  stride position), and the fraction of boxes some anchor matches at IoU ``>=`` the matcher's
  foreground threshold. Computed in closed form, not against every anchor: the overlap of a box and
  an anchor of one shape is a product of an x-overlap and a y-overlap, each largest at the anchor
  centre nearest the box centre, so each (box, anchor shape) pair needs one candidate position.
* :func:`kmeans_anchors`: k-means of box ``(w, h)`` with the distance ``1 - IoU`` of boxes sharing a
  centre (YOLO's autoanchor), seeded k-means++.
* :func:`propose_anchors`: an :class:`AnchorGenerator` for the data: aspect ratios from the k-means
  clusters, per-level sizes ``c * stride`` with the multiplier ``c`` (a third-octave grid) that
  maximises best-possible recall; never worse than the current set, which is a candidate.

Example:
    >>> boxes = torch.tensor([[10., 10., 30., 50.], [100., 60., 112., 66.]])
    >>> gen = AnchorGenerator(levels=(3, 4), sizes=(16, 32))
    >>> best_anchor_iou(boxes, (128, 128), gen).round(decimals=3).tolist()
    [0.806, 0.281]
    >>> best_possible_recall(boxes, (128, 128), gen)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, as_floating, as_tensor, check_finite, check_last_dim, check_real
from fewsight.geometry.anchors import AnchorGenerator

__all__ = [
    "AnchorProposal",
    "best_anchor_iou",
    "best_possible_recall",
    "kmeans_anchors",
    "propose_anchors",
    "wh_iou",
]

# Boxes per block of the closed form: N x S x 3 candidates of a few float64 buffers.
_BLOCK = 1 << 14


def _boxes(boxes: Any) -> Tensor:
    boxes = as_tensor("boxes", boxes, expected="Tensor[N, 4]")
    check_last_dim("boxes", boxes, 4, "Tensor[N, 4]")
    if boxes.ndim != 2:
        raise ShapeError(f"boxes: expected Tensor[N, 4], got shape {tuple(boxes.shape)}")
    boxes = as_floating("boxes", boxes)
    check_finite("boxes", boxes)
    return boxes


def _image_sizes(image_sizes: Any, n: int) -> Tensor:
    sizes = as_tensor("image_sizes", image_sizes, expected="(H, W) or Tensor[N, 2]").to(torch.float64)
    if sizes.shape == (2,):
        sizes = sizes.expand(n, 2)
    if sizes.shape != (n, 2):
        raise ShapeError(f"image_sizes: expected (H, W) or Tensor[{n}, 2] (one per box), got shape {tuple(sizes.shape)}")
    if n and bool((sizes < 1).any()):
        raise InvalidArgumentError(f"image_sizes: expected positive (H, W), got a minimum of {float(sizes.min())}")
    return sizes


def _shapes(generator: AnchorGenerator) -> tuple[Tensor, Tensor]:
    """``(cells: Tensor[S, 4], strides: Tensor[S])``: every anchor shape of every level, origin-centred."""
    cells = [generator.cell_anchors(k, torch.float64) for k in range(len(generator.levels))]
    strides = [torch.full((len(c),), float(s), dtype=torch.float64) for c, s in zip(cells, generator.strides)]
    return torch.cat(cells), torch.cat(strides)


def _best_overlap(lo: Tensor, hi: Tensor, length: Tensor, cell_lo: Tensor, cell_hi: Tensor, stride: Tensor) -> Tensor:
    """Largest overlap along one axis of ``[lo, hi]`` (``[n, 1]``) with an anchor of extent
    ``[cell_lo, cell_hi]`` (``[S]``) centred at ``(j + 0.5) * stride``, ``0 <= j < ceil(length / stride)``."""
    count = torch.ceil(length / stride)  # [n, S] positions along this axis
    nearest = torch.floor((lo + hi) / 2 / stride)  # the centre nearest the box centre ...
    best = None
    for step in (-1.0, 0.0, 1.0):  # ... and its neighbours, against rounding at exact halves
        j = torch.minimum(torch.clamp(nearest + step, min=0), count - 1)
        c = (j + 0.5) * stride
        o = (torch.minimum(hi, c + cell_hi) - torch.maximum(lo, c + cell_lo)).clamp(min=0)
        best = o if best is None else torch.maximum(best, o)
    return best


def best_anchor_iou(boxes: Tensor, image_sizes: Any, generator: AnchorGenerator) -> Tensor:
    """Each box's best IoU with the anchors ``generator`` lays over its image -> ``Tensor[N]`` float64.

    The anchors are ``generator((H, W))``: every level, shape and stride position, unclipped, as the
    detectors match them. Closed form per (box, anchor shape) -- the x- and y-overlaps are each largest
    at the anchor centre nearest the box centre (clamped to the grid), and IoU grows with the
    intersection at a fixed anchor area -- so the cost is ``O(N * shapes)``, not ``O(N * anchors)``.

    Args:
        boxes: ``Tensor[N, 4]`` xyxy in network-input pixels.
        image_sizes: ``(H, W)`` for every box, or ``Tensor[N, 2]``, the size of each box's image.

    >>> best_anchor_iou(torch.tensor([[0., 0., 32., 32.]]), (64, 64), AnchorGenerator(levels=(3,))).round(decimals=3)
    tensor([0.6300], dtype=torch.float64)
    """
    boxes = _boxes(boxes).to(torch.float64)
    sizes = _image_sizes(image_sizes, boxes.shape[0]).to(boxes.device)
    cells, strides = (t.to(boxes.device) for t in _shapes(generator))
    out = []
    for start in range(0, boxes.shape[0], _BLOCK):
        b, hw = boxes[start : start + _BLOCK, None, :], sizes[start : start + _BLOCK, None, :]
        ox = _best_overlap(b[..., 0], b[..., 2], hw[..., 1], cells[:, 0], cells[:, 2], strides)
        oy = _best_overlap(b[..., 1], b[..., 3], hw[..., 0], cells[:, 1], cells[:, 3], strides)
        inter = ox * oy
        box_area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
        anchor_area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
        union = (box_area + anchor_area - inter).clamp(min=torch.finfo(torch.float64).tiny)
        out.append((inter / union).amax(dim=1))
    return torch.cat(out) if out else boxes.new_zeros(0)


def best_possible_recall(boxes: Tensor, image_sizes: Any, generator: AnchorGenerator, threshold: float = 0.5) -> float:
    """Fraction of boxes whose best anchor IoU (:func:`best_anchor_iou`) is ``>= threshold``.

    The recall a detector could reach if every matched anchor were right: with the matcher's
    foreground threshold (``object_threshold``, 0.5), a box below it gets no positive anchor (except
    through ``low_quality`` matching, which this number does not count).

    >>> best_possible_recall(torch.tensor([[0., 0., 32., 32.], [0., 0., 4., 4.]]), (64, 64), AnchorGenerator(levels=(3,)))
    0.5
    """
    threshold = check_real("threshold", threshold, low=0.0, high=1.0, low_open=True)
    best = best_anchor_iou(boxes, image_sizes, generator)
    if best.numel() == 0:
        raise InvalidArgumentError("boxes: expected at least one box, got none")
    return float((best >= threshold).double().mean())


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes sharing a centre: ``Tensor[N, 2] x Tensor[K, 2] -> Tensor[N, K]`` (widths, heights).

    IoU = min(w) min(h) / (w1 h1 + w2 h2 - min(w) min(h)).

    >>> wh_iou(torch.tensor([[2., 4.]]), torch.tensor([[4., 2.], [2., 4.]])).tolist()
    [[0.3333333432674408, 1.0]]
    """
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    union = wh1.prod(1)[:, None] + wh2.prod(1)[None, :] - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def kmeans_anchors(wh: Tensor, k: int = 9, *, seed: int = 0, max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """k-means of box sizes with the distance ``1 - IoU`` (:func:`wh_iou`) -> ``(centroids: Tensor[k, 2], counts: Long[k])``.

    k-means++ seeding from ``torch.Generator().manual_seed(seed)``, then Lloyd steps: each box to its
    highest-IoU centroid, each centroid to the median ``(w, h)`` of its boxes (a cluster left empty
    keeps its centroid), until no assignment changes. Deterministic for a seed; computed on the CPU in
    float64 (a handful of numbers for a config) and returned on ``wh``'s device, sorted by area.

    >>> wh = torch.tensor([[10., 10.], [11., 9.], [50., 100.], [52., 98.]])
    >>> kmeans_anchors(wh, 2)[0].tolist(), kmeans_anchors(wh, 2)[1].tolist()
    ([[10.0, 9.0], [50.0, 98.0]], [2, 2])
    """
    wh_in = as_tensor("wh", wh, expected="Tensor[N, 2]")
    if wh_in.ndim != 2 or wh_in.shape[1] != 2:
        raise ShapeError(f"wh: expected Tensor[N, 2] (widths, heights), got shape {tuple(wh_in.shape)}")
    check_finite("wh", wh_in)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k: expected an int >= 1, got {k!r}")
    x = wh_in.detach().to("cpu", torch.float64)
    if x.shape[0] < k:
        raise InvalidArgumentError(f"wh: expected at least k={k} boxes, got {x.shape[0]}")
    if bool((x <= 0).any()):
        raise InvalidArgumentError("wh: expected positive widths and heights, got a box of zero or negative size")
    g = torch.Generator().manual_seed(int(seed))
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ distance^2
        d = 1 - wh_iou(x, centres).amax(dim=1)
        if float(d.sum()) <= 0:  # fewer distinct sizes than k: repeat one
            centres = torch.cat((centres, centres[:1]))
            continue
        centres = torch.cat((centres, x[torch.multinomial(d.square(), 1, generator=g)]))
    assign = None
    for _ in range(max_iter):
        new = wh_iou(x, centres).argmax(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.median(dim=0).values
    counts = torch.bincount(assign, minlength=k)
    order = torch.sort(centres.prod(dim=1), stable=True).indices
    return centres[order].to(wh_in.device, wh_in.dtype if wh_in.is_floating_point() else torch.float64), counts[order].to(wh_in.device)


class AnchorProposal(NamedTuple):
    """What :func:`propose_anchors` returns.

    ``generator``: the proposed :class:`AnchorGenerator`; ``recall`` / ``mean_iou``: its best-possible
    recall and mean best IoU; ``current_recall`` / ``current_mean_iou``: the same for the current
    anchors; ``centroids: Tensor[k, 2]`` and ``counts: Long[k]``: the IoU k-means clusters ``(w, h)``;
    ``multiplier``: the sizes' ``c`` (``sizes = c * strides``; ``None`` when the current set is kept).
    """

    generator: AnchorGenerator
    recall: float
    mean_iou: float
    current_recall: float
    current_mean_iou: float
    centroids: Tensor
    counts: Tensor
    multiplier: float | None

    def config(self) -> dict[str, Any]:
        """The proposal as ``model.anchor_generator`` options (plain lists, for a YAML config)."""
        g = self.generator
        return {"levels": list(g.levels), "sizes": [round(s, 2) for s in g.sizes],
                "scales": [round(s, 4) for s in g.scales], "aspect_ratios": [round(r, 3) for r in g.aspect_ratios]}


def _ratio_groups(ratios: Tensor, weights: Tensor, m: int) -> list[float]:
    """``m`` aspect ratios from the clusters' ratios: 1-D weighted k-means of their logarithms."""
    logs = ratios.log()
    distinct = torch.unique(logs)
    if len(distinct) <= m:
        return sorted(round(math.exp(float(v)), 3) for v in distinct)
    order = torch.argsort(logs)
    logs, weights = logs[order], weights[order].double()
    cum = torch.cumsum(weights, 0) / weights.sum()
    centres = torch.stack([logs[int(torch.searchsorted(cum, (i + 0.5) / m))] for i in range(m)])
    for _ in range(100):
        assign = (logs[:, None] - centres[None, :]).abs().argmin(dim=1)
        new = torch.stack([(logs[assign == i] * weights[assign == i]).sum() / weights[assign == i].sum()
                           if bool((assign == i).any()) else centres[i] for i in range(m)])
        if torch.allclose(new, centres):
            break
        centres = new
    return sorted({round(math.exp(float(v)), 3) for v in centres})


def propose_anchors(
    boxes: Tensor,
    image_sizes: Any,
    generator: AnchorGenerator | None = None,
    *,
    clusters: int = 9,
    num_ratios: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    multipliers: Sequence[float] | None = None,
) -> AnchorProposal:
    """An anchor set for these boxes, compared with ``generator`` (default: ``AnchorGenerator()``).

    1. :func:`kmeans_anchors` on the boxes' ``(w, h)`` with ``clusters`` clusters;
    2. aspect ratios: ``num_ratios`` (default: as many as ``generator``) groups of the clusters' ``h / w``
       (weighted by their sizes, in log space);
    3. sizes ``c * stride`` per level (the levels and scales stay ``generator``'s: the FPN ties an
       anchor size to its level's stride), ``c`` from ``multipliers`` (default ``2 ** (t / 3)``,
       ``t = 0 .. 12``: 1 to 16) maximising best-possible recall at ``threshold``, then mean best IoU;
    4. the current ``generator`` itself is a candidate: the proposal is never worse than it.

    ``boxes`` and ``image_sizes`` as :func:`best_anchor_iou` (network-input pixels).

    >>> g = torch.Generator().manual_seed(0)
    >>> xy = torch.rand(200, 2, generator=g) * 400
    >>> boxes = torch.cat((xy, xy + torch.tensor([16., 32.])), 1)  # small tall objects
    >>> p = propose_anchors(boxes, (416, 416), AnchorGenerator(levels=(3, 4, 5)))
    >>> round(p.current_recall, 3), p.recall, p.config()["sizes"], p.config()["aspect_ratios"]
    (0.715, 1.0, [16.0, 32.0, 64.0], [2.0])
    """
    boxes = _boxes(boxes)
    sizes = _image_sizes(image_sizes, boxes.shape[0])
    generator = AnchorGenerator() if generator is None else generator
    if boxes.shape[0] == 0:
        raise InvalidArgumentError("boxes: expected at least one box, got none")
    threshold = check_real("threshold", threshold, low=0.0, high=1.0, low_open=True)
    num_ratios = len(generator.aspect_ratios) if num_ratios is None else num_ratios
    if isinstance(num_ratios, bool) or not isinstance(num_ratios, int) or num_ratios < 1:
        raise InvalidArgumentError(f"num_ratios: expected an int >= 1, got {num_ratios!r}")
    wh = (boxes[:, 2:] - boxes[:, :2]).double()
    valid = (wh > 0).all(dim=1)
    if not bool(valid.any()):
        raise InvalidArgumentError("boxes: expected boxes of positive width and height, got none")
    centroids, counts = kmeans_anchors(wh[valid], min(clusters, int(valid.sum())), seed=seed)
    ratios = _ratio_groups(centroids[:, 1] / centroids[:, 0], counts, num_ratios)
    grid = [2 ** (t / 3) for t in range(13)] if multipliers is None else [float(c) for c in multipliers]

    def score(gen: AnchorGenerator) -> tuple[float, float]:
        best = best_anchor_iou(boxes, sizes, gen)
        return float((best >= threshold).double().mean()), float(best.mean())

    current = score(generator)
    chosen, chosen_score, multiplier = generator, current, None
    for c in grid:
        cand = AnchorGenerator(levels=generator.levels, sizes=[round(c * s, 2) for s in generator.strides],
                               scales=generator.scales, aspect_ratios=ratios)
        s = score(cand)
        if s > chosen_score:
            chosen, chosen_score, multiplier = cand, s, c
    return AnchorProposal(chosen, chosen_score[0], chosen_score[1], current[0], current[1], centroids, counts, multiplier)
