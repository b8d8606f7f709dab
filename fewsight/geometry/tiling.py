"""Tiles of a large image and the ground truth each tile holds (tiled training, sliced inference).

:func:`tile_grid` lays overlapping windows over an image; :func:`tile_targets` cuts a set of boxes
by those windows in one batched computation (a ``T x N`` visibility matrix, processed in blocks of
tiles so that memory stays bounded), returning a flat ``(tile, box)`` list that
:meth:`TileTargets.per_tile` splits into the torchvision-style per-tile targets.

Example:
    >>> windows = tile_grid(100, 150, 64, overlap=0.25)
    >>> windows.shape, windows[-1].tolist()
    (torch.Size([6, 4]), [86.0, 36.0, 150.0, 100.0])
    >>> t = tile_targets(torch.tensor([[30., 10., 60., 30.]]), torch.tensor([3]), windows, min_visibility=0.5)
    >>> t.tile.tolist(), t.ignore.tolist()
    ([0, 1], [False, True])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fewsight.errors import (
    DTypeError,
    InvalidArgumentError,
    ShapeError,
    as_floating,
    as_tensor,
    check_finite,
    check_last_dim,
    check_real,
)

__all__ = ["TileTargets", "tile_grid", "tile_starts", "tile_targets"]

# (tile, box) pairs per block of the visibility matrix: a few MB of work buffers.
_BLOCK = 1 << 20


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def _tile_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive_int("size", size), size
    try:
        values = tuple(size)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(f"size: expected an int or (height, width), got {size!r}") from None
    if len(values) != 2:
        raise InvalidArgumentError(f"size: expected an int or (height, width), got {size!r}")
    return _positive_int("size", values[0]), _positive_int("size", values[1])


def tile_starts(length: int, size: int, overlap: float = 0.2) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    Tiles of ``t = min(size, length)`` pixels every ``step = size - floor(overlap * size)`` pixels
    (at least 1), the last one moved back to end flush with the border: no tile leaves the image and
    consecutive tiles overlap by at least ``floor(overlap * size)`` pixels.

    >>> tile_starts(100, 40, 0.25)
    [0, 30, 60]
    >>> tile_starts(30, 40)
    [0]
    """
    length = _positive_int("length", length)
    size = _positive_int("size", size)
    overlap = check_real("overlap", overlap, low=0.0, high=1.0, high_open=True)
    step = size - math.floor(overlap * size)  # >= 1 because overlap < 1
    span = length - min(size, length)
    count = -(-span // step) + 1
    return [min(k * step, span) for k in range(count)]


def tile_grid(
    height: int,
    width: int,
    size: int | Sequence[int],
    overlap: float = 0.2,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Overlapping windows covering an ``height x width`` image -> ``Tensor[T, 4]`` xyxy, row-major.

    Every window is ``min(size, H) x min(size, W)`` pixels (``size`` an int or ``(h, w)``): an image
    smaller than a tile is one window, the image itself. Along each axis windows start every
    ``size - floor(overlap * size)`` pixels and the last row / column ends flush with the border
    (:func:`tile_starts`), so the windows cover the image and none leaves it. Order: row by row
    (``y`` outer, ``x`` inner), the order :func:`tile_targets` and sliced inference use.

    >>> w = tile_grid(50, 90, 40, overlap=0.5)
    >>> w[:4].tolist()
    [[0.0, 0.0, 40.0, 40.0], [20.0, 0.0, 60.0, 40.0], [40.0, 0.0, 80.0, 40.0], [50.0, 0.0, 90.0, 40.0]]
    >>> w[4:, 1].tolist(), tile_grid(30, 20, 64).tolist()
    ([10.0, 10.0, 10.0, 10.0], [[0.0, 0.0, 20.0, 30.0]])
    """
    th, tw = _tile_size(size)
    ys = torch.tensor(tile_starts(height, th, overlap), dtype=torch.float64)
    xs = torch.tensor(tile_starts(width, tw, overlap), dtype=torch.float64)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    windows = torch.stack((x, y, x + min(tw, width), y + min(th, height)), dim=-1)
    return windows.to(dtype=dtype, device=device)


class TileTargets(NamedTuple):
    """What :func:`tile_targets` returns: one row per (tile, box) pair where the box is visible.

    ``tile``: ``Long[K]`` tile index (rows sorted by tile, then by box); ``box``: ``Long[K]`` index of
    the input box; ``boxes``: ``Tensor[K, 4]`` the box clipped to the tile, in tile coordinates;
    ``labels``: ``Tensor[K]``; ``visibility``: ``Tensor[K]`` = area(box ∩ tile) / area(box);
    ``ignore``: ``Bool[K]``, the box is cut below ``min_visibility`` (its visible part is an ignore
    region for that tile, not a target); ``num_tiles``: ``T``.
    """

    tile: Tensor
    box: Tensor
    boxes: Tensor
    labels: Tensor
    visibility: Tensor
    ignore: Tensor
    num_tiles: int

    def per_tile(self) -> list[dict[str, Tensor]]:
        """``T`` dicts ``{"boxes": Tensor[N_t, 4], "labels": Tensor[N_t], "ignore_boxes": Tensor[R_t, 4]}``.

        One ``split`` of the flat rows by tile (the rows are already grouped by tile); the Python loop
        only builds the ``T`` dicts.
        """
        keep = ~self.ignore
        counts = torch.bincount(self.tile[keep], minlength=self.num_tiles).tolist()
        counts_ignored = torch.bincount(self.tile[self.ignore], minlength=self.num_tiles).tolist()
        boxes = self.boxes[keep].split(counts)
        labels = self.labels[keep].split(counts)
        ignored = self.boxes[self.ignore].split(counts_ignored)
        return [{"boxes": b, "labels": lab, "ignore_boxes": r} for b, lab, r in zip(boxes, labels, ignored)]


def _box_matrix(name: str, value: Any, expected: str) -> Tensor:
    t = as_tensor(name, value, expected=expected)
    check_last_dim(name, t, 4, expected)
    if t.ndim != 2:
        raise ShapeError(f"{name}: expected {expected}, got shape {tuple(t.shape)}")
    t = as_floating(name, t)
    check_finite(name, t)
    return t


def tile_targets(boxes: Tensor, labels: Tensor, windows: Tensor, min_visibility: float = 0.5) -> TileTargets:
    """Cut ``Tensor[N, 4]`` boxes by ``Tensor[T, 4]`` tile windows: the targets of every tile, batched.

    visibility(box, tile) = area(box ∩ tile) / area(box).

    A box whose visibility in a tile is ``>= min_visibility`` is a target of that tile, clipped to it
    and shifted to the tile's coordinates (``box ∩ tile - (tile.x1, tile.y1)``, exact); a box
    visible in the tile (``area(box ∩ tile) > 0``) below that fraction is marked ``ignore`` (an object
    cut by the border: neither object nor background). Boxes of zero area (and inverted ones) are in
    no tile. The ``T x N`` intersection is computed for blocks of tiles at a time (no loop over
    boxes), so memory is ``O(block + K)``. Coordinates follow ``boxes``' dtype (integer boxes become
    the default float dtype; half precision is computed in float32 and returned in half).

    Args:
        boxes: ``Tensor[N, 4]`` xyxy in image coordinates; labels: ``Tensor[N]``.
        windows: ``Tensor[T, 4]`` xyxy tiles, e.g. :func:`tile_grid`.
        min_visibility: in ``[0, 1]``; 0 keeps every visible part as a target.

    Returns:
        :class:`TileTargets` (flat rows; :meth:`TileTargets.per_tile` gives per-tile dicts).

    >>> w = torch.tensor([[0., 0., 10., 10.], [10., 0., 20., 10.]])
    >>> t = tile_targets(torch.tensor([[6., 2., 16., 4.]]), torch.tensor([1]), w, 0.5)
    >>> t.boxes.tolist(), t.visibility.tolist(), t.ignore.tolist()
    ([[6.0, 2.0, 10.0, 4.0], [0.0, 2.0, 6.0, 4.0]], [0.4000000059604645, 0.6000000238418579], [True, False])
    """
    boxes = _box_matrix("boxes", boxes, "Tensor[N, 4]")
    windows = _box_matrix("windows", windows, "Tensor[T, 4]")
    labels = as_tensor("labels", labels, expected="Tensor[N]")
    if labels.shape != boxes.shape[:1]:
        raise ShapeError(f"labels: expected Tensor[{boxes.shape[0]}] matching boxes, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise DTypeError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if windows.device != boxes.device:
        raise InvalidArgumentError(f"windows: expected the boxes' device {boxes.device}, got {windows.device}")
    min_visibility = check_real("min_visibility", min_visibility, low=0.0, high=1.0)
    out_dtype = boxes.dtype
    work = torch.promote_types(boxes.dtype, windows.dtype)
    if work in (torch.float16, torch.bfloat16):
        work = torch.float32  # areas of large boxes overflow half precision
    b, w = boxes.to(work), windows.to(work)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)

    num_tiles, num_boxes = w.shape[0], b.shape[0]
    block = max(1, _BLOCK // max(num_boxes, 1))
    tiles, picked = [], []
    for start in range(0, num_tiles, block):  # blocks of tiles: every box at once
        wb = w[start : start + block, None, :]
        iw = (torch.minimum(wb[..., 2], b[:, 2]) - torch.maximum(wb[..., 0], b[:, 0])).clamp_(min=0)
        ih = (torch.minimum(wb[..., 3], b[:, 3]) - torch.maximum(wb[..., 1], b[:, 1])).clamp_(min=0)
        t, n = (iw.mul_(ih) > 0).nonzero(as_tuple=True)
        tiles.append(t + start)
        picked.append(n)
    tile = torch.cat(tiles) if tiles else torch.zeros(0, dtype=torch.long, device=b.device)
    box = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long, device=b.device)

    # Only the visible pairs: recompute their intersection (the same operations, so the same values).
    bb, ww = b[box], w[tile]
    lo = torch.maximum(bb[:, :2], ww[:, :2])
    hi = torch.minimum(bb[:, 2:], ww[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=1)
    visibility = inter / area[box]
    clipped = torch.cat((lo - ww[:, :2], hi - ww[:, :2]), dim=1)
    ignore = visibility < min_visibility
    return TileTargets(tile, box, clipped.to(out_dtype), labels[box], visibility, ignore, num_tiles)
