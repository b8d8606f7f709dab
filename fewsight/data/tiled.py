"""Tiles of large images as a dataset: grid tiles for evaluation, random crops for training.

:class:`TiledDataset` wraps any detection dataset (COCO / VOC / YOLO / CSV / digits / ...) whose images
are too large to feed whole. Item ``k`` is one tile: the image it belongs to is decoded when the item
is read and the tile cut from it (a copy of the tile only; nothing is cached, nothing written to
disk). Its target is :func:`fewsight.geometry.tile_targets` of the image's boxes for that window:
boxes clipped to the tile in tile coordinates, those whose visible fraction is below
``min_visibility`` given as ``"ignore_boxes"`` (neither object nor background for the RetinaNet and
DLDENet losses, :func:`fewsight.models.assignment.prepare_targets`; SSD's MultiBox loss has no ignore
state and drops them) instead of being taught as background.

* ``mode="grid"``: the windows of :func:`fewsight.geometry.tile_grid` (``size``, ``overlap``), image by
  image, row-major; the length is the total tile count. Deterministic: for validation and tests.
* ``mode="random"``: ``crops_per_image`` windows of ``size`` per image at uniformly drawn positions
  (torch's global generator, which :class:`fewsight.train.data.SeededDataset` seeds from
  ``(seed, epoch, index)``: every epoch sees new crops, a resumed run the same ones). Default count:
  ``ceil(H * W / tile area)`` per image, so an epoch covers each image's area about once.

Image sizes come from the source without decoding when it can tell them (``image_size(i)`` of the
file readers, the fixed ``image_size`` of the generated datasets); otherwise each image is decoded
once at construction to measure it.

Example:
    >>> from fewsight.data import DigitsDataset
    >>> src = DigitsDataset("val", num_images=2, image_size=96, classes=[3, 5])
    >>> tiles = TiledDataset(src, size=64, overlap=0.25)
    >>> len(tiles), tiles.locate(5), tiles.window(5).tolist()
    (8, (1, 1), [32.0, 0.0, 96.0, 64.0])
    >>> image, target = tiles[5]
    >>> tuple(image.shape), sorted(target)
    ((3, 64, 64), ['boxes', 'ignore_boxes', 'labels'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewsight.data.dataset import DetectionDataset, Target, check_index, unwrap_relabeled
from fewsight.errors import DataError, InvalidArgumentError, check_choice, check_real
from fewsight.geometry import tile_starts, tile_targets

__all__ = ["TILE_MODES", "TiledDataset", "crops_per_image", "grid_tile_count", "tile_shape"]

TILE_MODES = ("grid", "random")


def tile_shape(size: Any) -> tuple[int, int]:
    """``(th, tw)`` of a tile ``size``: an int ``S`` (square) or ``(h, w)``, each ``>= 1``.

    >>> tile_shape(512), tile_shape([256, 384])
    ((512, 512), (256, 384))
    """
    values = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    try:
        th, tw = values
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"size: expected an int or (height, width), got {size!r}") from None
    for v in (th, tw):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(f"size: expected ints >= 1, got {size!r}")
    return int(th), int(tw)


def grid_tile_count(height: int, width: int, size: Any, overlap: float) -> int:
    """Number of :func:`fewsight.geometry.tile_grid` windows of an ``height x width`` image.

    >>> grid_tile_count(96, 96, 64, 0.25)
    4
    """
    th, tw = tile_shape(size)
    return len(tile_starts(height, th, overlap)) * len(tile_starts(width, tw, overlap))


def crops_per_image(height: int, width: int, size: Any) -> int:
    """Random crops that cover an ``height x width`` image's area about once: ``ceil(H W / crop area)``.

    >>> crops_per_image(1000, 1000, 512), crops_per_image(100, 100, 512)
    (4, 1)
    """
    th, tw = tile_shape(size)
    return math.ceil(height * width / (min(th, height) * min(tw, width)))


def _source_sizes(dataset: Any) -> np.ndarray:
    """``Long[N, 2]`` ``(H, W)`` of every image of ``dataset``, without decoding when it can say."""
    n = len(dataset)
    size = getattr(unwrap_relabeled(dataset), "image_size", None)
    if callable(size):  # the file readers: from the image headers
        return np.array([tuple(size(i)) for i in range(n)], dtype=np.int64).reshape(-1, 2)
    if isinstance(size, (tuple, list)) and len(size) == 2:  # generated canvases of one size
        return np.tile(np.array(size, dtype=np.int64), (n, 1))
    # Unknown dataset: decode each image once to measure it.
    return np.array([tuple(dataset[i][0].shape[-2:]) for i in range(n)], dtype=np.int64).reshape(-1, 2)


class TiledDataset(DetectionDataset):
    """Tiles of the images of ``dataset`` (see the module docstring).

    Args:
        dataset: a map-style detection dataset, ``dataset[i] -> (Tensor[3, H, W], {"boxes", "labels"})``,
            without ``transforms`` of its own (they would run on the whole image: give them here).
        size: tile side ``S`` or ``(h, w)``; an image smaller than a tile is one tile (the image).
        overlap: fraction of ``size`` consecutive grid tiles share (``[0, 1)``; grid mode).
        min_visibility: a box whose visible fraction in the tile is below this is an ignore region of
            the tile, not a target (``[0, 1]``; 0 keeps every visible part).
        mode: ``"grid"`` or ``"random"``.
        crops_per_image: random mode: crops per image and epoch (``None``: :func:`crops_per_image`).
        transforms: v2-style ``(image, target) -> (image, target)`` applied to each tile (ignore
            regions follow the boxes, :func:`fewsight.data.transforms.apply_transforms`).

    Items: ``(Tensor[3, th, tw], {"boxes": Tensor[N, 4], "labels": Long[N], "ignore_boxes": Tensor[R, 4]})``
    in tile coordinates. :meth:`locate` gives ``(image index, tile index)``, :meth:`window` the tile
    in image coordinates, :meth:`windows` an image's grid.
    """

    def __init__(
        self,
        dataset: Any,
        size: int | Sequence[int] = 512,
        overlap: float = 0.2,
        min_visibility: float = 0.5,
        *,
        mode: str = "grid",
        crops_per_image: int | None = None,
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise InvalidArgumentError(f"dataset: expected a map-style detection dataset, got {type(dataset).__name__}")
        if getattr(dataset, "transforms", None) is not None:
            raise InvalidArgumentError(
                "dataset: expected a dataset without transforms (they would run on the whole image), got one with "
                "transforms; pass them to TiledDataset(transforms=...) to augment each tile"
            )
        super().__init__(list(getattr(dataset, "classes", [])), transforms=transforms)
        self.dataset = dataset
        self.size = tile_shape(size)
        self.overlap = check_real("overlap", overlap, low=0.0, high=1.0, high_open=True)
        self.min_visibility = check_real("min_visibility", min_visibility, low=0.0, high=1.0)
        check_choice("mode", mode, TILE_MODES)
        self.mode = mode
        if crops_per_image is not None:
            if mode != "random":
                raise InvalidArgumentError(f"crops_per_image: expected None in grid mode, got {crops_per_image!r}")
            if isinstance(crops_per_image, bool) or not isinstance(crops_per_image, int) or crops_per_image < 1:
                raise InvalidArgumentError(f"crops_per_image: expected an int >= 1 or None, got {crops_per_image!r}")
        self.crops_per_image = crops_per_image
        self.skipped = list(getattr(dataset, "skipped", []))
        self.image_sizes = _source_sizes(dataset)  # Long[N, 2]
        counts = [self._count(int(h), int(w)) for h, w in self.image_sizes]
        self._offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64))).astype(np.int64)

    def _count(self, h: int, w: int) -> int:
        if self.mode == "grid":
            return grid_tile_count(h, w, self.size, self.overlap)
        return self.crops_per_image if self.crops_per_image is not None else crops_per_image(h, w, self.size)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    def locate(self, index: int) -> tuple[int, int]:
        """``(image index, tile index within the image)`` of item ``index``."""
        index = check_index(index, len(self))
        image = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return image, index - int(self._offsets[image])

    def tile_count(self, image: int) -> int:
        """Tiles (grid) or crops per epoch (random) of image ``image``."""
        image = check_index(image, self.num_images)
        return int(self._offsets[image + 1] - self._offsets[image])

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of item ``index`` (the tile; smaller than ``size`` for an image smaller than a tile)."""
        h, w = self.image_sizes[self.locate(index)[0]]
        return min(self.size[0], int(h)), min(self.size[1], int(w))

    def windows(self, image: int) -> Tensor:
        """``Tensor[T, 4]`` the grid windows of image ``image`` (:func:`fewsight.geometry.tile_grid`)."""
        from fewsight.geometry import tile_grid

        h, w = self.image_sizes[check_index(image, self.num_images)]
        return tile_grid(int(h), int(w), self.size, self.overlap)

    def window(self, index: int) -> Tensor:
        """``Tensor[4]`` xyxy window of item ``index`` in its image. Random mode draws a new position
        from torch's global generator on every call."""
        image, k = self.locate(index)
        h, w = (int(v) for v in self.image_sizes[image])
        th, tw = min(self.size[0], h), min(self.size[1], w)
        if self.mode == "grid":
            xs = tile_starts(w, self.size[1], self.overlap)
            y0, x0 = tile_starts(h, self.size[0], self.overlap)[k // len(xs)], xs[k % len(xs)]
        else:
            y0, x0 = int(torch.randint(0, h - th + 1, ())), int(torch.randint(0, w - tw + 1, ()))
        return torch.tensor([x0, y0, x0 + tw, y0 + th], dtype=torch.float32)

    def _cut(self, target: Target, window: Tensor) -> Target:
        boxes = target["boxes"].reshape(-1, 4)
        cut = tile_targets(boxes, target["labels"].reshape(-1), window.to(boxes.dtype)[None], self.min_visibility)
        return cut.per_tile()[0]

    def load(self, index: int) -> tuple[Tensor, Target]:
        image_index, _ = self.locate(index)
        window = self.window(index)
        image, target = self.dataset[image_index]
        expected = tuple(int(v) for v in self.image_sizes[image_index])
        if tuple(image.shape[-2:]) != expected:
            path = getattr(self.dataset, "image_path", None)
            where = path(image_index) if callable(path) else f"{type(self.dataset).__name__}[{image_index}]"
            raise DataError(where, f"expected an image of {expected[0]}x{expected[1]} px (measured when tiling "
                                   f"started), got {image.shape[-2]}x{image.shape[-1]}")
        x0, y0, x1, y1 = (int(v) for v in window.tolist())
        # A copy of the tile, not a view: the decoded image is freed as soon as this returns.
        tile = image[..., y0:y1, x0:x1].clone(memory_format=torch.contiguous_format)
        return tile, self._cut(target, window)

    def get_target(self, index: int) -> Target:
        """The (untransformed) target of grid item ``index``, without decoding when the source can."""
        if self.mode != "grid":
            return self.load(check_index(index, len(self)))[1]
        image_index, _ = self.locate(index)
        get = getattr(self.dataset, "get_target", None)
        target = get(image_index) if callable(get) else self.dataset[image_index][1]
        return self._cut(target, self.window(index))

    def __repr__(self) -> str:
        return (f"TiledDataset(len={len(self)}, mode={self.mode!r}, size={self.size}, overlap={self.overlap}, "
                f"min_visibility={self.min_visibility}, images={self.num_images}, classes={self.classes})")
