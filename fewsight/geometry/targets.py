"""Detection targets at the API boundary: list of dicts or padded ``[B, M, 5]`` -> padded tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, as_tensor, check_finite

__all__ = ["PaddedTargets", "pad_targets"]


class PaddedTargets(NamedTuple):
    """``boxes: Tensor[B, G, 4]``, ``labels: Long[B, G]`` (-1 in padding), ``valid: Bool[B, G]``."""

    boxes: Tensor
    labels: Tensor
    valid: Tensor


def pad_targets(
    targets: Sequence[Mapping[str, Tensor]] | Tensor,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PaddedTargets:
    """Convert targets to padded tensors, the form every batched op takes.

    ``targets`` is either a list (one per image) of ``{"boxes": Tensor[N_i, 4], "labels": Tensor[N_i]}``
    as in torchvision, or a padded ``Tensor[B, M, 5]`` of ``(x1, y1, x2, y2, label)`` whose unused rows
    carry label ``-1``. ``G`` is the largest ``N_i`` (0 when no image has a box). Labels ``< 0`` in
    a list are kept as ``-1`` padding-like rows and marked invalid, consistent with the padded form.
    Nested lists are converted to tensors and integer boxes are promoted to ``dtype``. A NaN / +-inf
    coordinate in a real row (any row of a list; a row with label ``>= 0`` of the padded form) raises
    ``NonFiniteError`` naming the image; padding rows are not read.

    >>> t = pad_targets([{"boxes": torch.tensor([[0., 0., 4., 4.]]), "labels": torch.tensor([2])},
    ...                  {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    >>> t.boxes.shape, t.labels.tolist(), t.valid.tolist()
    (torch.Size([2, 1, 4]), [[2], [-1]], [[True], [False]])
    """
    if isinstance(targets, Tensor):
        if targets.ndim != 3 or targets.shape[-1] != 5:
            raise ShapeError(f"targets: expected Tensor[B, M, 5] (x1, y1, x2, y2, label), got shape {tuple(targets.shape)}")
        if not targets.is_floating_point():
            raise DTypeError(f"targets: expected a floating tensor [B, M, 5], got dtype {targets.dtype}")
        check_finite("targets labels (column 4)", targets[..., 4])
        labels = targets[..., 4].round().long()
        valid = labels >= 0
        check_finite("targets boxes (rows with label >= 0)", targets[..., :4][valid])
        return PaddedTargets(
            targets[..., :4].to(device=device or targets.device, dtype=dtype),
            labels.where(valid, torch.full_like(labels, -1)).to(device=device or targets.device),
            valid.to(device=device or targets.device),
        )
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
        raise InvalidArgumentError(
            f"targets: expected a list of {{'boxes', 'labels'}} dicts or Tensor[B, M, 5], got {type(targets).__name__}"
        )
    boxes_list, labels_list = [], []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            raise InvalidArgumentError(f"targets[{i}]: expected a dict with 'boxes' and 'labels', got {type(t).__name__}")
        b = as_tensor(f"targets[{i}]['boxes']", t["boxes"], expected="Tensor[N, 4]")
        lab = as_tensor(f"targets[{i}]['labels']", t["labels"], expected="Tensor[N]", dtype=torch.long if not isinstance(t["labels"], Tensor) else None)
        if b.ndim == 1 and b.numel() == 0:
            b = b.reshape(0, 4)  # [] for an image without boxes
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ShapeError(f"targets[{i}]['boxes']: expected Tensor[N, 4], got shape {tuple(b.shape)}")
        if lab.shape != b.shape[:1]:
            raise ShapeError(f"targets[{i}]['labels']: expected Tensor[{b.shape[0]}], got shape {tuple(lab.shape)}")
        if lab.is_floating_point():
            raise DTypeError(f"targets[{i}]['labels']: expected an integer tensor, got dtype {lab.dtype}")
        if b.is_complex():
            raise DTypeError(f"targets[{i}]['boxes']: expected a real tensor, got dtype {b.dtype}")
        check_finite(f"targets[{i}]['boxes']", b)
        boxes_list.append(b)
        labels_list.append(lab)
    if device is None:
        device = boxes_list[0].device if boxes_list else torch.device("cpu")
    batch = len(boxes_list)
    g = max((b.shape[0] for b in boxes_list), default=0)
    boxes = torch.zeros((batch, g, 4), dtype=dtype, device=device)
    labels = torch.full((batch, g), -1, dtype=torch.long, device=device)
    if g > 0:
        # One copy for the whole batch: the ragged rows are concatenated and scattered by index.
        counts = torch.tensor([b.shape[0] for b in boxes_list], device=device)
        image = torch.repeat_interleave(torch.arange(batch, device=device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        slot = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(offsets, counts)
        boxes[image, slot] = torch.cat(boxes_list).to(device=device, dtype=dtype)
        labels[image, slot] = torch.cat(labels_list).to(device=device, dtype=torch.long)
    valid = labels >= 0
    labels = labels.where(valid, torch.full_like(labels, -1))
    return PaddedTargets(boxes, labels, valid)
