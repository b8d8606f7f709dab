"""Seeded k-shot support sets: ``k`` annotated instances per class drawn from a dataset, and
:func:`tile_support`, the same set cut into the tiles that hold its boxes (large support images).

Example:
    >>> from fewsight.data import DigitsDataset
    >>> ds = DigitsDataset("train", 40, seed=100)
    >>> s = sample_support(ds, [8, 9], k=2, seed=0)
    >>> sorted(int(l) for t in s.targets for l in t["labels"] if l >= 0)
    [0, 0, 1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewsight.data import ImageFileDataset, load_image
from fewsight.errors import InvalidArgumentError
from fewsight.geometry import tile_grid, tile_targets

__all__ = ["SupportSet", "all_boxes_support", "sample_support", "tile_support"]


@dataclass
class SupportSet:
    """``k`` instances per class: dataset ``indices``, their ``targets`` (labels index ``classes``, -1 = unused box)."""

    indices: list[int]
    targets: list[dict[str, Tensor]]
    classes: list[int]
    k: int

    def images(self, dataset: Any) -> list[Tensor]:
        return [dataset[i][0] for i in self.indices]


def sample_support(dataset: Any, classes: Sequence[int], k: int, seed: int) -> SupportSet:
    """Draw ``k`` annotated instances of each of ``classes`` (indices into ``dataset.classes``).

    Images are visited in the order of a permutation seeded by ``seed``; an image is used when it
    holds an instance of a class that still needs some, and every instance of such a class in it is
    taken up to ``k``. The returned targets relabel taken boxes to their position in ``classes``;
    the image's other boxes keep label ``-1`` (unknown: ignored by training and enrollment).

    Raises:
        InvalidArgumentError: ``k < 1``, or the dataset has fewer than ``k`` instances of a class.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k: expected an int >= 1, got {k!r}")
    classes = [int(c) for c in classes]
    need = {c: k for c in classes}
    lookup = {c: j for j, c in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(dataset))
    indices: list[int] = []
    targets: list[dict[str, Tensor]] = []
    get_target = getattr(dataset, "get_target", None)
    for i in order.tolist():
        if not any(need.values()):
            break
        target = get_target(i) if callable(get_target) else dataset[i][1]
        labels = target["labels"].tolist()
        new = torch.full((len(labels),), -1, dtype=torch.long)
        for b, lab in enumerate(labels):
            if need.get(lab, 0) > 0:
                need[lab] -= 1
                new[b] = lookup[lab]
        if (new >= 0).any():
            indices.append(i)
            targets.append({"boxes": target["boxes"].clone(), "labels": new})
    short = {c: k - n for c, n in need.items() if n > 0}
    if short:
        raise InvalidArgumentError(
            f"k: expected at least {k} instances of every class in the support dataset, found only {short} (class: count)"
        )
    return SupportSet(indices, targets, classes, k)


def all_boxes_support(dataset: Any, classes: Sequence[int]) -> SupportSet:
    """Every box of ``classes`` (indices into ``dataset.classes``) as a support set; other boxes get ``-1``."""
    classes = [int(c) for c in classes]
    lookup = torch.full((len(dataset.classes),), -1, dtype=torch.long)
    lookup[classes] = torch.arange(len(classes))
    indices, targets = [], []
    get_target = getattr(dataset, "get_target", None)
    for i in range(len(dataset)):
        t = get_target(i) if callable(get_target) else dataset[i][1]
        labels = lookup[t["labels"]]
        if (labels >= 0).any():
            indices.append(i)
            targets.append({"boxes": t["boxes"], "labels": labels})
    return SupportSet(indices, targets, classes, 0)


def _full_image(dataset: Any, index: int) -> Tensor:
    """Image ``index`` of ``dataset``; a file dataset's decoded as uint8 (3 bytes a pixel, not a float's 12)."""
    if isinstance(dataset, ImageFileDataset) and dataset.transforms is None:
        return load_image(dataset.image_path(index), max_pixels=dataset.max_pixels, dtype=None)
    return dataset[index][0]


def tile_support(dataset: Any, support: SupportSet, tile: int | Sequence[int], overlap: float = 0.2
                 ) -> tuple[list[Tensor], SupportSet]:
    """``support`` cut into tiles: each support box taken from the one tile that shows it best.

    The tiles of each support image are :func:`~fewsight.geometry.tile_grid`'s (``tile`` pixels, an
    int or ``(h, w)``, overlapping by ``overlap``: the windows sliced inference runs on). A support
    box (label ``>= 0``) is taken from the tile holding the largest part of it (the whole box when a
    tile holds it whole), ties going to the tile whose centre is nearest the box's, then to the
    first; each tile chosen for some box becomes one support image (float in ``[0, 1]``), its target
    every box visible in it clipped to it (:func:`~fewsight.geometry.tile_targets`), labelled where the
    tile was chosen for that box and ``-1`` (ignored: neither example nor background) otherwise.
    So enrollment sees the objects of an image larger than the model's input at their own scale,
    each once, and equals enrollment from those tiles saved as images.

    Returns ``(tiles, SupportSet)``: the tile images and a support set whose ``indices`` repeat the
    source image of each tile.

    >>> import torch
    >>> from fewsight.data import RelabeledDataset
    >>> class Big:  # one 100 x 300 image, a box at x 130-150
    ...     classes = ["a"]
    ...     def __len__(self): return 1
    ...     def __getitem__(self, i):
    ...         return torch.rand(3, 100, 300), {"boxes": torch.tensor([[130., 10., 150., 30.]]), "labels": torch.tensor([0])}
    >>> tiles, s = tile_support(Big(), all_boxes_support(Big(), [0]), tile=100, overlap=0.5)
    >>> [t.shape[-1] for t in tiles], s.targets[0]["boxes"].tolist()  # tile x 100-200 centres the box best
    ([100], [[30.0, 10.0, 50.0, 30.0]])
    """
    images: list[Tensor] = []
    targets: list[dict[str, Tensor]] = []
    indices: list[int] = []
    for index, target in zip(support.indices, support.targets):
        image = _full_image(dataset, index)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        windows = tile_grid(h, w, tile, overlap, dtype=torch.float64)
        boxes = target["boxes"].to(torch.float64).reshape(-1, 4)
        labels = target["labels"].reshape(-1).long()
        cut = tile_targets(boxes, labels, windows, min_visibility=0.0)
        # Rank the (tile, box) pairs: most of the box visible, then the box centre nearest the tile centre.
        centre = (boxes[cut.box, :2] + boxes[cut.box, 2:]) / 2
        middle = (windows[cut.tile, :2] + windows[cut.tile, 2:]) / 2
        distance = (centre - middle).square().sum(dim=1)
        order = torch.argsort(distance, stable=True)
        order = order[torch.argsort(-cut.visibility[order], stable=True)]
        order = order[torch.argsort(cut.box[order], stable=True)]  # grouped by box, best pair first
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = cut.box[order][1:] != cut.box[order][:-1]
        best = order[first]
        best = best[cut.labels[best] >= 0]
        chosen = torch.zeros(len(cut.tile), dtype=torch.bool)
        chosen[best] = True
        for t in torch.unique(cut.tile[best]).tolist():  # row-major tile order
            rows = cut.tile == t
            x1, y1, x2, y2 = (int(v) for v in windows[t].tolist())
            crop = image[:, y1:y2, x1:x2]
            images.append(crop.float().div_(255.0) if crop.dtype == torch.uint8 else crop.clone())
            labels_in_tile = torch.where(chosen[rows], cut.labels[rows], torch.full_like(cut.labels[rows], -1))
            targets.append({"boxes": cut.boxes[rows].to(target["boxes"].dtype), "labels": labels_in_tile})
            indices.append(index)
    return images, SupportSet(indices, targets, list(support.classes), support.k)
