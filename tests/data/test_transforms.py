"""Transforms keep boxes consistent with pixels; datasets unwrap tv_tensors; collate_detection."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from fewsight.data import DigitsDataset, collate_detection, eval_transforms, train_transforms
from fewsight.data.transforms import apply_transforms
from fewsight.errors import InvalidArgumentError


def _tight(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_hflip_moves_boxes_with_pixels():
    image = torch.zeros(3, 10, 20)
    image[:, 2:6, 1:4] = 1.0
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "labels": torch.tensor([5])}
    t = train_transforms(hflip=True, hflip_prob=1.0, scale_range=None, photometric=False)
    out_img, out = apply_transforms(t, image, target)
    assert out["boxes"].tolist() == [[16.0, 2.0, 19.0, 6.0]] and out["labels"].tolist() == [5]
    assert _tight(out_img[0] > 0.5) == out["boxes"][0].tolist()


def test_affine_scale_jitter_keeps_boxes_on_the_ink():
    torch.manual_seed(0)
    ds = DigitsDataset("train", num_images=12, clutter=False, seed=4)
    t = train_transforms(scale_range=(0.7, 1.3), translate=0.1, photometric=False, min_box_size=1.0)
    checked = 0
    for i in range(len(ds)):
        canvas = ds.render(i, ink_masks=True)
        image, target = ds[i]
        target = dict(target, masks=tv_tensors.Mask(torch.from_numpy(canvas.ink)))
        out_img, out = apply_transforms(t, image, target)
        assert out_img.shape == image.shape and type(out_img) is torch.Tensor
        assert type(out["boxes"]) is torch.Tensor and out["boxes"].dtype == torch.float32
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        h, w = image.shape[-2:]
        assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= w).all()
        assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= h).all()
        for box, mask in zip(out["boxes"], out["masks"]):
            # A clipped box cannot know where the cut ink still is: compare unclipped ones only.
            if mask.sum() < 4 or box[0] <= 0 or box[1] <= 0 or box[2] >= w or box[3] >= h:
                continue
            # Nearest-neighbour masks vs the box's corner mapping: within 1.5 pixels.
            torch.testing.assert_close(box, torch.tensor(_tight(mask)), atol=1.5, rtol=0)
            checked += 1
    assert checked >= 10


def test_photometric_only_leaves_boxes_alone():
    ds = DigitsDataset("train", num_images=3)
    t = train_transforms(scale_range=None, photometric=True, photometric_prob=1.0, min_box_size=1.0)
    for i in range(3):
        image, target = ds[i]
        out_img, out = apply_transforms(t, image, target)
        assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["labels"], target["labels"])
        assert 0.0 <= out_img.min() and out_img.max() <= 1.0


def test_eval_transforms_identity_on_float_images():
    ds = DigitsDataset("val", num_images=2)
    plain = ds[1]
    ds.transforms = eval_transforms()
    image, target = ds[1]
    assert type(image) is torch.Tensor and torch.equal(image, plain[0])
    assert torch.equal(target["boxes"], plain[1]["boxes"]) and type(target["boxes"]) is torch.Tensor


def test_dataset_with_train_transforms_drops_tiny_boxes_with_labels():
    torch.manual_seed(1)
    ds = DigitsDataset("train", num_images=8, transforms=train_transforms(scale_range=(0.5, 1.5), translate=0.3))
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 128, 128)
        b = target["boxes"]
        assert len(b) == len(target["labels"]) and target["labels"].dtype == torch.int64
        assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()


def test_train_transforms_argument_checks():
    with pytest.raises(InvalidArgumentError, match="scale_range"):
        train_transforms(scale_range=(1.2, 0.8))
    with pytest.raises(InvalidArgumentError, match="hflip_prob"):
        train_transforms(hflip=True, hflip_prob=2.0)
    with pytest.raises(InvalidArgumentError, match="min_box_size"):
        train_transforms(min_box_size=0.0)
    with pytest.raises(InvalidArgumentError, match="transforms"):
        apply_transforms(lambda image, target: image, torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)})


def test_collate_detection():
    ds = DigitsDataset("train", num_images=5)
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert torch.equal(images[2], ds[2][0]) and torch.equal(targets[2]["boxes"], ds[2][1]["boxes"])
    assert collate_detection([]) == ([], [])
    with pytest.raises(InvalidArgumentError, match=r"batch\[0\]"):
        collate_detection([torch.zeros(3)])
