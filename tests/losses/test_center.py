"""Tests of fewsight.losses.center: generalised center loss, distance-matrix form, module, pytorch-ood."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.losses import CenterLoss
from fewsight.losses.functional import center_loss, center_loss_from_distances

DISTANCES = ("squared_euclidean", "euclidean", "cosine")


def ref_center(x, labels, mu, radius, distance):
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y < 0:
            continue
        a, b = x[i].tolist(), mu[y].tolist()
        if distance == "cosine":
            dot = sum(p * q for p, q in zip(a, b))
            d = 1 - dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))
        else:
            d = sum((p - q) ** 2 for p, q in zip(a, b))
            if distance == "euclidean":
                d = math.sqrt(d)
        total += max(d - radius, 0.0)
        count += 1
    return total / max(count, 1)


def data(n=12, d=4, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    mu = torch.randn(c, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[1::5] = -1
    return x, labels, mu


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("radius", [0.0, 0.7, 3.0])
def test_matches_reference(distance, radius):
    x, labels, mu = data()
    got = center_loss(x, labels, mu, radius, distance)
    assert got.item() == pytest.approx(ref_center(x, labels, mu, radius, distance), rel=1e-12, abs=1e-14)
    per = center_loss(x, labels, mu, radius, distance, reduction="none")
    assert per.shape == (12,) and (per[labels < 0] == 0).all()
    torch.testing.assert_close(center_loss(x, labels, mu, radius, distance, reduction="sum"), per.sum())


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(distance):
    x, labels, mu = data(n=6, d=3)
    x.requires_grad_(True)
    mu.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: center_loss(a, labels, b, 0.1, distance), (x, mu))


def test_from_distances_matches():
    x, labels, mu = data()
    dist = torch.cdist(x, mu) ** 2
    torch.testing.assert_close(center_loss_from_distances(dist, labels, 0.5), center_loss(x, labels, mu, 0.5))
    per = center_loss_from_distances(dist, labels, reduction="none")
    assert (per[labels < 0] == 0).all()
    d = dist.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: center_loss_from_distances(t, labels, 0.3), (d,))


def test_only_own_centre_is_read():
    # An [N, C] distance matrix here would need 16 GB; the gather needs a few MB.
    n, c = 2000, 2_000_000
    mu = torch.zeros(c, 1)
    x = torch.ones(n, 1, requires_grad=True)
    labels = torch.randint(0, c, (n,))
    loss = center_loss(x, labels, mu)
    assert loss.item() == 1.0
    loss.backward()
    assert torch.all(x.grad == 2.0 / n)


def test_empty_and_coincident():
    mu = torch.randn(3, 2, requires_grad=True)
    for labels in (torch.zeros(0, dtype=torch.long), torch.tensor([-1, -1])):
        x = torch.randn(labels.shape[0], 2, requires_grad=True)
        for distance in DISTANCES:
            loss = center_loss(x, labels, mu, distance=distance)
            assert loss.item() == 0.0 and loss.requires_grad
            loss.backward()
            assert (x.grad == 0).all() and (mu.grad == 0).all()
            x.grad = mu.grad = None
    x = mu.detach()[:2].clone().requires_grad_(True)  # exactly on the centres
    for distance in DISTANCES:
        loss = center_loss(x, torch.tensor([0, 1]), mu, distance=distance)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert torch.isfinite(x.grad).all() and torch.isfinite(mu.grad).all()
        x.grad = mu.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, labels, mu = data(n=64, d=16, dtype=torch.float32)
    x = x * 200  # squared distances beyond the fp16 range
    xh = x.to(dtype).requires_grad_(True)
    loss = center_loss(xh, labels, mu.to(dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(xh.grad.float()).all()
    torch.testing.assert_close(loss, center_loss(x, labels, mu), rtol=1e-2, atol=1e-2)


def test_errors():
    x, labels, mu = data()
    with pytest.raises(LabelError, match="labels"):
        center_loss(x, torch.full_like(labels, 3), mu)
    with pytest.raises(InvalidArgumentError, match="radius"):
        center_loss(x, labels, mu, radius=-1.0)
    with pytest.raises(InvalidArgumentError, match="distance"):
        center_loss(x, labels, mu, distance="manhattan")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        center_loss(x, labels, mu, reduction="avg")
    with pytest.raises(ShapeError, match="embeddings"):
        center_loss(x[:, :2], labels, mu)
    with pytest.raises(ShapeError, match="centers"):
        center_loss(x, labels, mu[0])
    with pytest.raises(LabelError):
        center_loss_from_distances(torch.rand(4, 2), torch.tensor([0, 1, 2, -1]))
    with pytest.raises(InvalidArgumentError, match="distance"):
        CenterLoss(3, 4, distance="l1")


def test_module():
    learn = CenterLoss(4, 4, magnitude=3.0)
    assert isinstance(learn.centers, nn.Parameter) and learn.learnable
    torch.testing.assert_close(learn.centers.detach(), 3.0 * torch.eye(4))
    fixed = CenterLoss(5, 8, learnable=False, magnitude=2.0)
    assert not isinstance(fixed.centers, nn.Parameter) and "centers" in dict(fixed.named_buffers())
    assert "centers" in fixed.state_dict() and fixed.centers.shape == (5, 8)
    assert not torch.equal(fixed.centers, torch.zeros(5, 8))
    x, labels, _ = data(d=8, c=5, dtype=torch.float32)
    assert torch.equal(fixed(x, labels), center_loss(x, labels, fixed.centers))
    module = CenterLoss(5, 8, radius=0.5, distance="euclidean", reduction="sum")
    assert torch.equal(module(x, labels), center_loss(x, labels, module.centers, 0.5, "euclidean", "sum"))
    module(x, labels).backward()
    assert module.centers.grad is not None


# --- pytorch-ood: their value is ours / C (mean over the N x C masked matrix) ----------------------

ood = pytest.importorskip("pytorch_ood.loss")


@pytest.mark.filterwarnings("ignore:Discarding samples with targets")
@pytest.mark.parametrize("radius", [0.0, 1.5])
@pytest.mark.parametrize("shape", [(4, 4), (6, 3)])
def test_pytorch_ood(radius, shape):
    c, d = shape
    torch.manual_seed(0)
    theirs_module = ood.CenterLoss(n_classes=c, n_dim=d, radius=radius)
    z = torch.randn(20, d)
    y = torch.randint(0, c, (20,))
    y[::6] = -1
    theirs = theirs_module(theirs_module.distance(z), y)
    ours = center_loss(z, y, theirs_module.centers.params.detach(), radius)
    torch.testing.assert_close(ours, theirs * c, rtol=1e-5, atol=1e-6)


def test_pytorch_ood_fixed_identity_init():
    theirs = ood.CenterLoss(n_classes=3, n_dim=3, magnitude=5.0, fixed=True)
    ours = CenterLoss(3, 3, learnable=False, magnitude=5.0)
    torch.testing.assert_close(ours.centers, theirs.centers.params.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_follows_device():
    module = CenterLoss(3, 4, learnable=False).cuda()
    x, labels, _ = data()
    x = x.float()
    got = module(x.cuda(), labels.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), center_loss(x, labels, module.centers.cpu()))
