"""Tests of fewsight.losses.multibox against a naive per-image loop reference (float64)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.ssd import SSD as TvSSD
from torchvision.ops import box_iou as tv_box_iou

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.geometry import BoxCoder
from fewsight.losses.multibox import MultiBoxLoss, hard_negative_mask, multibox_loss

# --- naive reference ------------------------------------------------------------------------------


def _iou(a, b) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _ssd_match(priors: list, gts: list, thr: float) -> list[int]:
    """Per prior: matched GT index or -1. Best GT per prior (>= thr), then each GT forces its best prior."""
    out = []
    for p in priors:
        best, arg = -1.0, -1
        for j, g in enumerate(gts):
            v = _iou(p, g)
            if v > best:
                best, arg = v, j
        out.append(arg if arg >= 0 and best >= thr else -1)
    forced: dict[int, tuple[float, int]] = {}
    for j, g in enumerate(gts):
        best, arg = 0.0, -1
        for i, p in enumerate(priors):
            v = _iou(p, g)
            if v > best:
                best, arg = v, i
        if arg < 0:
            continue  # overlaps nothing
        if arg not in forced or best > forced[arg][0]:
            forced[arg] = (best, j)
    for i, (_, j) in forced.items():
        out[i] = j
    return out


def _encode(g, a, var=(0.1, 0.2)) -> list[float]:
    aw, ah = a[2] - a[0], a[3] - a[1]
    acx, acy = a[0] + aw / 2, a[1] + ah / 2
    gw, gh = g[2] - g[0], g[3] - g[1]
    gcx, gcy = g[0] + gw / 2, g[1] + gh / 2
    return [(gcx - acx) / aw / var[0], (gcy - acy) / ah / var[0], math.log(gw / aw) / var[1], math.log(gh / ah) / var[1]]


def _smooth_l1(d, beta=1.0):
    ad = d.abs()
    return torch.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)


def naive_multibox(logits, deltas, priors, targets, *, thr=0.5, ratio=3, alpha=1.0, min_neg=0):
    """Explicit per-image loop; returns (loss, loss_loc, loss_cls) as differentiable float64 tensors."""
    totals, locs, clss = [], [], []
    pri = priors.tolist()
    for i, t in enumerate(targets):
        keep = [k for k in range(len(t["labels"])) if t["labels"][k] >= 0 and t["boxes"][k][2] > t["boxes"][k][0] and t["boxes"][k][3] > t["boxes"][k][1]]
        gts = [t["boxes"][k].tolist() for k in keep]
        labs = [int(t["labels"][k]) for k in keep]
        m = _ssd_match(pri, gts, thr)
        pos = [a for a in range(len(pri)) if m[a] >= 0]
        neg = [a for a in range(len(pri)) if m[a] < 0]
        logp = torch.log_softmax(logits[i], dim=-1)
        loc = deltas[i].sum() * 0  # keeps a graph when the image has nothing to learn
        cls = logits[i].sum() * 0
        for a in pos:
            target = torch.tensor(_encode(gts[m[a]], pri[a]), dtype=deltas.dtype)
            loc = loc + _smooth_l1(deltas[i, a] - target).sum()
            cls = cls - logp[a, labs[m[a]] + 1]
        k = min(int(math.floor(ratio * len(pos))), len(neg))
        k = max(k, min(min_neg, len(neg)))
        hardest = sorted(neg, key=lambda a: (float(logp[a, 0].detach()), a))[:k]
        for a in hardest:
            cls = cls - logp[a, 0]
        n = max(1, len(pos))
        locs.append(loc / n)
        clss.append(cls / n)
        totals.append(((2 - alpha) * loc + alpha * cls) / n)
    return torch.stack(totals).mean(), torch.stack(locs).mean(), torch.stack(clss).mean()


# --- random cases -----------------------------------------------------------------------------------


def make_priors(seed: int, extra: int = 10) -> torch.Tensor:
    """A 4x4 grid of 25-px boxes over a 100x100 image at two sizes, plus random boxes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for size in (25.0, 50.0):
        for cy in range(4):
            for cx in range(4):
                x, y = 12.5 + 25 * cx, 12.5 + 25 * cy
                rows.append([x - size / 2, y - size / 2, x + size / 2, y + size / 2])
    xy = torch.rand(extra, 2, generator=g, dtype=torch.float64) * 70
    wh = torch.rand(extra, 2, generator=g, dtype=torch.float64) * 40 + 5
    return torch.cat([torch.tensor(rows, dtype=torch.float64), torch.cat([xy, xy + wh], 1)])


def make_targets(seed: int, counts: list[int], num_classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 70
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 8
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, num_classes, (n,), generator=g)})
    return out


def make_preds(seed: int, b: int, a: int, c: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, c + 1, generator=g, dtype=torch.float64) * scale
    deltas = torch.randn(b, a, 4, generator=g, dtype=torch.float64)
    return logits.requires_grad_(True), deltas.requires_grad_(True)


def check_against_naive(logits, deltas, priors, targets, **kw):
    naive_kw = {"thr": kw.get("iou_threshold", 0.5), "ratio": kw.get("neg_pos_ratio", 3), "alpha": kw.get("alpha", 1.0), "min_neg": kw.get("min_negatives", 0)}
    out = multibox_loss(logits, deltas, priors, targets, **kw)
    ref = naive_multibox(logits, deltas, priors, targets, **naive_kw)
    torch.testing.assert_close(out["loss"], ref[0])
    torch.testing.assert_close(out["loss_loc"], ref[1])
    torch.testing.assert_close(out["loss_cls"], ref[2])
    g_ours = torch.autograd.grad(out["loss"], (logits, deltas))
    g_ref = torch.autograd.grad(ref[0], (logits, deltas))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_naive_reference_random(seed):
    priors = make_priors(seed)
    targets = make_targets(seed + 100, [3, 0, 1, 5], num_classes=4)
    logits, deltas = make_preds(seed + 200, 4, priors.shape[0], 4)
    check_against_naive(logits, deltas, priors, targets)


@pytest.mark.parametrize("kw", [
    {"alpha": 0.5, "neg_pos_ratio": 2},
    {"min_negatives": 5},
    {"neg_pos_ratio": 2.5, "iou_threshold": 0.4},
    {"alpha": 2.0, "min_negatives": 100},
])
def test_naive_reference_options(kw):
    priors = make_priors(7)
    targets = make_targets(8, [2, 0, 4], num_classes=3)
    logits, deltas = make_preds(9, 3, priors.shape[0], 3)
    check_against_naive(logits, deltas, priors, targets, **kw)


def test_all_images_empty():
    priors = make_priors(10)
    targets = make_targets(11, [0, 0], num_classes=2)
    logits, deltas = make_preds(12, 2, priors.shape[0], 2)
    check_against_naive(logits, deltas, priors, targets)
    out = multibox_loss(logits, deltas, priors, targets)
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # graph exists
    assert (logits.grad == 0).all() and (deltas.grad == 0).all()
    # min_negatives makes empty images teach background
    out = check_against_naive(logits, deltas, priors, targets, min_negatives=4)
    assert out["loss"].item() > 0 and out["loss_loc"].item() == 0.0


def test_more_negatives_requested_than_available():
    # few priors, many GT: positives never counted twice, k clamped to the available negatives
    priors = make_priors(13, extra=0)[:6]
    targets = make_targets(14, [4, 6], num_classes=3)
    logits, deltas = make_preds(15, 2, 6, 3)
    check_against_naive(logits, deltas, priors, targets, neg_pos_ratio=10)
    check_against_naive(logits, deltas, priors, targets, neg_pos_ratio=10, min_negatives=50)


def test_gt_overlapping_nothing_and_degenerate_gt():
    priors = make_priors(16)
    far = {"boxes": torch.tensor([[500.0, 500.0, 520.0, 530.0], [10.0, 10.0, 40.0, 45.0]], dtype=torch.float64), "labels": torch.tensor([1, 0])}
    zero_w = {"boxes": torch.tensor([[30.0, 30.0, 30.0, 60.0], [5.0, 50.0, 45.0, 90.0]], dtype=torch.float64), "labels": torch.tensor([0, 2])}
    logits, deltas = make_preds(17, 2, priors.shape[0], 3)
    out = check_against_naive(logits, deltas, priors, [far, zero_w])
    assert torch.isfinite(out["loss"])
    # the degenerate box changes nothing
    clean = {"boxes": zero_w["boxes"][1:], "labels": zero_w["labels"][1:]}
    same = multibox_loss(logits, deltas, priors, [far, clean])
    torch.testing.assert_close(out["loss"], same["loss"])
    only_bad = {"boxes": torch.tensor([[30.0, 30.0, 30.0, 30.0]], dtype=torch.float64), "labels": torch.tensor([1])}
    out = multibox_loss(logits, deltas, priors, [only_bad, only_bad])
    assert out["loss"].item() == 0.0


def test_ties():
    # duplicated priors (tie for a GT's best prior), identical GTs (tie between GTs), equal logits (tie in CE)
    base = make_priors(18, extra=4)
    priors = torch.cat([base, base[:8]])
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [10.0, 10.0, 40.0, 40.0], [60.0, 55.0, 95.0, 98.0]], dtype=torch.float64)
    targets = [{"boxes": gt, "labels": torch.tensor([0, 2, 1])}, {"boxes": gt[2:], "labels": torch.tensor([1])}]
    logits, deltas = make_preds(19, 2, priors.shape[0], 3)
    with torch.no_grad():
        logits[:, 5:25] = logits[:, 5:6]  # many equal background CEs
    check_against_naive(logits, deltas, priors, targets)
    check_against_naive(logits, deltas, priors, targets, neg_pos_ratio=1)


def test_gradcheck_tiny():
    priors = make_priors(20, extra=0)[:8]
    targets = make_targets(21, [2, 0], num_classes=2)
    targets[1] = make_targets(22, [1], num_classes=2)[0]
    logits, deltas = make_preds(23, 2, 8, 2)
    assert torch.autograd.gradcheck(
        lambda lg, d: multibox_loss(lg, d, priors, targets, min_negatives=1)["loss"], (logits, deltas), fast_mode=True
    )


def test_padded_tensor_targets_equal_list():
    priors = make_priors(24)
    targets = make_targets(25, [3, 0, 2], num_classes=4)
    logits, deltas = make_preds(26, 3, priors.shape[0], 4)
    padded = torch.full((3, 4, 5), -1.0, dtype=torch.float64)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        padded[i, :n, :4] = t["boxes"]
        padded[i, :n, 4] = t["labels"].double()
    a = multibox_loss(logits, deltas, priors, targets)
    b = multibox_loss(logits, deltas, priors, padded)
    c = multibox_loss(logits, deltas, priors.expand(3, -1, -1), targets)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
        torch.testing.assert_close(a[k], c[k])


def test_reductions_and_batched_equals_looped():
    priors = make_priors(27)
    targets = make_targets(28, [2, 1, 0, 3], num_classes=3)
    logits, deltas = make_preds(29, 4, priors.shape[0], 3)
    per = multibox_loss(logits, deltas, priors, targets, reduction="none")
    assert per["loss"].shape == (4,)
    looped = torch.stack([multibox_loss(logits[i : i + 1], deltas[i : i + 1], priors, targets[i : i + 1])["loss"] for i in range(4)])
    torch.testing.assert_close(per["loss"], looped)
    torch.testing.assert_close(multibox_loss(logits, deltas, priors, targets, reduction="sum")["loss"], looped.sum())
    out = multibox_loss(logits, deltas, priors, targets, alpha=0.7)
    torch.testing.assert_close(out["loss"], 1.3 * out["loss_loc"] + 0.7 * out["loss_cls"])


def test_equals_torchvision_ssd_single_image():
    # With one image (and enough negatives) torchvision's batch normalisation equals ours per image.
    priors = make_priors(30, extra=20)
    targets = make_targets(31, [3], num_classes=5)
    logits, deltas = make_preds(32, 1, priors.shape[0], 5)
    ours = multibox_loss(logits, deltas, priors, targets)
    matcher = tv_det_utils.SSDMatcher(0.5)
    matched = [matcher(tv_box_iou(targets[0]["boxes"], priors))]
    fake = SimpleNamespace(box_coder=tv_det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3)
    tv_targets = [{"boxes": targets[0]["boxes"], "labels": targets[0]["labels"] + 1}]  # torchvision: 0 = background
    ref = TvSSD.compute_loss(fake, tv_targets, {"bbox_regression": deltas, "cls_logits": logits}, [priors], matched)
    torch.testing.assert_close(ours["loss_loc"], ref["bbox_regression"])
    torch.testing.assert_close(ours["loss_cls"], ref["classification"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    priors = make_priors(33).float()
    targets = [{k: (v.float() if v.is_floating_point() else v) for k, v in t.items()} for t in make_targets(34, [2, 1], 3)]
    logits, deltas = make_preds(35, 2, priors.shape[0], 3, scale=8.0)
    lh = logits.detach().to(dtype).requires_grad_(True)
    dh = deltas.detach().to(dtype).requires_grad_(True)
    out = multibox_loss(lh, dh, priors, targets)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert lh.grad.dtype == dtype and torch.isfinite(lh.grad).all() and torch.isfinite(dh.grad).all()
    ref = multibox_loss(lh.detach().float(), dh.detach().float(), priors, targets)
    torch.testing.assert_close(out["loss"], ref["loss"])


def test_hard_negative_mask_rules():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.7], [0.3, 0.2, 0.1, 0.0, 0.4]])
    positive = torch.tensor([[True, False, False, False, False], [False] * 5])
    negative = torch.tensor([[False, True, True, True, True], [True, True, True, False, True]])
    m = hard_negative_mask(scores, positive, negative, neg_pos_ratio=2)
    assert m.tolist() == [[False, True, False, True, False], [False] * 5]  # tie 0.7: lower index
    m = hard_negative_mask(scores, positive, negative, neg_pos_ratio=10, min_negatives=2)
    assert m.tolist() == [[False, True, True, True, True], [True, False, False, False, True]]
    m = hard_negative_mask(scores, positive, negative, neg_pos_ratio=1.5)
    assert m.sum(1).tolist() == [1, 0]


def test_errors():
    priors = make_priors(36)
    a = priors.shape[0]
    logits, deltas = make_preds(37, 1, a, 3)
    t = make_targets(38, [2], 3)
    bad = [{"boxes": t[0]["boxes"], "labels": torch.tensor([0, 3])}]
    with pytest.raises(LabelError, match="labels"):
        multibox_loss(logits, deltas, priors, bad)
    with pytest.raises(ShapeError, match="bbox_deltas"):
        multibox_loss(logits, deltas[:, :-1], priors, t)
    with pytest.raises(ShapeError, match="default_boxes"):
        multibox_loss(logits, deltas, priors[:-1], t)
    with pytest.raises(ShapeError, match="targets"):
        multibox_loss(logits, deltas, priors, t + t)
    with pytest.raises(ShapeError, match="cls_logits"):
        multibox_loss(logits[..., :1], deltas, priors, t)
    for kw in ({"alpha": 3.0}, {"neg_pos_ratio": -1}, {"min_negatives": -2}, {"iou_threshold": 0.0}, {"beta": -1.0}):
        with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
            multibox_loss(logits, deltas, priors, t, **kw)
        with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
            MultiBoxLoss(**kw)
    with pytest.raises(InvalidArgumentError, match="reduction"):
        MultiBoxLoss(reduction="avg")


def test_module_equals_function_and_custom_coder():
    priors = make_priors(39)
    targets = make_targets(40, [2, 3], 3)
    logits, deltas = make_preds(41, 2, priors.shape[0], 3)
    coder = BoxCoder.from_variances((0.1, 0.2))
    crit = MultiBoxLoss(neg_pos_ratio=2, alpha=0.8, min_negatives=3, coder=coder)
    a = crit(logits, deltas, priors, targets)
    b = multibox_loss(logits, deltas, priors, targets, neg_pos_ratio=2, alpha=0.8, min_negatives=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert "neg_pos_ratio=2" in repr(crit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    priors = make_priors(42)
    targets = make_targets(43, [2, 0, 3], 3)
    logits, deltas = make_preds(44, 3, priors.shape[0], 3)
    cpu = multibox_loss(logits, deltas, priors, targets)
    cuda_t = [{k: v.cuda() for k, v in t.items()} for t in targets]
    out = multibox_loss(logits.detach().cuda(), deltas.detach().cuda(), priors.cuda(), cuda_t)
    for k in cpu:
        torch.testing.assert_close(out[k].cpu(), cpu[k].detach())


def test_default_boxes_on_an_unknown_object_are_never_mined():
    # Priors on a row; the first is a known object, the last two sit on an unknown-class object.
    priors = torch.tensor([[float(10 * i), 0.0, float(10 * i + 10), 10.0] for i in range(8)])
    known = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}
    with_unknown = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [60.0, 0.0, 80.0, 10.0]]), "labels": torch.tensor([0, -1])}
    logits = torch.zeros(1, 8, 3)
    confident = logits.clone()
    confident[0, 6:, 1] = 20.0  # the hardest negatives, if they were negatives
    kwargs = {"neg_pos_ratio": 2.0}
    a = multibox_loss(logits, torch.zeros(1, 8, 4), priors, [with_unknown], **kwargs)["loss_cls"]
    b = multibox_loss(confident, torch.zeros(1, 8, 4), priors, [with_unknown], **kwargs)["loss_cls"]
    dropped = multibox_loss(confident, torch.zeros(1, 8, 4), priors, [known], **kwargs)["loss_cls"]
    assert torch.equal(a, b)  # what the detector says on the unknown object does not matter
    assert dropped > b + 10  # without the unknown box, those priors are mined as background
