"""The emoji-logos datasets: :class:`EmojiLogosDataset` (detection canvases) and :class:`EmojiCrops`.

A logo-detection and metric-learning benchmark (a FlickrLogos-32 stand-in): train on base classes in
one style, enroll or retrieve novel classes from a few examples of the other style.

**Determinism.** Item ``i`` of a split depends only on ``(seed, split, i)`` (and the epoch for
:class:`EmojiCrops`), through a per-item numpy generator, whatever the access order or the number of
DataLoader workers.

Boxes are xyxy in pixel-edge coordinates (``(x1, y1, x2, y2)`` covers columns ``x1 .. x2 - 1``) and
tight around the pasted emoji's alpha ``>= alpha_threshold``; nothing of the emoji is drawn outside.

Example (needs the data: ``make emoji-data``):
    >>> ds = EmojiLogosDataset("data/emoji", "train", num_images=100, classes="base", style="google")
    ... # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    >>> image.shape, ds.num_classes  # doctest: +SKIP
    (torch.Size([3, 256, 256]), 956)

Without the data the error says what to do:
    >>> from fewsight.errors import DataError
    >>> try:
    ...     EmojiLogosDataset("/nonexistent/emoji")
    ... except DataError as e:
    ...     print(e.reason.split(":")[0])
    emoji data not found
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewsight.data._paste import check_canvas_args, check_size, place_box, tight_crop
from fewsight.data.dataset import DetectionDataset, Target, check_index
from fewsight.data.emoji.catalog import DEFAULT_ROOT, STYLES, _EmojiSource
from fewsight.data.emoji.rendering import (
    BACKGROUNDS,
    SPLITS,
    _blend,
    _jitter,
    _photo_crop,
    _resize_rgba,
    load_photos,
)
from fewsight.errors import InvalidArgumentError, check_choice

__all__ = [
    "EmojiCanvas",
    "EmojiCrops",
    "EmojiLogosDataset",
]

_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


# -- detection canvases ---------------------------------------------------------------------------
class EmojiCanvas(NamedTuple):
    """A rendered canvas before conversion to tensors (see :meth:`EmojiLogosDataset.render`).

    ``image``: float32[H, W, 3] in [0, 1]; ``boxes``: float32[N, 4] xyxy; ``labels``: int64[N] (indices
    into ``dataset.classes``); ``styles``: int64[N] (indices into :data:`STYLES`); ``masks``:
    bool[N, H, W] alpha ``>= alpha_threshold`` of each pasted emoji (only when requested).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    styles: np.ndarray
    masks: np.ndarray | None


class EmojiLogosDataset(DetectionDataset):
    """Emoji pasted on real photographs: a logo-detection benchmark (see the module docstring).

    Args:
        root: the folder written by :func:`install_emoji` (``make emoji-data``).
        split: ``"train"``, ``"val"`` or ``"test"``: photo bands and item seeds.
        num_images: number of canvases (the dataset length).
        image_size: canvas side ``S`` or ``(H, W)``.
        min_objects, max_objects: emoji per canvas, uniform in ``[min, max]`` (one that finds no free
            place after 30 tries is left out, so rarely fewer).
        emoji_size: ``(min, max)`` longer side in pixels of a pasted emoji's visible part.
        classes: ``"all"``, ``"base"``, ``"novel"`` or a sequence of class indices (into
            ``emoji_classes(root).names``) or short names, in label order.
        style: ``"google"``, ``"twitter"``, ``"both"`` (drawn at random per object) or a sequence.
        seed: canvas seed; canvas ``i`` depends only on ``(seed, split, i)``.
        max_overlap: largest IoU allowed between two emoji boxes.
        background: ``"photo"`` (scikit-image photographs) or ``"plain"`` (one random colour, for tests
            and figures).
        alpha_threshold: opacity at which an emoji pixel counts for the tight box.
        transforms: optional ``(image, target) -> (image, target)`` v2-style callable.

    Attributes: ``classes`` (short names, label order), ``class_indices`` (their indices in
    :func:`emoji_classes`), ``unified`` (their code points), ``styles``.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        split: str = "train",
        num_images: int = 1000,
        *,
        image_size: int | tuple[int, int] = 256,
        min_objects: int = 1,
        max_objects: int = 6,
        emoji_size: tuple[float, float] = (20.0, 80.0),
        classes: str | Sequence[int | str] = "all",
        style: str | Sequence[str] = "both",
        seed: int = 0,
        max_overlap: float = 0.1,
        background: str = "photo",
        alpha_threshold: float = 0.25,
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("background", background, BACKGROUNDS)
        h, w, lo, hi = check_canvas_args(
            image_size, ("emoji_size", emoji_size), (("min_objects", min_objects), ("max_objects", max_objects)),
            num_images, {"max_overlap": max_overlap, "alpha_threshold": alpha_threshold}, min_side=8,
        )
        self._source = _EmojiSource(root, classes, style)
        catalog = self._source.catalog
        super().__init__([catalog.names[i] for i in self._source.class_indices], transforms=transforms)
        self.root = self._source.root
        self.class_indices: tuple[int, ...] = self._source.class_indices
        self.unified: tuple[str, ...] = tuple(catalog.unified[i] for i in self.class_indices)
        self.styles: tuple[str, ...] = self._source.styles
        self.split = split
        self.num_images = int(num_images)
        self.image_size = (h, w)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.emoji_size = (lo, hi)
        self.seed = int(seed)
        self.max_overlap = float(max_overlap)
        self.background = background
        self.alpha_threshold = float(alpha_threshold)
        if background == "photo":
            load_photos()  # fail at construction, not in a DataLoader worker

    def __len__(self) -> int:
        return self.num_images

    def _generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], int(index), 0xE3031])

    def render(self, index: int, *, masks: bool = False) -> EmojiCanvas:
        """Render canvas ``index`` as numpy arrays, optionally with per-emoji alpha masks."""
        index = self._check_index(index)
        rng = self._generator(index)
        h, w = self.image_size
        lo, hi = self.emoji_size
        src = self._source

        # 1. Layout: class, style, size and place of each emoji (tight boxes decided here).
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        boxes = np.zeros((0, 4), dtype=np.float64)
        labels: list[int] = []
        styles: list[int] = []
        pastes: list[tuple[np.ndarray, int, int]] = []
        for _ in range(n):
            label = int(rng.integers(self.num_classes))
            s = int(rng.integers(len(self.styles)))
            content = src.content(s, label)
            ch, cw = content.shape[:2]
            side = rng.uniform(lo, hi)
            f = side / max(ch, cw)
            rgba = _resize_rgba(content, max(int(round(cw * f)), 1), max(int(round(ch * f)), 1))
            rgba = tight_crop(rgba, rgba[..., 3] >= self.alpha_threshold)  # trimmed to the thresholded alpha
            if rgba is None:
                continue
            box = place_box(rng, rgba.shape[:2], (h, w), boxes, self.max_overlap)
            if box is not None:
                boxes = np.concatenate((boxes, box[None]))
                labels.append(label)
                styles.append(STYLES.index(self.styles[s]))
                pastes.append((rgba, int(box[1]), int(box[0])))

        # 2. Background, 3. emoji in drawing order (later ones on top).
        if self.background == "photo":
            canvas = _photo_crop(rng, self.split, h, w)
        else:
            canvas = np.empty((h, w, 3), dtype=np.float32)
            canvas[:] = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        for rgba, y, x in pastes:
            _blend(canvas, rgba, y, x)
        np.clip(canvas, 0.0, 1.0, out=canvas)

        mask_arr = None
        if masks:
            mask_arr = np.zeros((len(pastes), h, w), dtype=bool)
            for k, (rgba, y, x) in enumerate(pastes):
                mask_arr[k, y : y + rgba.shape[0], x : x + rgba.shape[1]] = rgba[..., 3] >= self.alpha_threshold
        return EmojiCanvas(
            canvas,
            boxes.astype(np.float32),
            np.asarray(labels, dtype=np.int64),
            np.asarray(styles, dtype=np.int64),
            mask_arr,
        )

    def load(self, index: int) -> tuple[Tensor, Target]:
        canvas = self.render(index)
        image = torch.from_numpy(np.ascontiguousarray(canvas.image.transpose(2, 0, 1)))
        return image, {"boxes": torch.from_numpy(canvas.boxes), "labels": torch.from_numpy(canvas.labels)}

    def __repr__(self) -> str:
        return (
            f"EmojiLogosDataset(root={str(self.root)!r}, split={self.split!r}, num_images={self.num_images}, "
            f"image_size={self.image_size}, num_classes={self.num_classes}, styles={self.styles}, seed={self.seed})"
        )


# -- crops for metric learning --------------------------------------------------------------------
class EmojiCrops(Dataset[tuple[Tensor, int]]):
    """One emoji per item, ``(Tensor[3, S, S] float32 in [0, 1], label)``, for metric learning.

    Items enumerate ``repeats x styles x classes`` (index ``i`` -> class ``i % K``, style
    ``(i // K) % len(styles)``, repeat ``i // (K * len(styles))``); ``labels`` and ``item_styles``
    hold them for samplers. Without ``augment`` an item is the 64x64 image resized to ``S`` over the
    background; with it the visible part is scaled to ``scale`` x ``S`` (longer side), placed at a
    random position, and its colours jittered (brightness / contrast / saturation within
    ``1 +- jitter``). Item ``i`` depends only on ``(seed, split, epoch, i)``; call :meth:`set_epoch`
    between epochs for fresh augmentations (as with ``DistributedSampler``).

    Args:
        root: the folder written by :func:`install_emoji`.
        classes: ``"all"``, ``"base"``, ``"novel"`` or class indices / short names, in label order.
        style: ``"google"``, ``"twitter"``, ``"both"`` or a sequence of styles.
        size: output side ``S``.
        split: which photo band backgrounds come from, and part of the item seed.
        repeats: copies of each (class, style) per epoch (useful with ``augment``).
        background: ``"plain"`` (``fill`` colour) or ``"photo"`` (a random crop of the split's band).
        fill: gray level of the plain background.
        augment: scale, shift and colour jitter.
        scale: ``(min, max)`` fraction of ``S`` for the emoji's longer side when augmenting.
        jitter: colour jitter amount in ``[0, 1)``.
        seed: item seed.

    Example (needs the data):
        >>> gallery = EmojiCrops("data/emoji", classes="novel", style="twitter")  # doctest: +SKIP
        >>> image, label = gallery[0]  # doctest: +SKIP
        >>> image.shape, gallery.classes == EmojiCrops("data/emoji", "novel", "google").classes  # doctest: +SKIP
        (torch.Size([3, 64, 64]), True)
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        classes: str | Sequence[int | str] = "all",
        style: str | Sequence[str] = "both",
        *,
        size: int = 64,
        split: str = "train",
        repeats: int = 1,
        background: str = "plain",
        fill: float = 1.0,
        augment: bool = False,
        scale: tuple[float, float] = (0.6, 1.0),
        jitter: float = 0.2,
        seed: int = 0,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("background", background, BACKGROUNDS)
        self.size = check_size("size", size, min_side=8)[0]
        if isinstance(size, (tuple, list)) and len(set(size)) != 1:
            raise InvalidArgumentError(f"size: expected one side (square crops), got {size!r}")
        if repeats < 1:
            raise InvalidArgumentError(f"repeats: expected >= 1, got {repeats}")
        if not 0.0 <= fill <= 1.0:
            raise InvalidArgumentError(f"fill: expected a value in [0, 1], got {fill}")
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise InvalidArgumentError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 <= jitter < 1.0:
            raise InvalidArgumentError(f"jitter: expected a value in [0, 1), got {jitter}")
        self._source = _EmojiSource(root, classes, style)
        catalog = self._source.catalog
        self.root = self._source.root
        self.class_indices: tuple[int, ...] = self._source.class_indices
        self.classes: list[str] = [catalog.names[i] for i in self.class_indices]
        self.unified: tuple[str, ...] = tuple(catalog.unified[i] for i in self.class_indices)
        self.styles: tuple[str, ...] = self._source.styles
        self.split = split
        self.repeats = int(repeats)
        self.background = background
        self.fill = float(fill)
        self.augment = bool(augment)
        self.scale = (lo, hi)
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.epoch = 0
        k, s = len(self.classes), len(self.styles)
        index = np.arange(k * s * self.repeats)
        self.labels: np.ndarray = index % k
        self.item_styles: np.ndarray = (index // k) % s
        if background == "photo":
            load_photos()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch`` (items stay deterministic given the epoch)."""
        self.epoch = int(epoch)

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self))

    def render(self, index: int) -> np.ndarray:
        """Item ``index`` as ``float32[S, S, 3]``."""
        i = self._check_index(index)
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], self.epoch, i, 0xC20B])
        label, s, side = int(self.labels[i]), int(self.item_styles[i]), self.size
        if self.background == "photo":
            canvas = _photo_crop(rng, self.split, side, side)
        else:
            canvas = np.full((side, side, 3), self.fill, dtype=np.float32)
        if not self.augment:
            rgba = _resize_rgba(self._source.images[s][label], side, side)
            _blend(canvas, rgba, 0, 0)
            return canvas
        content = self._source.content(s, label)
        ch, cw = content.shape[:2]
        f = rng.uniform(*self.scale) * side / max(ch, cw)
        rw, rh = min(max(int(round(cw * f)), 1), side), min(max(int(round(ch * f)), 1), side)
        rgba = _resize_rgba(content, rw, rh)
        if self.jitter > 0:
            rgba[..., :3] = _jitter(rgba[..., :3], rgba[..., 3], rng, self.jitter)
        y, x = int(rng.integers(0, side - rh + 1)), int(rng.integers(0, side - rw + 1))
        _blend(canvas, rgba, y, x)
        return np.clip(canvas, 0.0, 1.0, out=canvas)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = self._check_index(index)
        image = torch.from_numpy(np.ascontiguousarray(self.render(i).transpose(2, 0, 1)))
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"EmojiCrops(root={str(self.root)!r}, num_classes={self.num_classes}, styles={self.styles}, "
            f"size={self.size}, len={len(self)}, augment={self.augment}, background={self.background!r})"
        )
