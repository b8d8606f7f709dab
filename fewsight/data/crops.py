"""Crop datasets for metric learning: one object per item, ``(Tensor[3, S, S] float32 in [0, 1], label)``.

* :class:`BoxCrops` — the boxes of any detection dataset (the :class:`~fewsight.data.DetectionDataset`
  contract), each cut out with an optional context margin and resized to ``S × S``.
* :class:`ImageFolderCrops` — whole images in torchvision's ``ImageFolder`` layout
  (``root/<class>/<image>``), or one such tree per domain (``root/<domain>/<class>/<image>``, classes
  matched by folder name across domains).
* :func:`crop_augmentation` — the training augmentation both use (torchvision.transforms.v2): the
  object shrunk to a random fraction of the side and shifted over a plain background, and colour jitter.
  The emoji styles dataset, :class:`fewsight.data.emoji.EmojiCrops`, follows the same item contract.

Every crop dataset exposes ``labels`` (``int64[N]``), ``classes``, ``num_classes``, ``item_domains``
(``int64[N]`` domain of each item, or ``None`` when the data has no domains; what class-balanced
samplers pair across) and ``set_epoch(epoch)``: item ``i`` depends only on ``(seed, epoch, i)``, so
an epoch's augmentations are reproducible in any worker process.

Example:
    >>> from fewsight.data.digits import DigitsDataset
    >>> crops = BoxCrops(DigitsDataset("train", num_images=4, image_size=96), size=32, augment=True)
    >>> image, label = crops[0]
    >>> image.shape, crops.labels.shape == (len(crops),), crops.item_domains is None
    (torch.Size([3, 32, 32]), True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fewsight.data.dataset import check_index, load_image
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["BoxCrops", "ImageFolderCrops", "crop_augmentation", "item_domains"]


def item_domains(dataset: Any) -> np.ndarray | None:
    """The domain index of each item of a crop dataset (``item_domains``, or EmojiCrops' ``item_styles``
    when it has several styles), or ``None`` when the data has a single domain."""
    domains = getattr(dataset, "item_domains", None)
    if domains is None and len(getattr(dataset, "styles", ())) > 1:
        domains = dataset.item_styles
    return None if domains is None else np.asarray(domains, dtype=np.int64)


def crop_augmentation(scale: Sequence[float] = (0.8, 1.0), jitter: float = 0.2, fill: float = 1.0) -> v2.Compose:
    """Training augmentation of a square crop ``Tensor[3, S, S]``: shrunk to a random fraction in ``scale``
    of the side and placed at a random position over a ``fill`` background (objects are matched
    whatever their size and place in the crop), then brightness / contrast / saturation jitter of
    ``± jitter``. Draws from torch's global generator.

    Example:
        >>> import torch
        >>> crop_augmentation()(torch.rand(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """
    lo, hi = (float(v) for v in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise InvalidArgumentError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0.0 <= jitter < 1.0:
        raise InvalidArgumentError(f"jitter: expected a value in [0, 1), got {jitter}")
    if not 0.0 <= fill <= 1.0:
        raise InvalidArgumentError(f"fill: expected a value in [0, 1], got {fill}")
    steps: list[Any] = [v2.RandomAffine(degrees=0.0, translate=((1.0 - lo) / 2, (1.0 - lo) / 2), scale=(lo, hi), fill=fill)]
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return v2.Compose(steps)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index), 0xC809]).generate_state(1)[0])


class _CropBase(Dataset[tuple[Tensor, int]]):
    """Shared item logic: ``self._raw(i)`` (``Tensor[3, S, S]``) → seeded augmentation → ``(image, label)``."""

    labels: np.ndarray
    item_domains: np.ndarray | None
    classes: list[str]

    def __init__(self, size: int, augment: bool, scale: Sequence[float], jitter: float, fill: float, seed: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise InvalidArgumentError(f"size: expected an int >= 8, got {size!r}")
        self.size, self.augment, self.seed, self.epoch, self.fill = size, bool(augment), int(seed), 0, float(fill)
        self.transform = crop_augmentation(scale, jitter, fill) if augment else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch``."""
        self.epoch = int(epoch)

    def _raw(self, index: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _square(self, image: Tensor) -> Tensor:
        """Resize ``Tensor[3, h, w]`` so its longer side is ``S`` and centre it on the ``fill`` background."""
        h, w = image.shape[-2:]
        f = self.size / max(h, w)
        nh, nw = max(1, min(self.size, round(h * f))), max(1, min(self.size, round(w * f)))
        small = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        out = torch.full((3, self.size, self.size), self.fill)
        top, left = (self.size - nh) // 2, (self.size - nw) // 2
        out[:, top : top + nh, left : left + nw] = small.clamp(0.0, 1.0)
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = check_index(index, len(self))
        image = self._raw(i)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_item_seed(self.seed, self.epoch, i))
                image = self.transform(image).clamp(0.0, 1.0)
        return image.contiguous(), int(self.labels[i])


class BoxCrops(_CropBase):
    """Every box of a detection dataset as a square crop of side ``size``.

    Args:
        dataset: a detection dataset (``ds[i] -> (image, {"boxes", "labels"})``, ``ds.classes``); boxes are
            listed once at construction through ``get_target`` when it has one (file readers do not decode
            images for it), else ``ds[i]``.
        size: crop side ``S``; the box (plus ``context``) is resized so its longer side is ``S``, centred.
        context: margin added around each box, as a fraction of its width / height on each side.
        classes: keep only boxes of these class indices (relabelled ``0..len-1`` in this order);
            default all.
        domains: optional ``int[len(dataset)]`` domain of each image (its boxes inherit it).
        augment, scale, jitter, fill: see :func:`crop_augmentation` (``fill`` is also the background of
            non-square crops).
        seed: augmentation seed.
    """

    def __init__(
        self,
        dataset: Any,
        size: int = 64,
        *,
        context: float = 0.0,
        classes: Sequence[int] | None = None,
        domains: Sequence[int] | None = None,
        augment: bool = False,
        scale: Sequence[float] = (0.8, 1.0),
        jitter: float = 0.2,
        fill: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(size, augment, scale, jitter, fill, seed)
        if not context >= 0:
            raise InvalidArgumentError(f"context: expected a margin >= 0, got {context!r}")
        names = [str(c) for c in dataset.classes]
        keep = list(range(len(names))) if classes is None else [int(c) for c in classes]
        if any(not 0 <= c < len(names) for c in keep):
            raise InvalidArgumentError(f"classes: expected indices in [0, {len(names)}), got {keep}")
        if domains is not None and len(domains) != len(dataset):
            raise InvalidArgumentError(f"domains: expected one per image ({len(dataset)}), got {len(domains)}")
        relabel = torch.full((len(names),), -1, dtype=torch.long)
        relabel[keep] = torch.arange(len(keep))
        get = getattr(dataset, "get_target", None)
        images, boxes, labels = [], [], []
        for i in range(len(dataset)):
            target = get(i) if callable(get) else dataset[i][1]
            lab = relabel[target["labels"].long()]
            ok = lab >= 0
            images.append(torch.full((int(ok.sum()),), i, dtype=torch.long))
            boxes.append(target["boxes"].float().reshape(-1, 4)[ok])
            labels.append(lab[ok])
        self.dataset, self.context = dataset, float(context)
        self.classes = [names[c] for c in keep]
        self.image_index = torch.cat(images).numpy() if images else np.zeros(0, np.int64)
        self.boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
        self.labels = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
        self.item_domains = None if domains is None else np.asarray(domains, dtype=np.int64)[self.image_index]

    def _raw(self, index: int) -> Tensor:
        image = self.dataset[int(self.image_index[index])][0]
        x1, y1, x2, y2 = self.boxes[index].tolist()
        mx, my = (x2 - x1) * self.context, (y2 - y1) * self.context
        h, w = image.shape[-2:]
        l, t = max(0, int(x1 - mx)), max(0, int(y1 - my))
        r, b = min(w, max(l + 1, int(round(x2 + mx)))), min(h, max(t + 1, int(round(y2 + my))))
        return self._square(image[:, t:b, l:r])

    def __repr__(self) -> str:
        return f"BoxCrops(len={len(self)}, num_classes={self.num_classes}, size={self.size}, augment={self.augment})"


class ImageFolderCrops(_CropBase):
    """Images of an ``ImageFolder`` tree (``root/<class>/<image>``), one item each, resized to ``S × S``.

    Args:
        root: the tree; with ``domains``, ``root/<domain>/<class>/<image>`` (one tree per domain, classes
            matched by folder name; a class may miss from a domain).
        size: output side (longer side resized to it, centred on ``fill``).
        domains: sub-folder names of the domains, in domain-index order; ``None``: no domains.
        classes: keep only these class names (in this order); default all, sorted.
        augment, scale, jitter, fill, seed: as :class:`BoxCrops`.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 64,
        *,
        domains: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        augment: bool = False,
        scale: Sequence[float] = (0.8, 1.0),
        jitter: float = 0.2,
        fill: float = 1.0,
        seed: int = 0,
    ) -> None:
        from torchvision.datasets import ImageFolder

        super().__init__(size, augment, scale, jitter, fill, seed)
        root = Path(root)
        trees = [root] if domains is None else [root / str(d) for d in domains]
        found: list[Any] = []
        for tree in trees:
            if not tree.is_dir():
                raise DataError(tree, "image folder not found")
            try:
                found.append(ImageFolder(str(tree), loader=str))  # paths only; decoded lazily
            except (FileNotFoundError, OSError) as exc:
                raise DataError(tree, f"not an ImageFolder tree ({exc})") from None
        names = sorted({c for f in found for c in f.classes}) if classes is None else [str(c) for c in classes]
        index = {c: k for k, c in enumerate(names)}
        paths, labels, doms = [], [], []
        for d, f in enumerate(found):
            for path, y in f.samples:
                name = f.classes[y]
                if name in index:
                    paths.append(path)
                    labels.append(index[name])
                    doms.append(d)
        missing = sorted(set(names) - {names[y] for y in labels})
        if missing:
            raise DataError(root, f"classes without any image: {missing[:10]}")
        self.root, self.paths, self.classes = root, paths, names
        self.labels = np.asarray(labels, dtype=np.int64)
        self.item_domains = None if domains is None else np.asarray(doms, dtype=np.int64)

    def _raw(self, index: int) -> Tensor:
        return self._square(load_image(self.paths[index]))

    def __repr__(self) -> str:
        return f"ImageFolderCrops(root={str(self.root)!r}, len={len(self)}, num_classes={self.num_classes}, size={self.size})"
