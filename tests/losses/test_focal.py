"""Tests of fewsight.losses.focal: elementwise and detection sigmoid focal loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from fewsight.errors import DTypeError, InvalidArgumentError, LabelError, ShapeError
from fewsight.geometry import BACKGROUND, IGNORE, match
from fewsight.losses.focal import FocalLoss, anchor_labels, focal_loss, focal_loss_detection


def naive_focal(x: float, t: float, alpha: float | None, gamma: float) -> float:
    """Scalar reference in float64 with the textbook formula (stable log-sigmoid by hand)."""
    log_p = -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    log_1mp = -math.log1p(math.exp(x)) if x <= 0 else -x - math.log1p(math.exp(-x))
    ce = -(t * log_p + (1 - t) * log_1mp)
    p = math.exp(log_p)
    q = (1 - t) * p + t * math.exp(log_1mp)
    a = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return a * ce * q**gamma


def naive_detection(logits: torch.Tensor, labels: torch.Tensor, alpha, gamma) -> float:
    total, num_pos = 0.0, 0
    b, a, c = logits.shape
    for i in range(b):
        for j in range(a):
            lab = int(labels[i, j])
            if lab < -1:
                continue
            num_pos += lab >= 0
            for k in range(c):
                total += naive_focal(float(logits[i, j, k]), float(lab == k), alpha, gamma)
    return total / max(1, num_pos)


@pytest.mark.parametrize("alpha", [0.25, 0.5, None])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_torchvision(alpha, gamma, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 5, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(x.shape, generator=g) < 0.3).double()
    ours = focal_loss(x, t, alpha, gamma, reduction)
    ref = tv_focal(x, t, -1 if alpha is None else alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_equals_torchvision_soft_targets_and_grad():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 3, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.rand(40, 3, generator=g, dtype=torch.float64)
    ours = focal_loss(x, t, 0.25, 2.0, "sum")
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = tv_focal(x, t, 0.25, 2.0, "sum")
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_naive_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, generator=g, dtype=torch.float64) * 6
    t = torch.rand(30, generator=g, dtype=torch.float64).round()
    t[:5] = torch.rand(5, generator=g, dtype=torch.float64)  # a few soft targets
    for alpha, gamma in [(0.25, 2.0), (None, 1.5), (0.75, 0.0)]:
        ref = torch.tensor([naive_focal(float(a), float(b), alpha, gamma) for a, b in zip(x, t)], dtype=torch.float64)
        torch.testing.assert_close(focal_loss(x, t, alpha, gamma, "none"), ref)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0, 5.0])
def test_gradcheck(gamma):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t_hard = (torch.rand(4, 3, generator=g) < 0.5).double()
    t_soft = torch.rand(4, 3, generator=g, dtype=torch.float64)
    for t in (t_hard, t_soft):
        assert torch.autograd.gradcheck(lambda v: focal_loss(v, t, 0.25, gamma, "none"), (x,))
    assert torch.autograd.gradgradcheck(lambda v: focal_loss(v, t_soft, 0.25, gamma, "sum"), (x,))


def test_targets_with_grad_fall_back_to_autograd():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: focal_loss(a, b, 0.25, 2.0, "sum"), (x, t))
    torch.testing.assert_close(focal_loss(x, t, 0.25, 2.0, "sum"), tv_focal(x, t, 0.25, 2.0, "sum"))


def test_extremes_logits_100():
    x = torch.tensor([100.0, -100.0, 100.0, -100.0], requires_grad=True)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for gamma in (0.0, 0.5, 2.0, 10.0):
        loss = focal_loss(x, t, 0.25, gamma, "none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # confident-correct ~0; confident-wrong = alpha_t * 100 (modulating factor is 1)
        torch.testing.assert_close(loss, torch.tensor([0.0, 25.0, 75.0, 0.0]), atol=1e-30, rtol=1e-6)
        torch.testing.assert_close(grad, torch.tensor([0.0, -0.25, 0.75, 0.0]), atol=1e-30, rtol=1e-6)


def test_gamma_zero_is_bce():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=g) * 5
    t = torch.rand(7, 4, generator=g)
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(
            focal_loss(x, t, None, 0.0, red), F.binary_cross_entropy_with_logits(x, t, reduction=red)
        )
    torch.testing.assert_close(focal_loss(x, t, -1, 0.0), F.binary_cross_entropy_with_logits(x, t))


def test_large_gamma():
    g = torch.Generator().manual_seed(6)
    x64 = torch.randn(200, generator=g, dtype=torch.float64) * 8
    t = (torch.rand(200, generator=g) < 0.5).double()
    ref = tv_focal(x64, t, 0.25, 10.0, "none")
    x = x64.float().requires_grad_(True)
    loss = focal_loss(x, t.float(), 0.25, 10.0, "none")
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_float32(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 9, generator=g) * 20).to(dtype)
    t = (torch.rand(64, 9, generator=g) < 0.2).to(dtype)
    xr = x.clone().requires_grad_(True)
    loss = focal_loss(xr, t, reduction="sum")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert xr.grad.dtype == dtype and torch.isfinite(xr.grad).all()
    torch.testing.assert_close(loss, focal_loss(x.float(), t.float(), reduction="sum"))
    # detection form too
    logits = x.view(8, 8, 9)
    labels = torch.randint(-2, 9, (8, 8), generator=g)
    out = focal_loss_detection(logits, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, focal_loss_detection(logits.float(), labels))


def test_bool_targets_and_empty():
    x = torch.randn(3, 2)
    t = torch.rand(3, 2) < 0.5
    torch.testing.assert_close(focal_loss(x, t), focal_loss(x, t.float()))
    e = torch.zeros(0, 5, requires_grad=True)
    for red in ("mean", "sum"):
        loss = focal_loss(e, torch.zeros(0, 5), reduction=red)
        assert loss.item() == 0.0
        loss.backward()
    assert focal_loss(e, torch.zeros(0, 5), reduction="none").shape == (0, 5)


def test_validation_errors():
    x = torch.randn(3, 2)
    with pytest.raises(ShapeError, match="targets"):
        focal_loss(x, torch.zeros(3, 3))
    with pytest.raises(DTypeError, match="targets"):
        focal_loss(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(DTypeError, match="logits"):
        focal_loss(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(InvalidArgumentError, match="alpha"):
        focal_loss(x, torch.zeros(3, 2), alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="gamma"):
        focal_loss(x, torch.zeros(3, 2), gamma=-1.0)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        focal_loss(x, torch.zeros(3, 2), reduction="avg")
    with pytest.raises(InvalidArgumentError, match="reduction"):
        FocalLoss(reduction="batch")


# --- detection form -----------------------------------------------------------------------------


def _random_detection(seed: int, b=3, a=17, c=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(-2, c, (b, a), generator=g)
    return logits, labels


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.3)])
def test_detection_naive_reference(alpha, gamma):
    logits, labels = _random_detection(10)
    labels[0, 0] = -7  # unknown: treated as ignored
    ours = focal_loss_detection(logits, labels, alpha, gamma)
    torch.testing.assert_close(ours.item(), naive_detection(logits, labels, alpha, gamma))


def test_detection_torchvision_retinanet_way():
    # torchvision's head: one-hot targets, ignored anchors dropped, sigmoid_focal_loss(sum); here the
    # normaliser is the batch's positives (SPEC), so compare the sums.
    logits, labels = _random_detection(11)
    total = 0.0
    for lg, lb in zip(logits, labels):
        target = torch.zeros_like(lg)
        fg = lb >= 0
        target[fg, lb[fg]] = 1.0
        keep = lb != IGNORE
        total = total + tv_focal(lg[keep], target[keep], reduction="sum")
    torch.testing.assert_close(focal_loss_detection(logits, labels, reduction="sum"), total)
    torch.testing.assert_close(focal_loss_detection(logits, labels), total / (labels >= 0).sum())


def test_detection_gradcheck_and_grad_matches_autograd():
    logits, labels = _random_detection(12, b=2, a=5, c=3)
    x = logits.clone().requires_grad_(True)
    for gamma in (2.0, 0.5):
        assert torch.autograd.gradcheck(lambda v: focal_loss_detection(v, labels, 0.25, gamma), (x,))
    loss = focal_loss_detection(x, labels)
    (g1,) = torch.autograd.grad(loss, x)
    onehot = F.one_hot(labels.clamp(min=0), 3).double() * (labels >= 0).unsqueeze(-1)
    ref = (tv_focal(x, onehot, 0.25, 2.0, "none") * (labels >= -1).unsqueeze(-1)).sum() / (labels >= 0).sum()
    (g2,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g1, g2)
    assert (g1[labels < -1] == 0).all()


def test_detection_batched_equals_looped_sums():
    logits, labels = _random_detection(13, b=4)
    full = focal_loss_detection(logits, labels, reduction="sum")
    parts = sum(focal_loss_detection(logits[i : i + 1], labels[i : i + 1], reduction="sum") for i in range(4))
    torch.testing.assert_close(full, parts)
    none = focal_loss_detection(logits, labels, reduction="none")
    assert none.shape == logits.shape
    torch.testing.assert_close(none.sum(), full)
    assert (none[labels == IGNORE] == 0).all()


def test_detection_no_positives_and_all_ignored():
    logits = torch.randn(2, 6, 3, requires_grad=True)
    bg = torch.full((2, 6), BACKGROUND)
    # no positives: normaliser 1, the plain sum over background anchors
    torch.testing.assert_close(focal_loss_detection(logits, bg), focal_loss_detection(logits, bg, reduction="sum"))
    ign = torch.full((2, 6), IGNORE)
    loss = focal_loss_detection(logits, ign)
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()
    empty = torch.zeros(0, 0, 3, requires_grad=True)
    loss = focal_loss_detection(empty, torch.zeros(0, 0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_detection_extreme_logits():
    logits = torch.tensor([[[100.0, -100.0], [-100.0, 100.0], [100.0, 100.0]]], requires_grad=True)
    labels = torch.tensor([[0, 0, BACKGROUND]])
    loss = focal_loss_detection(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # anchor 1: class 0 wrong (alpha 0.25 * 100) and class 1 wrong (0.75 * 100); anchor 2: 2 * 0.75 * 100
    torch.testing.assert_close(loss, torch.tensor((25.0 + 75.0 + 150.0) / 2))


def test_detection_label_errors():
    logits = torch.randn(1, 3, 4)
    with pytest.raises(LabelError, match="labels"):
        focal_loss_detection(logits, torch.tensor([[0, 4, -1]]))
    with pytest.raises(ShapeError, match="labels"):
        focal_loss_detection(logits, torch.tensor([[0, 1]]))
    with pytest.raises(DTypeError, match="labels"):
        focal_loss_detection(logits, torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="logits"):
        focal_loss_detection(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_anchor_labels_from_match():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 7.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    gt_labels = torch.tensor([[3, -1]])  # second GT: unknown label
    m = match(anchors, gt, torch.tensor([[True, True]]), object_threshold=0.5, background_threshold=0.4)
    assert anchor_labels(m.indices, gt_labels).tolist() == [[3, IGNORE, BACKGROUND, 3]]
    none = anchor_labels(torch.full((1, 4), BACKGROUND), torch.zeros(1, 0, dtype=torch.long))
    assert none.tolist() == [[BACKGROUND] * 4]


def test_module_equals_function():
    logits, labels = _random_detection(14)
    crit = FocalLoss(alpha=0.3, gamma=1.5)
    torch.testing.assert_close(crit(logits, labels), focal_loss_detection(logits, labels, 0.3, 1.5))
    t = (torch.rand(logits.shape) < 0.4).double()
    torch.testing.assert_close(crit(logits, t), focal_loss(logits, t, 0.3, 1.5))
    assert "gamma=1.5" in repr(crit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits, labels = _random_detection(15, b=4, a=300, c=20)
    cpu = focal_loss_detection(logits, labels)
    x = logits.cuda().half().requires_grad_(True)
    out = focal_loss_detection(x, labels.cuda())
    out.backward()
    assert out.device.type == "cuda" and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.cpu().double(), cpu, rtol=2e-3, atol=1e-3)


def test_detection_chunked_equals_single_chunk(monkeypatch):
    import fewsight.losses.focal as focal_mod

    logits, labels = _random_detection(16, b=3, a=41, c=5)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ref = {red: focal_loss_detection(x1, labels, reduction=red) for red in ("mean", "none")}
    (g_ref,) = torch.autograd.grad(ref["mean"] + ref["none"].pow(2).sum(), x1)
    monkeypatch.setattr(focal_mod, "_CPU_CHUNK", 17)  # 3 rows per chunk, last chunk ragged
    out = {red: focal_loss_detection(x2, labels, reduction=red) for red in ("mean", "none")}
    (g_out,) = torch.autograd.grad(out["mean"] + out["none"].pow(2).sum(), x2)
    for red in ref:
        torch.testing.assert_close(out[red], ref[red])
    torch.testing.assert_close(g_out, g_ref)
    small = labels[:2, :9]
    assert torch.autograd.gradcheck(
        lambda v: focal_loss_detection(v, small, 0.25, 0.5), (logits[:2, :9].clone().requires_grad_(True),)
    )


# --- fused value-and-gradient pass (training) ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.6, 1.5)])
def test_fused_focal_equals_focal_loss_detection(dtype, alpha, gamma):
    torch.manual_seed(0)
    x = (torch.randn(2, 700, 5, dtype=torch.float64) * 6).to(dtype).requires_grad_()
    labels = torch.randint(-2, 5, (2, 700))
    ours = focal_loss_detection(x, labels, alpha, gamma, fused=True)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = focal_loss_detection(x, labels, alpha, gamma)
    (g_ref,) = torch.autograd.grad(ref, x)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(g_ours.double(), g_ref.double(), **tol)
    assert g_ours.dtype == dtype
    with torch.no_grad():  # no gradient wanted: the plain (memory-lean) path, same value
        torch.testing.assert_close(focal_loss_detection(x, labels, alpha, gamma, fused=True), ref, **tol)


def test_fused_focal_gradcheck_and_extremes():
    x = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, -1, 2, -2, 1]])
    assert torch.autograd.gradcheck(lambda x: focal_loss_detection(x, labels, fused=True), (x,))
    x = torch.tensor([[[100.0, -100.0], [-100.0, 100.0]]], requires_grad=True)
    loss = focal_loss_detection(x, torch.tensor([[1, -1]]), fused=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
