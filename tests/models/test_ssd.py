"""Tests for fewsight.models.ssd (SSD detector, default boxes, head, named MultiBox losses)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.geometry import box_iou, default_boxes
from fewsight.losses.multibox import multibox_loss
from fewsight.models import SSD, DefaultBoxGenerator, SSDHead, build_backbone
from fewsight.models.ssd import ssd_loss

SMALL = dict(levels=(3, 4, 5), fpn_channels=16)


def _model(num_classes: int = 3, **kwargs) -> SSD:
    torch.manual_seed(0)
    return SSD(num_classes, **{**SMALL, "image_size": (96, 96), **kwargs})


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [5.0, 5.0, 30.0, 20.0]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def _empty(batch: int):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(batch)]


# ------------------------------------------------------------------------------------ default boxes


def test_default_box_generator_ssd300_sizes_and_counts():
    gen = DefaultBoxGenerator((3, 4, 5, 6, 7))
    assert gen.feature_sizes((300, 300)) == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3)]
    assert gen.num_boxes_per_level == (4, 6, 6, 6, 4)
    boxes = gen((300, 300))
    assert boxes.shape == (gen.num_anchors((300, 300)), 4) == (8728, 4)
    ref = default_boxes((300, 300), [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3)],
                        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,)))
    torch.testing.assert_close(boxes, ref)


@pytest.mark.parametrize("size", [(300, 300), (97, 131)])
def test_default_box_generator_equals_torchvision(size):
    # torchvision clips in cxcywh (not corners), so compare unclipped boxes.
    ratios = [[2], [2, 3], [2, 3]]
    ours = DefaultBoxGenerator((3, 4, 5), min_scale=0.15, max_scale=0.9, aspect_ratios=ratios, clip=False)
    tv = TVDefaultBoxGenerator(ratios, min_ratio=0.15, max_ratio=0.9, clip=False)
    fs = ours.feature_sizes(size)
    ref = tv._grid_default_boxes(fs, list(size), dtype=torch.float64)  # cxcywh relative to the image
    h, w = size
    ref = ref * torch.tensor([w, h, w, h], dtype=torch.float64)
    ref = torch.cat((ref[:, :2] - ref[:, 2:] / 2, ref[:, :2] + ref[:, 2:] / 2), dim=1)
    torch.testing.assert_close(ours(size, dtype=torch.float64), ref, rtol=0, atol=1e-4)  # tv: float32 scales


def test_default_box_generator_options_and_errors():
    gen = DefaultBoxGenerator((3, 4), aspect_ratios=(2.0, 3.0, 0.5))  # flat: the same for every level
    assert gen.aspect_ratios == ((2.0, 3.0, 0.5),) * 2 and gen.num_boxes_per_level == (8, 8)
    out = gen((64, 64))
    assert out.min() >= 0 and out.max() <= 64
    assert torch.equal(gen((64, 64)), out)  # cached copy
    out.zero_()
    assert gen((64, 64)).abs().sum() > 0  # the cache is not modified through a returned tensor
    with pytest.raises(InvalidArgumentError, match="aspect_ratios"):
        DefaultBoxGenerator((3, 4), aspect_ratios=((2,), (2,), (3,)))
    with pytest.raises(InvalidArgumentError, match="min_scale"):
        DefaultBoxGenerator((3, 4), min_scale=0.9, max_scale=0.2)
    with pytest.raises(InvalidArgumentError, match="scales"):
        DefaultBoxGenerator((3, 4), scales=(0.1, 0.2))
    with pytest.raises(InvalidArgumentError, match="steps"):
        DefaultBoxGenerator((3, 4), steps=(8,))


# ------------------------------------------------------------------------------------------- head


def test_head_order_matches_flattening():
    head = SSDHead(4, (2, 4), num_classes=1)
    feats = [torch.rand(2, 4, 3, 5), torch.rand(2, 4, 2, 2)]
    out = head(feats)
    assert out["cls_logits"].shape == (2, 3 * 5 * 2 + 2 * 2 * 4, 2)
    assert out["bbox_regression"].shape == (2, 3 * 5 * 2 + 2 * 2 * 4, 4)
    # Row a = ((i * W + j) * K + k) of level 0 is channel k * 4 + o at pixel (i, j).
    raw = head.box_convs[0](feats[0])
    i, j, k = 2, 3, 1
    torch.testing.assert_close(out["bbox_regression"][:, (i * 5 + j) * 2 + k], raw[:, k * 4 : k * 4 + 4, i, j])
    with pytest.raises(ShapeError):
        head(feats[:1])
    with pytest.raises(ShapeError):
        head([torch.rand(2, 5, 3, 5), torch.rand(2, 4, 2, 2)])


# ------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("size", [(97, 131), (33, 65), (1, 1)])
def test_any_input_size_without_resizing(size):
    model = _model(image_size=None)
    images = torch.rand(2, 3, *size)
    out = model.forward_head(images)
    sizes = model.backbone.feature_sizes(size)
    assert out.anchors.shape[0] == model.default_box_generator.num_anchors(size)
    assert out.outputs["cls_logits"].shape == (2, out.anchors.shape[0], 4)
    assert out.level_sizes == [h * w * k for (h, w), k in zip(sizes, (4, 6, 6))]
    losses = model(images, _targets() if min(size) > 1 else _empty(2))
    assert set(losses) == {"classification", "box_regression"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_ragged_list_and_default_resize():
    model = _model(image_size=(300, 300))  # SSD300's default
    images = [torch.rand(3, 61, 45), torch.rand(3, 33, 77)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.0, 3.0, 20.0, 30.0]]), "labels": torch.tensor([0])},
    ]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for det, (h, w) in zip(dets, [(61, 45), (33, 77)]):
        b = det["boxes"]
        assert (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all() and (b >= 0).all()


def test_empty_targets_give_finite_losses_with_gradient():
    model = _model()
    images = torch.rand(2, 3, 64, 48)
    for targets in (_empty(2), torch.zeros(2, 0, 5), torch.full((2, 3, 5), -1.0)):
        model.zero_grad()
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total) and total.item() == 0.0
        total.backward()
        grads = [p.grad for p in model.head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # min_negatives: background-only images still teach.
    model = _model(min_negatives=8)
    losses = model(images, _empty(2))
    assert losses["classification"] > 0 and losses["box_regression"] == 0


def test_losses_equal_multibox_loss_and_alpha_weighting():
    model = _model(alpha=0.5, image_size=None)
    images = torch.rand(2, 3, 64, 80)
    out = model.forward_head(images)
    losses = model.compute_loss(out.outputs, out.anchors, model.prepare_targets(_targets(), out.batch))
    ref = multibox_loss(out.outputs["cls_logits"], out.outputs["bbox_regression"], out.anchors, _targets(),
                        alpha=0.5, coder=model.coder)
    torch.testing.assert_close(sum(losses.values()), ref["loss"])
    torch.testing.assert_close(losses["classification"], 0.5 * ref["loss_cls"])
    torch.testing.assert_close(losses["box_regression"], 1.5 * ref["loss_loc"])
    # ssd_loss takes the list, the padded tensor and PaddedTargets alike.
    padded = torch.tensor([[[10.0, 12.0, 50.0, 60.0, 1.0], [5.0, 5.0, 30.0, 20.0, 0.0]],
                           [[0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, -1.0]]])
    args = (out.outputs["cls_logits"], out.outputs["bbox_regression"], out.anchors)
    a, b = ssd_loss(*args, _targets(), alpha=0.5), ssd_loss(*args, padded, alpha=0.5)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # loss_weights scale the named terms.
    weighted = _model(alpha=0.5, image_size=None, loss_weights={"box_regression": 2.0})
    weighted.load_state_dict(model.state_dict())
    w = weighted.compute_loss(out.outputs, out.anchors, model.prepare_targets(_targets(), out.batch))
    torch.testing.assert_close(w["box_regression"], 2 * losses["box_regression"])


def test_targets_are_scaled_to_the_network_input():
    # With resizing, the same object at twice the resolution gives the same loss.
    model = _model(image_size=(64, 64))
    torch.manual_seed(1)
    image = torch.rand(1, 3, 32, 32)
    big = torch.nn.functional.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False)
    t = [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 28.0]]), "labels": torch.tensor([1])}]
    t2 = [{"boxes": t[0]["boxes"] * 2, "labels": t[0]["labels"]}]
    model.eval()  # BatchNorm in eval: a deterministic function of the input
    a, b = model.losses(big, t), model.losses(big, t2)
    c = _model(image_size=None)
    c.load_state_dict(model.state_dict())
    c.eval()
    d = c.losses(big, t2)
    for key in a:
        torch.testing.assert_close(b[key], d[key])
        assert not torch.allclose(a[key], b[key])


def test_label_errors_and_unknown_labels():
    model = _model()
    images = torch.rand(1, 3, 64, 64)
    with pytest.raises(LabelError):
        model(images, [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([3])}])
    # An unknown object (label -1) is not an error.
    losses = model(images, [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([-1])}])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(InvalidArgumentError, match="targets"):
        model(images)


def test_constructor_validation_and_injection():
    with pytest.raises(InvalidArgumentError, match="head"):
        SSD(2, **SMALL, head=SSDHead(16, (4, 4, 4), 2))
    with pytest.raises(InvalidArgumentError, match="alpha"):
        SSD(2, **SMALL, alpha=3.0)
    with pytest.raises(InvalidArgumentError, match="neg_pos_ratio"):
        SSD(2, **SMALL, neg_pos_ratio=-1)
    with pytest.raises(InvalidArgumentError, match="class_names"):
        SSD(2, **SMALL, class_names=["a"])
    with pytest.raises(InvalidArgumentError, match="image_size"):
        SSD(2, **SMALL, min_size=100)  # image_size defaults to (300, 300)
    backbone = build_backbone("mobilenet_v2", levels=(4, 5, 6), out_channels=8)
    model = SSD(2, backbone=backbone, image_size=(96, 96))
    assert model.levels == (4, 5, 6) and model.default_box_generator.levels == (4, 5, 6)
    assert model.head.num_boxes == (4, 6, 6)
    assert model.default_box_generator.strides == (16, 32, 64)
    with pytest.raises(InvalidArgumentError, match="image_size"):
        model.anchors_for([(6, 6), (3, 3), (2, 2)])
    gen = DefaultBoxGenerator((4, 5, 6), aspect_ratios=(2.0,))
    model = SSD(2, backbone=build_backbone("resnet18", levels=(4, 5, 6), out_channels=8), default_box_generator=gen)
    assert model.head.num_boxes == (4, 4, 4)


# --------------------------------------------------------------------------------------- inference


def test_eval_output_format_and_no_background_class():
    model = _model(num_classes=2, score_threshold=0.0, detections_per_image=7).eval()
    images = torch.rand(3, 3, 70, 90)
    with torch.no_grad():
        dets = model(images)
        scores = model.scores_from_outputs(model.forward_head(images).outputs)
    assert scores.shape[-1] == 2 and (scores.sum(-1) < 1).all()  # background's share dropped
    assert len(dets) == 3
    for det in dets:
        assert set(det) == {"boxes", "scores", "labels"}
        k = det["boxes"].shape[0]
        assert 0 < k <= 7
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape == (k, 4)
        assert det["labels"].dtype == torch.long and det["labels"].shape == (k,)
        assert ((det["labels"] >= 0) & (det["labels"] < 2)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
    # The per-image result equals running the image alone (no batch leakage).
    with torch.no_grad():
        alone = model(images[1:2])[0]
    torch.testing.assert_close(alone["boxes"], dets[1]["boxes"])
    torch.testing.assert_close(alone["scores"], dets[1]["scores"])


def test_state_dict_round_trip_keeps_weights_and_class_names():
    model = _model(class_names=["cat", "dog", "bird"]).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)
    other = SSD(3, **SMALL, image_size=(96, 96)).eval()
    other.load_state_dict(state)
    assert other.classes == ["cat", "dog", "bird"]
    images = torch.rand(1, 3, 50, 60)
    with torch.no_grad():
        a, b = model(images)[0], other(images)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_tiny_model_overfits_one_image():
    torch.manual_seed(0)
    # A frozen random body (trainable_layers=0) keeps the test fast; FPN + heads learn.
    model = SSD(2, levels=(3, 4), fpn_channels=32, image_size=None, frozen_bn=True, trainable_layers=0,
                min_scale=0.3, max_scale=0.6)
    image = torch.full((1, 3, 64, 64), 0.1)
    image[:, :, 16:48, 20:44] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    gt = torch.tensor([[20.0, 16.0, 44.0, 48.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(30):
        losses = model(image, targets)
        total = sum(losses.values())
        first = total.item() if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.25 * first
    model.eval()
    with torch.no_grad():
        det = model(image)[0]
    assert det["labels"][0] == 1
    assert box_iou(det["boxes"][:1], gt).item() > 0.5
    assert math.isfinite(det["scores"][0].item()) and det["scores"][0] > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_step_and_eval():
    model = _model().cuda()
    images = torch.rand(2, 3, 64, 80, device="cuda")
    targets = [{k: v.cuda() for k, v in t.items()} for t in _targets()]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(v.device.type == "cuda" and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert all(d["boxes"].device.type == "cuda" for d in dets)
