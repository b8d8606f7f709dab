"""RetinaNet: shapes for any input size and level subset, losses vs a torchvision-style per-image
reference, batched post-processing vs torchvision's per-image loop, coordinates, overfitting, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou, sigmoid_focal_loss

from fewsight.errors import CheckpointError, DTypeError, InvalidArgumentError, LabelError, ShapeError
from fewsight.geometry import AnchorGenerator, BoxCoder
from fewsight.models import RetinaNet
from fewsight.losses.focal import focal_loss_detection
from fewsight.models.assignment import assign_anchors, prepare_targets
from fewsight.models.postprocess import postprocess_detections
from fewsight.models.transform import preprocess_images
from fewsight.models.retinanet import retinanet_loss
from tests._helpers import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(num_classes: int = 3, **kw) -> RetinaNet:
    kw.setdefault("levels", (3, 4, 5))
    kw.setdefault("fpn_channels", 32)
    kw.setdefault("head_convs", 1)
    return RetinaNet(num_classes, **kw)


def one_box_targets(label: int = 1):
    return [{"boxes": torch.tensor([[20.0, 16.0, 70.0, 60.0]]), "labels": torch.tensor([label])}]


def empty_targets(n: int = 1):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(n)]


# --- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(513, 377), (600, 600)])
def test_odd_sizes_eval_forward_and_anchor_count(size):
    torch.manual_seed(0)
    model = tiny(levels=(3, 4, 5, 6, 7), fpn_channels=16).eval()
    images = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = model.forward_head(images)
        dets = model.postprocess(out)
    expected = AnchorGenerator((3, 4, 5, 6, 7)).num_anchors(size)
    assert out.anchors.shape == (expected, 4)
    assert out.outputs["cls_logits"].shape == (1, expected, 3)
    assert out.outputs["bbox_regression"].shape == (1, expected, 4)
    assert sum(out.level_sizes) == expected
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    d = dets[0]
    assert d["boxes"].shape[1] == 4 and d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0]
    assert d["labels"].dtype == torch.long


@pytest.mark.parametrize("levels", [(3,), (4, 5), (5, 6, 7), (7,), (3, 5, 7)])
def test_level_subsets_anchor_count_equals_head_outputs(levels):
    model = tiny(levels=levels, fpn_channels=8)
    out = model.forward_head(torch.rand(2, 3, 97, 131))
    n = AnchorGenerator(levels).num_anchors((97, 131))
    assert out.anchors.shape[0] == n == out.outputs["cls_logits"].shape[1]
    losses = model.compute_loss(out.outputs, out.anchors, one_box_targets() * 2)
    assert all(torch.isfinite(v) for v in losses.values())


def test_list_of_images_with_different_sizes():
    model = tiny().eval()
    images = [torch.rand(3, 60, 80), torch.rand(3, 90, 70)]
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for d, im in zip(dets, images):
        if len(d["boxes"]):
            assert (d["boxes"][:, 2] <= im.shape[2]).all() and (d["boxes"][:, 3] <= im.shape[1]).all()
    model.train()
    losses = model(images, one_box_targets() + empty_targets())
    assert set(losses) == {"classification", "box_regression"}


class _OneAnchorHead(nn.Module):
    """Scores one anchor (class 0) certain and everything else impossible, zero deltas."""

    num_anchors = 9

    def __init__(self, num_classes: int, anchor: int) -> None:
        super().__init__()
        self.num_classes, self.anchor = num_classes, anchor
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, features):
        b = features[0].shape[0]
        a = sum(f.shape[-1] * f.shape[-2] for f in features) * 9
        logits = torch.full((b, a, self.num_classes), -30.0) + self.dummy
        logits[:, self.anchor, 0] = 30.0
        return {"cls_logits": logits, "bbox_regression": torch.zeros(b, a, 4)}


@pytest.mark.parametrize("resize", [dict(min_size=128), dict(image_size=(100, 150)), dict()])
def test_outputs_are_in_original_image_coordinates(resize):
    gen = AnchorGenerator((3, 4, 5))
    images = torch.rand(2, 3, 64, 96)
    batch = preprocess_images(images, **resize)
    anchors = gen(batch.tensor.shape[-2:])
    j = 40  # an anchor well inside the image
    model = tiny(head=_OneAnchorHead(3, j), **resize).eval()
    dets = model(images)
    sy, sx = batch.scales[0].tolist()
    expected = anchors[j] / torch.tensor([sx, sy, sx, sy])
    expected = torch.minimum(expected.clamp(min=0), torch.tensor([96.0, 64.0, 96.0, 64.0]))
    for d in dets:
        assert d["labels"].tolist() == [0]
        torch.testing.assert_close(d["boxes"][0], expected)


def test_preprocess_resize_semantics():
    b = preprocess_images([torch.rand(3, 50, 100)], min_size=80, max_size=120)
    assert b.image_sizes == [(60, 120)]  # the max_size bound wins
    b = preprocess_images(torch.rand(1, 3, 50, 100), min_size=80)
    assert b.image_sizes == [(80, 160)]
    b = preprocess_images(torch.rand(1, 3, 50, 100), size_divisible=32)
    assert tuple(b.tensor.shape[-2:]) == (64, 128) and b.image_sizes == [(50, 100)]
    # Padding is zero after normalisation (the mean colour).
    assert b.tensor[..., 50:, :].abs().max() == 0
    with pytest.raises(InvalidArgumentError):
        preprocess_images(torch.rand(1, 3, 8, 8), min_size=8, image_size=16)


# --- losses --------------------------------------------------------------------------------------


def test_empty_targets_finite_losses_and_zero_box_loss():
    torch.manual_seed(0)
    model = tiny().train()
    losses = model(torch.rand(2, 3, 64, 64), empty_targets(2))
    assert set(losses) == {"classification", "box_regression"}
    assert losses["box_regression"].item() == 0.0
    assert torch.isfinite(losses["classification"]) and losses["classification"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_one_box_finite_losses_and_padded_tensor_form():
    torch.manual_seed(0)
    model = tiny().train()
    images = torch.rand(2, 3, 80, 80)
    targets = one_box_targets() + empty_targets()
    out = model.forward_head(images)
    a = model.compute_loss(out.outputs, out.anchors, targets)
    assert a["box_regression"] > 0 and torch.isfinite(a["classification"])
    padded = torch.full((2, 3, 5), -1.0)
    padded[0, 0] = torch.tensor([20.0, 16.0, 70.0, 60.0, 1.0])
    b = model.compute_loss(out.outputs, out.anchors, padded)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_training_mode_needs_targets_and_labels_are_checked():
    model = tiny().train()
    with pytest.raises(InvalidArgumentError):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(LabelError):
        model(torch.rand(1, 3, 64, 64), one_box_targets(label=3))
    with pytest.raises(ShapeError):
        model(torch.rand(2, 3, 64, 64), one_box_targets())


def test_bad_inputs_raise_typed_errors():
    model = tiny().eval()
    with pytest.raises(DTypeError):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ShapeError):
        model(torch.rand(1, 4, 32, 32))
    with pytest.raises(InvalidArgumentError):
        model([])
    with pytest.raises(InvalidArgumentError):
        tiny(box_loss="l2")
    with pytest.raises(InvalidArgumentError):
        tiny(loss_weights={"ccs": 1.0})
    with pytest.raises(InvalidArgumentError):
        tiny(background_threshold=0.6)


def test_unknown_label_and_degenerate_boxes():
    t = prepare_targets(
        [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 20.0, 20.0]]),
          "labels": torch.tensor([0, 1, -1])}],
        1,
    )
    assert t.valid.tolist() == [[True, False, True]]  # degenerate box dropped, unknown kept
    assert t.labels.tolist() == [[0, -1, -1]]
    # Anchors of an unknown-label box are ignored (not taught background).
    anchors = torch.tensor([[1.0, 1.0, 20.0, 20.0], [100.0, 100.0, 120.0, 120.0]])

    asg = assign_anchors(anchors, prepare_targets([{"boxes": anchors[:1], "labels": torch.tensor([-1])}], 1))
    assert asg.labels.tolist() == [[-2, -1]]


def _reference_loss(logits, deltas, anchors, targets, beta=0.11):
    """torchvision RetinaNet semantics, per-image loop; normalised by the batch's positives."""
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    coder = torchvision.models.detection._utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    cls_sum, box_sum, npos = 0.0, 0.0, 0
    for b, t in enumerate(targets):
        if t["boxes"].numel() == 0:
            idx = torch.full((anchors.shape[0],), -1, dtype=torch.long)
        else:
            idx = matcher(box_iou(t["boxes"], anchors))
        fg = idx >= 0
        npos += int(fg.sum())
        target = torch.zeros_like(logits[b])
        if fg.any():
            target[fg, t["labels"][idx[fg]]] = 1.0
        valid = idx != Matcher.BETWEEN_THRESHOLDS
        cls_sum = cls_sum + sigmoid_focal_loss(logits[b][valid], target[valid], reduction="sum")
        if fg.any():
            enc = coder.encode_single(t["boxes"][idx[fg]], anchors[fg])
            box_sum = box_sum + F.smooth_l1_loss(deltas[b][fg], enc, beta=beta, reduction="sum")
    n = max(1, npos)
    return cls_sum / n, box_sum / n


def test_loss_equals_torchvision_style_reference():
    torch.manual_seed(0)
    anchors = AnchorGenerator((3, 4, 5))((96, 128)).double()
    a, c = anchors.shape[0], 4
    logits = torch.randn(3, a, c, dtype=torch.float64)
    deltas = torch.randn(3, a, 4, dtype=torch.float64) * 0.2
    xy = torch.rand(3, 2, 2, dtype=torch.float64) * 60
    boxes = torch.cat((xy, xy + 12 + torch.rand(3, 2, 2, dtype=torch.float64) * 50), dim=-1)
    targets = [
        {"boxes": boxes[0], "labels": torch.tensor([0, 3])},
        {"boxes": boxes[1, :1], "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    ours = retinanet_loss(logits, deltas, anchors, targets)
    ref_cls, ref_box = _reference_loss(logits, deltas, anchors, targets)
    torch.testing.assert_close(ours["classification"], ref_cls)
    torch.testing.assert_close(ours["box_regression"], ref_box)


def test_box_loss_kinds_and_weights():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    for kind in ("smooth_l1", "l1", "giou"):
        model = tiny(box_loss=kind).train()
        losses = model(images, one_box_targets())
        assert torch.isfinite(losses["box_regression"]) and losses["box_regression"] > 0
    torch.manual_seed(0)
    base = tiny().train()(images, one_box_targets())
    torch.manual_seed(0)
    weighted = tiny(loss_weights={"box_regression": 2.0}).train()(images, one_box_targets())
    torch.testing.assert_close(weighted["box_regression"], 2 * base["box_regression"])
    torch.testing.assert_close(weighted["classification"], base["classification"])


# --- post-processing -----------------------------------------------------------------------------------


def _reference_postprocess(scores, deltas, anchors, level_sizes, sizes, thr, topk, nms, per_image):
    coder = BoxCoder()
    topk = max(topk, 10 * per_image)  # ten candidates per level for each detection allowed
    out = []
    c = scores.shape[-1]
    for i in range(scores.shape[0]):
        all_b, all_s, all_l = [], [], []
        start = 0
        for n in level_sizes:
            s = scores[i, start : start + n].flatten()
            keep = s > thr
            s, idx = s[keep], torch.where(keep)[0]
            s, order = s.topk(min(topk, idx.numel()))
            idx = idx[order]
            a = idx // c + start
            b = coder.decode(deltas[i, a], anchors[a])
            b = torchvision.ops.clip_boxes_to_image(b, sizes[i])
            all_b.append(b), all_s.append(s), all_l.append(idx % c)
            start += n
        b, s, lab = torch.cat(all_b), torch.cat(all_s), torch.cat(all_l)
        keep = torchvision.ops.batched_nms(b, s, lab, nms)[:per_image]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return out


@pytest.mark.parametrize("threshold,topk", [(0.2, 50), (0.95, 30), (0.9, 1000)])
def test_batched_postprocess_equals_per_image_loop(threshold, topk):
    # (0.2, 50): many candidates, per-level topk path; the others: threshold-first path, with and
    # without per-level truncation.
    torch.manual_seed(0)
    gen = AnchorGenerator((3, 4))
    anchors = gen((64, 80))
    level_sizes = [h * w * 9 for h, w in gen.feature_sizes((64, 80))]
    b, a, c = 3, anchors.shape[0], 5
    scores = torch.rand(b, a, c) ** 3
    deltas = torch.randn(b, a, 4) * 0.3
    sizes = torch.tensor([[64.0, 80.0], [50.0, 70.0], [64.0, 60.0]])
    ours = postprocess_detections(
        scores, deltas, anchors, level_sizes, coder=BoxCoder(), image_sizes=sizes,
        score_threshold=threshold, topk_per_level=topk, nms_threshold=0.5, detections_per_image=30,
    )
    ref = _reference_postprocess(
        scores, deltas, anchors, level_sizes, [tuple(int(v) for v in s) for s in sizes], threshold, topk, 0.5, 30
    )
    assert sum(len(r["scores"]) for r in ref) > 10
    for o, r in zip(ours, ref):
        assert len(o["scores"]) <= 30
        torch.testing.assert_close(o["scores"], r["scores"])
        torch.testing.assert_close(o["labels"], r["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"])


def test_postprocess_candidates_grow_with_the_detections_allowed():
    # 400 objects, each scored by 5 overlapping anchors of one level: 1,000 candidates hold 200 objects,
    # so a cap of 400 detections needs the 4,000 candidates the cap brings.
    n, per = 400, 5
    xy = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([[40.0, 0.0]])
    anchors = torch.cat((xy, xy + 30), 1).repeat_interleave(per, 0) + torch.arange(per).repeat(n)[:, None] * 0.5
    objects = 0.5 + 0.4 * torch.rand(n, generator=torch.Generator().manual_seed(0))
    scores = (objects.repeat_interleave(per) - torch.arange(per).repeat(n) * 1e-4).reshape(1, n * per, 1)
    common = dict(coder=BoxCoder(), image_sizes=torch.tensor([[64.0, 40.0 * n]]), score_threshold=0.05,
                  topk_per_level=1000, nms_threshold=0.5)
    (many,) = postprocess_detections(scores, torch.zeros(1, n * per, 4), anchors, [n * per], detections_per_image=400,
                                     **common)
    assert len(many["boxes"]) == n  # one per object
    (few,) = postprocess_detections(scores, torch.zeros(1, n * per, 4), anchors, [n * per], detections_per_image=100,
                                    **common)
    assert len(few["boxes"]) == 100


def test_postprocess_nothing_above_threshold():
    anchors = AnchorGenerator((3,))((16, 16))
    out = postprocess_detections(
        torch.zeros(2, anchors.shape[0], 2), torch.zeros(2, anchors.shape[0], 4), anchors, [anchors.shape[0]],
        coder=BoxCoder(), image_sizes=torch.tensor([[16.0, 16.0]] * 2),
    )
    assert [len(o["boxes"]) for o in out] == [0, 0] and out[0]["boxes"].shape == (0, 4)


# --- training end to end -------------------------------------------------------------------------------


def synthetic_image():
    img = torch.rand(1, 3, 96, 96) * 0.2
    img[0, :, 30:80, 20:64] = torch.tensor([0.9, 0.8, 0.1])[:, None, None]
    box = torch.tensor([[20.0, 30.0, 64.0, 80.0]])
    return img, [{"boxes": box, "labels": torch.tensor([1])}]


def test_overfits_one_image():
    torch.manual_seed(0)
    img, targets = synthetic_image()
    model = RetinaNet(2, levels=(3, 4, 5), fpn_channels=32, head_convs=2, head_norm="group")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    first = None
    for _ in range(30):
        losses = model(img, targets)
        loss = sum(losses.values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    model.eval()
    with torch.no_grad():
        det = model(img)[0]
    assert len(det["boxes"]) > 0 and det["labels"][0] == 1
    assert box_iou(det["boxes"][:1], targets[0]["boxes"]).item() > 0.5


# --- state ----------------------------------------------------------------------------------------------


def test_state_dict_round_trip_with_class_names():
    torch.manual_seed(0)
    model = tiny(class_names=["cat", "dog", "logo"]).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = tiny().eval()
    other.load_state_dict(state)
    assert other.classes == ["cat", "dog", "logo"] and other.num_classes == 3
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_head(images).outputs, other.forward_head(images).outputs
    torch.testing.assert_close(a["cls_logits"], b["cls_logits"])
    with pytest.raises(CheckpointError):
        tiny(num_classes=2).load_state_dict(state)
    with pytest.raises(InvalidArgumentError):
        tiny(class_names=["a", "b"])


@CUDA
def test_cuda_train_eval_and_bf16_autocast():
    torch.manual_seed(0)
    model = tiny().cuda().train()
    images = torch.rand(2, 3, 96, 80, device="cuda")
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]], device="cuda"), "labels": torch.tensor([1], device="cuda")},
               {"boxes": torch.zeros(0, 4, device="cuda"), "labels": torch.zeros(0, dtype=torch.long, device="cuda")}]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        dets = model(images)
    assert dets[0]["boxes"].device.type == "cuda" and dets[0]["boxes"].dtype == torch.float32
