"""Helpers shared by the synthetic canvas datasets (digits, emoji-logos): numpy, one canvas at a time."""

from __future__ import annotations

import numpy as np

__all__ = ["iou_one_many"]


def iou_one_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box[4]`` with ``boxes[N, 4]`` -> ``[N]`` (placement checks while pasting)."""
    if len(boxes) == 0:
        return np.zeros(0)
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / (area + areas - inter)
