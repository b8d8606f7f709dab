"""``collate_detection``: the DataLoader ``collate_fn`` for detection samples.

Images of a batch may differ in size, so they are not stacked: the models accept a list of
``Tensor[3, H_i, W_i]`` and resize/pad internally, as in torchvision.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from fewsight.data import DigitsDataset
    >>> loader = DataLoader(DigitsDataset("train", 4), batch_size=2, collate_fn=collate_detection)
    >>> images, targets = next(iter(loader))
    >>> len(images), images[0].shape, sorted(targets[0])
    (2, torch.Size([3, 128, 128]), ['boxes', 'labels'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from fewsight.errors import InvalidArgumentError

__all__ = ["collate_detection"]


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])`` (no stacking, no copies)."""
    images: list[Tensor] = []
    targets: list[dict[str, Any]] = []
    for k, sample in enumerate(batch):
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
            raise InvalidArgumentError(
                f"batch[{k}]: expected an (image, target) pair, got {type(sample).__name__}"
            )
        images.append(sample[0])
        targets.append(sample[1])
    return images, targets
