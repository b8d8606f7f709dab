"""Vertical flips and quarter turns (overhead imagery): boxes exact against pixel masks, round trips,
off by default."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from fewsight.data import RandomRot90, train_transforms
from fewsight.data.transforms import apply_transforms, rot90_boxes


def _tight(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _random_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    x = torch.randint(0, w, (n, 2), generator=g).sort(dim=1).values
    y = torch.randint(0, h, (n, 2), generator=g).sort(dim=1).values
    return torch.stack((x[:, 0], y[:, 0], x[:, 1] + 1, y[:, 1] + 1), dim=1).float()


def _box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1:x2] = True
    return masks


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("h,w", [(7, 11), (16, 16), (5, 30)])
def test_rot90_boxes_match_the_turned_pixels(k, h, w):
    g = torch.Generator().manual_seed(k * 100 + h)
    boxes = _random_boxes(g, 20, h, w)
    turned, size = rot90_boxes(boxes, (h, w), k)
    masks = torch.rot90(_box_masks(boxes, h, w), k, dims=(-2, -1))
    assert size == tuple(masks.shape[-2:])
    for box, mask in zip(turned, masks):  # naive reference: the tight box of the turned mask
        assert box.tolist() == _tight(mask)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_random_rot90_moves_image_boxes_and_masks_together(k):
    h, w = 9, 14
    g = torch.Generator().manual_seed(k)
    boxes = _random_boxes(g, 6, h, w)
    image = torch.rand(3, h, w, generator=g)
    masks = tv_tensors.Mask(_box_masks(boxes, h, w))
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    out_img, out_boxes, out_masks = RandomRot90()._apply(tv_tensors.Image(image), bb, masks, k=k)
    assert torch.equal(out_img.as_subclass(torch.Tensor), torch.rot90(image, k, dims=(-2, -1)))
    assert isinstance(out_img, tv_tensors.Image) and isinstance(out_masks, tv_tensors.Mask)
    assert out_boxes.canvas_size == tuple(out_img.shape[-2:])
    for box, mask in zip(out_boxes, out_masks):
        assert box.tolist() == _tight(mask)
    # Another box format gives the same boxes.
    cxcywh = v2.functional.convert_bounding_box_format(bb, new_format="CXCYWH")
    (other,) = RandomRot90()._apply(cxcywh, k=k)
    assert other.format == tv_tensors.BoundingBoxFormat.CXCYWH
    back = v2.functional.convert_bounding_box_format(other, new_format="XYXY")
    torch.testing.assert_close(back.as_subclass(torch.Tensor), out_boxes.as_subclass(torch.Tensor), atol=1e-5, rtol=0)


def test_round_trips_are_exact():
    g = torch.Generator().manual_seed(0)
    fine = (torch.rand(50, 4, generator=g) * 37.3 * 64).round() / 64  # sub-pixel, 1/64 px grid: exact
    noisy = torch.rand(50, 4, generator=g) * 37.3  # any float: one rounding per turn at most
    h, w = 41, 53
    for boxes, atol in ((fine, 0.0), (noisy, 1e-5)):
        boxes = torch.cat((boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])), dim=1)
        out, size = boxes, (h, w)
        for _ in range(4):
            out, size = rot90_boxes(out, size, 1)
        assert size == (h, w)
        torch.testing.assert_close(out, boxes, atol=atol, rtol=0)
        for k in range(4):
            there, s1 = rot90_boxes(boxes, (h, w), k)
            back, s2 = rot90_boxes(there, s1, 4 - k)
            assert s2 == (h, w)
            torch.testing.assert_close(back, boxes, atol=atol, rtol=0)
    boxes = torch.cat((fine[:, :2].minimum(fine[:, 2:]), fine[:, :2].maximum(fine[:, 2:])), dim=1)
    flip = train_transforms(vflip=True, vflip_prob=1.0, scale_range=None, photometric=False, min_box_size=1.0)
    image = torch.rand(3, h, w, generator=g)
    target = {"boxes": boxes[((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)], "labels": torch.arange(50)[
        ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)]}
    once_img, once = apply_transforms(flip, image, target)
    twice_img, twice = apply_transforms(flip, once_img, once)
    assert torch.equal(twice_img, image) and torch.equal(twice["boxes"], target["boxes"])
    assert torch.equal(twice["labels"], target["labels"])


def test_vflip_moves_boxes_with_pixels():
    g = torch.Generator().manual_seed(3)
    h, w = 12, 17
    boxes = _random_boxes(g, 10, h, w)
    masks = tv_tensors.Mask(_box_masks(boxes, h, w))
    t = train_transforms(vflip=True, vflip_prob=1.0, scale_range=None, photometric=False, min_box_size=1.0)
    image = torch.rand(3, h, w, generator=g)
    out_img, out = apply_transforms(t, image, {"boxes": boxes, "labels": torch.arange(10), "masks": masks})
    assert torch.equal(out_img, image.flip(-2))
    for box, mask in zip(out["boxes"], out["masks"]):
        assert box.tolist() == _tight(mask)
    assert out["boxes"][:, 0::2].tolist() == boxes[:, 0::2].tolist()  # x untouched
    assert torch.equal(out["boxes"][:, 1], h - boxes[:, 3])


def test_train_transforms_draw_every_quarter_turn_and_keep_boxes_exact():
    h, w = 10, 16
    image = torch.rand(3, h, w)
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0], [10.0, 0.0, 16.0, 3.0]])
    t = train_transforms(rot90=True, scale_range=None, photometric=False, min_box_size=1.0)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out_img, out = apply_transforms(t, image, {"boxes": boxes, "labels": torch.tensor([0, 1])})
        k = next(k for k in range(4) if out_img.shape == torch.rot90(image, k, dims=(1, 2)).shape
                 and torch.equal(out_img, torch.rot90(image, k, dims=(1, 2))))
        seen.add(k)
        assert torch.equal(out["boxes"], rot90_boxes(boxes, (h, w), k)[0])
        assert out["labels"].tolist() == [0, 1]
    assert seen == {0, 1, 2, 3}


def test_ignore_boxes_turn_with_the_boxes():
    h, w = 10, 16
    target = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 9.0]]), "labels": torch.tensor([-1]),
              "ignore_boxes": torch.tensor([[10.0, 0.0, 16.0, 3.0], [3.0, 3.0, 3.5, 3.5]])}
    t = v2.Compose([RandomRot90(), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)])
    torch.manual_seed(0)
    k = int(torch.randint(0, 4, ()))
    torch.manual_seed(0)
    _, out = apply_transforms(t, torch.rand(3, h, w), target)
    assert torch.equal(out["boxes"], rot90_boxes(target["boxes"], (h, w), k)[0])
    assert out["labels"].tolist() == [-1]  # a real unknown label stays a box, not an ignore region
    assert torch.equal(out["ignore_boxes"], rot90_boxes(target["ignore_boxes"][:1], (h, w), k)[0])  # the 0.5 px one sanitised


def test_off_by_default():
    default = [type(s) for s in train_transforms().transforms]
    assert v2.RandomVerticalFlip not in default and RandomRot90 not in default
    assert default == [v2.RandomAffine, v2.RandomApply, v2.ClampBoundingBoxes, v2.SanitizeBoundingBoxes]
    with pytest.raises(ValueError, match="vflip_prob"):
        train_transforms(vflip=True, vflip_prob=1.5)
