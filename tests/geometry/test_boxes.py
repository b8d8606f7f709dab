"""Adversarial tests for fewsight.geometry.boxes: naive float64 references and torchvision."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.geometry import (
    BOX_FORMATS,
    box_area,
    box_convert,
    box_ioa,
    box_iou,
    clip_boxes,
    sanitize_boxes,
)


def random_boxes(n: int, *, seed: int = 0, size: float = 100.0, dtype=torch.float32, grid: float | None = None):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2 + 1
    boxes = torch.cat((xy, xy + wh), dim=-1)
    if grid is not None:
        boxes = (boxes / grid).round() * grid
    return boxes.to(dtype)


def naive_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.double().tolist()):
        for j, q in enumerate(b.double().tolist()):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            ap = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
            aq = max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1])
            union = ap + aq - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def naive_ioa(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.double().tolist()):
        ap = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
        for j, q in enumerate(b.double().tolist()):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            out[i, j] = iw * ih / ap if ap > 0 else 0.0
    return out


# ----------------------------------------------------------------------------------------- box_iou


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_iou_matches_naive_and_torchvision(seed):
    a = random_boxes(17, seed=seed, grid=5.0, dtype=torch.float64)
    b = random_boxes(11, seed=seed + 100, grid=5.0, dtype=torch.float64)
    ours = box_iou(a, b)
    assert ours.shape == (17, 11)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, naive_iou(a, b), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, torchvision.ops.box_iou(a, b), rtol=0, atol=1e-12)
    ours32 = box_iou(a.float(), b.float())
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32, torchvision.ops.box_iou(a.float(), b.float()), rtol=1e-5, atol=1e-6)


def test_box_iou_identical_and_disjoint():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [100.0, 100.0, 101.0, 101.0]])
    assert box_iou(a, b).tolist() == [[1.0, 0.0, 0.0]]


def test_box_iou_batched_leading_dims_broadcast():
    a = random_boxes(2 * 3 * 5, seed=3).reshape(2, 3, 5, 4)
    b = random_boxes(3 * 4, seed=4).reshape(3, 4, 4)  # broadcasts against the [2, 3] leading dims
    out = box_iou(a, b)
    assert out.shape == (2, 3, 5, 4)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], naive_iou(a[i, j], b[j]).float(), rtol=1e-5, atol=1e-6)
    # a shared [N, 4] against a batch [B, M, 4]
    shared = random_boxes(6, seed=5)
    out2 = box_iou(shared, b)
    assert out2.shape == (3, 6, 4)
    for j in range(3):
        torch.testing.assert_close(out2[j], naive_iou(shared, b[j]).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_half_precision_large_coordinates(dtype):
    # 4000 px boxes: areas ~1.6e7 overflow fp16 (max 65504) if computed in the input dtype.
    a = torch.tensor([[0.0, 0.0, 4000.0, 3000.0], [1000.0, 500.0, 3990.0, 2990.0], [10.0, 10.0, 20.0, 20.0]])
    b = torch.tensor([[0.0, 0.0, 3000.0, 4000.0], [2000.0, 1000.0, 4000.0, 4000.0]])
    out = box_iou(a.to(dtype), b.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = box_iou(a.to(dtype).float(), b.to(dtype).float())
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), naive_iou(a, b).float(), rtol=2 * tol, atol=2 * tol)


def test_box_iou_mixed_dtypes_promote():
    a = random_boxes(4, seed=6, dtype=torch.float16)
    b = random_boxes(3, seed=7, dtype=torch.float64)
    out = box_iou(a, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_iou(a.double(), b), rtol=0, atol=1e-12)


def test_box_iou_integer_boxes_not_truncated():
    # torchvision returns a float IoU for integer boxes; ours must not silently round IoU to an int.
    a = torch.tensor([[0, 0, 2, 2]])
    b = torch.tensor([[1, 1, 3, 3]])
    try:
        out = box_iou(a, b)
    except DTypeError:
        return  # refusing integer boxes is acceptable
    assert out.is_floating_point(), f"integer boxes gave IoU of dtype {out.dtype}: {out}"
    torch.testing.assert_close(out.double(), torchvision.ops.box_iou(a, b).double(), rtol=1e-6, atol=1e-7)


def test_box_ioa_integer_boxes_not_truncated():
    a = torch.tensor([[0, 0, 2, 2]])
    b = torch.tensor([[1, 1, 3, 3]])
    try:
        out = box_ioa(a, b)
    except DTypeError:
        return
    assert out.is_floating_point(), f"integer boxes gave IoA of dtype {out.dtype}: {out}"
    assert out.item() == pytest.approx(0.25)


def test_box_iou_degenerate_boxes_zero_not_nan():
    zero_w = torch.tensor([[5.0, 0.0, 5.0, 10.0]])
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    normal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    inverted = torch.tensor([[10.0, 10.0, 0.0, 0.0]])
    for x, y in itertools.product([zero_w, point, normal, inverted], repeat=2):
        out = box_iou(x, y)
        assert torch.isfinite(out).all(), (x, y, out)
    assert box_iou(zero_w, zero_w).item() == 0.0  # both degenerate: union 0 -> 0, not NaN
    assert box_iou(point, point).item() == 0.0
    assert box_iou(zero_w, normal).item() == 0.0
    assert box_iou(inverted, normal).item() == 0.0  # inverted box has area 0
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert box_iou(point.to(dtype), point.to(dtype)).item() == 0.0


@pytest.mark.parametrize("n,m", [(0, 3), (3, 0), (0, 0)])
def test_box_iou_empty(n, m):
    out = box_iou(torch.zeros(n, 4), torch.zeros(m, 4))
    assert out.shape == (n, m)
    out_b = box_iou(torch.zeros(2, n, 4), torch.zeros(2, m, 4))
    assert out_b.shape == (2, n, m)


def test_box_iou_gradient_flows():
    a = random_boxes(3, seed=8, dtype=torch.float64).requires_grad_()
    b = random_boxes(2, seed=9, dtype=torch.float64) + torch.tensor([1.0, 1.0, 30.0, 30.0], dtype=torch.float64)
    b.requires_grad_()
    torch.autograd.gradcheck(box_iou, (a, b))


def test_box_iou_errors_name_argument_and_shapes():
    with pytest.raises(ShapeError) as e:
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    msg = str(e.value)
    assert "boxes1" in msg and "(3, 5)" in msg and "4]" in msg
    with pytest.raises(ShapeError) as e:
        box_iou(torch.zeros(3, 4), torch.zeros(2, 3))
    msg = str(e.value)
    assert "boxes2" in msg and "(2, 3)" in msg
    with pytest.raises(ShapeError) as e:
        box_iou(torch.zeros(4), torch.zeros(2, 4))
    assert "(4,)" in str(e.value)
    with pytest.raises(ValueError):  # ShapeError is a ValueError
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    # nested lists are converted at the boundary; what cannot become a tensor is a DTypeError
    assert box_iou([[0, 0, 1, 1]], torch.zeros(2, 4)).shape == (1, 2)
    with pytest.raises(DTypeError):
        box_iou("0 0 1 1", torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------- box_ioa


def test_box_ioa_matches_naive():
    a = random_boxes(9, seed=10, grid=4.0, dtype=torch.float64)
    b = random_boxes(5, seed=11, grid=4.0, dtype=torch.float64)
    torch.testing.assert_close(box_ioa(a, b), naive_ioa(a, b), rtol=0, atol=1e-12)
    inside = torch.tensor([[2.0, 2.0, 4.0, 4.0]])
    region = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    assert box_ioa(inside, region).item() == 1.0
    assert box_ioa(region, inside).item() == pytest.approx(4 / 10000)
    degenerate = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    assert box_ioa(degenerate, region).item() == 0.0  # zero-area box: 0, not NaN


def test_box_ioa_half_and_batched():
    a = torch.tensor([[[0.0, 0.0, 4000.0, 4000.0]], [[0.0, 0.0, 10.0, 10.0]]], dtype=torch.float16)
    r = torch.tensor([[[0.0, 0.0, 2000.0, 4000.0]], [[0.0, 0.0, 5.0, 5.0]]], dtype=torch.float16)
    out = box_ioa(a, r)
    assert out.shape == (2, 1, 1) and out.dtype == torch.float16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().flatten(), torch.tensor([0.5, 0.25]))


# ----------------------------------------------------------------------------------------- box_area


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [5.0, 5.0, 1.0, 1.0], [-2.0, -2.0, 2.0, 0.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 0.0, 8.0]
    batched = boxes.reshape(2, 2, 4)
    assert box_area(batched).shape == (2, 2)
    r = random_boxes(10, seed=12, dtype=torch.float64)
    torch.testing.assert_close(box_area(r), torchvision.ops.box_area(r))
    assert box_area(torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(ShapeError, match="boxes"):
        box_area(torch.zeros(3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_area_half_precision_large_box_finite(dtype):
    # SPEC §1: half inputs computed in float32 where precision matters, results finite.
    # torchvision.ops.box_area upcasts fp16 and returns float32 16e6 here; fp16 cannot hold 1.6e7.
    boxes = torch.tensor([[0.0, 0.0, 4000.0, 4000.0], [0.0, 0.0, 3.0, 2.0]], dtype=dtype)
    out = box_area(boxes)
    assert torch.isfinite(out).all(), f"box_area({dtype}) overflowed: {out}"
    torch.testing.assert_close(out.float(), torch.tensor([1.6e7, 6.0]), rtol=1e-2, atol=0)


# ----------------------------------------------------------------------------------------- box_convert


@pytest.mark.parametrize("in_fmt,out_fmt", list(itertools.product(BOX_FORMATS, repeat=2)))
def test_box_convert_vs_torchvision_and_round_trip(in_fmt, out_fmt):
    xyxy = random_boxes(20, seed=13, dtype=torch.float64)
    src = torchvision.ops.box_convert(xyxy, "xyxy", in_fmt)
    ours = box_convert(src, in_fmt, out_fmt)
    ref = torchvision.ops.box_convert(src, in_fmt, out_fmt)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    back = box_convert(ours, out_fmt, in_fmt)
    torch.testing.assert_close(back, src, rtol=0, atol=1e-12)
    if in_fmt == out_fmt:
        assert ours.data_ptr() != src.data_ptr()  # a copy, not an alias


def test_box_convert_batched_and_values():
    b = torch.tensor([[[1.0, 1.0, 2.0, 4.0]]])
    assert box_convert(b, "cxcywh", "xyxy").tolist() == [[[0.0, -1.0, 2.0, 3.0]]]
    assert box_convert(b, "xywh", "xyxy").tolist() == [[[1.0, 1.0, 3.0, 5.0]]]
    assert box_convert(b, "xyxy", "xywh").tolist() == [[[1.0, 1.0, 1.0, 3.0]]]
    assert box_convert(b, "xyxy", "cxcywh").tolist() == [[[1.5, 2.5, 1.0, 3.0]]]
    assert box_convert(torch.zeros(0, 4), "xyxy", "cxcywh").shape == (0, 4)
    assert box_convert(b.half(), "xyxy", "cxcywh").dtype == torch.float16


def test_box_convert_errors():
    with pytest.raises(InvalidArgumentError) as e:
        box_convert(torch.zeros(1, 4), "xyxy", "yxyx")
    assert "out_fmt" in str(e.value) and "yxyx" in str(e.value)
    with pytest.raises(InvalidArgumentError, match="in_fmt"):
        box_convert(torch.zeros(1, 4), "cxcy", "xyxy")
    with pytest.raises(ShapeError, match="boxes"):
        box_convert(torch.zeros(1, 5), "xyxy", "xywh")


# ----------------------------------------------------------------------------------------- clip_boxes


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, 2.0, 50.0, 9.0], [1.0, 1.0, 2.0, 2.0], [-10.0, -10.0, -1.0, -1.0]])
    out = clip_boxes(boxes, (8, 40))
    assert out.tolist() == [[0.0, 2.0, 40.0, 8.0], [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    # H and W are not swapped on a non-square image
    out = clip_boxes(torch.tensor([[0.0, 0.0, 1000.0, 1000.0]]), (100, 300))
    assert out.tolist() == [[0.0, 0.0, 300.0, 100.0]]
    batched = random_boxes(12, seed=14, size=200).reshape(3, 4, 4)
    out = clip_boxes(batched, (50, 70))
    assert out.shape == (3, 4, 4)
    ref = torchvision.ops.clip_boxes_to_image(batched.reshape(-1, 4), (50, 70)).reshape(3, 4, 4)
    torch.testing.assert_close(out, ref)
    assert not torch.equal(out, batched)  # input left untouched (clip is not in place)
    assert clip_boxes(torch.zeros(0, 4), (5, 5)).shape == (0, 4)


def test_clip_boxes_errors():
    with pytest.raises(InvalidArgumentError, match="image_size"):
        clip_boxes(torch.zeros(1, 4), (0, 5))
    with pytest.raises(InvalidArgumentError, match="image_size"):
        clip_boxes(torch.zeros(1, 4), (5,))
    with pytest.raises(ShapeError):
        clip_boxes(torch.zeros(1, 2), (5, 5))


# ----------------------------------------------------------------------------------------- sanitize_boxes


def test_sanitize_boxes_repairs_and_drops():
    boxes = torch.tensor(
        [
            [5.0, 5.0, 1.0, 1.0],  # swapped corners -> repaired
            [0.0, 0.0, 0.0, 9.0],  # zero width -> dropped
            [float("nan"), 0.0, 3.0, 3.0],  # non-finite -> dropped
            [0.0, 0.0, float("inf"), 3.0],  # non-finite -> dropped
            [20.0, 20.0, 30.0, 30.0],  # outside an 8x8 image -> dropped
            [-3.0, 2.0, 4.0, 12.0],  # clipped to [0, 2, 4, 8]
            [1.0, 1.0, 1.5, 6.0],  # 0.5 wide < min_size 1 -> dropped
            [2.0, 1.0, 3.0, 2.0],  # exactly min_size -> kept
        ]
    )
    labels = torch.arange(8)
    r = sanitize_boxes(boxes, labels, image_size=(8, 8))
    assert r.keep.tolist() == [True, False, False, False, False, True, False, True]
    assert r.num_dropped == 5
    assert r.boxes.tolist() == [[1.0, 1.0, 5.0, 5.0], [0.0, 2.0, 4.0, 8.0], [2.0, 1.0, 3.0, 2.0]]
    assert r.labels.tolist() == [0, 5, 7]
    assert torch.equal(r.labels, labels[r.keep])
    assert r.keep.dtype == torch.bool and r.keep.shape == (8,)
    assert torch.isfinite(r.boxes).all()


def test_sanitize_boxes_without_image_size_and_min_size():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [-100.0, -100.0, -90.0, -80.0], [0.0, 0.0, 0.0, 0.0]])
    r = sanitize_boxes(boxes)
    assert r.keep.tolist() == [False, True, False]  # no image: outside boxes are kept
    assert r.labels is None
    r0 = sanitize_boxes(boxes, min_size=0.0)
    assert r0.keep.tolist() == [True, True, False]  # zero area still dropped with min_size 0
    r5 = sanitize_boxes(boxes, min_size=15.0)
    assert r5.keep.tolist() == [False, False, False]
    assert r5.boxes.shape == (0, 4)


def test_sanitize_boxes_matches_naive_loop():
    g = torch.Generator().manual_seed(15)
    boxes = (torch.rand(40, 4, generator=g) * 60 - 10).round()
    boxes[3, 1] = float("-inf")
    boxes[7, 2] = float("nan")
    labels = torch.randint(0, 5, (40,), generator=g)
    r = sanitize_boxes(boxes, labels, image_size=(30, 50), min_size=2.0)
    keep, kept = [], []
    for row in boxes.tolist():
        if not all(math.isfinite(v) for v in row):
            keep.append(False)
            continue
        x1, x2 = sorted((row[0], row[2]))
        y1, y2 = sorted((row[1], row[3]))
        x1, x2 = min(max(x1, 0), 50), min(max(x2, 0), 50)
        y1, y2 = min(max(y1, 0), 30), min(max(y2, 0), 30)
        ok = (x2 - x1) >= 2.0 and (y2 - y1) >= 2.0
        keep.append(ok)
        if ok:
            kept.append([x1, y1, x2, y2])
    assert r.keep.tolist() == keep
    assert r.boxes.tolist() == kept
    assert r.labels.tolist() == labels[torch.tensor(keep)].tolist()
    assert r.num_dropped == keep.count(False)


def test_sanitize_boxes_empty_and_errors():
    r = sanitize_boxes(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_size=(4, 4))
    assert r.boxes.shape == (0, 4) and r.labels.shape == (0,) and r.keep.shape == (0,)
    assert r.num_dropped == 0
    with pytest.raises(ShapeError) as e:
        sanitize_boxes(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    assert "labels" in str(e.value) and "(2,)" in str(e.value)
    with pytest.raises(ShapeError) as e:
        sanitize_boxes(torch.zeros(2, 3, 4))
    assert "boxes" in str(e.value) and "(2, 3, 4)" in str(e.value)
    with pytest.raises(ShapeError):
        sanitize_boxes(torch.zeros(3, 5))
    with pytest.raises(InvalidArgumentError, match="min_size"):
        sanitize_boxes(torch.zeros(3, 4), min_size=-1.0)


def test_box_iou_incompatible_leading_dims_raise_shape_error():
    # SPEC §1: bad input raises a fewsight.errors exception naming the shapes (not a raw RuntimeError)
    with pytest.raises(ShapeError) as e:
        box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 5, 4))
    assert "(2, 3, 4)" in str(e.value) and "(3, 5, 4)" in str(e.value)
