"""Helpers shared by the canvas datasets: argument checks, tight crops, placement."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fewsight.data._paste import check_canvas_args, check_size, iou_one_many, place_box, tight_crop
from fewsight.errors import InvalidArgumentError

OK = dict(object_size=("emoji_size", (8, 32)), counts=(("min_objects", 1), ("max_objects", 3)), num_images=4,
          fractions={"max_overlap": 0.1})


def test_check_canvas_args_accepts_and_names_each_bad_argument():
    assert check_canvas_args((48, 64), **OK) == (48, 64, 8.0, 32.0)
    assert check_size("size", np.int64(9), min_side=8) == (9, 9)
    bad = [
        (dict(image_size="big"), "image_size: expected an int or (H, W)"),
        (dict(image_size=7, min_side=8), "image_size: expected sides >= 8"),
        (dict(object_size=("emoji_size", (8, 80))), "emoji_size: expected 4 <= min <= max <= the canvas side 64"),
        (dict(object_size=("digit_size", (3, 8))), "digit_size"),
        (dict(counts=(("min_digits", 3), ("max_digits", 2))), "min_digits, max_digits: expected 1 <= min_digits"),
        (dict(num_images=-1), "num_images: expected >= 0"),
        (dict(fractions={"ink_threshold": 1.5}), "ink_threshold: expected a value in [0, 1], got 1.5"),
    ]
    for change, message in bad:
        kwargs = {"image_size": 64, **OK, **change}
        with pytest.raises(InvalidArgumentError, match=re.escape(message)):
            check_canvas_args(**kwargs)


def test_tight_crop_is_the_mask_rectangle():
    pixels = np.arange(6 * 7 * 2).reshape(6, 7, 2)
    mask = np.zeros((6, 7), dtype=bool)
    mask[2, 3] = mask[4, 5] = True
    np.testing.assert_array_equal(tight_crop(pixels, mask), pixels[2:5, 3:6])
    assert tight_crop(pixels, np.zeros((6, 7), dtype=bool)) is None


def test_place_box_fits_and_respects_the_overlap_limit():
    rng = np.random.default_rng(0)
    boxes = np.zeros((0, 4))
    for _ in range(40):
        box = place_box(rng, (10, 12), (50, 60), boxes, 0.1)
        if box is not None:
            assert 0 <= box[0] and box[2] <= 60 and 0 <= box[1] and box[3] <= 50
            assert box[2] - box[0] == 12 and box[3] - box[1] == 10
            assert len(boxes) == 0 or iou_one_many(box, boxes).max() <= 0.1
            boxes = np.concatenate((boxes, box[None]))
    assert len(boxes) > 5
    assert place_box(rng, (51, 10), (50, 60), boxes, 1.0) is None  # does not fit
    full = np.array([[0.0, 0.0, 60.0, 50.0]])
    assert place_box(rng, (50, 60), (50, 60), full, 0.5) is None  # every place overlaps
