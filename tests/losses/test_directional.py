"""Tests of fewsight.losses.directional: calibrated directional probabilities, the focal loss on their
logarithms (reference and fused forms), the rivalry gate, the dispersion loss.

Naive loop references in float64, gradcheck, empty inputs (zero loss with a graph), extremes and
half precision, unknown labels, module = function.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.losses import DirectionalFocalLoss, DispersionLoss
from fewsight.losses.functional import (
    directional_focal_loss,
    directional_log_probs,
    directional_probabilities,
    dispersion_loss,
    focal_loss_detection,
    focal_loss_from_log_probs,
    log1mexp,
    rival_log_gate,
)


# --- probabilities -----------------------------------------------------------------------------------


def test_log_probs_match_the_formula_in_float64():
    torch.manual_seed(0)
    e = torch.randn(40, 6, dtype=torch.float64)
    d = torch.randn(3, 6, dtype=torch.float64)
    w = torch.tensor([0.5, 7.0, 40.0], dtype=torch.float64)
    b = torch.tensor([-0.5, 0.2, -1.5], dtype=torch.float64)
    log_p, log_1mp = directional_log_probs(e, d, w, b)
    cos = F.normalize(e, dim=-1) @ F.normalize(d, dim=-1).T
    p = torch.empty_like(cos)
    for i in range(cos.shape[0]):  # naive loop reference
        for c in range(cos.shape[1]):
            p[i, c] = torch.sigmoid(w[c] * (cos[i, c] + b[c])) / torch.sigmoid(w[c] * (1 + b[c]))
    torch.testing.assert_close(log_p.exp(), p)
    torch.testing.assert_close(log_1mp, torch.log1p(-p), rtol=1e-6, atol=1e-9)
    # cos = 1 gives p = 1.
    lp, _ = directional_log_probs(d[:1], d[:1], w[:1], b[:1])
    assert lp.item() == 0.0


def test_log1mexp_stable_and_gradcheck():
    x = torch.tensor([-1e-30, -1e-8, -0.5, -0.6931, -0.7, -30.0, -1e4], dtype=torch.float64)
    ref = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), ref)
    assert log1mexp(torch.tensor(0.0)) == -math.inf
    assert torch.autograd.gradcheck(log1mexp, (torch.tensor([-1e-2, -0.69, -0.7, -3.0], dtype=torch.float64, requires_grad=True),))


def test_inference_probabilities_equal_exp_log_p():
    torch.manual_seed(0)
    e, d = torch.randn(3, 50, 8), torch.randn(4, 8)
    w, b = torch.tensor([0.5, 7.0, 30.0, 7.0]), torch.tensor([-0.5, -0.5, 0.5, -3.0])
    p = directional_probabilities(e, d, w, b)
    torch.testing.assert_close(p, directional_log_probs(e, d, w, b)[0].exp())
    assert ((p >= 0) & (p <= 1)).all()


# --- focal loss on log-probabilities -----------------------------------------------------------------


def test_gradcheck_log_probs_and_focal():
    torch.manual_seed(0)
    e = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([3.0, 7.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.5, 0.2, -1.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, -1, 2, -2]])

    def f(e, d, w, b):
        return focal_loss_from_log_probs(*directional_log_probs(e, d, w, b), labels)

    assert torch.autograd.gradcheck(f, (e, d, w, b))


def test_focal_from_log_probs_equals_sigmoid_focal():
    # With log p = logsigmoid(x) and log(1 - p) = logsigmoid(-x) it is the RetinaNet focal loss.
    torch.manual_seed(0)
    x = torch.randn(2, 30, 4, dtype=torch.float64) * 3
    labels = torch.randint(-2, 4, (2, 30))
    for gamma, alpha in ((2.0, 0.25), (0.0, None), (1.5, 0.5)):
        ours = focal_loss_from_log_probs(F.logsigmoid(x), F.logsigmoid(-x), labels, alpha, gamma)
        ref = focal_loss_detection(x, labels, alpha, gamma)
        torch.testing.assert_close(ours, ref)
    none = DirectionalFocalLoss(reduction="none")(F.logsigmoid(x), F.logsigmoid(-x), labels)
    torch.testing.assert_close(none, focal_loss_detection(x, labels, reduction="none"))
    with pytest.raises(LabelError):
        focal_loss_from_log_probs(F.logsigmoid(x), F.logsigmoid(-x), torch.full((2, 30), 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.7, 1.5)])
def test_fused_directional_focal_equals_the_composition(dtype, alpha, gamma):
    torch.manual_seed(0)
    e = torch.randn(2, 400, 8, dtype=dtype, requires_grad=True)
    d = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    w = torch.tensor([0.5, 3.0, 7.0, 40.0, 1e-3], dtype=dtype, requires_grad=True)
    b = torch.tensor([-0.5, 0.3, -1.5, -0.5, 2.0], dtype=dtype, requires_grad=True)
    labels = torch.randint(-2, 5, (2, 400))
    fused = directional_focal_loss(e, d, w, b, labels, alpha, gamma)
    g_fused = torch.autograd.grad(fused, (e, d, w, b))
    ref = focal_loss_from_log_probs(*directional_log_probs(e, d, w, b), labels, alpha, gamma)
    g_ref = torch.autograd.grad(ref, (e, d, w, b))
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(fused, ref, **tol)
    for a, r in zip(g_fused, g_ref):
        torch.testing.assert_close(a, r, **tol)


def test_fused_directional_focal_gradcheck_normalized_and_extremes():
    torch.manual_seed(0)
    e = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([3.0, 7.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.5, 0.2, -1.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, -1, 2, -2, 1]])
    assert torch.autograd.gradcheck(lambda *a: directional_focal_loss(*a, labels), (e, d, w, b))
    unit = F.normalize(e.detach(), dim=-1)
    torch.testing.assert_close(
        directional_focal_loss(unit, d, w, b, labels, normalized=True), directional_focal_loss(unit, d, w, b, labels)
    )
    # Embeddings on a class direction, negative for it; huge and vanishing scales: finite.
    dirs = F.normalize(torch.randn(3, 4), dim=-1)
    emb = torch.stack((dirs[0], dirs[1], -dirs[2])).unsqueeze(0).requires_grad_()
    for scale in (1e-30, 1e-3, 1e4):
        ws = torch.full((3,), scale, requires_grad=True)
        loss = directional_focal_loss(emb, dirs, ws, torch.full((3,), -0.5), torch.tensor([[1, -1, 2]]))
        gs = torch.autograd.grad(loss, (emb, ws))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gs)


# --- rivalry gate ------------------------------------------------------------------------------------


def naive_gate(cos: torch.Tensor, rivalry: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(cos)
    rows = cos.reshape(-1, cos.shape[-1])
    flat = out.reshape(-1, cos.shape[-1])
    rivals = [j for j in range(cos.shape[-1]) if rivalry[j] == 0]
    for i in range(rows.shape[0]):
        for c in range(cos.shape[-1]):
            if rivalry[c] > 0 and rivals:
                best = max(rows[i, j].item() for j in rivals)
                flat[i, c] = math.log(1.0 / (1.0 + math.exp(-rivalry[c].item() * (rows[i, c].item() - best))))
    return out


def test_gate_matches_the_naive_reference_in_float64():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(3, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    rivalry = torch.tensor([0.0, 0.0, 0.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rival_log_gate(cos, rivalry), naive_gate(cos, rivalry))


def test_gate_is_one_without_rivalry_or_without_rivals():
    cos = torch.rand(4, 3) * 2 - 1
    assert torch.equal(rival_log_gate(cos, torch.zeros(3)), torch.zeros(4, 3))
    assert torch.equal(rival_log_gate(cos, torch.full((3,), 5.0)), torch.zeros(4, 3))  # every class gated
    assert rival_log_gate(torch.zeros(2, 0), torch.zeros(0)).shape == (2, 0)
    with pytest.raises(ShapeError):
        rival_log_gate(cos, torch.zeros(2))


def test_gate_orders_an_object_by_its_margin_over_the_best_trained_class():
    # Same cosine with the new class (0.8); the object nearer a trained class gets the lower gate.
    cos = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.1, 0.8]])
    gate = rival_log_gate(cos, torch.tensor([0.0, 0.0, 5.0])).exp()
    assert gate[0, 2] < 0.5 < gate[1, 2]
    assert torch.equal(gate[:, :2], torch.ones(2, 2))


def _inputs(dtype=torch.float64, n=7, c=4, d=5):
    g = torch.Generator().manual_seed(1)
    e = torch.randn(2, n, d, generator=g, dtype=dtype)
    dirs = torch.randn(c, d, generator=g, dtype=dtype)
    w = torch.full((c,), 7.0, dtype=dtype)
    b = torch.full((c,), -0.5, dtype=dtype)
    r = torch.tensor([0.0, 0.0, 5.0, 2.0], dtype=dtype)[:c]
    return e, dirs, w, b, r


def test_log_probs_with_rivalry_are_the_gated_probabilities():
    e, dirs, w, b, r = _inputs()
    plain_lp, plain_l1mp = directional_log_probs(e, dirs, w, b)
    lp, l1mp = directional_log_probs(e, dirs, w, b, rivalry=r)
    cos = F.normalize(e, dim=-1) @ F.normalize(dirs, dim=-1).T
    torch.testing.assert_close(lp, plain_lp + naive_gate(cos, r))
    torch.testing.assert_close(lp.exp() + l1mp.exp(), torch.ones_like(lp))
    torch.testing.assert_close(l1mp[..., :2], plain_l1mp[..., :2])  # ungated classes untouched
    torch.testing.assert_close(directional_probabilities(e, dirs, w, b, rivalry=r), lp.exp())
    zero = torch.zeros_like(r)
    torch.testing.assert_close(directional_log_probs(e, dirs, w, b, rivalry=zero), (plain_lp, plain_l1mp))


def test_gradcheck_gate_and_gated_log_probs():
    e, dirs, w, b, r = _inputs(n=3, c=4, d=3)
    cos = (torch.rand(3, 4, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: rival_log_gate(x, r), (cos,))
    e.requires_grad_()
    dirs.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: directional_log_probs(x, y, w, b, rivalry=r), (e, dirs))


def test_focal_loss_with_rivalry_is_the_reference_composition_and_handles_empty_input():
    e, dirs, w, b, r = _inputs()
    labels = torch.tensor([[0, 2, -1, -1, -2, 3, 1], [-1, -1, 2, -1, -1, -1, -1]])
    for reduction in ("mean", "sum"):
        got = directional_focal_loss(e, dirs, w, b, labels, reduction=reduction, rivalry=r)
        ref = focal_loss_from_log_probs(*directional_log_probs(e, dirs, w, b, rivalry=r), labels, reduction=reduction)
        torch.testing.assert_close(got, ref)
    e0 = torch.zeros(1, 0, 5, dtype=torch.float64, requires_grad=True)
    loss = directional_focal_loss(e0, dirs, w, b, torch.zeros(1, 0, dtype=torch.long), rivalry=r)
    assert loss.item() == 0.0
    loss.backward()
    assert e0.grad is not None


def test_extremes_and_half_precision_stay_finite():
    e, dirs, w, b, r = _inputs(dtype=torch.float32)
    for scale in (1e-3, 1.0, 200.0):
        lp, l1mp = directional_log_probs(e, dirs, w * scale, b, rivalry=r * scale)
        assert torch.isfinite(lp).all() and not torch.isnan(l1mp).any()
        assert (lp <= 0).all() and (l1mp <= 0).all()
    on_rival = dirs[0].expand(1, 3, -1).clone()  # embeddings exactly on a trained class's direction
    p = directional_probabilities(on_rival, dirs, w, b, rivalry=torch.tensor([0.0, 0.0, 100.0, 100.0]))
    assert torch.isfinite(p).all() and (p[..., 2:] < 1e-6).all()
    lp16, _ = directional_log_probs(e.half(), dirs.half(), w, b, rivalry=r)
    assert lp16.dtype == torch.float32 and torch.isfinite(lp16).all()
    loss = directional_focal_loss(e.bfloat16(), dirs, w, b, torch.zeros(2, 7, dtype=torch.long), rivalry=r)
    assert torch.isfinite(loss)


# --- dispersion -------------------------------------------------------------------------------------


def test_dispersion_loss_value():
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    c = 1 / math.sqrt(2)  # cos(d0, d1); cos(d1, d2) < 0, cos(d0, d2) < 0
    torch.testing.assert_close(dispersion_loss(d), torch.tensor(2 * c / 6))
    DispersionLoss()(d).backward()
    assert torch.isfinite(d.grad).all()
    single = torch.randn(1, 3, requires_grad=True)
    z = dispersion_loss(single)
    z.backward()
    assert z.item() == 0.0


# --- contract shared with the other losses ------------------------------------------------------------


def naive_focal_from_log_probs(log_p, log_1mp, labels, alpha, gamma):
    """Scalar loop reference: positive target -alpha (1-p)^g log p, other classes -(1-alpha) p^g log(1-p)."""
    total, num_pos = 0.0, 0
    lp, l1 = log_p.reshape(-1, log_p.shape[-1]), log_1mp.reshape(-1, log_p.shape[-1])
    for i, lab in enumerate(labels.reshape(-1).tolist()):
        if lab < -1:
            continue
        num_pos += lab >= 0
        for c in range(lp.shape[1]):
            p, q = math.exp(lp[i, c]), math.exp(l1[i, c])
            if c == lab:
                total += -(1.0 if alpha is None else alpha) * q**gamma * float(lp[i, c])
            else:
                total += -(1.0 if alpha is None else 1.0 - alpha) * p**gamma * float(l1[i, c])
    return total / max(1, num_pos)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.5)])
def test_focal_from_log_probs_matches_the_naive_loop(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    e, d = torch.randn(2, 9, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    w, b = torch.tensor([7.0, 2.0, 20.0], dtype=torch.float64), torch.tensor([-0.5, 0.1, -0.9], dtype=torch.float64)
    labels = torch.randint(-3, 3, (2, 9), generator=g)  # -3: an unknown label, ignored like IGNORE
    lp, l1mp = directional_log_probs(e, d, w, b)
    ref = naive_focal_from_log_probs(lp, l1mp, labels, alpha, gamma)
    torch.testing.assert_close(focal_loss_from_log_probs(lp, l1mp, labels, alpha, gamma).item(), ref)
    torch.testing.assert_close(directional_focal_loss(e, d, w, b, labels, alpha, gamma).item(), ref)


def test_unknown_labels_are_ignored_like_ignore():
    g = torch.Generator().manual_seed(4)
    e, d = torch.randn(1, 6, 4, generator=g), torch.randn(3, 4, generator=g)
    w, b = torch.full((3,), 7.0), torch.full((3,), -0.5)
    unknown = torch.tensor([[0, -1, -5, 2, -2, -100]])
    ignored = torch.where(unknown < -1, -2, unknown)
    for fn in (
        lambda y: directional_focal_loss(e, d, w, b, y),
        lambda y: focal_loss_from_log_probs(*directional_log_probs(e, d, w, b), y),
    ):
        torch.testing.assert_close(fn(unknown), fn(ignored))


def test_empty_inputs_give_zero_with_a_graph():
    e = torch.zeros(2, 0, 4, requires_grad=True)
    d = torch.randn(3, 4, requires_grad=True)
    w, b = torch.full((3,), 7.0, requires_grad=True), torch.full((3,), -0.5, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    for loss in (
        directional_focal_loss(e, d, w, b, labels),
        focal_loss_from_log_probs(*directional_log_probs(e, d, w, b), labels),
        directional_focal_loss(torch.zeros(1, 3, 4, requires_grad=True), d[:0], w[:0], b[:0], torch.full((1, 3), -1)),
        dispersion_loss(d[:1]),
    ):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(5)
    e32, d32 = torch.randn(2, 8, 6, generator=g), torch.randn(4, 6, generator=g)
    e, d = e32.to(dtype), d32.to(dtype)
    w, b = torch.full((4,), 7.0), torch.full((4,), -0.5)
    labels = torch.randint(-2, 4, (2, 8), generator=g)
    lp, l1mp = directional_log_probs(e, d, w, b)
    assert lp.dtype == l1mp.dtype == torch.float32
    torch.testing.assert_close(lp, directional_log_probs(e.float(), d.float(), w, b)[0])
    loss = directional_focal_loss(e.requires_grad_(), d, w, b, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and e.grad.dtype == dtype
    torch.testing.assert_close(loss, directional_focal_loss(e.detach().float(), d.float(), w, b, labels))
    assert directional_probabilities(e, d, w, b).dtype == torch.float32
    assert torch.isfinite(dispersion_loss(d)) and dispersion_loss(d).dtype == torch.float32


def test_extreme_inputs_stay_finite():
    # Logits of +-100 through the sigmoid form of log p / log(1 - p); embeddings of magnitude 100;
    # scales of 100 (probabilities of exactly 0 and 1).
    x = torch.tensor([[[100.0, -100.0], [-100.0, 100.0]]], requires_grad=True)
    loss = focal_loss_from_log_probs(F.logsigmoid(x), F.logsigmoid(-x), torch.tensor([[1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    e = (torch.randn(1, 5, 4) * 100).requires_grad_()
    d = torch.randn(3, 4) * 100
    w = torch.full((3,), 100.0, requires_grad=True)
    b = torch.tensor([-100.0, 0.0, 100.0], requires_grad=True)
    loss = directional_focal_loss(e, d, w, b, torch.tensor([[0, 1, 2, -1, -2]]))
    grads = torch.autograd.grad(loss, (e, w, b))
    assert torch.isfinite(loss) and all(torch.isfinite(g_).all() for g_ in grads)
    # Inference form: a ratio of sigmoids, valid while sigmoid(w (1 + b)) is a normal float.
    p = directional_probabilities(e.detach(), d, w.detach(), torch.tensor([-1.5, 0.0, 100.0]))
    assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()


def test_modules_equal_their_functions_and_validate_at_construction():
    g = torch.Generator().manual_seed(6)
    lp = -torch.rand(2, 5, 3, generator=g, dtype=torch.float64) * 4
    l1mp = log1mexp(lp.clamp(max=-1e-6))
    labels = torch.randint(-2, 3, (2, 5), generator=g)
    for reduction in ("mean", "sum", "none"):
        module = DirectionalFocalLoss(alpha=0.5, gamma=1.5, reduction=reduction)
        torch.testing.assert_close(module(lp, l1mp, labels), focal_loss_from_log_probs(lp, l1mp, labels, 0.5, 1.5, reduction))
    d = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(DispersionLoss(eps=1e-6)(d), dispersion_loss(d, 1e-6))
    with pytest.raises(InvalidArgumentError):
        DirectionalFocalLoss(gamma=-1.0)
    with pytest.raises(InvalidArgumentError):
        DirectionalFocalLoss(reduction="max")


def test_bad_shapes_raise_errors_naming_the_argument():
    e, d, w, b = torch.randn(2, 5, 4), torch.randn(3, 4), torch.full((3,), 7.0), torch.full((3,), -0.5)
    with pytest.raises(ShapeError, match="embeddings"):
        directional_log_probs(torch.randn(2, 5, 3), d, w, b)
    with pytest.raises(ShapeError, match="scale"):
        directional_focal_loss(e, d, w[:2], b, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ShapeError, match="labels"):
        directional_focal_loss(e, d, w, b, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LabelError):
        directional_focal_loss(e, d, w, b, torch.full((2, 5), 3))
