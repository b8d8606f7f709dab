"""Adversarial tests for fewsight.geometry.match against a naive per-anchor / per-GT loop reference.

Boxes lie on an integer grid, so every intersection, area and union is an exact integer and IoU is a
single correctly-rounded division: exact ties happen and the reference (Python floats) equals the
float64 matcher bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.geometry import BACKGROUND, IGNORE, Match, match

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------- reference


def _iou(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1]) + max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0


def _ioa(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    area = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
    return iw * ih / area if area > 0 else 0.0


def naive_match(
    anchors, gt, valid, *, obj=0.5, bg=0.4, low_quality=False, force_best=False,
    regions=None, regions_valid=None, ioa_threshold=0.5,
):
    """One image, explicit loops, documented semantics. Returns (indices list, iou list)."""
    anchors = anchors.double().tolist()
    gt = gt.double().tolist()
    valid = valid.tolist()
    gts = [g for g in range(len(gt)) if valid[g]]
    num_a = len(anchors)
    iou = [[_iou(a, gt[g]) if valid[g] else None for g in range(len(gt))] for a in anchors]
    best, arg = [0.0] * num_a, [BACKGROUND] * num_a
    for i in range(num_a):
        b, k = -1.0, None
        for g in gts:  # strict > keeps the lowest GT index among ties
            if iou[i][g] > b:
                b, k = iou[i][g], g
        if k is not None:
            best[i], arg[i] = b, k
    labels = []
    for i in range(num_a):
        if not gts:  # no valid GT: background whatever the thresholds
            labels.append(BACKGROUND)
        elif best[i] >= obj:
            labels.append(arg[i])
        elif best[i] < bg:
            labels.append(BACKGROUND)
        else:
            labels.append(IGNORE)
    gt_best = {g: max((iou[i][g] for i in range(num_a)), default=0.0) for g in gts}
    if low_quality:
        for g in gts:
            if gt_best[g] > 0:
                for i in range(num_a):
                    if iou[i][g] == gt_best[g]:
                        labels[i] = arg[i]  # the anchor's OWN best GT (torchvision semantics)
    if regions is not None:
        rl = regions.double().tolist()
        rv = regions_valid.tolist() if regions_valid is not None else [True] * len(rl)
        for i in range(num_a):
            if labels[i] < 0 and any(rv[r] and _ioa(anchors[i], rl[r]) >= ioa_threshold for r in range(len(rl))):
                labels[i] = IGNORE
    out_iou = list(best)
    if force_best:
        claims = {}  # anchor -> list of (gt_best, gt)
        for g in gts:
            if gt_best[g] > 0:
                i = min(i for i in range(num_a) if iou[i][g] == gt_best[g])
                claims.setdefault(i, []).append((gt_best[g], g))
        for i, cs in claims.items():
            top = max(c[0] for c in cs)
            winner = min(g for v, g in cs if v == top)
            labels[i] = winner
            out_iou[i] = top
    return labels, out_iou


def naive_batch(anchors, gt, valid, **kw):
    idx, ious = [], []
    for b in range(gt.shape[0]):
        a = anchors if anchors.ndim == 2 else anchors[b]
        regions = kw.get("regions")
        extra = dict(kw)
        if regions is not None:
            extra["regions"] = regions[b]
            extra["regions_valid"] = None if kw.get("regions_valid") is None else kw["regions_valid"][b]
        i, v = naive_match(a, gt[b], valid[b], **extra)
        idx.append(i)
        ious.append(v)
    return torch.tensor(idx, dtype=torch.long), torch.tensor(ious, dtype=torch.float64)


def call(anchors, gt, valid, *, regions=None, regions_valid=None, ioa_threshold=0.5, obj=0.5, bg=0.4, **kw):
    return match(
        anchors, gt, valid, object_threshold=obj, background_threshold=bg,
        ignore_regions=regions, ignore_valid=regions_valid, ignore_threshold=ioa_threshold, **kw,
    )


# ----------------------------------------------------------------------------------------- data


def grid_anchors(size=48, step=8, sizes=(8, 16), dtype=torch.float64):
    out = []
    for y in range(0, size, step):
        for x in range(0, size, step):
            for s in sizes:
                out.append([x, y, x + s, y + s])
    return torch.tensor(out, dtype=dtype)


def random_case(seed, *, batch=3, max_gt=5, size=48, dtype=torch.float64, garbage=True):
    """Padded GT on a 4-px grid; invalid rows hold garbage (NaN, inf, huge, or a copy of an anchor)."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.zeros(batch, max_gt, 4, dtype=torch.float64)
    xy = torch.randint(0, size // 4, (batch, max_gt, 2), generator=g) * 4
    wh = torch.randint(1, 6, (batch, max_gt, 2), generator=g) * 4
    gt[..., :2] = xy.double()
    gt[..., 2:] = (xy + wh).double()
    valid = torch.rand(batch, max_gt, generator=g) < 0.7
    valid[0, 0] = True
    if batch > 1:
        valid[-1] = False  # an all-padded image
    if garbage:
        choices = [
            [NAN, NAN, NAN, NAN],
            [-INF, -INF, INF, INF],
            [0.0, 0.0, 8.0, 8.0],  # exactly an anchor: must still be ignored
            [1e30, -1e30, -1e30, 1e30],
            [0.0, 0.0, 1e6, 1e6],
        ]
        k = 0
        for b in range(batch):
            for j in range(max_gt):
                if not valid[b, j]:
                    gt[b, j] = torch.tensor(choices[k % len(choices)], dtype=torch.float64)
                    k += 1
    return gt.to(dtype), valid


MODES = [dict(low_quality=lq, force_best=fb) for lq, fb in itertools.product([False, True], repeat=2)]


def mode_id(m):
    return f"lq={int(m['low_quality'])}-fb={int(m['force_best'])}"


# ----------------------------------------------------------------------------------------- vs naive


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_cases_equal_naive_reference(seed, mode):
    anchors = grid_anchors()
    gt, valid = random_case(seed)
    m = call(anchors, gt, valid, **mode)
    ref_idx, ref_iou = naive_batch(anchors, gt, valid, **mode)
    assert isinstance(m, Match)
    assert m.indices.dtype == torch.long and m.indices.shape == ref_idx.shape
    assert torch.equal(m.indices, ref_idx), (m.indices != ref_idx).nonzero()
    assert m.iou.dtype == torch.float64
    assert torch.equal(m.iou, ref_iou)
    assert torch.equal(m.positive, ref_idx >= 0)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_random_cases_with_thresholds_and_ignore_regions(mode):
    anchors = grid_anchors(sizes=(8, 12, 16))
    for seed in (10, 11):
        gt, valid = random_case(seed, max_gt=4)
        g = torch.Generator().manual_seed(seed)
        regions = (torch.randint(0, 12, (3, 2, 4), generator=g) * 4).double()
        regions[..., 2:] = regions[..., :2] + 12
        regions_valid = torch.tensor([[True, False], [True, True], [False, True]])
        kw = dict(obj=0.45, bg=0.25, regions=regions, regions_valid=regions_valid, ioa_threshold=0.6, **mode)
        m = call(anchors, gt, valid, **kw)
        ref_idx, ref_iou = naive_batch(anchors, gt, valid, **kw)
        assert torch.equal(m.indices, ref_idx), (seed, (m.indices != ref_idx).nonzero())
        assert torch.equal(m.iou, ref_iou)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("obj,bg", [(0.0, 0.0), (0.3, 0.0), (1.0, 1.0), (0.7, 0.1)])
def test_extreme_thresholds_equal_naive(obj, bg, mode):
    # object_threshold 0 makes IoU-0 anchors positive: their GT must be a VALID row (lowest valid index),
    # never a padding row, whose IoU is also 0.
    anchors = grid_anchors()
    for seed in (40, 41):
        gt, valid = random_case(seed, max_gt=5)
        valid[0, 0] = False  # padding before a valid row in image 0
        valid[0, 1] = True
        try:
            m = call(anchors, gt, valid, obj=obj, bg=bg, **mode)
        except InvalidArgumentError as e:  # refusing object_threshold 0 is acceptable too
            assert obj == 0.0 and "object_threshold" in str(e)
            return
        ref_idx, ref_iou = naive_batch(anchors, gt, valid, obj=obj, bg=bg, **mode)
        assert torch.equal(m.indices, ref_idx), (seed, (m.indices != ref_idx).nonzero()[:5])
        assert torch.equal(m.iou, ref_iou), seed
        pos = m.indices >= 0
        assert valid.gather(1, m.indices.clamp(min=0))[pos].all(), "an anchor was matched to a padding row"


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_random_conflict_heavy_cases_equal_naive(mode):
    # few anchors, many GT: several GTs share a best anchor (force_best conflicts), many GT-axis ties.
    anchors = torch.tensor([[0, 0, 24, 24], [24, 0, 48, 24], [0, 24, 24, 48], [24, 24, 48, 48],
                            [12, 12, 36, 36], [0, 0, 24, 24]], dtype=torch.float64)
    conflicts = 0
    for seed in range(30, 36):
        gt, valid = random_case(seed, batch=2, max_gt=8, garbage=True)
        m = call(anchors, gt, valid, **mode)
        ref_idx, ref_iou = naive_batch(anchors, gt, valid, **mode)
        assert torch.equal(m.indices, ref_idx), (seed, m.indices, ref_idx)
        assert torch.equal(m.iou, ref_iou), seed
        iou = torch.where(valid[..., None], _dense_iou(anchors, gt), -1.0)
        best_anchor = iou.argmax(-1)
        claims = valid & (iou.amax(-1) > 0)
        for b in range(2):
            picked = best_anchor[b][claims[b]].tolist()
            conflicts += len(picked) - len(set(picked))
    assert conflicts > 0  # the data does exercise the conflict rule


def _dense_iou(anchors, gt):
    out = torch.zeros(gt.shape[0], gt.shape[1], len(anchors), dtype=torch.float64)
    for b in range(gt.shape[0]):
        for g in range(gt.shape[1]):
            for i in range(len(anchors)):
                out[b, g, i] = _iou(anchors[i].tolist(), gt[b, g].tolist())
    return torch.nan_to_num(out, nan=0.0)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_medium_random_case_equals_naive(mode):
    # anchors at many scales on a 2-px grid, many GT: lots of exact ties, several chunks.
    anchors = grid_anchors(size=96, step=4, sizes=(8, 12, 24))  # 1728 anchors
    gt, valid = random_case(123, batch=2, max_gt=12, size=96)
    ref_idx, ref_iou = naive_batch(anchors, gt, valid, **mode)
    for block in (None, 1000):
        kw = {} if block is None else {"max_block_elements": block}
        m = call(anchors, gt, valid, **mode, **kw)
        assert torch.equal(m.indices, ref_idx)
        assert torch.equal(m.iou, ref_iou)


# ----------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_empty_gt_all_background(mode):
    anchors = grid_anchors()
    m = match(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), **mode)
    assert m.indices.shape == (2, len(anchors)) and m.iou.shape == (2, len(anchors))
    assert (m.indices == BACKGROUND).all()
    assert (m.iou == 0).all()
    assert m.indices.dtype == torch.long


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_all_padded_all_background_even_with_garbage(mode):
    anchors = grid_anchors()
    gt = anchors[None, :3].clone().repeat(2, 1, 1)  # garbage equal to anchors: IoU 1 if not masked
    gt[1, 0] = torch.tensor([NAN, NAN, NAN, NAN])
    valid = torch.zeros(2, 3, dtype=torch.bool)
    m = match(anchors, gt, valid, **mode)
    assert (m.indices == BACKGROUND).all()
    assert (m.iou == 0).all()
    assert torch.isfinite(m.iou).all()


def test_empty_gt_still_applies_ignore_regions():
    # G = 0 (no objects) but a crowd/ignore region: anchors inside it must be IGNORE, as they are when
    # G > 0 with every row padded.
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [40.0, 40.0, 48.0, 48.0]])
    regions = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
    padded = match(anchors, torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool), ignore_regions=regions)
    assert padded.indices.tolist() == [[IGNORE, BACKGROUND]]
    empty = match(anchors, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool), ignore_regions=regions)
    assert empty.indices.tolist() == [[IGNORE, BACKGROUND]], (
        f"G=0 skips ignore regions: got {empty.indices.tolist()}"
    )


def test_empty_anchors_and_empty_batch():
    m = match(torch.zeros(0, 4), torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]), torch.ones(1, 1, dtype=torch.bool),
              low_quality=True, force_best=True)
    assert m.indices.shape == (1, 0) and m.iou.shape == (1, 0)
    m = match(torch.zeros(5, 4), torch.zeros(0, 2, 4), torch.zeros(0, 2, dtype=torch.bool))
    assert m.indices.shape == (0, 5)


def test_gt_valid_default_all_valid():
    anchors = grid_anchors()
    gt, _ = random_case(5, garbage=False)
    valid = torch.ones(gt.shape[:2], dtype=torch.bool)
    a = match(anchors, gt, None, low_quality=True)
    b = match(anchors, gt, valid, low_quality=True)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.iou, b.iou)


def test_zero_iou_gt_low_quality_no_positive_unlike_torchvision():
    anchors = grid_anchors(dtype=torch.float32)
    far = torch.tensor([[1000.0, 1000.0, 1010.0, 1010.0]])
    m = match(anchors, far[None], torch.ones(1, 1, dtype=torch.bool), low_quality=True)
    assert (m.indices == BACKGROUND).all()
    m = match(anchors, far[None], torch.ones(1, 1, dtype=torch.bool), force_best=True)
    assert (m.indices == BACKGROUND).all()
    # torchvision's Matcher: every anchor ties at IoU 0 and becomes positive (the bug our guard avoids).
    tv = Matcher(0.5, 0.4, allow_low_quality_matches=True)(torchvision.ops.box_iou(far, anchors))
    assert (tv == 0).all()


def test_zero_iou_gt_does_not_disturb_other_gts_low_quality():
    anchors = grid_anchors()
    gt = torch.tensor([[[1000.0, 1000.0, 1010.0, 1010.0], [2.0, 2.0, 10.0, 14.0]]], dtype=torch.float64)
    valid = torch.ones(1, 2, dtype=torch.bool)
    m = match(anchors, gt, valid, low_quality=True)
    ref_idx, ref_iou = naive_batch(anchors, gt, valid, low_quality=True)
    assert torch.equal(m.indices, ref_idx) and torch.equal(m.iou, ref_iou)
    assert (m.indices == 1).sum() >= 1 and (m.indices != 0).all()


def test_duplicate_best_anchors_low_quality_and_force_best():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]
    )
    gt = torch.tensor([[[0.0, 0.0, 30.0, 30.0]]])  # IoU 1/9 with anchors 0, 1, 2
    valid = torch.ones(1, 1, dtype=torch.bool)
    assert match(anchors, gt, valid).indices.tolist() == [[BACKGROUND] * 4]
    # low quality: every tied best anchor becomes positive
    assert match(anchors, gt, valid, low_quality=True).indices.tolist() == [[0, 0, 0, BACKGROUND]]
    # force best: only the lowest-index best anchor
    m = match(anchors, gt, valid, force_best=True)
    assert m.indices.tolist() == [[0, BACKGROUND, BACKGROUND, BACKGROUND]]
    assert m.iou[0, 0].item() == pytest.approx(1 / 9)


def test_low_quality_uses_anchor_own_best_gt():
    # Anchor 0 is GT 1's best anchor but overlaps GT 0 more: it becomes positive for GT 0.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]], dtype=torch.float64)
    gt = torch.tensor([[[0.0, 0.0, 10.0, 16.0], [0.0, 5.0, 10.0, 25.0]]], dtype=torch.float64)
    m = match(anchors, gt, None, low_quality=True)
    assert m.indices.tolist() == [[0, BACKGROUND]]
    assert m.iou[0, 0].item() == pytest.approx(100 / 160)


def test_force_best_conflicts_highest_iou_then_lowest_gt_index():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]], dtype=torch.float64)
    # GT 0 and GT 2 both have anchor 0 as their only overlapping anchor; GT 2 overlaps it more.
    gt = torch.tensor(
        [[[0.0, 0.0, 40.0, 40.0], [300.0, 300.0, 310.0, 310.0], [0.0, 0.0, 20.0, 20.0]]], dtype=torch.float64
    )
    m = match(anchors, gt, None, force_best=True)
    assert m.indices.tolist() == [[2, BACKGROUND]]
    assert m.iou[0, 0].item() == pytest.approx(0.25)
    # equal IoU: the lowest GT index wins
    gt = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0]]], dtype=torch.float64)
    assert match(anchors, gt, None, force_best=True).indices.tolist() == [[0, BACKGROUND]]
    gt_valid = torch.tensor([[False, True]])
    assert match(anchors, gt, gt_valid, force_best=True).indices.tolist() == [[1, BACKGROUND]]


def test_force_best_overrides_thresholds_and_ignore_regions():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 12.0, 12.0], [100.0, 100.0, 110.0, 110.0]])
    gt = torch.tensor([[[0.0, 0.0, 30.0, 30.0]]])  # best anchor 1 with IoU 144/900 = 0.16
    region = torch.tensor([[[0.0, 0.0, 50.0, 50.0]]])
    m = match(anchors, gt, None, force_best=True, ignore_regions=region)
    assert m.indices.tolist() == [[IGNORE, 0, BACKGROUND]]
    assert m.iou[0, 1].item() == pytest.approx(0.16)


def test_ignore_regions_leave_positives_and_respect_validity():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [26.0, 20.0, 36.0, 30.0], [80.0, 80.0, 90.0, 90.0]]
    )
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    regions = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [80.0, 80.0, 90.0, 90.0]]])
    m = match(anchors, gt, None, ignore_regions=regions, ignore_valid=torch.tensor([[True, False]]))
    # anchor 0 positive stays; anchor 1 fully inside -> IGNORE; anchor 2 IoA 0.4 < 0.5 -> BACKGROUND;
    # anchor 3 only in an invalid region -> BACKGROUND
    assert m.indices.tolist() == [[0, IGNORE, BACKGROUND, BACKGROUND]]
    m = match(anchors, gt, None, ignore_regions=regions, ignore_threshold=0.4)
    assert m.indices.tolist() == [[0, IGNORE, IGNORE, IGNORE]]
    # no regions at all (R = 0)
    m = match(anchors, gt, None, ignore_regions=torch.zeros(1, 0, 4))
    assert m.indices.tolist() == [[0, BACKGROUND, BACKGROUND, BACKGROUND]]


def test_object_threshold_zero_never_matches_padding_row():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [40.0, 40.0, 48.0, 48.0]])
    gt = torch.tensor([[[100.0, 100.0, 110.0, 110.0], [0.0, 0.0, 8.0, 8.0]]])  # row 0 is padding
    valid = torch.tensor([[False, True]])
    try:
        m = match(anchors, gt, valid, object_threshold=0.0, background_threshold=0.0)
    except InvalidArgumentError as e:
        assert "object_threshold" in str(e)
        return
    assert m.indices.tolist() == [[1, 1]], f"anchor 1 matched to padding row: {m.indices.tolist()}"


def test_threshold_boundaries():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.0]], dtype=torch.float64)
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]], dtype=torch.float64)  # IoU 1, 0.5, 0.4 exactly
    m = match(anchors, gt, None)
    assert m.indices.tolist() == [[0, 0, IGNORE]]  # >= object; 0.4 is not < background
    m = match(anchors, gt, None, object_threshold=0.6, background_threshold=0.45)
    assert m.indices.tolist() == [[0, IGNORE, BACKGROUND]]
    m = match(anchors, gt, None, object_threshold=0.5, background_threshold=0.5)  # no ignore band
    assert m.indices.tolist() == [[0, 0, BACKGROUND]]


# ----------------------------------------------------------------------------------------- dtypes / layouts


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_half_inputs_equal_float32(mode):
    anchors = grid_anchors(dtype=torch.float32)
    gt, valid = random_case(7, dtype=torch.float32, garbage=False)  # grid coords: exact in fp16
    ref = match(anchors, gt, valid, **mode)
    for dtype in (torch.float16, torch.bfloat16):
        m = match(anchors.to(dtype), gt.to(dtype), valid, **mode)
        assert torch.equal(m.indices, ref.indices)
        assert torch.isfinite(m.iou).all()
        torch.testing.assert_close(m.iou.float(), ref.iou)


def test_half_large_coordinates_finite():
    anchors = torch.tensor([[0.0, 0.0, 4000.0, 4000.0], [2000.0, 2000.0, 4000.0, 4000.0]], dtype=torch.float16)
    gt = torch.tensor([[[0.0, 0.0, 4000.0, 3000.0]]], dtype=torch.float16)
    m = match(anchors, gt, None, low_quality=True)
    assert torch.isfinite(m.iou).all()
    assert m.indices.tolist() == [[0, BACKGROUND]]  # anchor 1: IoU 2e6 / 1.4e7 = 0.143
    assert m.iou[0, 1].item() == pytest.approx(1 / 7, abs=1e-3)
    assert m.iou[0, 0].item() == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_shared_anchors_equal_batched_anchors(mode):
    anchors = grid_anchors()
    gt, valid = random_case(8)
    a = match(anchors, gt, valid, **mode)
    b = match(anchors.expand(gt.shape[0], -1, -1), gt, valid, **mode)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.iou, b.iou)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_per_image_anchors_differ(mode):
    # [B, A, 4] with genuinely different anchors per image (e.g. different image sizes)
    anchors = torch.stack([grid_anchors(), grid_anchors() + 4.0, grid_anchors(sizes=(12, 20))])
    gt, valid = random_case(9)
    m = match(anchors, gt, valid, **mode)
    ref_idx, ref_iou = naive_batch(anchors, gt, valid, **mode)
    assert torch.equal(m.indices, ref_idx) and torch.equal(m.iou, ref_iou)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("with_regions", [False, True], ids=["no-regions", "regions"])
def test_batched_equals_per_image_calls(mode, with_regions):
    # image 3 is all padding, so its single-image call has G = 0
    anchors = grid_anchors()
    gt, valid = random_case(11, batch=4)
    regions = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64).expand(4, 1, 4) if with_regions else None
    m = match(anchors, gt, valid, ignore_regions=regions, **mode)
    for b in range(4):
        # each image alone with only its own valid rows
        n = int(valid[b].sum())
        g1 = gt[b : b + 1, valid[b]]
        r1 = regions[b : b + 1] if with_regions else None
        one = match(anchors, g1, torch.ones(1, n, dtype=torch.bool), ignore_regions=r1, **mode)
        # indices refer to the padded axis in the batched call; map the single-image ones back
        pos = valid[b].nonzero().flatten()
        mapped = torch.where(one.indices[0] >= 0, pos[one.indices[0].clamp(min=0)] if n else one.indices[0],
                             one.indices[0])
        assert torch.equal(m.indices[b], mapped), b
        assert torch.equal(m.iou[b], one.iou[0]), b


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_chunked_equals_unchunked_exactly(mode, block):
    anchors = grid_anchors(sizes=(8, 12, 16))
    gt, valid = random_case(12, batch=3, max_gt=6)
    regions = torch.tensor([[[0.0, 0.0, 20.0, 20.0]], [[30.0, 30.0, 48.0, 48.0]], [[0.0, 0.0, 0.0, 0.0]]])
    for dtype in (torch.float32, torch.float64):
        kw = dict(ignore_regions=regions, **mode)
        ref = match(anchors.to(dtype), gt.to(dtype), valid, **kw)
        m = match(anchors.to(dtype), gt.to(dtype), valid, max_block_elements=block, **kw)
        assert torch.equal(m.indices, ref.indices)
        assert torch.equal(m.iou, ref.iou)


def test_chunked_force_best_tie_across_chunk_boundary_keeps_lowest_index():
    # identical anchors 0 and 5 tie for the GT; with 1-anchor chunks the first chunk must win.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] + [[100.0, 100.0, 110.0, 110.0]] * 4 + [[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[[0.0, 0.0, 30.0, 30.0]]])
    for block in (1, 2, 3, 100):
        m = match(anchors, gt, None, force_best=True, max_block_elements=block)
        assert m.indices.tolist() == [[0] + [BACKGROUND] * 5], block
        m = match(anchors, gt, None, low_quality=True, max_block_elements=block)
        assert m.indices.tolist() == [[0] + [BACKGROUND] * 4 + [0]], block


# ----------------------------------------------------------------------------------------- vs torchvision


@pytest.mark.parametrize("low_quality", [False, True])
@pytest.mark.parametrize("seed", [20, 21, 22])
def test_equals_torchvision_matcher_per_image(seed, low_quality):
    anchors = grid_anchors(dtype=torch.float32)
    gt, valid = random_case(seed, batch=3, garbage=True, dtype=torch.float32)
    m = match(anchors, gt, valid, low_quality=low_quality)
    tv_matcher = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    for b in range(gt.shape[0]):
        real = gt[b, valid[b]]
        if len(real) == 0:
            assert (m.indices[b] == BACKGROUND).all()
            continue
        quality = torchvision.ops.box_iou(real, anchors)
        assert (quality.max(dim=1).values > 0).all()  # torchvision is only right without zero-IoU GT
        tv = tv_matcher(quality)
        pos = valid[b].nonzero().flatten()
        expected = torch.where(tv >= 0, pos[tv.clamp(min=0)], tv)  # tv uses -1 / -2 like ours
        assert torch.equal(m.indices[b], expected), b
        torch.testing.assert_close(m.iou[b], quality.max(dim=0).values, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- errors


def test_errors():
    anchors = torch.zeros(5, 4)
    gt = torch.zeros(2, 3, 4)
    valid = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(InvalidArgumentError) as e:
        match(anchors, gt, valid, object_threshold=0.3, background_threshold=0.4)
    assert "background_threshold" in str(e.value) and "0.3" in str(e.value)
    with pytest.raises(InvalidArgumentError):
        match(anchors, gt, valid, background_threshold=-0.1)
    with pytest.raises(InvalidArgumentError):
        match(anchors, gt, valid, object_threshold=float("nan"))
    with pytest.raises(InvalidArgumentError, match="max_block_elements"):
        match(anchors, gt, valid, max_block_elements=0)
    with pytest.raises(ShapeError) as e:
        match(torch.zeros(5, 3), gt, valid)
    assert "anchors" in str(e.value) and "(5, 3)" in str(e.value)
    with pytest.raises(ShapeError, match="anchors"):
        match(torch.zeros(1, 2, 5, 4), gt, valid)
    with pytest.raises(ShapeError) as e:
        match(torch.zeros(3, 5, 4), gt, valid)  # batch 3 vs 2
    assert "(3, 5, 4)" in str(e.value)
    with pytest.raises(ShapeError) as e:
        match(anchors, torch.zeros(3, 4), valid)
    assert "gt_boxes" in str(e.value) and "(3, 4)" in str(e.value)
    with pytest.raises(ShapeError) as e:
        match(anchors, gt, torch.ones(2, 4, dtype=torch.bool))
    assert "gt_valid" in str(e.value) and "(2, 4)" in str(e.value)
    with pytest.raises(DTypeError, match="gt_valid"):
        match(anchors, gt, torch.ones(2, 3))
    with pytest.raises(ShapeError, match="ignore_regions"):
        match(anchors, gt, valid, ignore_regions=torch.zeros(3, 1, 4))
    with pytest.raises(ShapeError, match="ignore_regions"):
        match(anchors, gt, valid, ignore_regions=torch.zeros(2, 1, 5))
    with pytest.raises(ShapeError, match="ignore_valid"):
        match(anchors, gt, valid, ignore_regions=torch.zeros(2, 1, 4), ignore_valid=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_per_image_anchors_chunked_equal_naive(mode):
    anchors = torch.stack([grid_anchors(), grid_anchors() + 4.0, grid_anchors(sizes=(12, 20))])
    gt, valid = random_case(13)
    ref_idx, ref_iou = naive_batch(anchors, gt, valid, **mode)
    for block in (7, 64):
        m = match(anchors, gt, valid, max_block_elements=block, **mode)
        assert torch.equal(m.indices, ref_idx) and torch.equal(m.iou, ref_iou), block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_cuda_equals_cpu(mode):
    # tie-breaking (first maximum) must hold on the GPU too
    anchors = grid_anchors(size=96, step=4, sizes=(8, 12, 24))
    gt, valid = random_case(123, batch=2, max_gt=12, size=96)
    regions = torch.tensor([[[0.0, 0.0, 20.0, 20.0]], [[30.0, 30.0, 48.0, 48.0]]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        for block in (None, 64):
            kw = dict(ignore_regions=regions, **mode)
            if block:
                kw["max_block_elements"] = block
            ref = match(anchors.to(dtype), gt.to(dtype), valid, **kw)
            kw["ignore_regions"] = regions.cuda()
            m = match(anchors.to(dtype).cuda(), gt.to(dtype).cuda(), valid.cuda(), **kw)
            assert m.indices.device.type == "cuda"
            assert torch.equal(m.indices.cpu(), ref.indices)
            assert torch.equal(m.iou.cpu(), ref.iou)


def test_ignore_valid_wrong_dtype_raises_dtype_error():
    # like gt_valid, a non-bool ignore_valid should be a DTypeError naming the argument
    anchors = torch.zeros(5, 4)
    gt = torch.zeros(2, 3, 4)
    valid = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(DTypeError, match="ignore_valid"):
        match(anchors, gt, valid, ignore_regions=torch.zeros(2, 1, 4), ignore_valid=torch.ones(2, 1))


def test_ignore_threshold_zero_does_not_ignore_disjoint_anchors():
    # IoA 0 >= 0 would turn every non-positive anchor into IGNORE, even ones far from any region;
    # either reject ignore_threshold <= 0 or never ignore an anchor that does not touch a region.
    anchors = torch.tensor([[100.0, 100.0, 110.0, 110.0]])
    regions = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    try:
        m = match(anchors, torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool),
                  ignore_regions=regions, ignore_threshold=0.0)
    except InvalidArgumentError as e:
        assert "ignore_threshold" in str(e)
        return
    assert m.indices.tolist() == [[BACKGROUND]]
