"""Data of an embedder training run: the crop datasets of a config and the Lightning data module.

* :func:`build_embedder_data` — training crops (augmented), validation crops (held-out classes, plain)
  and test crops (the emoji novel classes; else the validation classes) of an
  :class:`~fewsight.train.embedder_config.EmbedderDataConfig`.
* :class:`EmbedderDataModule` — training batches from
  :class:`~fewsight.data.samplers.ClassBalancedBatchSampler` (P classes × K items, K split across
  domains; sharded per DDP rank), validation in order. Items are ``(image, label, domain)``
  (``domain`` ``-1`` without domains); the epoch travels in the sampler's keys, so augmentations
  depend only on ``(seed, epoch, index)`` in any worker process.

Example:
    >>> from fewsight.train.embedder_config import embedder_config_from_dict
    >>> cfg = embedder_config_from_dict({"data": {"type": "crops", "size": 32, "val_classes": 2,
    ...     "dataset": {"type": "digits", "num_images": 6, "image_size": 96}}})
    >>> data = build_embedder_data(cfg.data, seed=0)
    >>> data.train.num_classes + data.val.num_classes
    10
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from fewsight.data.crops import BoxCrops, ImageFolderCrops, item_domains
from fewsight.data.samplers import ClassBalancedBatchSampler
from fewsight.errors import ConfigError
from fewsight.train.embedder_config import EmbedderDataConfig

__all__ = ["EmbedderData", "EmbedderDataModule", "build_embedder_data", "held_out_classes"]

#: Seed of the fixed draw of held-out validation classes (independent of the run's seed, so runs of
#: different seeds validate on the same classes).
VAL_DRAW_SEED = 2026


@dataclass
class EmbedderData:
    """Crop datasets of a run (``val`` / ``test`` ``None`` when there are none)."""

    train: Any
    val: Any = None
    test: Any = None


def held_out_classes(num_classes: int, n: int) -> tuple[list[int], list[int]]:
    """``(kept, held_out)`` class positions: ``n`` of ``num_classes`` drawn with a fixed seed."""
    if not 0 <= n < num_classes:
        raise ConfigError(f"data.val_classes: expected 0..{num_classes - 1} (classes available), got {n}")
    held = set(np.random.default_rng(VAL_DRAW_SEED).permutation(num_classes)[:n].tolist())
    return [i for i in range(num_classes) if i not in held], sorted(held)


def _emoji(cfg: EmbedderDataConfig, seed: int) -> EmbedderData:
    from fewsight.data.emoji import EmojiCrops, emoji_classes

    root = cfg.root or "data/emoji"
    catalog = emoji_classes(root)
    base, novel = list(catalog.base), list(catalog.novel)
    if cfg.max_classes:
        base, novel = base[: cfg.max_classes], novel[: cfg.max_classes]
    kept, held = held_out_classes(len(base), cfg.val_classes)
    a = cfg.augment
    train = EmojiCrops(
        root, [base[i] for i in kept], cfg.styles, size=cfg.size, augment=a.enabled, scale=tuple(a.scale),
        jitter=a.jitter, fill=a.fill, split="train", seed=seed,
    )  # fmt: skip
    test = EmojiCrops(root, novel, cfg.styles, size=cfg.size, fill=1.0)
    val = EmojiCrops(root, [base[i] for i in held], cfg.styles, size=cfg.size, fill=1.0) if held else test
    return EmbedderData(train, val, test)


def _split_classes(make: Any, num_classes: int, cfg: EmbedderDataConfig) -> EmbedderData:
    kept, held = held_out_classes(num_classes, cfg.val_classes)
    a = cfg.augment
    train = make(kept, augment=a.enabled, scale=tuple(a.scale), jitter=a.jitter, fill=a.fill)
    val = make(held, augment=False, fill=a.fill) if held else None
    return EmbedderData(train, val, val)


def build_embedder_data(cfg: EmbedderDataConfig, *, seed: int = 0) -> EmbedderData:
    """The train / val / test crop datasets ``cfg`` describes (see the module docstring)."""
    if cfg.type == "emoji":
        return _emoji(cfg, seed)
    if cfg.type == "crops":
        from fewsight.train.builders import build_dataset

        assert cfg.dataset is not None  # checked by the config
        detection = build_dataset(cfg.dataset)
        names = list(detection.classes)[: cfg.max_classes] if cfg.max_classes else list(detection.classes)

        def make(classes: Sequence[int], **kw: Any) -> BoxCrops:
            return BoxCrops(detection, cfg.size, context=cfg.context, classes=classes, seed=seed, **kw)

        return _split_classes(make, len(names), cfg)
    assert cfg.root is not None  # checked by the config
    every = ImageFolderCrops(cfg.root, cfg.size, domains=cfg.domains).classes
    names = every[: cfg.max_classes] if cfg.max_classes else every

    def folder(classes: Sequence[int], **kw: Any) -> ImageFolderCrops:
        return ImageFolderCrops(cfg.root, cfg.size, domains=cfg.domains, classes=[names[i] for i in classes], seed=seed, **kw)  # type: ignore[arg-type]

    return _split_classes(folder, len(names), cfg)


class _EpochItems(Dataset[Any]):
    """``(image, label, domain)`` items; key ``epoch * len + i`` is item ``i`` with the augmentations of
    ``epoch`` (plain keys ``< len`` are epoch 0)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        domains = item_domains(dataset)
        self.domains = np.full(len(dataset), -1, dtype=np.int64) if domains is None else domains

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> tuple[Any, int, int]:
        epoch, index = divmod(int(key), len(self.dataset))
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)
        image, label = self.dataset[index]
        return image, int(label), int(self.domains[index])


class EmbedderDataModule(L.LightningDataModule):
    """Class-balanced training batches and ordered validation batches (use with
    ``Trainer(use_distributed_sampler=False)``; DDP ranks take disjoint training batches and each
    validates the whole set, so every rank computes the same retrieval figures)."""

    def __init__(
        self,
        train: Any,
        val: Any = None,
        *,
        classes_per_batch: int = 64,
        items_per_class: int = 2,
        passes: int | None = None,
        val_batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.p, self.k, self.passes = int(classes_per_batch), int(items_per_class), passes
        self.val_batch_size, self.num_workers, self.seed = int(val_batch_size), int(num_workers), int(seed)

    def _shard(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))

    def train_sampler(self) -> ClassBalancedBatchSampler:
        rank, world = self._shard()
        return ClassBalancedBatchSampler(
            self.train_set.labels, self.p, self.k, domains=item_domains(self.train_set), passes=self.passes,
            seed=self.seed, rank=rank, world_size=world, encode_epoch=True,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(_EpochItems(self.train_set), batch_sampler=self.train_sampler(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        if self.val_set is None:
            return []
        return DataLoader(_EpochItems(self.val_set), batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers)
