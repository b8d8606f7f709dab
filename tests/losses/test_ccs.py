"""Tests of fewsight.losses.ccs: classification and detection forms of the CCS loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import DTypeError, InvalidArgumentError, LabelError, ShapeError
from fewsight.geometry import box_iou
from fewsight.losses import CCSDetectionLoss, CCSLoss
from fewsight.losses.functional import ccs_detection_loss, ccs_loss


def ref_ccs(e, w, labels, weights=None):
    total, count = 0.0, 0
    for i in range(e.shape[0]):
        y = int(labels[i])
        if y < 0:
            continue
        cos = float(e[i] @ w[y]) / (float(e[i].norm()) * float(w[y].norm()))
        s = 1.0 if weights is None else float(weights[i])
        total += (1 - s * cos) / 2
        count += 1
    return total / max(count, 1)


def data(n=10, d=6, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::4] = -1
    return e, w, labels


def test_matches_reference_hard_and_soft():
    e, w, labels = data()
    weights = torch.rand(e.shape[0], dtype=e.dtype)
    assert ccs_loss(e, w, labels).item() == pytest.approx(ref_ccs(e, w, labels), rel=1e-12)
    assert ccs_loss(e, w, labels, weights).item() == pytest.approx(ref_ccs(e, w, labels, weights), rel=1e-12)
    per = ccs_loss(e, w, labels, reduction="none")
    assert per.shape == (10,) and (per[labels < 0] == 0).all()
    torch.testing.assert_close(ccs_loss(e, w, labels, reduction="sum"), per.sum())
    torch.testing.assert_close(per.sum() / (labels >= 0).sum(), ccs_loss(e, w, labels))


def test_gradcheck_and_detach():
    e, w, labels = data(n=6, d=3, c=3)
    e.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ccs_loss(a, b, labels, detach_class_vectors=False), (e, w))
    assert torch.autograd.gradcheck(lambda a: ccs_loss(a, w, labels), (e,))
    ccs_loss(e, w, labels).backward()
    assert w.grad is None and e.grad is not None
    assert (e.grad[labels < 0] == 0).all()


def test_extremes_and_empty():
    w = torch.eye(3)
    # Perfectly aligned / opposite / zero vectors.
    e = torch.tensor([[5.0, 0, 0], [-1e15, 0, 0], [0.0, 0, 0]], requires_grad=True)
    per = ccs_loss(e, w, torch.tensor([0, 0, 1]), reduction="none")
    torch.testing.assert_close(per, torch.tensor([0.0, 1.0, 0.5]))
    per.sum().backward()
    assert torch.isfinite(e.grad).all()
    for labels in (torch.zeros(0, dtype=torch.long), torch.tensor([-1, -3, -1])):
        x = torch.randn(labels.shape[0], 3, requires_grad=True)
        loss = ccs_loss(x, w, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert (x.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    e, w, labels = data(n=64, d=16, dtype=torch.float32)
    e16 = (e * 300).to(dtype).requires_grad_(True)
    loss = ccs_loss(e16, w.to(dtype), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(e16.grad).all()
    torch.testing.assert_close(loss, ccs_loss(e, w, labels), rtol=1e-2, atol=1e-2)


def test_errors_and_module():
    e, w, labels = data()
    with pytest.raises(LabelError, match="labels"):
        ccs_loss(e, w, torch.full_like(labels, 4))
    with pytest.raises(ShapeError, match="embeddings"):
        ccs_loss(e[:, :3], w, labels)
    with pytest.raises(ShapeError, match="weights"):
        ccs_loss(e, w, labels, torch.ones(3, dtype=e.dtype))
    with pytest.raises(DTypeError, match="labels"):
        ccs_loss(e, w, labels.float())
    with pytest.raises(InvalidArgumentError, match="reduction"):
        CCSLoss(reduction="avg")
    module = CCSLoss(reduction="sum")
    assert torch.equal(module(e, w, labels), ccs_loss(e, w, labels, reduction="sum"))


# --- detection form -----------------------------------------------------------------------------


def grid_anchors(size=40, stride=4, box=8):
    c = torch.arange(0, size, stride, dtype=torch.float32) + stride / 2
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    a = torch.stack([cx - box / 2, cy - box / 2, cx + box / 2, cy + box / 2], dim=-1).reshape(-1, 4)
    b = a.clone()
    b[:, 2:] += box / 2  # a second, bigger shape per location
    return torch.cat([a, b])


def detection_batch(seed=0, d=5, c=3):
    g = torch.Generator().manual_seed(seed)
    anchors = grid_anchors()
    a = anchors.shape[0]
    targets = []
    for n in (3, 0, 2, 1):  # image 1 has no objects
        idx = torch.randint(0, a, (n,), generator=g)
        boxes = anchors[idx] + torch.randn(n, 4, generator=g) * 1.5
        targets.append({"boxes": boxes, "labels": torch.randint(0, c, (n,), generator=g)})
    # Image 3's only box overlaps no anchor enough to be positive.
    targets[3]["boxes"] = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    emb = torch.randn(4, a, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    return anchors, emb, w, targets


def ref_detection(anchors, emb, w, targets, iou_weighted, normalization, obj=0.5):
    """Per-image loop with box_iou."""
    image_losses, total, num_pos = [], 0.0, 0
    for b, t in enumerate(targets):
        if t["boxes"].shape[0] == 0:
            continue
        iou = box_iou(anchors.double(), t["boxes"].double())  # [A, G]
        best, arg = iou.max(dim=1)
        losses = []
        for i in torch.nonzero(best >= obj).flatten().tolist():
            y = int(t["labels"][arg[i]])
            cos = F.cosine_similarity(emb[b, i], w[y], dim=0)
            s = float(best[i]) if iou_weighted else 1.0
            losses.append((1 - s * cos) / 2)
        if losses:
            image_losses.append(sum(losses) / len(losses))
            total = total + sum(losses)
            num_pos += len(losses)
    if normalization == "anchor":
        return total / max(num_pos, 1)
    return sum(image_losses) / max(len(image_losses), 1)


@pytest.mark.parametrize("normalization", ["anchor", "image"])
@pytest.mark.parametrize("iou_weighted", [True, False])
def test_detection_matches_per_image_loop(normalization, iou_weighted):
    anchors, emb, w, targets = detection_batch()
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    got = ccs_detection_loss(anchors, e1, w, targets, iou_weighted=iou_weighted, normalization=normalization)
    ref = ref_detection(anchors, e2, w, targets, iou_weighted, normalization)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-8)
    got.backward()
    ref.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-5, atol=1e-8)
    assert (e1.grad[1] == 0).all() and (e1.grad[3] == 0).all()  # images without positives


def test_detection_input_forms_agree():
    anchors, emb, w, targets = detection_batch(seed=1)
    ref = ccs_detection_loss(anchors, emb, w, targets)
    g = max(t["boxes"].shape[0] for t in targets)
    padded = torch.zeros(4, g + 1, 5)
    padded[..., 4] = -1
    for b, t in enumerate(targets):
        n = t["boxes"].shape[0]
        padded[b, :n, :4] = t["boxes"]
        padded[b, :n, 4] = t["labels"].float()
    torch.testing.assert_close(ccs_detection_loss(anchors, emb, w, padded), ref)
    torch.testing.assert_close(ccs_detection_loss(anchors.expand(4, -1, -1), emb, w, targets), ref)
    module = CCSDetectionLoss(normalization="image", iou_weighted=False)
    assert torch.equal(
        module(anchors, emb, w, targets),
        ccs_detection_loss(anchors, emb, w, targets, normalization="image", iou_weighted=False),
    )


def test_detection_no_positives_and_errors():
    anchors, emb, w, targets = detection_batch()
    e = emb.clone().requires_grad_(True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 4
    for t in (empty, [targets[3]] * 4):
        for normalization in ("anchor", "image"):
            loss = ccs_detection_loss(anchors, e, w, t, normalization=normalization)
            assert loss.item() == 0.0 and loss.requires_grad
            loss.backward()
            assert (e.grad == 0).all()
    bad = [dict(t) for t in targets]
    bad[0] = {"boxes": targets[0]["boxes"], "labels": torch.tensor([0, 1, 3])}
    with pytest.raises(LabelError):
        ccs_detection_loss(anchors, emb, w, bad)
    with pytest.raises(ShapeError, match="anchors"):
        ccs_detection_loss(anchors[:-1], emb, w, targets)
    with pytest.raises(ShapeError, match="targets"):
        ccs_detection_loss(anchors, emb, w, targets[:2])
    with pytest.raises(InvalidArgumentError, match="normalization"):
        ccs_detection_loss(anchors, emb, w, targets, normalization="batch")
    with pytest.raises(InvalidArgumentError, match="normalization"):
        CCSDetectionLoss(normalization="batch")


def test_detection_half_precision():
    anchors, emb, w, targets = detection_batch()
    e = emb.to(torch.bfloat16).requires_grad_(True)
    loss = ccs_detection_loss(anchors, e, w.to(torch.bfloat16), targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(e.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    anchors, emb, w, targets = detection_batch()
    cpu = ccs_detection_loss(anchors, emb, w, targets, normalization="image")
    cuda_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    gpu = ccs_detection_loss(anchors.cuda(), emb.cuda(), w.cuda(), cuda_targets, normalization="image")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    e, cv, labels = data()
    torch.testing.assert_close(ccs_loss(e.cuda(), cv.cuda(), labels.cuda()).cpu(), ccs_loss(e, cv, labels))
