"""Adversarial tests for fewsight.geometry.BoxCoder against a float64 reference and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.geometry import BoxCoder
from fewsight.geometry.coder import DEFAULT_SCALE_CLAMP

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 0.5, 7.0)]


def boxes(n, seed, dtype=torch.float64, size=500.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2 + 2
    return torch.cat((xy, xy + wh), -1).to(dtype)


def naive_encode(gt, anchors, w):
    out = []
    for p, a in zip(gt.double().tolist(), anchors.double().tolist()):
        pw, ph = p[2] - p[0], p[3] - p[1]
        aw, ah = a[2] - a[0], a[3] - a[1]
        pcx, pcy = p[0] + pw / 2, p[1] + ph / 2
        acx, acy = a[0] + aw / 2, a[1] + ah / 2
        out.append([w[0] * (pcx - acx) / aw, w[1] * (pcy - acy) / ah, w[2] * math.log(pw / aw), w[3] * math.log(ph / ah)])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_equals_naive_and_round_trip(weights):
    coder = BoxCoder(weights)
    gt, anchors = boxes(50, 0), boxes(50, 1)
    deltas = coder.encode(gt, anchors)
    assert deltas.dtype == torch.float64 and deltas.shape == (50, 4)
    torch.testing.assert_close(deltas, naive_encode(gt, anchors, weights), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coder.decode(deltas, anchors), gt, rtol=0, atol=1e-9)  # float64 exact-ish
    g32, a32 = gt.float(), anchors.float()
    back = coder.decode(coder.encode(g32, a32), a32)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, g32, rtol=0, atol=2e-4)  # coordinates up to ~750 px


@pytest.mark.parametrize("weights", WEIGHTS)
def test_vs_torchvision_box_coder(weights):
    coder = BoxCoder(weights)
    tv = TVBoxCoder(weights, bbox_xform_clip=DEFAULT_SCALE_CLAMP)
    gt, anchors = boxes(40, 2, torch.float32), boxes(40, 3, torch.float32)
    torch.testing.assert_close(coder.encode(gt, anchors), tv.encode_single(gt, anchors), rtol=1e-5, atol=1e-5)
    deltas = torch.randn(40, 4, generator=torch.Generator().manual_seed(4)) * 3
    ref = tv.decode_single(deltas, anchors)
    torch.testing.assert_close(coder.decode(deltas, anchors), ref, rtol=1e-5, atol=1e-3)


def test_from_variances_equals_ssd_weights():
    ssd = BoxCoder.from_variances((0.1, 0.2))
    assert ssd.weights == (10.0, 10.0, 5.0, 5.0)
    plain = BoxCoder((10.0, 10.0, 5.0, 5.0))
    gt, anchors = boxes(20, 5), boxes(20, 6)
    assert torch.equal(ssd.encode(gt, anchors), plain.encode(gt, anchors))
    d = torch.randn(20, 4, dtype=torch.float64)
    assert torch.equal(ssd.decode(d, anchors), plain.decode(d, anchors))
    # the SSD formulation: dx = (cx - cx_a) / (var0 * w_a), dw = log(w / w_a) / var1
    enc = ssd.encode(gt, anchors)
    torch.testing.assert_close(enc, naive_encode(gt, anchors, (10.0, 10.0, 5.0, 5.0)))
    assert ssd.clamp == DEFAULT_SCALE_CLAMP
    assert BoxCoder.from_variances((0.1, 0.2), clamp=2.0).clamp == 2.0


def test_decode_clamps_huge_scale_deltas():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors)
    assert torch.isfinite(out).all()
    w = out[0, 2] - out[0, 0]
    assert w.item() == pytest.approx(1000.0, rel=1e-5)  # exp(log(1000/16)) * 16
    out = coder.decode(torch.tensor([[0.0, 0.0, -1e4, -1e4]]), anchors)
    assert torch.isfinite(out).all()
    # the clamp is applied after dividing by the weights (as torchvision)
    ssd = BoxCoder.from_variances()
    out = ssd.decode(torch.tensor([[0.0, 0.0, 1e4, 5 * 1.0]]), anchors)
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(1000.0, rel=1e-5)
    assert (out[0, 3] - out[0, 1]).item() == pytest.approx(16 * math.e, rel=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        o = coder.decode(torch.tensor([[0.5, -0.5, 1e4, 1e4]], dtype=dtype), anchors.to(dtype))  # dx is not clamped (as torchvision)
        assert o.dtype == dtype and torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    gt, anchors = boxes(30, 7, torch.float32), boxes(30, 8, torch.float32)
    gt_h, anchors_h = gt.to(dtype), anchors.to(dtype)
    enc = coder.encode(gt_h, anchors_h)
    assert enc.dtype == dtype and torch.isfinite(enc).all()
    ref = coder.encode(gt_h.float(), anchors_h.float())
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(enc.float(), ref, rtol=tol, atol=tol)
    dec = coder.decode(enc, anchors_h)
    assert dec.dtype == dtype and torch.isfinite(dec).all()
    torch.testing.assert_close(dec.float(), gt_h.float(), rtol=tol, atol=4.0)
    # 4000 px boxes in fp16
    big_a = torch.tensor([[0.0, 0.0, 4000.0, 3000.0]], dtype=dtype)
    big_g = torch.tensor([[100.0, 50.0, 3900.0, 2950.0]], dtype=dtype)
    e = coder.encode(big_g, big_a)
    assert torch.isfinite(e).all()
    assert torch.isfinite(coder.decode(e, big_a)).all()


def test_broadcast_anchors_over_batch():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = boxes(12, 9)  # [A, 4]
    gt = torch.stack([boxes(12, 10), boxes(12, 11), boxes(12, 12)])  # [B, A, 4]
    enc = coder.encode(gt, anchors)
    assert enc.shape == (3, 12, 4)
    for b in range(3):
        torch.testing.assert_close(enc[b], coder.encode(gt[b], anchors), rtol=0, atol=0)
    dec = coder.decode(enc, anchors)
    assert dec.shape == (3, 12, 4)
    torch.testing.assert_close(dec, gt, rtol=0, atol=1e-9)
    # deltas [B, A, 4] with anchors [B, A, 4]
    torch.testing.assert_close(coder.decode(enc, anchors.expand(3, -1, -1)), dec, rtol=0, atol=0)
    # empty
    assert coder.encode(torch.zeros(2, 0, 4), torch.zeros(0, 4)).shape == (2, 0, 4)
    assert coder.decode(torch.zeros(2, 0, 4), torch.zeros(0, 4)).shape == (2, 0, 4)


def test_zero_size_boxes_finite():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    gt = torch.tensor([[3.0, 3.0, 3.0, 8.0], [0.0, 0.0, 10.0, 10.0]])  # zero-width gt; zero-size anchor
    for dtype in (torch.float32, torch.float64, torch.float16):
        enc = coder.encode(gt.to(dtype), anchors.to(dtype))
        assert torch.isfinite(enc).all(), (dtype, enc)
        assert torch.isfinite(coder.decode(enc, anchors.to(dtype))).all()


def test_gradient_through_decode_and_encode():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = boxes(4, 13)
    deltas = (torch.randn(4, 4, dtype=torch.float64) * 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda d: coder.decode(d, anchors), (deltas,))
    gt = boxes(4, 14).requires_grad_()
    torch.autograd.gradcheck(lambda g: coder.encode(g, anchors), (gt,))


def test_errors():
    with pytest.raises(InvalidArgumentError, match="weights"):
        BoxCoder((1.0, 1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="weights"):
        BoxCoder((1.0, 0.0, 1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="variances"):
        BoxCoder.from_variances((0.1,))
    with pytest.raises(InvalidArgumentError, match="variances"):
        BoxCoder.from_variances((0.1, -0.2))
    coder = BoxCoder()
    with pytest.raises(ShapeError) as e:
        coder.encode(torch.zeros(3, 5), torch.zeros(3, 4))
    assert "boxes" in str(e.value) and "(3, 5)" in str(e.value)
    with pytest.raises(ShapeError, match="anchors"):
        coder.encode(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ShapeError, match="deltas"):
        coder.decode(torch.zeros(3, 3), torch.zeros(3, 4))
    assert "BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)" in repr(coder)
