"""Circle loss (all forms) and the block-wise pairwise engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fewsight as fs
from fewsight.errors import DTypeError, InvalidArgumentError, LabelError, ShapeError
from fewsight.losses import functional as LF
from fewsight.losses._blockwise import Channel, PairKernel, pairwise_partials
from fewsight.losses.circle import (
    CircleLoss,
    ClassCircleLoss,
    circle_loss,
    circle_loss_class_level,
    circle_loss_from_similarities,
)

D64 = torch.float64


# ----------------------------------------------------------------------------- references


def _term(sp: torch.Tensor, sn: torch.Tensor, m: float, gamma: float) -> torch.Tensor:
    ap = (1 + m - sp.detach()).clamp_min(0)
    an = (sn.detach() + m).clamp_min(0)
    return F.softplus(torch.logsumexp(-gamma * ap * (sp - (1 - m)), 0) + torch.logsumexp(gamma * an * (sn - m), 0))


def ref_anchor(x, y, m=0.25, gamma=256.0):
    """Per-anchor terms with explicit loops (0 for anchors without a positive or a negative)."""
    xn = x / x.norm(dim=1, keepdim=True)
    n = x.shape[0]
    out, valid = [], []
    for i in range(n):
        yi = int(y[i])
        sp = [xn[i] @ xn[j] for j in range(n) if j != i and yi >= 0 and int(y[j]) == yi]
        sn = [xn[i] @ xn[j] for j in range(n) if yi >= 0 and int(y[j]) >= 0 and int(y[j]) != yi]
        if sp and sn:
            out.append(_term(torch.stack(sp), torch.stack(sn), m, gamma))
            valid.append(True)
        else:
            out.append(x.sum() * 0)
            valid.append(False)
    return torch.stack(out), torch.tensor(valid)


def ref_batch(x, y, m=0.25, gamma=256.0):
    xn = x / x.norm(dim=1, keepdim=True)
    sp, sn = [], []
    for i in range(x.shape[0]):
        for j in range(i + 1, x.shape[0]):
            if int(y[i]) < 0 or int(y[j]) < 0:
                continue
            (sp if int(y[i]) == int(y[j]) else sn).append(xn[i] @ xn[j])
    if not sp or not sn:
        return x.sum() * 0
    return _term(torch.stack(sp), torch.stack(sn), m, gamma)


def dense_reference(x, y, m=0.25, gamma=256.0):
    """Vectorised dense autograd reference (anchor pooling, mean)."""
    xn = F.normalize(x, dim=1)
    s = xn @ xn.T
    known = (y >= 0)[:, None] & (y >= 0)[None, :]
    same = (y[:, None] == y[None, :]) & known
    pos = same & ~torch.eye(len(y), dtype=torch.bool)
    neg = ~same & known
    ap = (1 + m - s.detach()).clamp_min(0)
    an = (s.detach() + m).clamp_min(0)
    lp = torch.where(pos, -gamma * ap * (s - 1 + m), torch.full_like(s, -math.inf)).logsumexp(1)
    ln = torch.where(neg, gamma * an * (s - m), torch.full_like(s, -math.inf)).logsumexp(1)
    valid = pos.any(1) & neg.any(1)
    per = torch.where(valid, F.softplus(torch.where(valid, lp + ln, torch.zeros_like(lp))), torch.zeros_like(lp))
    return per.sum() / valid.sum().clamp(min=1)


def ref_class(x, y, w, m=0.25, gamma=256.0):
    xn, wn = x / x.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True)
    out, valid = [], []
    for i in range(x.shape[0]):
        yi = int(y[i])
        if yi < 0 or w.shape[0] < 2:
            out.append(x.sum() * 0)
            valid.append(False)
            continue
        sp = (xn[i] @ wn[yi]).reshape(1)
        sn = torch.stack([xn[i] @ wn[c] for c in range(w.shape[0]) if c != yi])
        out.append(_term(sp, sn, m, gamma))
        valid.append(True)
    return torch.stack(out), torch.tensor(valid)


def _data(n=24, d=6, classes=4, unknown=3, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if unknown:
        y[torch.randperm(n, generator=g)[:unknown]] = -1
    return x.requires_grad_(), y


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- form (a)/(b)


@pytest.mark.parametrize("block_size", [None, 1, 5, 7, 64])
@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 80.0)])
def test_anchor_matches_loop_reference(block_size, m, gamma):
    x, y = _data()
    per_ref, valid = ref_anchor(x, y, m, gamma)
    ref = per_ref.sum() / valid.sum()
    got = circle_loss(x, y, m, gamma, block_size=block_size)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_grad(got, x), _grad(ref, x), rtol=1e-9, atol=1e-10)
    per = circle_loss(x, y, m, gamma, reduction="none", block_size=block_size)
    torch.testing.assert_close(per, per_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(circle_loss(x, y, m, gamma, reduction="sum", block_size=block_size), per_ref.sum())


@pytest.mark.parametrize("block_size", [None, 3, 8])
def test_batch_pooling_matches_loop_reference(block_size):
    x, y = _data(n=18, seed=1)
    ref = ref_batch(x, y, 0.25, 64.0)
    got = circle_loss(x, y, 0.25, 64.0, pooling="batch", block_size=block_size)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_grad(got, x), _grad(ref, x), rtol=1e-9, atol=1e-10)


class _SmoothLSEKernel(PairKernel):
    """Circle-shaped kernel with its full derivative (circle's alpha is detached, which gradcheck
    cannot see): pos ``γ((1 − s)² − m²)``, neg ``γ(s² − m²)``."""

    channels = (Channel("pos", "lse"), Channel("neg", "lse"))

    def value(self, s, c):
        return 3.0 * ((1 - s) ** 2 - 0.0625) if c == 0 else 3.0 * (s * s - 0.0625)

    def value_and_derivative(self, s, c):
        return (self.value(s, c), -6.0 * (1 - s) if c == 0 else 6.0 * s)


@pytest.mark.parametrize("block_size", [None, 1, 4])
def test_engine_gradcheck(block_size):
    x, y = _data(n=10, d=4, classes=3, unknown=1, seed=2)
    k = torch.randn(7, 4, dtype=D64, requires_grad=True)
    yk = torch.tensor([0, 1, 2, 0, 1, -1, 2])

    def f_self(e):
        lp, ln = pairwise_partials(F.normalize(e, dim=1), y, _SmoothLSEKernel(), block_size=block_size)
        valid = torch.isfinite(lp) & torch.isfinite(ln)
        return torch.where(valid, F.softplus(torch.where(valid, lp + ln, 0.0)), 0.0).sum()

    def f_rect(e, kk):
        lp, ln = pairwise_partials(e, y, _SmoothLSEKernel(), k=kk, labels_k=yk, block_size=block_size)
        valid = torch.isfinite(lp) & torch.isfinite(ln)
        return torch.where(valid, F.softplus(torch.where(valid, lp + ln, 0.0)), 0.0).sum()

    torch.autograd.gradcheck(f_self, (x,))
    torch.autograd.gradcheck(f_rect, (x, k))


def test_circle_gradient_is_autograd_of_detached_alpha_formula():
    # The circle gradient = autograd of the formula with alpha detached (checked against the loop
    # reference elsewhere); here with every pooling on a tiny batch and a blocked path.
    x, y = _data(n=10, d=4, classes=3, unknown=1, seed=2)
    for bs in (None, 4):
        got = _grad(circle_loss(x, y, 0.25, 4.0, pooling="batch", block_size=bs), x)
        torch.testing.assert_close(got, _grad(ref_batch(x, y, 0.25, 4.0), x))


def test_blocked_equals_dense_fp64_and_fp32():
    # 700 x 700 pairs: the automatic path on CPU is blocked; compare with the dense formula.
    for dtype, tol in ((D64, 1e-10), (torch.float32, 1e-4)):
        x, y = _data(n=700, d=16, classes=30, unknown=20, seed=3, dtype=dtype)
        ref = dense_reference(x, y)
        g_ref = _grad(ref, x)
        for bs in (None, 128, 333, 1000):
            got = circle_loss(x, y, block_size=bs)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(_grad(got, x), g_ref, rtol=tol, atol=tol * 1e-2)


def test_few_classes_every_tile_masked():
    # Two classes: every tile mixes labels (mask path everywhere), including single-label tiles.
    x, y = _data(n=90, d=5, classes=2, unknown=0, seed=4)
    ref = dense_reference(x, y, gamma=32.0)
    g_ref = _grad(ref, x)
    for bs in (4, 17, 45):
        got = circle_loss(x, y, gamma=32.0, block_size=bs)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_grad(got, x), g_ref, rtol=1e-9, atol=1e-11)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_blocked_never_materialises_n_by_n():
    x, y = _data(n=1200, d=8, classes=50, unknown=0, seed=5, dtype=torch.float32)
    with _MaxNumel() as mode:
        circle_loss(x, y, block_size=100).backward()
    assert mode.max <= 100 * 100 < 1200 * 1200 // 100


# ----------------------------------------------------------------------------- peer library


@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 80.0)])
def test_matches_pytorch_metric_learning(m, gamma):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(6)
    for n, classes, bs in ((64, 5, None), (300, 20, None), (300, 20, 64)):
        x = torch.randn(n, 32, generator=g, dtype=D64, requires_grad=True)
        y = torch.randint(0, classes, (n,), generator=g)
        y[:2] = 1000 + torch.arange(2)  # singleton classes: anchors without positives
        want = pml.CircleLoss(m=m, gamma=gamma)(x, y)
        got = circle_loss(x, y, m, gamma, block_size=bs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(_grad(got, x), _grad(want, x), rtol=1e-8, atol=1e-12)
        x32 = x.detach().float().requires_grad_()
        want32 = pml.CircleLoss(m=m, gamma=gamma)(x32, y)
        got32 = circle_loss(x32, y, m, gamma, block_size=bs)
        torch.testing.assert_close(got32, want32, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- labels, edges


def test_unknown_labels_equal_dropping_them():
    x, y = _data(n=30, unknown=6, seed=7)
    keep = y >= 0
    for bs in (None, 4):
        for pooling in ("anchor", "batch"):
            got = circle_loss(x, y, pooling=pooling, block_size=bs, gamma=32.0)
            sub = circle_loss(x[keep], y[keep], pooling=pooling, block_size=bs, gamma=32.0)
            torch.testing.assert_close(got, sub)
            g = _grad(got, x)
            assert torch.all(g[~keep] == 0)
    assert torch.all(circle_loss(x, y, reduction="none")[~keep] == 0)


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("pooling", ["anchor", "batch"])
@pytest.mark.parametrize(
    "labels",
    [
        [],  # empty batch
        [-1, -1, -1],  # all unknown
        [3, 3, 3, 3],  # one class: no negatives
        [0, 1, 2, 3],  # all distinct: no positives
        [5],
    ],
)
def test_nothing_valid_gives_zero_with_graph(labels, pooling, block_size):
    y = torch.tensor(labels, dtype=torch.long)
    x = torch.randn(len(labels), 4, requires_grad=True)
    loss = circle_loss(x, y, pooling=pooling, block_size=block_size)
    assert loss.ndim == 0 and loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)
    none = circle_loss(x, y, reduction="none", block_size=block_size)
    assert none.shape == (len(labels),) and torch.all(none == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [512.0, 1024.0])
@pytest.mark.parametrize("block_size", [None, 8])
def test_half_precision_large_gamma_is_finite(dtype, gamma, block_size):
    x, y = _data(n=40, d=8, classes=4, unknown=2, seed=8, dtype=torch.float32)
    xh = x.detach().to(dtype).requires_grad_()
    for pooling in ("anchor", "batch"):
        loss = circle_loss(xh, y, gamma=gamma, pooling=pooling, block_size=block_size)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
        ref = circle_loss(xh.detach().double(), y, gamma=gamma, pooling=pooling)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-3)
        xh.grad = None


def test_extreme_scales_and_duplicates():
    x = torch.randn(12, 5, dtype=D64)
    x[1] = x[0]  # identical positive pair: s = 1
    x[3] = -x[2] * 1e6  # huge norm, opposite direction
    x[4] = x[4] * 1e-6
    x.requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    for bs in (None, 3):
        loss = circle_loss(x, y, gamma=2048.0, block_size=bs)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        ref = ref_anchor(x.detach(), y, gamma=2048.0)
        torch.testing.assert_close(loss.detach(), ref[0].sum() / ref[1].sum())
        x.grad = None


def test_module_equals_function_and_validation():
    x, y = _data(n=20, seed=9)
    mod = CircleLoss(m=0.3, gamma=100.0, pooling="batch", block_size=6)
    torch.testing.assert_close(mod(x, y), circle_loss(x, y, 0.3, 100.0, pooling="batch", block_size=6))
    assert isinstance(fs.losses.CircleLoss(), torch.nn.Module)
    assert LF.circle_loss is circle_loss
    with pytest.raises(InvalidArgumentError, match="pooling"):
        CircleLoss(pooling="pairs")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        CircleLoss(reduction="avg")
    with pytest.raises(InvalidArgumentError, match="gamma"):
        CircleLoss(gamma=0)
    with pytest.raises(InvalidArgumentError, match="m"):
        CircleLoss(m=float("nan"))
    with pytest.raises(InvalidArgumentError, match="block_size"):
        CircleLoss(block_size=0)
    with pytest.raises(InvalidArgumentError, match="block_size"):
        circle_loss(x, y, block_size=2.5)
    with pytest.raises(ShapeError, match="labels"):
        circle_loss(x, y[:-1])
    with pytest.raises(DTypeError, match="labels"):
        circle_loss(x, y.float())
    with pytest.raises(DTypeError, match="embeddings"):
        circle_loss(y[:, None].expand(-1, 3), y)
    with pytest.raises(ShapeError, match="embeddings"):
        circle_loss(x[0], y)


@pytest.mark.parametrize("m", [-0.3, 0.0, 0.25, 0.4])
def test_kernel_polynomial_forms_equal_the_formula(m):
    from fewsight.losses.circle import _CircleKernel

    s = torch.linspace(-1.6, 1.6, 321, dtype=D64)[None, :]
    kern = _CircleKernel(m, 7.0)
    ap, an = (1 + m - s).clamp_min(0), (s + m).clamp_min(0)
    want = (-7.0 * ap * (s - (1 - m)), 7.0 * an * (s - m))
    dwant = (-7.0 * ap, 7.0 * an)
    for c in (0, 1):
        torch.testing.assert_close(kern.value(s, c), want[c])
        v, d = kern.value_and_derivative(s, c)
        torch.testing.assert_close(v, want[c])
        torch.testing.assert_close(d, dwant[c])


# ----------------------------------------------------------------------------- form (c)


def test_from_similarities():
    g = torch.Generator().manual_seed(10)
    sp = (torch.rand(4, 5, generator=g, dtype=D64) * 2 - 1).requires_grad_()
    sn = (torch.rand(4, 7, generator=g, dtype=D64) * 2 - 1).requires_grad_()
    rows = torch.stack([_term(sp[b], sn[b], 0.25, 64.0) for b in range(4)])
    torch.testing.assert_close(circle_loss_from_similarities(sp, sn, gamma=64.0, reduction="none"), rows)
    torch.testing.assert_close(circle_loss_from_similarities(sp, sn, gamma=64.0), rows.mean())
    torch.testing.assert_close(circle_loss_from_similarities(sp[0], sn[0], gamma=64.0), rows[0])
    got_g = torch.autograd.grad(circle_loss_from_similarities(sp, sn, gamma=64.0, reduction="sum"), (sp, sn))
    for a, b in zip(got_g, torch.autograd.grad(rows.sum(), (sp, sn))):
        torch.testing.assert_close(a, b)
    # empty side: zero with graph
    z = circle_loss_from_similarities(sp[0, :0], sn[0])
    z.backward()
    assert z.item() == 0 and torch.all(sn.grad == 0)
    # large gamma in half precision stays finite
    h = circle_loss_from_similarities(sp.detach().half(), sn.detach().half(), gamma=1024.0)
    assert h.dtype == torch.float32 and torch.isfinite(h)
    with pytest.raises(ShapeError, match="sp, sn"):
        circle_loss_from_similarities(sp, sn[:2])
    with pytest.raises(DTypeError, match="sp"):
        circle_loss_from_similarities(sp.long(), sn)


# ----------------------------------------------------------------------------- form (d)


@pytest.mark.parametrize("block_size", [None, 3])
def test_class_level(block_size):
    x, y = _data(n=15, d=6, classes=5, unknown=2, seed=11)
    w = torch.randn(5, 6, dtype=D64, requires_grad=True)
    per_ref, valid = ref_class(x, y, w, 0.25, 64.0)
    got = circle_loss_class_level(x, y, w, gamma=64.0, block_size=block_size)
    ref = per_ref.sum() / valid.sum()
    torch.testing.assert_close(got, ref)
    gx, gw = torch.autograd.grad(got, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(
        circle_loss_class_level(x, y, w, gamma=64.0, reduction="none", block_size=block_size), per_ref.detach()
    )


def test_class_level_edges_and_module():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(LabelError, match="labels"):
        circle_loss_class_level(x, torch.tensor([0, 1, 2, 3]), torch.randn(3, 3))
    with pytest.raises(ShapeError, match="proxies"):
        circle_loss_class_level(x, torch.tensor([0, 1, 2, 0]), torch.randn(3, 4))
    one = circle_loss_class_level(x, torch.tensor([0, 0, -1, 0]), torch.randn(1, 3))  # no negatives
    one.backward()
    assert one.item() == 0 and torch.all(x.grad == 0)
    unk = circle_loss_class_level(x, torch.full((4,), -1), torch.randn(3, 3))
    assert unk.item() == 0
    torch.manual_seed(0)
    mod = ClassCircleLoss(3, 3, gamma=32.0)
    assert mod.proxies.shape == (3, 3)
    torch.testing.assert_close(mod.proxies.norm(dim=1), torch.ones(3))
    y = torch.tensor([0, 1, 2, -1])
    loss = mod(x, y)
    torch.testing.assert_close(loss, circle_loss_class_level(x, y, mod.proxies, gamma=32.0))
    loss.backward()
    assert mod.proxies.grad is not None and torch.isfinite(mod.proxies.grad).all()
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        ClassCircleLoss(0, 3)


# ----------------------------------------------------------------------------- generic engine


class _SumKernel(PairKernel):
    """pos: sum of s²; neg: sum of relu(s)."""

    channels = (Channel("pos", "sum"), Channel("neg", "sum"))

    def value(self, s, c):
        return s * s if c == 0 else s.clamp_min(0)

    def value_and_derivative(self, s, c):
        return (s * s, 2 * s) if c == 0 else (s.clamp_min(0), (s > 0).to(s.dtype))


def test_engine_sum_channels_and_rect_mode():
    x, y = _data(n=20, d=5, classes=3, unknown=2, seed=12)
    k = torch.randn(9, 5, dtype=D64, requires_grad=True)
    yk = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, 1])
    ids_q = torch.arange(20)
    ids_k = torch.tensor([0, 1, 2, 3, 100, 101, 102, 103, 104])  # rows 0..3 of q are also columns
    s = x @ k.T
    known = (y >= 0)[:, None] & (yk >= 0)[None, :]
    pos = (y[:, None] == yk[None, :]) & known & (ids_q[:, None] != ids_k[None, :])
    neg = (y[:, None] != yk[None, :]) & known
    ref = ((s * s) * pos).sum(1), (s.clamp_min(0) * neg).sum(1)
    wq = torch.randn(20, dtype=D64)
    obj = lambda parts: (parts[0] * wq).sum() + (parts[1] * wq.flip(0)).sum()  # noqa: E731
    gb = torch.autograd.grad(obj(ref), (x, k))
    for bs in (None, 1, 4, 50):
        got = pairwise_partials(x, y, _SumKernel(), k=k, labels_k=yk, ids_q=ids_q, ids_k=ids_k, block_size=bs)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
        ga = torch.autograd.grad(obj(got), (x, k))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
    # self mode with a signed upstream gradient
    sself = x @ x.T
    eye = torch.eye(20, dtype=torch.bool)
    kn = (y >= 0)[:, None] & (y >= 0)[None, :]
    ref_self = ((sself * sself) * ((y[:, None] == y[None, :]) & kn & ~eye)).sum(1)
    g_self = torch.autograd.grad((ref_self * wq).sum(), x)[0]
    for bs in (None, 3):
        (got, _) = pairwise_partials(x, y, _SumKernel(), block_size=bs)
        torch.testing.assert_close(got, ref_self)
        torch.testing.assert_close(torch.autograd.grad((got * wq).sum(), x)[0], g_self)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _data(n=600, d=32, classes=20, unknown=10, seed=13, dtype=torch.float32)
    ref = circle_loss(x, y)
    g_ref = _grad(ref, x)
    xc = x.detach().cuda().requires_grad_()
    for bs in (None, 128):
        got = circle_loss(xc, y.cuda(), block_size=bs)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_grad(got, xc).cpu(), g_ref, rtol=1e-3, atol=1e-5)
