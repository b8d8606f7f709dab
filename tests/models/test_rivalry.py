"""Rivalry of enrolled DLDENet classes: the gate ``p'_c = p_c sigmoid(r_c (cos_c - max_{j: r_j = 0} cos_j))``.

Reference with explicit loops, gradcheck, identities (no rivalry = plain, log p' and log(1 - p') consistent),
the fused loss's fallback, extremes and fp16, empty inputs, enrollment and state round trips, ONNX export.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.models import DLDENet
from fewsight.models.detector import prepare_targets
from fewsight.models.dldenet import (
    DirectionalClassifier,
    directional_focal_loss,
    directional_log_probs,
    directional_probabilities,
    focal_loss_from_log_probs,
    rival_log_gate,
)
from tests._helpers import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)


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


def test_classifier_buffer_grows_resizes_and_validates():
    clf = DirectionalClassifier(2, 4, directions="learned")
    assert torch.equal(clf.rivalry, torch.zeros(2)) and clf.active_rivalry() is None
    clf.add_classes(torch.randn(2, 4), rivalry=5.0)
    assert torch.equal(clf.rivalry, torch.tensor([0.0, 0.0, 5.0, 5.0]))
    assert clf.active_rivalry() is clf.rivalry
    e = torch.randn(3, 4)
    torch.testing.assert_close(
        clf.probabilities(e), directional_probabilities(e, clf.directions(), clf.scale, clf.bias, rivalry=clf.rivalry)
    )
    clf._resize(3)
    assert torch.equal(clf.rivalry, torch.tensor([0.0, 0.0, 5.0]))
    with pytest.raises(InvalidArgumentError):
        clf.add_classes(torch.randn(1, 4), rivalry=-1.0)


# --- in the detector -------------------------------------------------------------------------------


def _tiny(num_classes=2, **kw):
    kw = {"levels": (3, 4, 5), "fpn_channels": 16, "head_convs": 1, "embedding_dim": 8, **kw}
    return DLDENet(num_classes, **kw)


def _scene():
    img = torch.rand(1, 3, 96, 96) * 0.2
    img[0, :, 40:80, 8:48] = torch.tensor([0.9, 0.8, 0.1])[:, None, None]
    img[0, :, 10:47, 52:89] = torch.tensor([0.1, 0.3, 0.9])[:, None, None]
    boxes = torch.tensor([[8.0, 40.0, 48.0, 80.0], [52.0, 10.0, 89.0, 47.0]])
    return img, boxes


def test_enroll_with_rivalry_gates_only_the_new_class_and_round_trips():
    torch.manual_seed(0)
    img, boxes = _scene()
    base = _tiny(2, class_names=["square", "patch"], directions="learned").eval()
    plain, rival = copy.deepcopy(base), copy.deepcopy(base)
    support = [{"boxes": boxes[1:], "labels": torch.tensor([0])}]
    plain.enroll(img, support, ["new"])
    rival.enroll(img, support, ["new"], rivalry=5.0)
    assert torch.equal(rival.classifier.rivalry, torch.tensor([0.0, 0.0, 5.0]))
    torch.testing.assert_close(rival.classifier.directions(), plain.classifier.directions())
    with torch.no_grad():
        out = rival.forward_head(img)
        p_rival = rival.scores_from_outputs(out.outputs)
        p_plain = plain.scores_from_outputs(out.outputs)
    torch.testing.assert_close(p_rival[..., :2], p_plain[..., :2])  # trained classes untouched
    assert (p_rival[..., 2] <= p_plain[..., 2] + 1e-7).all()  # the gate only lowers
    with pytest.raises(InvalidArgumentError):
        copy.deepcopy(base).enroll(img, support, ["new"], rivalry=-1.0)

    buf = io.BytesIO()
    torch.save(rival.state_dict(), buf)
    buf.seek(0)
    fresh = _tiny(2, directions="learned").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.classifier.rivalry, rival.classifier.rivalry) and fresh.classes == rival.classes
    with torch.no_grad():
        torch.testing.assert_close(fresh.scores_from_outputs(out.outputs), p_rival)


def test_state_dict_without_rivalry_loads_as_no_rivalry():
    model = _tiny(2)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rivalry")}
    fresh = _tiny(3)
    fresh.load_state_dict(state)  # a file written before rivalry existed
    assert torch.equal(fresh.classifier.rivalry, torch.zeros(2))


def test_training_loss_uses_the_gate_and_fine_tuning_trains():
    torch.manual_seed(0)
    img, boxes = _scene()
    model = _tiny(1, class_names=["square"], directions="learned")
    model.eval()
    model.enroll(img, [{"boxes": boxes[1:], "labels": torch.tensor([0])}], ["patch"], rivalry=5.0)
    model.train()
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1])}]
    losses = model(img, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.classifier.weight.grad is not None and torch.isfinite(model.classifier.weight.grad).all()
    # The classification term is the gated reference composition.
    with torch.no_grad():
        out = model.forward_head(img)
        asg = model.assign(out.anchors, prepare_targets(targets, 1))
        clf = model.classifier
        ref = focal_loss_from_log_probs(
            *directional_log_probs(out.outputs["embeddings"], clf.directions(), clf.scale, clf.bias, rivalry=clf.rivalry),
            asg.labels, model.focal_alpha, model.focal_gamma,
        )
        got = model.compute_loss(out.outputs, out.anchors, prepare_targets(targets, 1))["classification"]
    torch.testing.assert_close(got, ref * model.loss_weights["classification"])


def test_onnx_export_keeps_the_gate(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fewsight.models.export import InferenceGraph, OnnxDetector, export_onnx

    torch.manual_seed(0)
    img, boxes = _scene()
    model = _tiny(2, class_names=["square", "patch"], directions="learned", score_threshold=0.0).eval()
    model.enroll(img, [{"boxes": boxes[1:], "labels": torch.tensor([0])}], ["new"], rivalry=5.0)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, image_size=(96, 96))
    _, scores = OnnxDetector(path).run(img)
    with torch.no_grad():
        _, ref = InferenceGraph(model, (96, 96))(img)
    np.testing.assert_allclose(scores, ref.numpy(), rtol=1e-4, atol=1e-5)
