"""``digits_large``: 2,048 px canvases of 100-300 small real MNIST digits, by split and seed, in the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewsight.data import DigitsDataset, infer_format, open_dataset
from fewsight.data.digits import LargeDigitsDataset


@pytest.fixture(scope="module")
def canvas():
    ds = LargeDigitsDataset("test", 2, seed=3)
    return ds, ds[0]


def test_defaults_are_the_benchmark_canvases(canvas):
    ds, (image, target) = canvas
    assert image.shape == (3, 2048, 2048) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    boxes = target["boxes"]
    assert 100 <= len(boxes) <= 300 and target["labels"].max() <= 9
    wh = boxes[:, 2:] - boxes[:, :2]
    assert wh[:, 1].min() >= 12 - 1 and wh[:, 1].max() <= 40  # digit heights 12-40 px
    assert (wh.prod(dim=1) < 32 * 32).float().mean() > 0.7  # mostly COCO "small" objects
    assert ((boxes >= 0) & (boxes <= 2048)).all()
    assert "LargeDigitsDataset(split='test'" in repr(ds)


def test_canvases_depend_on_seed_split_and_index_only(canvas):
    ds, (image, target) = canvas
    again = LargeDigitsDataset("test", 2, seed=3, image_size=2048)
    image2, target2 = again[0]
    assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
    other = LargeDigitsDataset("test", 1, seed=4, image_size=256, min_digits=5, max_digits=5)
    same = LargeDigitsDataset("test", 1, seed=3, image_size=256, min_digits=5, max_digits=5)
    assert not torch.equal(other[0][0], same[0][0])


def test_splits_use_disjoint_digit_instances():
    pools = [LargeDigitsDataset(split, 1, image_size=128, min_digits=1, max_digits=2).pool
             for split in ("train", "val", "test")]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.intersect1d(pools[a], pools[b]).size
    assert np.array_equal(pools[2], DigitsDataset("test", 1).pool)  # the same held-out pool as digits


def test_registry_and_config_build_it():
    assert infer_format("digits_large") == "digits_large"
    ds = open_dataset("digits_large", classes=["8", "9"], split="val", num_images=2, image_size=256,
                      min_digits=4, max_digits=8, seed=1)
    assert isinstance(ds, LargeDigitsDataset) and ds.classes == ["8", "9"] and len(ds) == 2
    assert set(ds[1][1]["labels"].tolist()) <= {0, 1}

    from fewsight.train.builders import build_dataset
    from fewsight.train.config import config_from_dict

    cfg = config_from_dict({"data": {"train": {"type": "digits_large", "split": "train", "num_images": 3,
                                               "image_size": 256, "min_digits": 2, "max_digits": 4}},
                            "trainer": {"max_epochs": 1}})
    train = build_dataset(cfg.data.train)
    assert isinstance(train, LargeDigitsDataset) and len(train) == 3 and train[0][0].shape == (3, 256, 256)
