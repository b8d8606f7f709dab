"""Detection augmentations on torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes``.

A dataset's ``transforms`` is any callable ``(image, target) -> (image, target)`` in the v2 style.
:func:`apply_transforms` wraps the plain tensors a dataset produces (``image`` as
``tv_tensors.Image``, ``target["boxes"]`` as ``BoundingBoxes(format="XYXY", canvas_size=(H, W))``),
calls it, and unwraps the result back to plain tensors (boxes float32, labels int64), so the
geometric transforms move the boxes together with the pixels.

Images stay float in ``[0, 1]``; resizing to the model's input size and normalisation happen inside
the models, as in torchvision.

Example:
    >>> import torch
    >>> t = train_transforms(hflip=True, hflip_prob=1.0, scale_range=None, photometric=False)
    >>> img = torch.zeros(3, 10, 20)
    >>> _, out = apply_transforms(t, img, {"boxes": torch.tensor([[0., 0., 5., 5.]]), "labels": torch.tensor([3])})
    >>> out["boxes"], out["labels"]
    (tensor([[15.,  0., 20.,  5.]]), tensor([3]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from fewsight.errors import InvalidArgumentError

__all__ = ["apply_transforms", "eval_transforms", "train_transforms"]


def apply_transforms(
    transforms: Callable[..., Any], image: Tensor, target: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run a v2-style ``transforms(image, target)`` with boxes wrapped, and unwrap the result.

    ``image``: ``Tensor[3, H, W]``; ``target["boxes"]``: ``Tensor[N, 4]`` xyxy. Other target keys
    pass through (v2 transforms leave unknown keys alone, or transform them if they are tv_tensors).
    """
    h, w = image.shape[-2:]
    wrapped = dict(target)
    wrapped["boxes"] = tv_tensors.BoundingBoxes(
        target["boxes"].reshape(-1, 4), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(int(h), int(w))
    )
    out = transforms(tv_tensors.Image(image), wrapped)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
        raise InvalidArgumentError(
            f"transforms: expected a callable returning (image, target), got {type(out).__name__}"
        )
    image_out, target_out = out
    result = {k: (v.as_subclass(Tensor) if isinstance(v, Tensor) else v) for k, v in target_out.items()}
    result["boxes"] = result["boxes"].reshape(-1, 4).to(torch.float32)
    if "labels" in result:
        result["labels"] = result["labels"].to(torch.int64)
    if isinstance(image_out, Tensor):
        image_out = image_out.as_subclass(Tensor)
    return image_out, result


def train_transforms(
    *,
    hflip: bool = False,
    hflip_prob: float = 0.5,
    scale_range: tuple[float, float] | None = (0.75, 1.25),
    translate: float = 0.1,
    photometric: bool = True,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.02,
    photometric_prob: float = 0.8,
    min_box_size: float = 2.0,
) -> v2.Compose:
    """A small training augmentation: scale jitter, optional horizontal flip, photometric jitter.

    * ``scale_range``: objects are zoomed by a factor in this range and shifted by up to
      ``translate`` of the image side with an affine warp that keeps the canvas size (so the
      jitter survives a model's fixed-size resize); ``None`` disables it.
    * ``hflip``: off by default — mirrored digits and logos are different objects.
    * ``photometric``: brightness / contrast / saturation / hue jitter with ``photometric_prob``.

    Boxes are clamped to the image and those thinner than ``min_box_size`` (>= 1) pixels are
    dropped, with their labels and any per-box ``tv_tensors.Mask``, by ``v2.SanitizeBoundingBoxes``.
    """
    steps: list[Callable[..., Any]] = []
    if scale_range is not None:
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise InvalidArgumentError(f"scale_range: expected 0 < min <= max, got {scale_range}")
        if not 0 <= translate < 1:
            raise InvalidArgumentError(f"translate: expected a value in [0, 1), got {translate}")
        steps.append(v2.RandomAffine(degrees=0.0, translate=(translate, translate), scale=(lo, hi)))
    if hflip:
        if not 0 <= hflip_prob <= 1:
            raise InvalidArgumentError(f"hflip_prob: expected a value in [0, 1], got {hflip_prob}")
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    if photometric:
        if not 0 <= photometric_prob <= 1:
            raise InvalidArgumentError(f"photometric_prob: expected a value in [0, 1], got {photometric_prob}")
        steps.append(
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=photometric_prob)
        )
    if not min_box_size >= 1:
        raise InvalidArgumentError(f"min_box_size: expected >= 1 (torchvision's limit), got {min_box_size}")
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=min_box_size, labels_getter="default"),
    ]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation transform: converts PIL / uint8 images to float ``[0, 1]``; float tensors pass unchanged."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
