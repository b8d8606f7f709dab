"""``anchor_generator: auto``: a detector's anchors fitted to its training boxes before training.

:func:`network_boxes` reads a dataset's boxes (:func:`fewsight.data.dataset_boxes`) and scales them
as the detector's transform resizes their images, or their tiles for a
:class:`~fewsight.data.TiledDataset` (the network sees a tile, not the image); :func:`fit_anchors`
runs :func:`fewsight.geometry.propose_anchors` on them against the detector's own anchors, at its
matcher's foreground threshold. The result is a concrete ``anchor_generator`` mapping: the model's
file stores it, so a saved model never depends on the data again. ``fewsight anchors --config``
prints what a config's ``auto`` resolves to.

Example:
    >>> from fewsight.data import DigitsDataset
    >>> from fewsight.models import RetinaNet
    >>> model = RetinaNet(10, backbone="mobilenet_v2", levels=(3, 4, 5), fpn_channels=8)
    >>> p = fit_anchors(model, DigitsDataset("train", num_images=8, image_size=128))
    >>> p.recall >= p.current_recall, sorted(p.config())
    (True, ['aspect_ratios', 'levels', 'scales', 'sizes'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fewsight.data import TiledDataset, dataset_boxes
from fewsight.errors import DataError, InvalidArgumentError
from fewsight.geometry import AnchorGenerator, AnchorProposal, propose_anchors
from fewsight.models.transform import DetectionTransform

__all__ = ["AUTO", "MAX_IMAGES", "fit_anchors", "network_boxes", "scale_to_network"]

#: The ``model.anchor_generator`` value that asks for anchors fitted to the training set.
AUTO = "auto"
#: Images read to fit anchors (an even sample of larger datasets): box shapes settle long before.
MAX_IMAGES = 200


def network_boxes(
    model: nn.Module, dataset: Any, *, max_images: int | None = MAX_IMAGES, advance: Callable[[], None] | None = None
) -> tuple[Tensor, Tensor]:
    """``(boxes: Tensor[N, 4], image_sizes: Tensor[N, 2])`` float64: ``dataset``'s boxes and their images'
    sizes scaled to the pixels of ``model``'s input (:func:`scale_to_network` with its ``transform``,
    resizing each image, or each tile of a TiledDataset: a tile is resized, not the image)."""
    boxes, sizes = dataset_boxes(dataset, max_images=max_images, advance=advance)
    transform = getattr(model, "transform", None)
    if transform is None:
        return boxes, sizes
    return scale_to_network(boxes, sizes, transform, tile=dataset.size if isinstance(dataset, TiledDataset) else None)


def scale_to_network(
    boxes: Tensor, image_sizes: Tensor, transform: DetectionTransform, *, tile: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """``boxes: Tensor[N, 4]`` in images of ``image_sizes: Tensor[N, 2]`` ``(H, W)`` -> both in the pixels
    the network sees after ``transform`` resizes each image, or each ``tile`` ``(th, tw)`` of it.

    >>> from fewsight.models.transform import DetectionTransform
    >>> b, s = scale_to_network(torch.tensor([[0., 0., 40., 20.]]), torch.tensor([[200., 400.]]),
    ...                         DetectionTransform(max_size=800))
    >>> b.tolist(), s.tolist()
    ([[0.0, 0.0, 80.0, 40.0]], [[400.0, 800.0]])
    """
    if len(boxes) == 0:
        return boxes, image_sizes
    frames = image_sizes
    if tile is not None:
        # A tile smaller than the image; an image smaller than a tile is one tile of its own size.
        frames = torch.stack((image_sizes[:, 0].clamp(max=tile[0]), image_sizes[:, 1].clamp(max=tile[1])), dim=1)
    unique, inverse = torch.unique(frames, dim=0, return_inverse=True)
    resized = torch.tensor([transform.resized_size(int(h), int(w)) for h, w in unique.tolist()],
                           dtype=unique.dtype)
    scale = (resized / unique)[inverse]  # (s_y, s_x) per box
    boxes = boxes * torch.stack((scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]), dim=1)
    # Image coordinates even for tiles: the anchor grid is the same in every tile up to a shift of
    # less than a stride, which the best-possible recall of a box does not depend on much.
    return boxes, (image_sizes * scale).round().clamp(min=1)


def fit_anchors(
    model: nn.Module, dataset: Any, *, max_images: int | None = MAX_IMAGES, clusters: int = 9, seed: int = 0,
    advance: Callable[[], None] | None = None,
) -> AnchorProposal:
    """Anchors for ``model`` fitted to ``dataset`` (see the module docstring); never worse than the model's own.

    Raises :class:`~fewsight.errors.InvalidArgumentError` for a detector without an
    :class:`~fewsight.geometry.AnchorGenerator` (SSD's default boxes) and
    :class:`~fewsight.errors.DataError` for a dataset without boxes.
    """
    current = getattr(model, "anchor_generator", None)
    if not isinstance(current, AnchorGenerator):
        raise InvalidArgumentError(f"anchor_generator: '{AUTO}' fits an AnchorGenerator (RetinaNet, DLDENet); "
                                   f"{type(model).__name__} has {type(current).__name__}")
    boxes, sizes = network_boxes(model, dataset, max_images=max_images, advance=advance)
    if not bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all(dim=1).any()):
        raise DataError(type(dataset).__name__, "no boxes in the dataset: there are no anchors to fit")
    assigner = getattr(model, "assigner", None)
    threshold = float(getattr(assigner, "object_threshold", 0.5))
    return propose_anchors(boxes, sizes, current, clusters=min(clusters, len(boxes)), threshold=threshold, seed=seed)
