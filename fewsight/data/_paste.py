"""Helpers shared by the synthetic canvas datasets (digits, emoji-logos): numpy, one canvas at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fewsight.errors import InvalidArgumentError

__all__ = ["check_canvas_args", "check_size", "iou_one_many", "place_box", "tight_crop"]


def check_size(name: str, value: Any, min_side: int = 1) -> tuple[int, int]:
    """``(H, W)`` from an int side or a pair; :class:`InvalidArgumentError` naming ``name`` otherwise."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        h, w = (int(s) for s in value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name}: expected an int or (H, W), got {value!r}") from None
    if h < min_side or w < min_side:
        raise InvalidArgumentError(f"{name}: expected sides >= {min_side}, got {(h, w)}")
    return h, w


def check_canvas_args(
    image_size: Any,
    object_size: tuple[str, Sequence[float]],
    counts: tuple[tuple[str, int], tuple[str, int]],
    num_images: int,
    fractions: Mapping[str, float],
    *,
    min_side: int = 1,
) -> tuple[int, int, float, float]:
    """The checks every canvas dataset makes: canvas ``(H, W)``, object sizes ``4 <= min <= max <= side``,
    ``1 <= min count <= max count``, ``num_images >= 0`` and each of ``fractions`` in ``[0, 1]``.

    Returns ``(H, W, min size, max size)``.

    >>> check_canvas_args(64, ("digit_size", (8, 32)), (("min_digits", 1), ("max_digits", 3)), 10, {"max_overlap": 0.1})
    (64, 64, 8.0, 32.0)
    """
    h, w = check_size("image_size", image_size, min_side)
    name, sizes = object_size
    lo, hi = (float(s) for s in sizes)
    if not 4 <= lo <= hi <= min(h, w):
        raise InvalidArgumentError(
            f"{name}: expected 4 <= min <= max <= the canvas side {min(h, w)}, got {tuple(sizes)}"
        )
    if num_images < 0:
        raise InvalidArgumentError(f"num_images: expected >= 0, got {num_images}")
    (lo_name, lo_count), (hi_name, hi_count) = counts
    if not 1 <= lo_count <= hi_count:
        raise InvalidArgumentError(
            f"{lo_name}, {hi_name}: expected 1 <= {lo_name} <= {hi_name}, got {lo_count}, {hi_count}"
        )
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise InvalidArgumentError(f"{key}: expected a value in [0, 1], got {value}")
    return h, w, lo, hi


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


def tight_crop(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """``pixels[H, W, ...]`` cut to the rectangle around ``mask[H, W]`` (``None`` when ``mask`` is empty):
    the box of a pasted object is then tight and nothing of the object lies outside it."""
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def place_box(
    rng: np.random.Generator, size: tuple[int, int], canvas: tuple[int, int], boxes: np.ndarray, max_overlap: float,
    tries: int = 30,
) -> np.ndarray | None:
    """An xyxy ``box[4]`` for an object of ``size`` ``(h, w)`` on a ``canvas`` ``(H, W)``, at a uniformly random
    place whose IoU with every one of ``boxes[N, 4]`` is at most ``max_overlap``; ``None`` after ``tries``
    misses or when the object does not fit."""
    (ah, aw), (h, w) = size, canvas
    if ah > h or aw > w:
        return None
    for _try in range(tries):
        y, x = int(rng.integers(0, h - ah + 1)), int(rng.integers(0, w - aw + 1))
        box = np.array([x, y, x + aw, y + ah], dtype=np.float64)
        if len(boxes) == 0 or iou_one_many(box, boxes).max() <= max_overlap:
            return box
    return None
