"""Anchors for a feature pyramid (RetinaNet) and SSD default boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError

__all__ = ["AnchorGenerator", "default_boxes", "feature_size", "SSD300_ASPECT_RATIOS"]

SSD300_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def feature_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Feature-map size of a level with ``stride`` for an ``(H, W)`` input: ``(ceil(H/s), ceil(W/s))``.

    Every stride-2 convolution with kernel 3 / padding 1 (and ResNet's 7x7 / padding 3 stem and
    3x3 / padding 1 max-pool) maps ``n`` to ``ceil(n / 2)``, so a backbone's level ``l`` has exactly
    this size for any input, not only multiples of 128.

    >>> feature_size((513, 377), 8)
    (65, 48)
    """
    h, w = image_size
    return (-(-int(h) // stride), -(-int(w) // stride))


def _as_size(images_or_size: Tensor | Sequence[int] | torch.Size) -> tuple[int, int]:
    if isinstance(images_or_size, Tensor):
        if images_or_size.ndim < 2:
            raise ShapeError(
                f"images_or_size: expected Tensor[..., H, W] or (H, W), got shape {tuple(images_or_size.shape)}"
            )
        h, w = images_or_size.shape[-2:]
        return int(h), int(w)
    size = tuple(int(s) for s in images_or_size)
    if len(size) != 2 or min(size) <= 0:
        raise InvalidArgumentError(f"images_or_size: expected positive (H, W), got {images_or_size!r}")
    return size  # type: ignore[return-value]


class AnchorGenerator:
    """RetinaNet anchors (Lin et al. 2017) for pyramid levels P3–P7 of any input size.

    Per level ``l``: stride ``2**l``, base size ``sizes[l]`` (default ``4 * 2**l``: 32 … 512), sizes
    ``size * scale`` for each scale and aspect ratios ``ratio = h / w`` keeping the area; centres at
    ``((j + 0.5) * stride, (i + 0.5) * stride)``. Output order, the one a dense head's
    ``[B, H, W, K * ...]`` output flattens to: level, then row ``i``, column ``j``, then ratio, then scale.

    Args:
        levels: pyramid levels, e.g. ``(3, 4, 5, 6, 7)`` or any subset.
        sizes: base anchor size per level (default ``4 * 2**l``).
        scales: multipliers of the base size.
        aspect_ratios: ``h / w`` ratios.

    >>> gen = AnchorGenerator()
    >>> gen((600, 600)).shape
    torch.Size([67995, 4])
    >>> gen.num_anchors((513, 377)) == sum(h * w * 9 for h, w in gen.feature_sizes((513, 377)))
    True
    """

    def __init__(
        self,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        sizes: Sequence[float] | None = None,
        scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        self.levels = tuple(int(level) for level in levels)
        if not self.levels or any(level < 0 for level in self.levels):
            raise InvalidArgumentError(f"levels: expected a non-empty sequence of levels >= 0, got {tuple(levels)}")
        self.strides = tuple(2**level for level in self.levels)
        self.sizes = tuple(float(s) for s in (sizes if sizes is not None else [4 * s for s in self.strides]))
        if len(self.sizes) != len(self.levels):
            raise InvalidArgumentError(f"sizes: expected {len(self.levels)} values (one per level), got {len(self.sizes)}")
        self.scales = tuple(float(s) for s in scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        if not self.scales or not self.aspect_ratios or min(self.scales + self.aspect_ratios) <= 0:
            raise InvalidArgumentError(
                f"scales/aspect_ratios: expected non-empty positive values, got {self.scales} and {self.aspect_ratios}"
            )
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def feature_sizes(self, images_or_size: Tensor | Sequence[int]) -> list[tuple[int, int]]:
        size = _as_size(images_or_size)
        return [feature_size(size, s) for s in self.strides]

    def num_anchors(self, images_or_size: Tensor | Sequence[int]) -> int:
        return sum(h * w for h, w in self.feature_sizes(images_or_size)) * self.num_anchors_per_location

    def cell_anchors(self, level_index: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """``Tensor[K, 4]`` anchors centred at the origin for one level (ratio-major, then scale)."""
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)
        scales = torch.tensor(self.scales, dtype=torch.float64) * self.sizes[level_index]
        h = (ratios.sqrt()[:, None] * scales[None, :]).reshape(-1)
        w = (1 / ratios.sqrt()[:, None] * scales[None, :]).reshape(-1)
        return torch.stack((-w / 2, -h / 2, w / 2, h / 2), dim=-1).to(dtype=dtype, device=device)

    def grid_anchors(
        self, feature_sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32, device=None
    ) -> Tensor:
        """Anchors for explicit per-level feature sizes -> ``Tensor[sum(H_l * W_l * K), 4]``."""
        if len(feature_sizes) != len(self.levels):
            raise InvalidArgumentError(
                f"feature_sizes: expected {len(self.levels)} sizes (one per level), got {len(feature_sizes)}"
            )
        key = (tuple(tuple(int(x) for x in fs) for fs in feature_sizes), dtype, None if device is None else torch.device(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached.clone()  # callers may modify anchors in place; the cache must not change
        parts = []
        for k, ((fh, fw), stride) in enumerate(zip(feature_sizes, self.strides)):
            ys = (torch.arange(fh, dtype=torch.float64) + 0.5) * stride
            xs = (torch.arange(fw, dtype=torch.float64) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
            parts.append((centres + self.cell_anchors(k, torch.float64)).reshape(-1, 4))
        anchors = torch.cat(parts).to(dtype=dtype, device=device)
        if len(self._cache) > 16:  # a training run sees a handful of padded sizes
            self._cache.clear()
        self._cache[key] = anchors
        return anchors.clone()

    def __call__(
        self, images_or_size: Tensor | Sequence[int], dtype: torch.dtype | None = None, device=None
    ) -> Tensor:
        """Anchors for an input of ``(H, W)`` pixels (or a ``Tensor[..., H, W]``) -> ``Tensor[A, 4]``.

        With a tensor, dtype and device follow it (float32 for non-float tensors).
        """
        if isinstance(images_or_size, Tensor):
            device = images_or_size.device if device is None else device
            if dtype is None and images_or_size.is_floating_point():
                dtype = images_or_size.dtype
        return self.grid_anchors(self.feature_sizes(images_or_size), dtype or torch.float32, device)

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(levels={self.levels}, sizes={self.sizes}, scales={tuple(round(s, 4) for s in self.scales)}, "
            f"aspect_ratios={self.aspect_ratios})"
        )


def default_boxes(
    image_size: tuple[int, int],
    feature_sizes: Sequence[tuple[int, int]],
    *,
    min_scale: float = 0.2,
    max_scale: float = 0.9,
    scales: Sequence[float] | None = None,
    aspect_ratios: Sequence[Sequence[float]] | None = None,
    steps: Sequence[float] | None = None,
    clip: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """SSD default boxes (Liu et al. 2016) in absolute xyxy pixels -> ``Tensor[A, 4]``.

    Level ``k`` of ``m`` has scale ``s_k = min_scale + (max_scale - min_scale) * k / (m - 1)`` (or
    ``scales[k]``, with ``scales`` of length ``m + 1``), boxes ``s_k`` and ``sqrt(s_k * s_{k+1})`` of
    ratio 1, then for each ratio ``r`` the pair ``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose;
    widths are relative to the image width and heights to its height. Centres are at
    ``(j + 0.5) * step`` with ``step = W / f_w`` (or the given ``steps``). Per location the order is
    the one above, as in torchvision's ``DefaultBoxGenerator``. ``clip`` clips boxes to the image.

    Args:
        image_size: ``(H, W)`` of the network input.
        feature_sizes: ``(h_k, w_k)`` of each level.
        aspect_ratios: per level; default SSD300's ``((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))`` for 6
            levels, else ``(2, 3)`` everywhere.

    >>> fs = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    >>> default_boxes((300, 300), fs).shape
    torch.Size([8732, 4])
    """
    h_img, w_img = _as_size(image_size)
    m = len(feature_sizes)
    if m == 0:
        raise InvalidArgumentError("feature_sizes: expected at least one level, got none")
    if aspect_ratios is None:
        aspect_ratios = SSD300_ASPECT_RATIOS if m == 6 else ((2.0, 3.0),) * m
    if len(aspect_ratios) != m:
        raise InvalidArgumentError(f"aspect_ratios: expected {m} entries (one per level), got {len(aspect_ratios)}")
    if scales is None:
        if m == 1:
            scales = [min_scale, max_scale]
        else:
            scales = [min_scale + (max_scale - min_scale) * k / (m - 1) for k in range(m)] + [1.0]
    if len(scales) != m + 1:
        raise InvalidArgumentError(f"scales: expected {m + 1} values (one per level plus one), got {len(scales)}")
    if steps is not None and len(steps) != m:
        raise InvalidArgumentError(f"steps: expected {m} values (one per level), got {len(steps)}")

    parts = []
    for k, (fh, fw) in enumerate(feature_sizes):
        s_k = float(scales[k])
        wh = [(s_k, s_k), (math.sqrt(s_k * scales[k + 1]),) * 2]
        for r in aspect_ratios[k]:
            q = math.sqrt(r)
            wh += [(s_k * q, s_k / q), (s_k / q, s_k * q)]
        wh_t = torch.tensor(wh, dtype=torch.float64) * torch.tensor([w_img, h_img], dtype=torch.float64)
        step_x = w_img / fw if steps is None else float(steps[k])
        step_y = h_img / fh if steps is None else float(steps[k])
        cy, cx = torch.meshgrid(
            (torch.arange(fh, dtype=torch.float64) + 0.5) * step_y,
            (torch.arange(fw, dtype=torch.float64) + 0.5) * step_x,
            indexing="ij",
        )
        centres = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)
        half = (wh_t / 2).unsqueeze(0)
        parts.append(torch.cat((centres - half, centres + half), dim=-1).reshape(-1, 4))
    boxes = torch.cat(parts)
    if clip:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w_img)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h_img)
    return boxes.to(dtype=dtype, device=device)
