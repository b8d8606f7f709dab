"""Seeded k-shot support sets: ``k`` annotated instances per class drawn from a dataset.

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

from fewsight.errors import InvalidArgumentError

__all__ = ["SupportSet", "all_boxes_support", "sample_support"]


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
