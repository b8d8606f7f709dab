"""Tests of fewsight.losses.margin: ArcFace and CosFace."""

from __future__ import annotations

import math

import pytest
import torch

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.losses import ArcFaceLoss, CosFaceLoss
from fewsight.losses.functional import arcface_loss, cosface_loss


def ref_margin(x, labels, w, scale, margin, kind, easy_margin=False):
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y < 0:
            continue
        xi = x[i].tolist()
        nx = math.sqrt(sum(v * v for v in xi))
        cos = []
        for j in range(w.shape[0]):
            wj = w[j].tolist()
            cos.append(sum(a * b for a, b in zip(xi, wj)) / (nx * math.sqrt(sum(v * v for v in wj))))
        c = cos[y]
        if kind == "cosface":
            target = c - margin
        else:
            theta = math.acos(max(-1.0, min(1.0, c)))
            if easy_margin:
                target = math.cos(theta + margin) if c > 0 else c
            else:
                target = math.cos(theta + margin) if theta + margin <= math.pi else c - margin * math.sin(margin)
        logits = [scale * (target if j == y else cj) for j, cj in enumerate(cos)]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[y]
        count += 1
    return total / max(count, 1)


def data(n=12, d=5, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[2::5] = -1
    return x, labels, w


FUNCS = {"arcface": arcface_loss, "cosface": cosface_loss}


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("scale,margin", [(64.0, 0.5), (10.0, 0.35), (30.0, 1.2)])
def test_matches_reference(kind, scale, margin):
    x, labels, w = data()
    got = FUNCS[kind](x, labels, w, scale, margin)
    assert got.item() == pytest.approx(ref_margin(x, labels, w, scale, margin, kind), rel=1e-9)
    per = FUNCS[kind](x, labels, w, scale, margin, reduction="none")
    assert per.shape == (12,) and (per[labels < 0] == 0).all()
    torch.testing.assert_close(FUNCS[kind](x, labels, w, scale, margin, reduction="sum"), per.sum())


def test_arcface_threshold_and_easy_margin():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    angles = torch.linspace(0.0, math.pi, 41, dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.zeros(41, dtype=torch.long)
    for easy in (False, True):
        per = arcface_loss(x, labels, w, 8.0, 0.5, "none", easy_margin=easy)
        ref = torch.tensor([ref_margin(x[i : i + 1], labels[:1], w, 8.0, 0.5, "arcface", easy) for i in range(41)], dtype=torch.float64)
        torch.testing.assert_close(per, ref.to(per.dtype), rtol=1e-9, atol=1e-9)
    # The penalised target logit never increases with the angle (the point of the threshold).
    from fewsight.losses.margin import _arcface_target

    target = _arcface_target(angles.cos(), 0.5, False)
    assert (target[1:] <= target[:-1] + 1e-12).all()


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_gradcheck(kind):
    x, labels, w = data(n=6, d=3, c=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: FUNCS[kind](a, labels, b, 4.0, 0.3), (x, w))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_extremes_finite(kind):
    w = torch.eye(3, requires_grad=True)
    x = torch.tensor([[2.0, 0, 0], [-3.0, 0, 0], [0.0, 0, 0], [1e15, 0, 0]], requires_grad=True)
    loss = FUNCS[kind](x, torch.tensor([0, 0, 1, 0]), w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_unknown_ignored_and_empty(kind):
    x, labels, w = data()
    keep = labels >= 0
    torch.testing.assert_close(FUNCS[kind](x, labels, w), FUNCS[kind](x[keep], labels[keep], w))
    w = w.clone().requires_grad_(True)
    for lab in (torch.zeros(0, dtype=torch.long), torch.tensor([-1, -2])):
        e = torch.randn(lab.shape[0], 5, dtype=torch.float64, requires_grad=True)
        loss = FUNCS[kind](e, lab, w)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert (e.grad == 0).all() and (w.grad == 0).all()
        w.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_half_precision(dtype, kind):
    x, labels, w = data(n=64, d=16, c=10, dtype=torch.float32)
    xh = (x * 1000).to(dtype).requires_grad_(True)
    loss = FUNCS[kind](xh, labels, w.to(dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(xh.grad.float()).all()
    torch.testing.assert_close(loss, FUNCS[kind](x, labels, w), rtol=2e-2, atol=5e-2)


def test_errors():
    x, labels, w = data()
    with pytest.raises(LabelError, match="labels"):
        arcface_loss(x, torch.full_like(labels, 4), w)
    with pytest.raises(ShapeError, match="embeddings"):
        cosface_loss(x[:, :3], labels, w)
    with pytest.raises(ShapeError, match="weight"):
        cosface_loss(x, labels, w[0])
    with pytest.raises(InvalidArgumentError, match="scale"):
        arcface_loss(x, labels, w, scale=0.0)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        arcface_loss(x, labels, w, reduction="avg")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        ArcFaceLoss(3, 4, reduction="avg")
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        CosFaceLoss(0, 4)


def test_modules():
    arc = ArcFaceLoss(4, 5, scale=16.0, margin=0.4, easy_margin=True)
    assert isinstance(arc.weight, torch.nn.Parameter) and arc.weight.shape == (4, 5)
    x, labels, _ = data(dtype=torch.float32)
    assert torch.equal(arc(x, labels), arcface_loss(x, labels, arc.weight, 16.0, 0.4, easy_margin=True))
    cos = CosFaceLoss(4, 5, reduction="sum")
    assert torch.equal(cos(x, labels), cosface_loss(x, labels, cos.weight, 64.0, 0.35, "sum"))
    cos(x, labels).backward()
    assert cos.weight.grad is not None
    logits = arc.logits(x)
    assert logits.shape == (12, 4) and logits.abs().max() <= 16.0 + 1e-4


# --- pytorch-metric-learning: same definitions when their W (D x C) is ours transposed and their
# ArcFace margin is given in degrees; their MeanReducer averages over all samples (no unknown labels).

pml = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_pml_arcface(margin):
    x, labels, w = data(n=32, d=8, c=6, dtype=torch.float64)
    labels = labels.clamp(min=0)
    theirs = pml.ArcFaceLoss(6, 8, margin=math.degrees(margin), scale=64.0)
    with torch.no_grad():
        theirs.W.copy_(w.t())
    torch.testing.assert_close(arcface_loss(x, labels, w, 64.0, margin), theirs(x, labels), rtol=1e-7, atol=1e-7)


def test_pml_cosface():
    x, labels, w = data(n=32, d=8, c=6, dtype=torch.float64)
    labels = labels.clamp(min=0)
    theirs = pml.CosFaceLoss(6, 8, margin=0.35, scale=64.0)
    with torch.no_grad():
        theirs.W.copy_(w.t())
    torch.testing.assert_close(cosface_loss(x, labels, w), theirs(x, labels), rtol=1e-7, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_follows_device():
    module = ArcFaceLoss(4, 5).cuda()
    x, labels, _ = data(dtype=torch.float32)
    got = module(x.cuda().half(), labels.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.cpu(), arcface_loss(x, labels, module.weight.detach().cpu()), rtol=2e-2, atol=5e-2)
