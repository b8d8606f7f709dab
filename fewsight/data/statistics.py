"""The boxes of a detection dataset, read without decoding images where the dataset can tell them.

:func:`dataset_boxes` feeds box statistics and anchor fitting (``fewsight anchors``, a config's
``anchor_generator: auto``): every box of (an even sample of) the images, with the size of the image
holding it. File datasets give targets and image sizes from their annotations and headers; generated
ones draw each sampled image once. A :class:`~fewsight.data.TiledDataset` answers for its source's
whole images: a box is the same size in a tile as in its image, and random crops have no fixed set.

Example:
    >>> from fewsight.data import DigitsDataset
    >>> boxes, sizes = dataset_boxes(DigitsDataset("val", num_images=3, image_size=96))
    >>> boxes.shape[1], sizes[0].tolist(), len(boxes) == len(sizes)
    (4, [96.0, 96.0], True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewsight.data.dataset import unwrap_relabeled
from fewsight.data.tiled import TiledDataset
from fewsight.errors import InvalidArgumentError

__all__ = ["dataset_boxes", "sample_indices"]


def sample_indices(n: int, max_images: int | None) -> list[int]:
    """``min(n, max_images)`` indices spread evenly over ``range(n)`` (all of them when ``max_images`` is None).

    >>> sample_indices(10, 4), sample_indices(3, None)
    ([0, 3, 6, 9], [0, 1, 2])
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise InvalidArgumentError(f"max_images: expected an int >= 1 or None, got {max_images!r}")
    if max_images is None or n <= max_images:
        return list(range(n))
    return np.unique(np.linspace(0, n - 1, max_images).round().astype(np.int64)).tolist()


def dataset_boxes(
    dataset: Any, *, max_images: int | None = None, advance: Callable[[], None] | None = None
) -> tuple[Tensor, Tensor]:
    """``(boxes: Tensor[N, 4] float64 xyxy, image_sizes: Tensor[N, 2] float64 (H, W))`` of ``dataset``'s boxes.

    ``max_images`` reads an even sample of that many images (:func:`sample_indices`); ``advance`` is
    called after each image (a progress bar). A :class:`~fewsight.data.TiledDataset` is read as its
    source's whole images (see the module docstring).
    """
    if isinstance(dataset, TiledDataset):
        dataset = dataset.dataset
    get_target = getattr(dataset, "get_target", None)
    image_size = getattr(unwrap_relabeled(dataset), "image_size", None)
    boxes, sizes = [], []
    for i in sample_indices(len(dataset), max_images):
        if callable(get_target) and (callable(image_size) or isinstance(image_size, (tuple, list))):
            target = get_target(i)
            h, w = image_size(i) if callable(image_size) else image_size
        else:
            image, target = dataset[i]
            h, w = image.shape[-2:]
        b = target["boxes"].reshape(-1, 4).double()
        boxes.append(b)
        sizes.append(torch.tensor([[float(h), float(w)]], dtype=torch.float64).expand(len(b), 2))
        if advance is not None:
            advance()
    if not boxes:
        return torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64)
    return torch.cat(boxes), torch.cat(sizes)
