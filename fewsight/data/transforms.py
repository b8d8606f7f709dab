"""Detection augmentations on torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes``.

A dataset's ``transforms`` is any callable ``(image, target) -> (image, target)`` in the v2 style.
:func:`apply_transforms` wraps the plain tensors a dataset produces (``image`` as
``tv_tensors.Image``, ``target["boxes"]`` as ``BoundingBoxes(format="XYXY", canvas_size=(H, W))``),
calls it, and unwraps the result back to plain tensors (boxes float32, labels int64), so the
geometric transforms move the boxes together with the pixels.

A target may carry ``"ignore_boxes": Tensor[R, 4]`` (regions that are neither object nor background,
e.g. objects cut by a tile border, :class:`fewsight.data.TiledDataset`): :func:`apply_transforms` moves
them with the boxes, so every geometric transform keeps them on their pixels.

Overhead imagery has no "up": :class:`RandomRot90` (quarter turns, boxes mapped exactly) and vertical
flips are options of :func:`train_transforms`, off by default.

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

__all__ = ["RandomRot90", "apply_transforms", "eval_transforms", "rot90_boxes", "train_transforms"]

# Label of the ignore rows while they travel with the boxes through a transform: no real label is this.
_IGNORE_MARK = -(1 << 62)


def apply_transforms(
    transforms: Callable[..., Any], image: Tensor, target: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run a v2-style ``transforms(image, target)`` with boxes wrapped, and unwrap the result.

    ``image``: ``Tensor[3, H, W]``; ``target["boxes"]``: ``Tensor[N, 4]`` xyxy. Other target keys
    pass through (v2 transforms leave unknown keys alone, or transform them if they are tv_tensors).
    ``target["ignore_boxes"]`` (``Tensor[R, 4]`` xyxy), when present, travels as extra rows of the
    boxes (so it is flipped, warped, clamped and sanitised exactly like them) and comes back under
    its own key.
    """
    h, w = image.shape[-2:]
    wrapped = dict(target)
    boxes = target["boxes"].reshape(-1, 4)
    ignore = wrapped.pop("ignore_boxes", None)
    if ignore is not None:
        if "labels" not in target:
            raise InvalidArgumentError("target: expected 'labels' with 'ignore_boxes' (they travel as marked labels)")
        ignore = ignore.reshape(-1, 4).to(boxes.dtype)
        boxes = torch.cat((boxes, ignore))
        marks = torch.full((ignore.shape[0],), _IGNORE_MARK, dtype=torch.int64)
        wrapped["labels"] = torch.cat((target["labels"].to(torch.int64), marks))
    wrapped["boxes"] = tv_tensors.BoundingBoxes(
        boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(int(h), int(w))
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
    if ignore is not None:
        marked = result["labels"] == _IGNORE_MARK
        result["ignore_boxes"] = result["boxes"][marked]
        result["boxes"], result["labels"] = result["boxes"][~marked], result["labels"][~marked]
    if isinstance(image_out, Tensor):
        image_out = image_out.as_subclass(Tensor)
    return image_out, result


def rot90_boxes(boxes: Tensor, canvas_size: tuple[int, int], k: int = 1) -> tuple[Tensor, tuple[int, int]]:
    """``Tensor[N, 4]`` xyxy boxes of an ``(H, W)`` image turned ``k`` quarter turns as ``torch.rot90(image, k,
    dims=(-2, -1))`` turns it (counter-clockwise on screen) -> ``(boxes, new canvas size)``. Only swaps and
    ``side - coordinate``, as a flip does: exact on the pixel grid (and any coordinate with few
    fractional bits), one float rounding otherwise.

    >>> rot90_boxes(torch.tensor([[1., 2., 4., 3.]]), (10, 20))
    (tensor([[ 2., 16.,  3., 19.]]), (20, 10))
    """
    h, w = int(canvas_size[0]), int(canvas_size[1])
    x1, y1, x2, y2 = boxes.unbind(-1)
    k %= 4
    if k == 0:
        return boxes.clone(), (h, w)
    if k == 1:  # (x, y) -> (y, W - x)
        return torch.stack((y1, w - x2, y2, w - x1), dim=-1), (w, h)
    if k == 2:  # (x, y) -> (W - x, H - y)
        return torch.stack((w - x2, h - y2, w - x1, h - y1), dim=-1), (h, w)
    return torch.stack((h - y2, x1, h - y1, x2), dim=-1), (w, h)  # (x, y) -> (H - y, x)


def _is_plain_tensor(value: Any) -> bool:
    return type(value) is Tensor


class RandomRot90(v2.Transform):
    """Turn the sample by a uniformly drawn number ``k`` of quarter turns (0, 1, 2 or 3), as
    ``torch.rot90(image, k, dims=(-2, -1))``; boxes follow exactly (:func:`rot90_boxes`), the canvas
    of a non-square image swaps its sides. Images, videos, masks and plain image tensors turn;
    other values pass through. ``k`` is drawn from torch's global generator (seeded per sample by
    training's data loading).

    >>> img = torch.zeros(3, 4, 6)
    >>> box = tv_tensors.BoundingBoxes(torch.tensor([[0., 0., 2., 1.]]), format="XYXY", canvas_size=(4, 6))
    >>> out_img, out_box = RandomRot90()._apply(img, box, k=1)
    >>> tuple(out_img.shape), out_box.tolist(), out_box.canvas_size
    ((3, 6, 4), [[0.0, 4.0, 1.0, 6.0]], (6, 4))
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Video, tv_tensors.Mask, tv_tensors.BoundingBoxes, _is_plain_tensor)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        k = params["k"]
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            fmt = inpt.format
            xyxy = v2.functional.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            turned, size = rot90_boxes(xyxy.as_subclass(Tensor), inpt.canvas_size, k)
            out = tv_tensors.wrap(turned, like=inpt, canvas_size=size, format=tv_tensors.BoundingBoxFormat.XYXY)
            return v2.functional.convert_bounding_box_format(out, new_format=fmt)
        turned = torch.rot90(inpt.as_subclass(Tensor), k, dims=(-2, -1))
        return tv_tensors.wrap(turned, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else turned

    def _apply(self, *inputs: Any, k: int) -> Any:
        """The transform with a given ``k`` (tests, reproductions)."""
        return tuple(self.transform(x, {"k": k}) for x in inputs)


def train_transforms(
    *,
    hflip: bool = False,
    hflip_prob: float = 0.5,
    vflip: bool = False,
    vflip_prob: float = 0.5,
    rot90: bool = False,
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
    """A small training augmentation: scale jitter, optional flips and quarter turns, photometric jitter.

    * ``scale_range``: objects are zoomed by a factor in this range and shifted by up to
      ``translate`` of the image side with an affine warp that keeps the canvas size (so the
      jitter survives a model's fixed-size resize); ``None`` disables it.
    * ``hflip``: off by default — mirrored digits and logos are different objects.
    * ``vflip`` (with ``vflip_prob``) and ``rot90`` (:class:`RandomRot90`: 0-3 quarter turns, equally
      likely): off by default; the standard augmentations of overhead imagery, where no direction is up.
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
    if vflip:
        if not 0 <= vflip_prob <= 1:
            raise InvalidArgumentError(f"vflip_prob: expected a value in [0, 1], got {vflip_prob}")
        steps.append(v2.RandomVerticalFlip(p=vflip_prob))
    if rot90:
        steps.append(RandomRot90())
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
