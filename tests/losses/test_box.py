"""Tests of fewsight.losses.box: smooth-L1, L1, GIoU and the detector box-regression wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.ops import generalized_box_iou_loss as tv_giou

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.geometry import BoxCoder
from fewsight.losses.box import box_regression_loss, giou_loss, l1_loss, smooth_l1_loss


def random_boxes(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 50
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 30 + 1
    return torch.cat([xy, xy + wh], dim=1)


def naive_smooth_l1(d: float, beta: float) -> float:
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def naive_giou_loss(p, t) -> float:
    def area(b):
        return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)

    iw = max(min(p[2], t[2]) - max(p[0], t[0]), 0.0)
    ih = max(min(p[3], t[3]) - max(p[1], t[1]), 0.0)
    inter = iw * ih
    union = area(p) + area(t) - inter
    c = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1]))
    return 1 - (inter / (union + 1e-7) - (c - union) / (c + 1e-7))


@pytest.mark.parametrize("beta", [1.0, 1 / 9, 0.5])
def test_smooth_l1_reference_and_torch(beta):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref = torch.tensor([[naive_smooth_l1(float(a - b), beta) for a, b in zip(r, s)] for r, s in zip(p, t)], dtype=torch.float64)
    torch.testing.assert_close(smooth_l1_loss(p, t, beta, "none"), ref)
    for red in ("mean", "sum"):
        torch.testing.assert_close(smooth_l1_loss(p, t, beta, red), F.smooth_l1_loss(p, t, beta=beta, reduction=red))
    assert torch.autograd.gradcheck(lambda x: smooth_l1_loss(x, t, beta, "none"), (p.clone().requires_grad_(True),))


def test_beta_zero_is_l1():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    torch.testing.assert_close(smooth_l1_loss(p, t, beta=0.0), l1_loss(p, t))
    torch.testing.assert_close(l1_loss(p, t, "sum"), F.l1_loss(p, t, reduction="sum"))
    x = p.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: l1_loss(v, t.double(), "sum"), (x,))


def test_giou_equals_torchvision_and_reference():
    p, t = random_boxes(50, 2), random_boxes(50, 3)
    for red in ("none", "mean", "sum"):
        torch.testing.assert_close(giou_loss(p, t, red), tv_giou(p, t, red))
    ref = torch.tensor([naive_giou_loss(a.tolist(), b.tolist()) for a, b in zip(p, t)], dtype=torch.float64)
    torch.testing.assert_close(giou_loss(p, t, "none"), ref)
    # batched leading dims
    torch.testing.assert_close(giou_loss(p.view(5, 10, 4), t.view(5, 10, 4), "none"), ref.view(5, 10))


def test_giou_gradcheck():
    p, t = random_boxes(5, 4), random_boxes(5, 5)
    assert torch.autograd.gradcheck(lambda x: giou_loss(x, t, "sum"), (p.clone().requires_grad_(True),))


def test_giou_degenerate_finite():
    p = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 2.0, 2.0], [0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 4.0, 4.0], [3.0, 3.0, 3.0, 3.0]],
        requires_grad=True,
    )
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 4.0], [10.0, 10.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0]])
    loss = giou_loss(p, t, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(p.grad).all()
    assert ((loss >= 0) & (loss <= 2)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    p, t = random_boxes(20, 6, torch.float32), random_boxes(20, 7, torch.float32)
    ph = p.to(dtype).requires_grad_(True)
    for fn in (giou_loss, smooth_l1_loss, l1_loss):
        out = fn(ph, t.to(dtype))
        assert out.dtype == torch.float32 and torch.isfinite(out)
        out.backward()
        assert ph.grad.dtype == dtype and torch.isfinite(ph.grad).all()
        ph.grad = None
        torch.testing.assert_close(out, fn(p.to(dtype).float(), t.to(dtype).float()))


def test_empty_zero_with_graph():
    e = torch.zeros(0, 4, requires_grad=True)
    for fn in (giou_loss, smooth_l1_loss, l1_loss):
        for red in ("mean", "sum"):
            out = fn(e, torch.zeros(0, 4), reduction=red)
            assert out.item() == 0.0
            out.backward()


def test_validation():
    with pytest.raises(ShapeError, match="target"):
        smooth_l1_loss(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(InvalidArgumentError, match="beta"):
        smooth_l1_loss(torch.zeros(3, 4), torch.zeros(3, 4), beta=-1.0)
    with pytest.raises(ShapeError, match="pred_boxes"):
        giou_loss(torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(InvalidArgumentError, match="kind"):
        box_regression_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), coder=BoxCoder(), kind="iou")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        l1_loss(torch.zeros(3, 4), torch.zeros(3, 4), reduction="avg")


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "giou"])
def test_box_regression_equals_torchvision_box_loss(kind):
    # torchvision's detection heads: per image, foreground anchors only, reduction "sum".
    anchors = random_boxes(30, 8)
    gt = random_boxes(30, 9)
    g = torch.Generator().manual_seed(10)
    deltas = torch.randn(2, 30, 4, generator=g, dtype=torch.float64) * 0.3
    positive = torch.rand(2, 30, generator=g) < 0.5
    gt_b = torch.stack([gt, gt.flip(0)])
    ours_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    tv_coder = tv_det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    beta = 1 / 9
    ours = box_regression_loss(deltas, gt_b, anchors, coder=ours_coder, kind=kind, beta=beta, positive=positive)
    ref = sum(
        tv_det_utils._box_loss(kind, tv_coder, anchors[positive[i]], gt_b[i][positive[i]], deltas[i][positive[i]], {"beta": beta})
        for i in range(2)
    )
    torch.testing.assert_close(ours, ref)
    per = box_regression_loss(deltas, gt_b, anchors, coder=ours_coder, kind=kind, beta=beta, positive=positive, reduction="none")
    assert per.shape == (2, 30) and (per[~positive] == 0).all()
    mean = box_regression_loss(deltas, gt_b, anchors, coder=ours_coder, kind=kind, beta=beta, positive=positive, reduction="mean")
    torch.testing.assert_close(mean, ref / positive.sum())


def test_box_regression_padding_targets_safe():
    # Non-positive anchors may carry garbage (zero boxes, NaN): no inf/NaN reaches loss or gradient.
    anchors = random_boxes(4, 11)
    deltas = torch.zeros(1, 4, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [float("nan")] * 4, [1.0, 1.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    positive = torch.tensor([[False, False, True, False]])
    for kind in ("l1", "smooth_l1", "giou"):
        out = box_regression_loss(deltas, targets, anchors, coder=BoxCoder(), kind=kind, positive=positive)
        (grad,) = torch.autograd.grad(out, deltas)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
        assert (grad[0, :2] == 0).all()
    none_pos = box_regression_loss(deltas, targets, anchors, coder=BoxCoder(), positive=torch.zeros(1, 4, dtype=torch.bool))
    assert none_pos.item() == 0.0
    none_pos.backward()


def test_box_regression_gradcheck():
    anchors = random_boxes(3, 12)
    gt = random_boxes(3, 13)
    deltas = (torch.randn(3, 4, dtype=torch.float64) * 0.2).requires_grad_(True)
    for kind in ("smooth_l1", "giou"):
        assert torch.autograd.gradcheck(
            lambda d: box_regression_loss(d, gt, anchors, coder=BoxCoder.from_variances(), kind=kind), (deltas,)
        )
