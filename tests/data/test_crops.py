"""Crop datasets: boxes of a detection dataset, ImageFolder trees (with domains), seeded augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewsight.data.crops import BoxCrops, ImageFolderCrops, crop_augmentation, item_domains
from fewsight.data.digits import DigitsDataset
from fewsight.errors import DataError, InvalidArgumentError


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset("train", num_images=4, image_size=96, seed=0)


def test_box_crops_list_every_box_with_its_label(digits):
    crops = BoxCrops(digits, 24)
    targets = [digits.get_target(i) for i in range(len(digits))]
    assert len(crops) == sum(len(t["labels"]) for t in targets)
    assert crops.labels.tolist() == torch.cat([t["labels"] for t in targets]).tolist()
    image, label = crops[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == crops.labels[0] and crops.classes == digits.classes and item_domains(crops) is None
    assert crops.num_classes == 10



class _One:
    """A one-image detection dataset with a single box."""

    classes = ["x"]

    def __init__(self, image, box):
        self.image, self.box = image, box

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.image, {"boxes": torch.tensor([self.box]), "labels": torch.tensor([0])}


def test_box_crop_is_the_boxed_pixels_resized_and_centred():
    image = torch.rand(3, 40, 60)
    whole = BoxCrops(_One(image, [0.0, 0.0, 60.0, 40.0]), 30, fill=1.0)[0][0]
    expected = torch.nn.functional.interpolate(image[None], size=(20, 30), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(whole[:, 5:25], expected.clamp(0, 1))
    assert bool((whole[:, :5] == 1).all()) and bool((whole[:, 25:] == 1).all())
    part = BoxCrops(_One(image, [10.0, 10.0, 20.0, 20.0]), 10, context=0.5)[0][0]
    torch.testing.assert_close(part, torch.nn.functional.interpolate(image[None, :, 5:25, 5:25], size=10, mode="bilinear",
                                                                     antialias=True)[0].clamp(0, 1))


def test_box_crops_class_subset_is_relabelled_and_domains_follow_images(digits):
    crops = BoxCrops(digits, 16, classes=[7, 3], domains=[0, 1, 0, 1])
    kept = torch.cat([digits.get_target(i)["labels"] for i in range(len(digits))])
    assert len(crops) == int(((kept == 7) | (kept == 3)).sum())
    assert crops.classes == [digits.classes[7], digits.classes[3]] and set(crops.labels.tolist()) <= {0, 1}
    assert item_domains(crops).tolist() == [[0, 1, 0, 1][i] for i in crops.image_index]
    with pytest.raises(InvalidArgumentError, match="domains"):
        BoxCrops(digits, 16, domains=[0])
    with pytest.raises(InvalidArgumentError, match="classes"):
        BoxCrops(digits, 16, classes=[12])


def test_augmentation_is_seeded_by_seed_epoch_and_index(digits):
    crops = BoxCrops(digits, 24, augment=True, seed=0)
    a = crops[1][0]
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(crops[1][0], a)
    crops.set_epoch(1)
    assert not torch.equal(crops[1][0], a)
    assert not torch.equal(BoxCrops(digits, 24, augment=True, seed=1)[1][0], a)
    assert not torch.equal(BoxCrops(digits, 24)[1][0], a)
    with pytest.raises(InvalidArgumentError, match="scale"):
        crop_augmentation(scale=(0.9, 0.5))


def _tree(root, domains=("a", "b"), classes=("cat", "dog")):
    for d in domains:
        for k, c in enumerate(classes):
            folder = root / d / c
            folder.mkdir(parents=True)
            for j in range(2):
                Image.fromarray(np.full((20, 30, 3), 40 * k + 10 * j, dtype=np.uint8)).save(folder / f"{j}.png")
    return root


def test_image_folder_with_domains(tmp_path):
    root = _tree(tmp_path / "tree")
    ds = ImageFolderCrops(root, 16, domains=["a", "b"])
    assert ds.classes == ["cat", "dog"] and len(ds) == 8
    assert item_domains(ds).tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ds.labels.tolist() == [0, 0, 1, 1] * 2
    image, label = ds[2]
    assert image.shape == (3, 16, 16) and label == 1
    plain = ImageFolderCrops(root / "a", 16, classes=["dog"])
    assert len(plain) == 2 and plain.labels.tolist() == [0, 0] and item_domains(plain) is None
    with pytest.raises(DataError, match="missing"):
        ImageFolderCrops(tmp_path / "missing", 16)
    with pytest.raises(DataError, match="without any image"):
        ImageFolderCrops(root / "a", 16, classes=["cat", "bird"])


def test_emoji_crops_styles_are_domains(tmp_path):
    from fewsight.data.emoji import EmojiCrops
    from tests._fake_emoji import write_fake_emoji

    root = write_fake_emoji(tmp_path / "emoji")
    both = EmojiCrops(root, "all", "both", size=16)
    assert item_domains(both).tolist() == both.item_styles.tolist() and set(item_domains(both)) == {0, 1}
    assert item_domains(EmojiCrops(root, "all", "google", size=16)) is None
