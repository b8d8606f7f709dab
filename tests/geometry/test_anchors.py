"""Adversarial tests for fewsight.geometry.anchors: RetinaNet anchors and SSD default boxes."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.geometry import SSD300_ASPECT_RATIOS, AnchorGenerator, default_boxes, feature_size

SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)
SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]
SSD300_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]


def naive_anchors(image_size, levels=(3, 4, 5, 6, 7), scales=SCALES, ratios=RATIOS):
    """Explicit loops in float64: level, row, column, ratio, scale."""
    h_img, w_img = image_size
    out = []
    for level in levels:
        stride = 2**level
        size = 4 * stride
        fh, fw = math.ceil(h_img / stride), math.ceil(w_img / stride)
        for i in range(fh):
            for j in range(fw):
                cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
                for r in ratios:
                    for s in scales:
                        area = (size * s) ** 2
                        w = math.sqrt(area / r)
                        h = w * r
                        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("size", [(513, 377), (600, 600), (97, 131), (1, 1), (128, 256), (129, 255)])
@pytest.mark.parametrize("levels", [(3, 4, 5, 6, 7), (3, 4, 5), (4, 5, 6, 7), (3, 4, 5, 6)])
def test_anchor_count_any_size_any_levels(size, levels):
    gen = AnchorGenerator(levels=levels)
    expected = sum(math.ceil(size[0] / 2**lv) * math.ceil(size[1] / 2**lv) * 9 for lv in levels)
    anchors = gen(size)
    assert anchors.shape == (expected, 4)
    assert gen.num_anchors(size) == expected
    assert gen.feature_sizes(size) == [(math.ceil(size[0] / 2**lv), math.ceil(size[1] / 2**lv)) for lv in levels]
    assert gen.num_anchors_per_location == 9


def test_feature_size_matches_resnet_stride2_convs():
    # ceil(n / 2) per stride-2 conv (k3 p1): check against real convolutions for awkward sizes.
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    for h, w in [(513, 377), (97, 131), (1, 1), (300, 300)]:
        x = torch.zeros(1, 1, h, w)
        for level in range(1, 8):
            x = conv(x)
            assert feature_size((h, w), 2**level) == tuple(x.shape[-2:]), (h, w, level)


def test_feature_size_doc_example():
    assert feature_size((513, 377), 8) == (65, 48)


# ----------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [(97, 131), (1, 1), (200, 72)])
def test_anchors_equal_naive_loop(size):
    ours = AnchorGenerator()(size, dtype=torch.float64)
    ref = naive_anchors(size)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_anchors_subset_levels_equal_naive_loop():
    ours = AnchorGenerator(levels=(4, 5, 6))((150, 97), dtype=torch.float64)
    torch.testing.assert_close(ours, naive_anchors((150, 97), levels=(4, 5, 6)), rtol=0, atol=1e-9)


def test_anchor_centres_areas_ratios_per_level():
    size = (257, 130)
    gen = AnchorGenerator()
    anchors = gen(size, dtype=torch.float64)
    offset = 0
    for level, (fh, fw) in zip(gen.levels, gen.feature_sizes(size)):
        stride = 2**level
        n = fh * fw * 9
        a = anchors[offset : offset + n].reshape(fh, fw, 3, 3, 4)  # row, col, ratio, scale
        offset += n
        cx = (a[..., 0] + a[..., 2]) / 2
        cy = (a[..., 1] + a[..., 3]) / 2
        w = a[..., 2] - a[..., 0]
        h = a[..., 3] - a[..., 1]
        js = (torch.arange(fw, dtype=torch.float64) + 0.5) * stride
        is_ = (torch.arange(fh, dtype=torch.float64) + 0.5) * stride
        torch.testing.assert_close(cx, js.view(1, fw, 1, 1).expand_as(cx), rtol=0, atol=1e-9)
        torch.testing.assert_close(cy, is_.view(fh, 1, 1, 1).expand_as(cy), rtol=0, atol=1e-9)
        for r_i, r in enumerate(RATIOS):
            for s_i, s in enumerate(SCALES):
                expected_area = (4 * stride * s) ** 2
                torch.testing.assert_close(
                    (w * h)[:, :, r_i, s_i], torch.full((fh, fw), expected_area, dtype=torch.float64)
                )
                torch.testing.assert_close(
                    (h / w)[:, :, r_i, s_i], torch.full((fh, fw), r, dtype=torch.float64)
                )
    assert offset == len(anchors)


def test_custom_sizes_scales_ratios():
    gen = AnchorGenerator(levels=(3,), sizes=(20.0,), scales=(1.0, 2.0), aspect_ratios=(1.0, 4.0))
    a = gen((8, 8), dtype=torch.float64)
    assert a.shape == (4, 4)
    w = a[:, 2] - a[:, 0]
    h = a[:, 3] - a[:, 1]
    # order: ratio-major then scale
    torch.testing.assert_close(w, torch.tensor([20.0, 40.0, 10.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([20.0, 40.0, 40.0, 80.0], dtype=torch.float64))
    torch.testing.assert_close(a[:, :2] + a[:, 2:], torch.full((4, 2), 8.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- vs torchvision


@pytest.mark.parametrize("size,levels", [((512, 640), (3, 4, 5, 6, 7)), ((256, 384), (4, 5, 6))])
def test_anchors_vs_torchvision(size, levels):
    # torchvision: centres at j * stride (ours (j + 0.5) * stride) and rounded base anchors; its strides
    # are image_size // grid_size, which is only right when every level divides the image, so we use
    # multiples of 128 here.
    gen = AnchorGenerator(levels=levels)
    tv = TVAnchorGenerator(
        sizes=tuple(tuple(4 * 2**lv * s for s in SCALES) for lv in levels),
        aspect_ratios=(RATIOS,) * len(levels),
    )
    feats = [torch.zeros(1, 1, *fs) for fs in gen.feature_sizes(size)]
    images = ImageList(torch.zeros(1, 3, *size), [size])
    ref = tv(images, feats)[0].double()
    ours = gen(size, dtype=torch.float64)
    assert ours.shape == ref.shape
    offsets = torch.cat([torch.full((h * w * 9, 1), 2**lv / 2, dtype=torch.float64)
                         for lv, (h, w) in zip(levels, gen.feature_sizes(size))])
    ours_c = (ours[:, :2] + ours[:, 2:]) / 2
    ref_c = (ref[:, :2] + ref[:, 2:]) / 2
    torch.testing.assert_close(ours_c - offsets, ref_c, rtol=0, atol=1e-4)
    ours_wh = ours[:, 2:] - ours[:, :2]
    ref_wh = ref[:, 2:] - ref[:, :2]
    assert (ours_wh - ref_wh).abs().max() <= 1.0 + 1e-4  # torchvision rounds each half-size


# ----------------------------------------------------------------------------------------- dtype/device/cache


def test_dtype_and_device_follow_tensor_input():
    gen = AnchorGenerator(levels=(3, 4))
    images = torch.zeros(2, 3, 40, 56, dtype=torch.float64)
    a = gen(images)
    assert a.dtype == torch.float64 and a.device == images.device
    assert a.shape[0] == gen.num_anchors((40, 56))
    assert gen(images.half()).dtype == torch.float16
    assert gen(torch.zeros(40, 56, dtype=torch.uint8)).dtype == torch.float32
    assert gen((40, 56)).dtype == torch.float32
    torch.testing.assert_close(gen(images.half()).double(), a, rtol=1e-3, atol=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_follows_cuda_tensor():
    gen = AnchorGenerator()
    x = torch.zeros(1, 3, 100, 70, device="cuda")
    a = gen(x)
    assert a.device == x.device
    torch.testing.assert_close(a.cpu(), gen((100, 70)))


def test_cache_returns_equal_tensors():
    gen = AnchorGenerator()
    a = gen((97, 131))
    b = gen((97, 131))
    assert torch.equal(a, b)
    c = gen((97, 131), dtype=torch.float64)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c.float(), a)
    # a different size after caching
    assert gen((98, 131)).shape[0] == gen.num_anchors((98, 131))
    for k in range(30):  # the cache is bounded and still correct after eviction
        gen((64 + k, 64))
    torch.testing.assert_close(gen((97, 131)), AnchorGenerator()((97, 131)))


def test_cached_anchors_not_corrupted_by_caller_in_place_edit():
    # A caller clipping anchors in place (anchors.clamp_(...)) must not change later calls' anchors.
    gen = AnchorGenerator(levels=(3,))
    a = gen((16, 16))
    fresh = a.clone()
    a.clamp_(min=0, max=16)
    b = gen((16, 16))
    assert torch.equal(b, fresh), "AnchorGenerator returns its cached tensor itself: in-place edits leak into the cache"


def test_anchor_generator_errors():
    with pytest.raises(InvalidArgumentError, match="levels"):
        AnchorGenerator(levels=())
    with pytest.raises(InvalidArgumentError, match="sizes"):
        AnchorGenerator(levels=(3, 4), sizes=(32.0,))
    with pytest.raises(InvalidArgumentError):
        AnchorGenerator(scales=())
    with pytest.raises(InvalidArgumentError):
        AnchorGenerator(aspect_ratios=(0.0, 1.0))
    gen = AnchorGenerator()
    with pytest.raises(InvalidArgumentError, match="images_or_size"):
        gen((0, 10))
    with pytest.raises(InvalidArgumentError, match="images_or_size"):
        gen((10, 10, 3))
    with pytest.raises(ShapeError, match="images_or_size"):
        gen(torch.zeros(5))
    with pytest.raises(InvalidArgumentError, match="feature_sizes"):
        gen.grid_anchors([(4, 4)])


# ----------------------------------------------------------------------------------------- SSD default boxes


def naive_default_boxes(image_size, feature_sizes, scales, aspect_ratios, steps=None):
    h_img, w_img = image_size
    out = []
    for k, (fh, fw) in enumerate(feature_sizes):
        s, s_next = scales[k], scales[k + 1]
        whs = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in aspect_ratios[k]:
            whs += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        sx = w_img / fw if steps is None else steps[k]
        sy = h_img / fh if steps is None else steps[k]
        for i in range(fh):
            for j in range(fw):
                cx, cy = (j + 0.5) * sx, (i + 0.5) * sy
                for w, h in whs:
                    w, h = w * w_img, h * h_img
                    out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(out, dtype=torch.float64)


def test_ssd300_default_box_count():
    boxes = default_boxes((300, 300), SSD300_FEATURES)
    assert boxes.shape == (8732, 4)
    assert boxes.dtype == torch.float32
    assert SSD300_ASPECT_RATIOS == ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def test_ssd300_equals_torchvision_default_box_generator():
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    tv = DefaultBoxGenerator(ratios, scales=SSD300_SCALES, steps=SSD300_STEPS, clip=False)
    feats = [torch.zeros(1, 1, h, w, dtype=torch.float64) for h, w in SSD300_FEATURES]
    ref = tv(ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)]), feats)[0]
    ours = default_boxes(
        (300, 300), SSD300_FEATURES, scales=SSD300_SCALES, steps=SSD300_STEPS,
        aspect_ratios=ratios, clip=False, dtype=torch.float64,
    )
    assert ours.shape == ref.shape == (8732, 4)
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=1e-4)  # torchvision: float32 wh pairs
    naive = naive_default_boxes((300, 300), SSD300_FEATURES, SSD300_SCALES, ratios, SSD300_STEPS)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-9)


def test_default_boxes_non_square_equals_torchvision_and_naive():
    size = (320, 512)
    feats = [(40, 64), (20, 32), (10, 16), (5, 8), (3, 4), (1, 2)]
    ours = default_boxes(size, feats, clip=False, dtype=torch.float64)
    scales = [0.2 + 0.7 * k / 5 for k in range(6)] + [1.0]
    tv = DefaultBoxGenerator([list(r) for r in SSD300_ASPECT_RATIOS], min_ratio=0.2, max_ratio=0.9, clip=False)
    ref = tv(ImageList(torch.zeros(1, 3, *size), [size]), [torch.zeros(1, 1, h, w, dtype=torch.float64) for h, w in feats])[0]
    torch.testing.assert_close(ours, ref.double(), rtol=0, atol=1e-4)  # torchvision: float32 wh pairs
    naive = naive_default_boxes(size, feats, scales, SSD300_ASPECT_RATIOS)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-9)
    expected = sum(h * w * (2 + 2 * len(r)) for (h, w), r in zip(feats, SSD300_ASPECT_RATIOS))
    assert ours.shape == (expected, 4)


def test_default_boxes_clip_keeps_inside():
    size = (320, 512)
    feats = [(40, 64), (20, 32), (10, 16), (5, 8), (3, 4), (1, 2)]
    unclipped = default_boxes(size, feats, clip=False)
    assert (unclipped[:, 0] < 0).any() and (unclipped[:, 2] > 512).any()  # the test is meaningful
    boxes = default_boxes(size, feats, clip=True)
    assert boxes.shape == unclipped.shape
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 512).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 320).all()
    inside = (unclipped[:, :2] >= 0).all(1) & (unclipped[:, 2:] <= torch.tensor([512.0, 320.0])).all(1)
    torch.testing.assert_close(boxes[inside], unclipped[inside])


def test_default_boxes_other_level_counts_and_dtype():
    b = default_boxes((64, 64), [(8, 8)], dtype=torch.float64)
    assert b.shape == (8 * 8 * 6, 4) and b.dtype == torch.float64  # one level: ratios (2, 3)
    b2 = default_boxes((64, 64), [(8, 8), (4, 4), (2, 2)], aspect_ratios=[(2,), (2,), ()])
    assert b2.shape == (64 * 4 + 16 * 4 + 4 * 2, 4)


def test_default_boxes_errors():
    with pytest.raises(InvalidArgumentError, match="feature_sizes"):
        default_boxes((300, 300), [])
    with pytest.raises(InvalidArgumentError, match="aspect_ratios"):
        default_boxes((300, 300), SSD300_FEATURES, aspect_ratios=[(2,)])
    with pytest.raises(InvalidArgumentError, match="scales"):
        default_boxes((300, 300), SSD300_FEATURES, scales=[0.1, 0.2])
    with pytest.raises(InvalidArgumentError, match="steps"):
        default_boxes((300, 300), SSD300_FEATURES, steps=[8])
    with pytest.raises(InvalidArgumentError):
        default_boxes((0, 300), SSD300_FEATURES)
