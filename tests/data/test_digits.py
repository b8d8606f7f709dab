"""DigitsDataset: determinism, tight boxes, disjoint pools, class subsets, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fewsight.data import BASE_CLASSES, NOVEL_CLASSES, DigitsDataset, collate_detection
from fewsight.data.digits import digit_pools, load_mnist_digits
from fewsight.errors import InvalidArgumentError


def _same(a, b) -> bool:
    (ia, ta), (ib, tb) = a, b
    return (
        torch.equal(ia, ib)
        and torch.equal(ta["boxes"], tb["boxes"])
        and torch.equal(ta["labels"], tb["labels"])
    )


def test_mnist_sample_is_read_directly():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.max() > 200  # real ink, not an empty table


def test_output_types_and_shapes():
    ds = DigitsDataset("train", num_images=5, image_size=(96, 160), digit_size=(16, 40))
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 96, 160) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64
        assert 1 <= len(target["labels"]) <= 4
        assert len(target["boxes"]) == len(target["labels"])


def test_same_seed_same_sample_any_order():
    a = DigitsDataset("train", num_images=12, seed=3)
    b = DigitsDataset("train", num_images=12, seed=3)
    forward = [a[i] for i in range(12)]
    backward = [b[i] for i in reversed(range(12))][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward))
    assert _same(a[-1], a[11])


def test_different_index_seed_split_differ():
    ds = DigitsDataset("train", num_images=4, seed=0)
    assert not torch.equal(ds[0][0], ds[1][0])
    assert not torch.equal(ds[0][0], DigitsDataset("train", num_images=4, seed=1)[0][0])
    assert not torch.equal(ds[0][0], DigitsDataset("val", num_images=4, seed=0)[0][0])


def test_independent_of_num_workers():
    ds = DigitsDataset("test", num_images=6, seed=5)
    direct = [ds[i] for i in range(6)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection)
    loaded = [(img, tgt) for images, targets in loader for img, tgt in zip(images, targets)]
    assert all(_same(x, y) for x, y in zip(direct, loaded))


def test_boxes_are_tight_around_ink():
    ds = DigitsDataset("train", num_images=40, seed=1)
    h, w = ds.image_size
    for i in range(len(ds)):
        c = ds.render(i, ink_masks=True)
        assert c.ink is not None and len(c.ink) == len(c.boxes)
        for box, ink in zip(c.boxes, c.ink):
            x1, y1, x2, y2 = box.astype(int)
            assert np.array_equal(box, box.round())  # pixel-edge integers
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            inside = np.zeros_like(ink)
            inside[y1:y2, x1:x2] = True
            assert not (ink & ~inside).any()  # all ink inside the box
            # every border row / column of the box holds ink: nothing to shrink
            assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()
            assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()


def test_without_clutter_only_digits_differ_from_background():
    ds = DigitsDataset("val", num_images=20, clutter=False, seed=2)
    for i in range(len(ds)):
        image, target = ds[i]
        gray = image[0]
        covered = torch.zeros_like(gray, dtype=torch.bool)
        for x1, y1, x2, y2 in target["boxes"].long().tolist():
            covered[y1:y2, x1:x2] = True
        outside = gray[~covered]
        bg = outside[0]
        assert torch.all(outside == bg)  # nothing of a digit leaks out of its box
        for x1, y1, x2, y2 in target["boxes"].long().tolist():
            patch = (gray[y1:y2, x1:x2] - bg).abs() > 0.1
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()


def test_pools_disjoint_stratified_and_seed_independent():
    pools = digit_pools()
    _, labels = load_mnist_digits()
    train, val, test = (set(pools[s].tolist()) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 5000
    assert np.bincount(labels[pools["train"]], minlength=10).tolist() == [350] * 10
    assert np.bincount(labels[pools["test"]], minlength=10).tolist() == [75] * 10
    # Canvas seed must not move instances between splits.
    a = DigitsDataset("train", num_images=1, seed=0)
    b = DigitsDataset("test", num_images=1, seed=7)
    assert not set(a.pool.tolist()) & set(b.pool.tolist())
    # The split is random, not the first 70 % of the label-sorted file.
    assert pools["train"].max() > 4900 and not np.array_equal(pools["train"], np.arange(3500))


def test_class_subset_labels_and_instances():
    _, labels = load_mnist_digits()
    ds = DigitsDataset("train", num_images=30, classes=NOVEL_CLASSES)
    assert ds.classes == ["8", "9"] and ds.digits == (8, 9) and ds.num_classes == 2
    for k, digit in enumerate(ds.digits):
        assert (labels[ds._class_pools[k]] == digit).all()
    seen = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    assert set(seen.tolist()) == {0, 1}

    rev = DigitsDataset("train", num_images=2, classes=["9", 8])
    assert rev.classes == ["9", "8"] and rev.digits == (9, 8)
    base = DigitsDataset("train", num_images=30, classes=BASE_CLASSES)
    assert base.classes == [str(d) for d in range(8)]
    assert int(torch.cat([base[i][1]["labels"] for i in range(30)]).max()) <= 7
    full = DigitsDataset("train", num_images=2)
    assert full.classes == [str(d) for d in range(10)]


def test_digit_count_bounds():
    ds = DigitsDataset("train", num_images=30, min_digits=1, max_digits=1)
    assert all(len(ds[i][1]["labels"]) == 1 for i in range(30))
    ds = DigitsDataset("train", num_images=30, min_digits=2, max_digits=3, max_overlap=0.3)
    counts = [len(ds[i][1]["labels"]) for i in range(30)]
    assert max(counts) <= 3 and min(counts) >= 1


def test_overlap_is_limited():
    from fewsight.geometry import box_iou

    ds = DigitsDataset("train", num_images=30, max_digits=6, max_overlap=0.1)
    for i in range(len(ds)):
        boxes = ds[i][1]["boxes"]
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert float(iou.max()) <= 0.1 + 1e-6


def test_inversion_makes_bright_background():
    ds = DigitsDataset("train", num_images=5, invert_prob=1.0, clutter=False)
    assert all(float(ds[i][0].median()) >= 0.7 for i in range(5))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"split": "training"}, "split"),
        ({"classes": (3, 10)}, "classes"),
        ({"classes": (3, 3)}, "classes"),
        ({"classes": ()}, "classes"),
        ({"classes": ("x",)}, "classes"),
        ({"digit_size": (16, 200)}, "digit_size"),
        ({"digit_size": (20, 10)}, "digit_size"),
        ({"min_digits": 0}, "min_digits"),
        ({"num_images": -1}, "num_images"),
        ({"max_overlap": 1.5}, "max_overlap"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        DigitsDataset(**kwargs)


def test_index_out_of_range():
    ds = DigitsDataset("train", num_images=3)
    with pytest.raises(IndexError, match="index"):
        ds[3]


def test_variants_add_auxiliary_classes_and_leave_plain_canvases_alone():
    from fewsight.data.digits import VARIANTS

    plain = DigitsDataset("train", 6, classes=[3, 5], seed=2)
    same = DigitsDataset("train", 6, classes=[3, 5], seed=2, variants=())
    for i in range(6):
        assert torch.equal(plain[i][0], same[i][0])
    ds = DigitsDataset("train", 40, classes=[3, 5], seed=2, variants=["mirror", "rot90"], clutter=False)
    assert ds.classes == ["3", "5", "3/mirror", "5/mirror", "3/rot90", "5/rot90"]
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    assert set(labels.tolist()) == set(range(6))
    # A rot90 glyph is the turned digit: its box is as wide as a plain one is tall, on average.
    h = {v: [] for v in (0, 2)}
    for i in range(len(ds)):
        t = ds[i][1]
        for box, label in zip(t["boxes"], t["labels"]):
            if int(label) // 2 in h:
                h[int(label) // 2].append(float((box[3] - box[1]) / (box[2] - box[0])))
    assert sum(h[0]) / len(h[0]) > 1.0 > sum(h[2]) / len(h[2])
    assert set(VARIANTS) == {"mirror", "flipud", "rot90", "rot270"}
    with pytest.raises(InvalidArgumentError):
        DigitsDataset("train", 1, variants=["rot180"])  # maps 6 onto 9, a novel class
    with pytest.raises(InvalidArgumentError):
        DigitsDataset("train", 1, variants=["mirror", "mirror"])
