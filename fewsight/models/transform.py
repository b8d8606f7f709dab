"""The detectors' image transform: resize, normalise and pad a batch (torchvision's ``GeneralizedRCNNTransform``).

:class:`DetectionTransform` is the component a detector receives (``transform=``); :func:`preprocess_images`
is its pure function. Images enter as floats in ``[0, 1]`` and leave as one normalised, zero-padded
``Tensor[B, 3, H, W]`` with the sizes and scales needed to map boxes back (:class:`ImageBatch`), so
targets are given, and detections returned, in the coordinates of the images passed to the model.

Example:
    >>> batch = preprocess_images([torch.rand(3, 50, 60), torch.rand(3, 40, 70)], min_size=80)
    >>> tuple(batch.tensor.shape), batch.image_sizes
    ((2, 3, 80, 140), [(80, 96), (80, 140)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, check_finite, check_real
from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DetectionTransform", "ImageBatch", "preprocess_images"]


class ImageBatch(NamedTuple):
    """A preprocessed batch.

    ``tensor``: ``Tensor[B, 3, H, W]`` normalised, zero-padded at the bottom/right;
    ``image_sizes``: ``(h_i, w_i)`` of each resized image inside ``tensor``;
    ``original_sizes``: ``(H_i, W_i)`` as given; ``scales``: ``Tensor[B, 2]`` float32 ``(s_y, s_x)``
    = resized / original, on the images' device.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    scales: Tensor

    def sizes_tensor(self) -> Tensor:
        """``Tensor[B, 2]`` float32 ``(h_i, w_i)`` on the batch's device."""
        return torch.tensor(self.image_sizes, dtype=torch.float32, device=self.tensor.device).reshape(-1, 2)

    def original_sizes_tensor(self) -> Tensor:
        """``Tensor[B, 2]`` float32 ``(H_i, W_i)`` on the batch's device."""
        return torch.tensor(self.original_sizes, dtype=torch.float32, device=self.tensor.device).reshape(-1, 2)


def _check_resize_args(min_size: Any, max_size: Any, image_size: Any, size_divisible: Any) -> tuple:
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name}: expected None or an int >= 1, got {value!r}")
    if image_size is not None:
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            image_size = (image_size, image_size)
        try:
            image_size = tuple(int(v) for v in image_size)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"image_size: expected None, an int or (H, W), got {image_size!r}") from None
        if len(image_size) != 2 or min(image_size) < 1:
            raise InvalidArgumentError(f"image_size: expected None, an int or positive (H, W), got {image_size!r}")
        if min_size is not None or max_size is not None:
            raise InvalidArgumentError(
                f"image_size: expected None when min_size/max_size are given, got image_size={image_size} with "
                f"min_size={min_size}, max_size={max_size}"
            )
    if isinstance(size_divisible, bool) or not isinstance(size_divisible, int) or size_divisible < 1:
        raise InvalidArgumentError(f"size_divisible: expected an int >= 1, got {size_divisible!r}")
    return min_size, max_size, image_size, size_divisible


def _resized_size(
    h: int, w: int, min_size: int | None, max_size: int | None, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    if image_size is not None:
        return image_size
    if min_size is None and max_size is None:
        return h, w
    scale = float("inf")
    if min_size is not None:
        scale = min_size / min(h, w)
    if max_size is not None:
        scale = min(scale, max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _check_image(name: str, image: Any, ndim: int) -> None:
    expected = "Tensor[B, 3, H, W]" if ndim == 4 else "Tensor[3, H, W]"
    if not isinstance(image, Tensor):
        raise DTypeError(f"{name}: expected a float {expected} in [0, 1], got {type(image).__name__}")
    if image.ndim != ndim or image.shape[-3] != 3 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ShapeError(f"{name}: expected {expected} with H, W >= 1, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        hint = " (divide a uint8 image by 255)" if image.dtype == torch.uint8 else ""
        raise DTypeError(f"{name}: expected a floating tensor in [0, 1]{hint}, got dtype {image.dtype}")
    check_finite(name, image)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.ndim == 3
    y = F.interpolate(x.unsqueeze(0) if squeeze else x, size=size, mode="bilinear", align_corners=False)
    return y.squeeze(0) if squeeze else y


def preprocess_images(
    images: Tensor | Sequence[Tensor],
    *,
    mean: Sequence[float] | Tensor = IMAGENET_MEAN,
    std: Sequence[float] | Tensor = IMAGENET_STD,
    min_size: int | None = None,
    max_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    size_divisible: int = 1,
    dtype: torch.dtype | None = None,
) -> ImageBatch:
    """Resize, normalise and batch images (torchvision's ``GeneralizedRCNNTransform`` semantics).

    Resizing (bilinear), per image of size ``(H, W)``:

    * all of ``min_size``, ``max_size``, ``image_size`` None: no resize;
    * ``min_size`` / ``max_size``: aspect-preserving scale ``min(min_size / min(H, W), max_size / max(H, W))``
      (each bound used only when given);
    * ``image_size = (h, w)``: every image to exactly that size (aspect not kept).

    Then ``(x - mean) / std`` and zero padding (the mean colour) at the bottom/right to the largest
    ``(h, w)`` rounded up to ``size_divisible``. A ``Tensor[B, 3, H, W]`` batch is resized in one call.

    Args:
        images: ``Tensor[B, 3, H, W]`` or a non-empty list of ``Tensor[3, H_i, W_i]``, float in ``[0, 1]``.
        mean, std: per-channel normalisation (ImageNet by default).
        dtype: the output's floating dtype (default: the first image's); every image is cast to it
            first, so float64 / float16 images feed a float32 network and vice versa.

    Returns:
        :class:`ImageBatch`.

    Example:
        >>> batch = preprocess_images(torch.rand(2, 3, 30, 40), max_size=80)
        >>> tuple(batch.tensor.shape), batch.scales[0].tolist()
        ((2, 3, 60, 80), [2.0, 2.0])
    """
    min_size, max_size, image_size, size_divisible = _check_resize_args(min_size, max_size, image_size, size_divisible)
    if isinstance(images, Tensor):
        _check_image("images", images, 4)
        if images.shape[0] == 0:
            raise ShapeError(f"images: expected at least one image, got shape {tuple(images.shape)}")
        h, w = int(images.shape[-2]), int(images.shape[-1])
        originals = [(h, w)] * images.shape[0]
        first = images
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
            raise InvalidArgumentError(
                f"images: expected Tensor[B, 3, H, W] or a non-empty list of Tensor[3, H, W], got {type(images).__name__}"
                + (" of length 0" if isinstance(images, Sequence) else "")
            )
        for i, im in enumerate(images):
            _check_image(f"images[{i}]", im, 3)
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        first = images[0]
        if any(im.device != first.device for im in images):
            raise InvalidArgumentError(
                f"images: expected every image on one device, got {sorted({str(im.device) for im in images})}"
            )
    device = first.device
    dtype = first.dtype if dtype is None else dtype
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1, 1, 1)
    sizes = [_resized_size(h, w, min_size, max_size, image_size) for h, w in originals]

    if isinstance(images, Tensor) or len(set(originals)) == 1:
        # Uniform batch: one resize and one normalisation for all images.
        batch = images.to(dtype) if isinstance(images, Tensor) else torch.stack([im.to(dtype) for im in images])
        tensor = (_resize(batch, sizes[0]) - mean_t) / std_t
    else:
        tensor = None
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    height = -(-height // size_divisible) * size_divisible
    width = -(-width // size_divisible) * size_divisible
    if tensor is not None:
        if tensor.shape[-2:] != (height, width):
            tensor = F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))
    else:
        tensor = torch.zeros((len(sizes), 3, height, width), dtype=dtype, device=device)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):  # ragged sizes: one copy per image
            tensor[i, :, :h, :w] = (_resize(im.to(dtype), (h, w)) - mean_t) / std_t
    scales = torch.tensor(
        [(h / oh, w / ow) for (h, w), (oh, ow) in zip(sizes, originals)], dtype=torch.float32, device=device
    )
    return ImageBatch(tensor, sizes, originals, scales)


class DetectionTransform(nn.Module):
    """Resize, normalise and pad images for a detector: ``forward(images) -> ImageBatch``.

    Args:
        min_size, max_size, image_size, size_divisible: resizing and padding (see :func:`preprocess_images`;
            default: no resize, no rounding).
        image_mean, image_std: per-channel normalisation (ImageNet), held as non-persistent buffers:
            configuration, not weights, that follow ``.to(device)`` with the model.

    Shapes:
        forward(``Tensor[B, 3, H, W]`` or a list of ``Tensor[3, H_i, W_i]`` in ``[0, 1]``) ->
        :class:`ImageBatch` with ``tensor: Tensor[B, 3, H', W']``.

    Example:
        >>> t = DetectionTransform(max_size=80, size_divisible=32)
        >>> tuple(t(torch.rand(2, 3, 30, 40)).tensor.shape)
        (2, 3, 64, 96)
    """

    def __init__(
        self,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        size_divisible: int = 1,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.min_size, self.max_size, self.image_size, self.size_divisible = _check_resize_args(
            min_size, max_size, image_size, size_divisible
        )
        if len(image_mean) != 3 or len(image_std) != 3:
            raise InvalidArgumentError(
                f"image_mean/image_std: expected 3 values each (std > 0), got {tuple(image_mean)} and {tuple(image_std)}"
            )
        image_mean = [check_real("image_mean", v) for v in image_mean]
        image_std = [check_real("image_std", v, low=0, low_open=True) for v in image_std]
        self.register_buffer("image_mean", torch.tensor(image_mean), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std), persistent=False)

    def forward(self, images: Tensor | Sequence[Tensor]) -> ImageBatch:
        """Images -> :class:`ImageBatch` in the dtype of this module's buffers, i.e. the detector's
        (``model.half()`` / ``model.double()`` convert them), whatever floating dtype the images have."""
        return preprocess_images(
            images,
            dtype=self.image_mean.dtype,
            mean=self.image_mean,
            std=self.image_std,
            min_size=self.min_size,
            max_size=self.max_size,
            image_size=self.image_size,
            size_divisible=self.size_divisible,
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` an ``height x width`` image has inside the network (before padding).

        >>> DetectionTransform(max_size=1024).resized_size(2048, 1536)
        (1024, 768)
        """
        return _resized_size(int(height), int(width), self.min_size, self.max_size, self.image_size)

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, image_size={self.image_size}, "
            f"size_divisible={self.size_divisible}"
        )
