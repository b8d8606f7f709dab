"""Box crops resized to a fixed size, for a second network that embeds objects from their pixels.

:func:`crop_boxes` is bilinear crop-and-resize through ``torchvision.ops.roi_align`` (``aligned=True``):
output pixel ``i`` of a box ``[x0, x1)`` cut to ``S`` samples the image at
``x0 + (i + ½)·(x1 − x0)/S − ½`` (pixel centres at integers), exactly what
``F.interpolate(image[..., y0:y1, x0:x1], size=S, mode="bilinear")`` samples, but for every box of every
image in one call, with sub-pixel boxes, and with pixels outside the box (rather than its edge
replicated) at its border. Boxes larger than ``S`` average several samples per output pixel.

Example:
    >>> import torch
    >>> images = torch.rand(2, 3, 64, 64)
    >>> boxes = [torch.tensor([[8., 8., 40., 24.]]), torch.tensor([[0., 0., 64., 64.], [10., 20., 30., 60.]])]
    >>> crop_boxes(images, boxes, 32).shape
    torch.Size([3, 3, 32, 32])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

from fewsight.errors import InvalidArgumentError, ShapeError, check_floating, check_last_dim, check_ndim

__all__ = ["crop_boxes"]


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)  # type: ignore[arg-type]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise InvalidArgumentError(f"size: expected an int >= 1 or (height, width) of them, got {size!r}")
    return pair  # type: ignore[return-value]


def crop_boxes(
    images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor], size: int | tuple[int, int]
) -> Tensor:
    """Crop every box of every image and resize it to ``size``.

    Args:
        images: ``Tensor[B, C, H, W]`` or a list of ``Tensor[C, H_i, W_i]`` (floating point).
        boxes: ``B`` tensors ``Tensor[n_i, 4]`` of absolute ``xyxy`` pixel boxes (``n_i`` may be 0).
        size: output side, or ``(height, width)``.

    Returns:
        ``Tensor[sum n_i, C, h, w]``, the crops of image 0's boxes first, in the images' dtype/device.
    """
    out_h, out_w = _size(size)
    if isinstance(images, Tensor):
        check_ndim("images", images, 4, "Tensor[B, C, H, W]")
        images = list(images)
    images = list(images)
    if len(boxes) != len(images):
        raise ShapeError(f"boxes: expected one Tensor[n_i, 4] per image ({len(images)}), got {len(boxes)}")
    for i, (img, b) in enumerate(zip(images, boxes)):
        check_ndim(f"images[{i}]", img, 3, "Tensor[C, H, W]")
        check_floating(f"images[{i}]", img)
        check_ndim(f"boxes[{i}]", b, 2, "Tensor[n, 4]")
        check_last_dim(f"boxes[{i}]", b, 4, "Tensor[n, 4]")
    if not images:
        raise InvalidArgumentError("images: expected at least one image, got none")
    channels = images[0].shape[0]
    if any(img.shape[0] != channels for img in images):
        raise ShapeError(f"images: expected the same channel count, got {[img.shape[0] for img in images]}")
    ref = images[0]
    counts = [len(b) for b in boxes]
    out = ref.new_empty(sum(counts), channels, out_h, out_w)
    # One roi_align per distinct image size (usually one): stacking images of different sizes would
    # let border samples read padding.
    offsets = torch.tensor([0, *counts], device=ref.device).cumsum(0).tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if counts[i]:
            groups.setdefault(tuple(img.shape), []).append(i)
    for members in groups.values():
        batch = torch.stack([images[i] for i in members])
        rois = torch.cat(
            [
                torch.cat([torch.full((counts[i], 1), float(j), dtype=boxes[i].dtype, device=ref.device),
                           boxes[i].to(ref.device)], dim=1)
                for j, i in enumerate(members)
            ]
        ).to(batch.dtype if batch.dtype != torch.float16 else torch.float32)
        crops = roi_align(batch.to(rois.dtype), rois, (out_h, out_w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1], device=ref.device) for i in members])
        out[rows] = crops.to(out.dtype)
    return out
