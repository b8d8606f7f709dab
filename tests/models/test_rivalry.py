"""Rivalry of enrolled DLDENet classes in the class-direction store and the detector: buffer growth,
enrollment and state round trips, the training loss, ONNX export (the gate's math: tests/losses/test_directional.py).
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
from fewsight.losses.functional import directional_log_probs, directional_probabilities, focal_loss_from_log_probs
from fewsight.models.assignment import prepare_targets
from fewsight.models.directions import DirectionalClassifier
from tests._helpers import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)


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
