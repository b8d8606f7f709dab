"""Deterministic data loading for training: the order and the augmentation of every sample depend
only on ``(seed, epoch, index)``, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would have seen, whatever the number of DataLoader workers.

* :class:`EpochSampler` — a per-epoch permutation seeded by ``(seed, epoch)`` (Lightning calls
  ``set_epoch``), sharded over DDP ranks like ``DistributedSampler`` (padded to equal length for
  training, unpadded for evaluation). It yields ``epoch * len(dataset) + index`` so that
  :class:`SeededDataset` knows the epoch even inside a worker process.
* :class:`SeededDataset` — runs the wrapped dataset's ``__getitem__`` (and so its random
  augmentations, which draw from torch's global generator) under a generator seeded by
  ``(seed, epoch, index)``, restoring the caller's RNG state afterwards.
* :class:`DetectionDataModule` — the ``LightningDataModule`` that builds the loaders with both.

Example:
    >>> s = EpochSampler(5, seed=0, shuffle=True)
    >>> s.set_epoch(1)
    >>> sorted(k - 5 for k in s)
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fewsight.data.collate import collate_detection
from fewsight.errors import InvalidArgumentError

__all__ = ["DetectionDataModule", "EpochSampler", "SeededDataset", "sample_seed"]

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, index)`` (splitmix64-style, no Python ``hash``)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK64
    x ^= x >> 29
    return x


class EpochSampler(Sampler[int]):
    """Indices of a dataset of ``size`` items for one epoch, encoded as ``epoch * size + index``.

    Args:
        size: dataset length.
        seed: shuffling seed (the permutation of epoch ``e`` depends only on ``(seed, e)``).
        shuffle: permute (training) or keep the order (evaluation).
        rank, world_size: DDP shard ``rank`` of ``world_size`` (every ``world_size``-th item).
        pad: repeat leading items so every rank gets ``ceil(size / world_size)`` (DDP training
            needs equal batch counts); evaluation shards without padding so no image counts twice.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if size < 0:
            raise InvalidArgumentError(f"size: expected >= 0, got {size}")
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world_size, self.pad = int(rank), int(world_size), bool(pad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1 and self.size > 0:
            total = -(-self.size // self.world_size) * self.world_size
            order = (order * (total // max(len(order), 1) + 1))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.size
        return iter([offset + i for i in self._indices()])

    def __len__(self) -> int:
        if self.pad and self.world_size > 1:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class SeededDataset(Dataset[Any]):
    """Wraps ``dataset`` so item ``epoch * len + i`` is ``dataset[i]`` drawn under ``sample_seed(seed, epoch, i)``.

    Plain indices ``0 <= k < len`` are epoch 0. The caller's torch CPU RNG state is restored.
    """

    def __init__(self, dataset: Dataset[Any], seed: int = 0) -> None:
        if not isinstance(dataset, Sized):
            raise InvalidArgumentError(f"dataset: expected a map-style dataset with len(), got {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        n = len(self)
        epoch, index = divmod(int(key), n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped dataset's attributes (classes, num_classes, ...).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _Decoded(Dataset[Any]):
    """Evaluation view: strips the epoch from ``EpochSampler`` keys."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        return self.dataset[int(key) % len(self)]


class DetectionDataModule(L.LightningDataModule):
    """Train / val loaders with :class:`EpochSampler` (use with ``Trainer(use_distributed_sampler=False)``;
    DDP sharding uses the trainer's ``global_rank`` / ``world_size``)."""

    def __init__(
        self,
        train: Dataset[Any],
        val: Dataset[Any] | None = None,
        *,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set = train
        self.val_set = val
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)

    def _shard(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: Dataset[Any], sampler: EpochSampler, batch_size: int) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        rank, world = self._shard()
        sampler = EpochSampler(len(self.train_set), seed=self.seed, shuffle=True, rank=rank, world_size=world, pad=True)  # type: ignore[arg-type]
        return self._loader(SeededDataset(self.train_set, self.seed), sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        if self.val_set is None:
            return []
        rank, world = self._shard()
        sampler = EpochSampler(len(self.val_set), shuffle=False, rank=rank, world_size=world, pad=False)  # type: ignore[arg-type]
        return self._loader(_Decoded(self.val_set), sampler, self.val_batch_size)
