"""DLDENet.embed_boxes (retrieval embeddings of given boxes) and enrollment through the shared
positive-anchor matching: naive references, batching, empty / unmatched boxes, mode, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from fewsight.errors import ShapeError
from fewsight.models import DLDENet
from fewsight.models.assignment import prepare_targets
from tests._helpers import one_thread  # noqa: F401  (autouse)

D = 8


def tiny(num_classes: int = 2, **kw) -> DLDENet:
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "levels": (3, 4, 5), "fpn_channels": 16, "embedding_dim": D, "head_convs": 1, **kw}
    return DLDENet(num_classes, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def _images(seed: int = 0, sizes=((64, 64), (64, 64))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


BOXES = [
    torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 62.0, 60.0], [10.0, 10.0, 30.0, 26.0]]),
    torch.tensor([[8.0, 8.0, 56.0, 50.0]]),
]


def _reference(model, images, boxes):
    """Naive float64 reference: one forward, this model's matching, then per box a loop over anchors."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_head(images)
        targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
        padded = prepare_targets(targets, len(boxes), scales=out.batch.scales)
        asg = model.assign(out.anchors, padded)
        emb = out.outputs["embeddings"].double()
    model.train(was_training)
    result = []
    for i, b in enumerate(boxes):
        rows = torch.zeros(len(b), emb.shape[-1], dtype=torch.float64)
        for j in range(len(b)):
            picked = [emb[i, a] for a in range(emb.shape[1]) if asg.positive[i, a] and asg.matched[i, a] == j]
            if picked:
                mean = torch.stack(picked).mean(0)
                rows[j] = mean / mean.norm()
        result.append(rows)
    return result


def test_equals_naive_reference(model):
    images = _images()
    got = model.embed_boxes(images, BOXES)
    want = _reference(model, images, BOXES)
    assert [g.shape for g in got] == [(3, D), (1, D)]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_single_box_equals_hand_matching(model):
    """One isolated box: positives are the anchors with IoU >= 0.5 or the box's best IoU (low-quality rule)."""
    image = _images(3, ((64, 64),))
    box = torch.tensor([[12.0, 10.0, 50.0, 46.0]])
    with torch.no_grad():
        out = model.forward_head(image)
    iou = box_iou(out.anchors.double(), box.double())[:, 0]
    positive = (iou >= model.object_threshold) | (iou == iou.max())
    assert positive.any()
    mean = out.outputs["embeddings"][0][positive].double().mean(0)
    got = model.embed_boxes(image, [box])[0][0]
    torch.testing.assert_close(got.double(), mean / mean.norm(), rtol=1e-5, atol=1e-6)


def test_box_coordinates_are_input_image_pixels_when_the_model_resizes():
    model = tiny(image_size=96).eval()
    images = _images(1, ((64, 64), (64, 64)))
    got = model.embed_boxes(images, BOXES)
    want = _reference(model, images, BOXES)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    # The same boxes in network pixels (x1.5) on the already-resized images give the same embeddings.
    resized = [F.interpolate(im[None], size=(96, 96), mode="bilinear", align_corners=False)[0] for im in images]
    direct = tiny().eval().embed_boxes(resized, [b * 1.5 for b in BOXES])  # same weights, no resizing
    for g, d in zip(got, direct):
        torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-5)


def test_batch_size_one_equals_all_at_once(model):
    images = torch.stack(_images(2))
    whole = model.embed_boxes(images, BOXES)
    for bs in (1, 2, 5):
        chunked = model.embed_boxes(images, BOXES, batch_size=bs)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tensor_and_list_images_agree(model):
    images = _images(4)
    a = model.embed_boxes(images, BOXES)
    b = model.embed_boxes(torch.stack(images), BOXES)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_unit_norm_and_zero_rows_for_unmatched_boxes(model):
    images = _images(5)
    boxes = [
        torch.tensor([[1000.0, 1000.0, 1100.0, 1100.0], [5.0, 5.0, 45.0, 45.0], [20.0, 20.0, 20.0, 40.0]]),
        torch.tensor([[-300.0, -300.0, -200.0, -250.0], [10.0, 12.0, 60.0, 62.0]]),
    ]
    out = model.embed_boxes(images, boxes)
    norms = [o.norm(dim=1) for o in out]
    # outside the image, and degenerate (zero width): zero rows; others unit norm
    torch.testing.assert_close(norms[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(norms[1], torch.tensor([0.0, 1.0]))
    assert all(torch.isfinite(o).all() for o in out)
    # a zero row does not disturb the other boxes' embeddings
    alone = model.embed_boxes(images, [boxes[0][1:2], boxes[1][1:]])
    torch.testing.assert_close(out[0][1], alone[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], alone[1][0], rtol=1e-5, atol=1e-6)


def test_empty_box_lists(model):
    images = _images(6)
    out = model.embed_boxes(images, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert [o.shape for o in out] == [(0, D), (0, D)]
    out = model.embed_boxes(images, [torch.zeros(0, 4), BOXES[1]])
    assert out[0].shape == (0, D) and out[1].shape == (1, D)
    torch.testing.assert_close(out[1], model.embed_boxes(images[1:], BOXES[1:])[0], rtol=1e-5, atol=1e-6)
    assert model.embed_boxes([], []) == []


def test_differently_sized_images(model):
    images = _images(7, ((64, 80), (72, 64), (96, 96)))
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 44.0]]), torch.tensor([[10.0, 8.0, 50.0, 40.0], [30.0, 30.0, 60.0, 70.0]]),
             torch.tensor([[40.0, 40.0, 90.0, 92.0]])]
    got = model.embed_boxes(images, boxes)
    assert [g.shape for g in got] == [(1, D), (2, D), (1, D)]
    for g, w in zip(got, _reference(model, images, boxes)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.norm(dim=1), torch.ones(len(g)))


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_and_no_gradient(training):
    model = tiny().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    out = model.embed_boxes(_images(8), BOXES)
    assert model.training is training
    assert all(not o.requires_grad for o in out)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # no BN statistics, no tracked means moved


def test_errors(model):
    images = _images(9)
    with pytest.raises(ShapeError, match="boxes"):
        model.embed_boxes(images, BOXES[:1])  # count mismatch
    with pytest.raises(ShapeError, match="boxes"):
        model.embed_boxes(torch.stack(images), BOXES + [torch.zeros(0, 4)])
    with pytest.raises(ShapeError, match=r"boxes\[1\]"):
        model.embed_boxes(images, [BOXES[0], torch.zeros(3, 5)])
    with pytest.raises(ShapeError, match=r"boxes\[0\]"):
        model.embed_boxes(images, [torch.zeros(4), BOXES[1]])
    with pytest.raises(ShapeError, match=r"boxes\[0\]"):
        model.embed_boxes(images, [[1.0, 2.0, 3.0, 4.0], BOXES[1]])


# --- enrollment through the same matching -----------------------------------------------------------


def test_enroll_is_the_normalised_mean_of_embed_style_sums():
    model = tiny(0).eval()
    images = _images(10, ((64, 80), (72, 64)))
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 44.0], [30.0, 20.0, 70.0, 60.0], [2.0, 2.0, 20.0, 20.0]]),
         "labels": torch.tensor([0, 1, -1])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([0])},
    ]
    # Per-box (un-normalised) sums from embed_boxes' own matching: mean embedding x number of positives.
    with torch.no_grad():
        out = model.forward_head(images)
        padded = prepare_targets(targets, 2, scales=out.batch.scales)
        asg = model.assign(out.anchors, padded)
        emb = out.outputs["embeddings"].double()
    sums = torch.zeros(2, D, dtype=torch.float64)
    for i, t in enumerate(targets):
        for j, lab in enumerate(t["labels"].tolist()):
            sel = asg.positive[i] & (asg.matched[i] == j)
            if lab >= 0:
                sums[lab] += emb[i][sel].sum(0)
    assert model.enroll(images, targets, ["a", "b"]) == [0, 1]
    torch.testing.assert_close(model.classifier.means.double(), F.normalize(sums, dim=1), rtol=1e-5, atol=1e-6)
    # One box per class: the direction is exactly embed_boxes' embedding of that box.
    solo = tiny(0).eval()
    solo.enroll(images[1:], targets[1:], ["only"])
    torch.testing.assert_close(solo.classifier.means[0], solo.embed_boxes(images[1:], [targets[1]["boxes"]])[0][0],
                               rtol=1e-5, atol=1e-6)


def test_enroll_accepts_padded_tensor_targets():
    images = torch.stack(_images(11))
    rows = torch.tensor([
        [[4.0, 6.0, 40.0, 44.0, 0.0], [30.0, 20.0, 62.0, 60.0, 1.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
        [[8.0, 8.0, 56.0, 50.0, 1.0], [0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
    ])
    as_lists = [
        {"boxes": rows[0, :2, :4], "labels": torch.tensor([0, 1])},
        {"boxes": rows[1, :1, :4], "labels": torch.tensor([1])},
    ]
    a, b = tiny(2).eval(), tiny(2).eval()
    assert a.enroll(images, rows, ["x", "y"]) == [2, 3]
    assert b.enroll(images, as_lists, ["x", "y"], batch_size=1) == [2, 3]
    torch.testing.assert_close(a.classifier.means, b.classifier.means, rtol=1e-5, atol=1e-6)
    assert a.classes[-2:] == ["x", "y"]


def test_enroll_without_support_images_is_a_clear_error():
    from fewsight.errors import InvalidArgumentError

    model = tiny(2)
    with pytest.raises(InvalidArgumentError, match="targets"):
        model.enroll([], [], ["new"])
    assert model.classes == ["0", "1"]


def test_calibrated_enrollment_sets_the_bias_between_positives_and_background(model):
    images = _images(3)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 12.0, 60.0, 50.0]]), "labels": torch.tensor([0])}]
    plain = tiny()
    plain.load_state_dict(model.state_dict())
    calibrated = tiny()
    calibrated.load_state_dict(model.state_dict())
    plain.enroll(images, targets, ["new"])
    calibrated.enroll(images, targets, ["new"], calibrate=True)
    direction = F.normalize(calibrated.classifier.means[-1], dim=0)
    assert torch.equal(calibrated.classifier.means, plain.classifier.means)  # same directions
    assert plain.classifier.bias[-1] == plain.classifier.init_bias
    # Reference: this model's matching by hand, over the whole support set at once.
    calibrated.eval()  # enrollment runs the model in eval mode
    with torch.no_grad():
        out = calibrated.forward_head(images)
        a = calibrated.assign(out.anchors, prepare_targets(targets, 2, scales=out.batch.scales, num_classes=1))
        cos = F.normalize(out.outputs["embeddings"], dim=-1) @ direction
        pos = cos[a.labels == 0].mean()
        bg = cos[a.labels == -1]
        q = bg.sort().values[int(torch.tensor(0.999 * bg.numel()).ceil()) - 1]
    assert torch.allclose(calibrated.classifier.bias[-1], -(pos + q) / 2, atol=1e-5)
    # Same result when the support set is processed in chunks.
    chunked = tiny()
    chunked.load_state_dict(model.state_dict())
    chunked.enroll(images, targets, ["new"], calibrate=True, batch_size=1)
    assert torch.allclose(chunked.classifier.bias, calibrated.classifier.bias, atol=1e-5)
