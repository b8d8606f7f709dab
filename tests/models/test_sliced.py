"""fewsight.models.sliced: sliced inference, greedy merging, the sliced detector wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError
from fewsight.geometry import box_iou, tile_grid
from fewsight.models import SlicedDetector, greedy_merge, predict_sliced
from torch.utils._python_dispatch import TorchDispatchMode

from tests._helpers import one_thread  # noqa: F401


class Oracle(nn.Module):
    """A fake detector that "sees" the part of each ground-truth box inside the image it is given.

    The images carry their own coordinates (channel 0 = x, channel 1 = y of the large image), so the
    model knows which tile it looks at; a detection's score is ``base * visibility``, so a tile holding
    an object whole scores it highest. Images smaller than ``tile`` pixels wide stand for the
    downscaled full-image pass: there it detects ``full_box`` (given in full-image coordinates).
    """

    def __init__(self, boxes, labels, scores=None, *, full_box=None, image_size=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # a device to follow
        self.gt = torch.as_tensor(boxes, dtype=torch.float32)
        self.labels = torch.as_tensor(labels)
        self.base = torch.full((len(self.gt),), 0.9) if scores is None else torch.as_tensor(scores)
        self.full_box, self.image_size = full_box, image_size
        self.detections_per_image = 100
        self.calls = []

    def forward(self, images):
        out = []
        for im in images:
            h, w = im.shape[-2:]
            self.calls.append((h, w))
            if self.full_box is not None and (h, w) != self.tile_size:
                H, W = self.image_size
                b = torch.tensor([self.full_box]) * torch.tensor([w / W, h / H, w / W, h / H])
                out.append({"boxes": b, "scores": torch.tensor([0.95]), "labels": torch.tensor([0])})
                continue
            x0, y0 = float(im[0, 0, 0]), float(im[1, 0, 0])
            win = torch.tensor([x0, y0, x0 + w, y0 + h])
            lo = torch.maximum(self.gt[:, :2], win[:2])
            hi = torch.minimum(self.gt[:, 2:], win[2:])
            inter = (hi - lo).clamp(min=0).prod(1)
            area = (self.gt[:, 2:] - self.gt[:, :2]).prod(1)
            seen = inter > 0
            boxes = torch.cat((lo - win[:2], hi - win[:2]), 1)[seen]
            scores = (self.base * inter / area)[seen]
            order = scores.argsort(descending=True)[: self.detections_per_image]
            out.append({"boxes": boxes[order], "scores": scores[order], "labels": self.labels[seen][order]})
        return out

    tile_size = None


def coordinate_image(h, w):
    """Float image whose pixels hold their own (x, y): what Oracle reads."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack((xs, ys, torch.zeros_like(xs)))


def test_box_cut_by_a_tile_border_merges_to_one_detection():
    image = coordinate_image(100, 300)
    gt = [[85.0, 20.0, 115.0, 50.0]]  # tiles at x 0-100 and 80-180 (overlap 0.2): cut by the first's border
    model = Oracle(gt, [1])
    nms = predict_sliced(model, image, tile=100, overlap=0.2, merge="nms")
    greedy = predict_sliced(model, image, tile=100, overlap=0.2, merge="greedy")
    assert len(nms["boxes"]) == 2  # the part 85-100 (IoU 0.5 with the whole box, not above NMS's 0.5) stays
    assert greedy["boxes"].tolist() == gt and greedy["labels"].tolist() == [1]
    assert greedy["scores"].tolist() == pytest.approx([0.9])


class Overshoot(Oracle):
    """An Oracle whose box of a part cut by a tile's right border runs ``px`` pixels past the object's
    bottom (a part's box, regressed from a truncated view, is sloppy)."""

    def __init__(self, *args, px=6.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.px = px

    def forward(self, images):
        out = super().forward(images)
        for o, im in zip(out, images):
            cut = o["boxes"][:, 2] >= im.shape[-1] - 1
            o["boxes"][cut, 3] += self.px
        return out


def test_greedy_keeps_the_box_a_tile_saw_whole_not_its_union_with_a_sloppy_part():
    image = coordinate_image(100, 300)
    gt = [[85.0, 20.0, 115.0, 50.0]]  # whole in the tile at x 80, cut in the tile at x 0
    out = predict_sliced(Overshoot(gt, [1]), image, tile=100, overlap=0.2, merge="greedy")
    assert out["boxes"].tolist() == gt  # a union would reach y 56
    assert out["scores"].tolist() == pytest.approx([0.9])


def test_box_no_tile_holds_whole_merges_into_its_union():
    image = coordinate_image(64, 192)
    gt = [[40.0, 10.0, 90.0, 30.0]]  # 50 px wide, tiles 64 px every 32 px: never whole in a tile
    out = predict_sliced(Oracle(gt, [0]), image, tile=64, overlap=0.5, merge="greedy")
    assert out["boxes"].tolist() == gt


def test_box_at_a_tile_corner_merges_to_one_detection():
    image = coordinate_image(200, 200)
    gt = [[90.0, 90.0, 110.0, 115.0]]  # tiles of 100 every 80: cut by both borders, whole in tile (80, 80)
    out = predict_sliced(Oracle(gt, [0]), image, tile=100, overlap=0.2, merge="greedy")
    assert out["boxes"].tolist() == gt


def test_crowded_scene_one_detection_per_object():
    g = torch.Generator().manual_seed(0)
    h, w, n = 400, 600, 120
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
    gt = torch.cat((xy, xy + 8 + torch.rand(n, 2, generator=g) * 10), 1).round()
    # well separated objects of two classes (greedy merging joins overlapping same-class objects)
    iou = box_iou(gt, gt).fill_diagonal_(0)
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        if keep[i]:
            keep[(iou[i] > 0) & (torch.arange(n) > i)] = False
    gt = gt[keep]
    labels = torch.arange(len(gt)) % 2
    model = Oracle(gt, labels)
    out = predict_sliced(model, coordinate_image(h, w), tile=128, overlap=0.25, merge="greedy", batch_size=5)
    got = sorted(zip(map(tuple, out["boxes"].tolist()), out["labels"].tolist()))
    assert got == sorted(zip(map(tuple, gt.tolist()), labels.tolist()))


def test_overlapping_neighbours_no_border_cuts_stay_apart():
    # Two same-class objects overlapping by half the smaller one, inside one tile: SAHI's plain
    # greedy merge would join them into their union; only boxes cut by a tile border merge.
    image = coordinate_image(100, 300)
    gt = [[10.0, 10.0, 40.0, 40.0], [25.0, 15.0, 45.0, 35.0]]
    out = predict_sliced(Oracle(gt, [0, 0], [0.9, 0.8]), image, tile=100, overlap=0.2, merge="greedy")
    assert sorted(out["boxes"].tolist()) == sorted(gt)


def test_batched_equals_tile_by_tile_exactly():
    image = coordinate_image(150, 230)
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(30, 2, generator=g) * torch.tensor([200.0, 120.0])
    model = Oracle(torch.cat((xy, xy + 25), 1), torch.randint(0, 3, (30,), generator=g))
    one = predict_sliced(model, image, tile=64, overlap=0.3, batch_size=1)
    many = predict_sliced(model, image, tile=64, overlap=0.3, batch_size=100)
    for k in one:
        assert torch.equal(one[k], many[k])


@pytest.fixture(scope="module")
def tiny_model():
    from fewsight.train import build_model
    from fewsight.train.config import ModelConfig
    from tests.train._tiny import TINY_MODEL

    torch.manual_seed(0)
    model = build_model(ModelConfig("retinanet", None, dict(TINY_MODEL)), ["0", "1"])
    model.score_threshold = 0.0  # an untrained model: keep every candidate
    with torch.no_grad():  # spread the untrained scores (all near the 0.01 prior) so that rankings have no near-ties
        model.head.classification_head.predictor.weight.normal_(0.0, 1.0)
    return model.eval()


def test_real_detector_batched_equals_tile_by_tile(tiny_model):
    image = torch.rand(3, 150, 200, generator=torch.Generator().manual_seed(0))
    one = predict_sliced(tiny_model, image, tile=64, overlap=0.25, batch_size=1, max_detections=50)
    many = predict_sliced(tiny_model, image, tile=64, overlap=0.25, batch_size=16, max_detections=50)
    assert len(one["boxes"]) == 50
    torch.testing.assert_close(one["scores"], many["scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one["boxes"], many["boxes"], atol=1e-3, rtol=1e-4)
    assert one["boxes"].dtype == torch.float32 and one["labels"].dtype == torch.long


def test_uint8_image_equals_float_image(tiny_model):
    u8 = torch.randint(0, 256, (3, 100, 140), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = predict_sliced(tiny_model, u8, tile=64, batch_size=3)
    b = predict_sliced(tiny_model, u8.float() / 255, tile=64, batch_size=3)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_detections_per_tile_and_mode_are_restored(tiny_model):
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(3))
    tiny_model.train()
    before = tiny_model.detections_per_image
    few = predict_sliced(tiny_model, image, tile=64, overlap=0.0, detections_per_tile=3, merge="greedy", iou_threshold=1.0)
    assert tiny_model.training and tiny_model.detections_per_image == before
    tiny_model.eval()
    assert len(few["boxes"]) <= 4 * 3
    many = predict_sliced(tiny_model, image, tile=64, overlap=0.0, detections_per_tile=500)
    assert len(many["boxes"]) > 4 * before  # beyond the model's own cap per tile
    capped = predict_sliced(tiny_model, image, tile=64, overlap=0.0, detections_per_tile=500, max_detections=7)
    assert torch.equal(capped["scores"], many["scores"][:7])


def test_detections_per_tile_needs_a_settable_cap():
    class NoCap(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in images]

    with pytest.raises(InvalidArgumentError, match="detections_per_image"):
        predict_sliced(NoCap(), torch.rand(3, 10, 10), tile=8, detections_per_tile=5)
    wrapper = nn.Module()
    wrapper.detector = Oracle([[0.0, 0.0, 1.0, 1.0]], [0])
    wrapper.forward = wrapper.detector.forward
    predict_sliced(wrapper, coordinate_image(10, 10), tile=8, detections_per_tile=5)  # capped through .detector


def test_full_image_pass_adds_large_objects():
    h, w = 300, 400
    model = Oracle(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), full_box=[20.0, 30.0, 380.0, 290.0],
                   image_size=(h, w))
    model.tile_size = (100, 100)
    out = predict_sliced(model, coordinate_image(h, w), tile=100, overlap=0.0, full_image=True)
    assert (75, 100) in model.calls  # longer side downscaled to the tile size
    torch.testing.assert_close(out["boxes"], torch.tensor([[20.0, 30.0, 380.0, 290.0]]))
    assert predict_sliced(model, coordinate_image(h, w), tile=100, overlap=0.0)["boxes"].shape == (0, 4)


def test_tiles_are_views_only_the_batch_is_copied():
    h, w, tile, batch = 600, 800, 100, 3
    image = torch.zeros(3, h, w, dtype=torch.uint8)

    class Empty(nn.Module):
        def forward(self, images):
            z = torch.zeros(0)
            return [{"boxes": z.reshape(0, 4), "scores": z, "labels": z.long()} for _ in images]

    with MaxNewBytes() as probe:
        predict_sliced(Empty(), image, tile=tile, overlap=0.2, batch_size=batch, full_image=True)
    # the float batch is the largest allocation, never a copy of the whole image (3 * 600 * 800 bytes)
    assert probe.max_bytes == batch * 3 * tile * tile * 4


class MaxNewBytes(TorchDispatchMode):
    """The largest tensor any non-view op allocates while active (views of the image cost nothing)."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


def _naive_greedy(boxes, scores, labels, thr, metric):
    """SAHI's greedy_nmm: explicit loops, returns the kept indices and their merged boxes."""
    order = sorted(range(len(boxes)), key=lambda i: (-float(scores[i]), i))
    remaining, result = list(order), {}
    while remaining:
        i = remaining.pop(0)
        merged = boxes[i].clone()
        rest = []
        for j in remaining:
            a, b = boxes[i], boxes[j]
            iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
            ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
            inter = iw * ih
            aa, ab = float((a[2] - a[0]) * (a[3] - a[1])), float((b[2] - b[0]) * (b[3] - b[1]))
            denom = aa + ab - inter if metric == "iou" else min(aa, ab)
            m = inter / denom if denom > 0 else 0.0
            if labels[j] == labels[i] and m >= thr:
                merged[:2] = torch.minimum(merged[:2], b[:2])
                merged[2:] = torch.maximum(merged[2:], b[2:])
            else:
                rest.append(j)
        remaining = rest
        result[i] = merged
    return result


@pytest.mark.parametrize("metric", ["iou", "ios"])
@pytest.mark.parametrize("seed,block", [(0, 1), (1, 500), (2, 1 << 22)])
def test_greedy_merge_equals_naive(metric, seed, block, monkeypatch):
    import fewsight.models.sliced as sliced

    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(80, 2, generator=g) * 100).round()  # integer corners: equal x1 happen
    boxes = torch.cat((xy, xy + 5 + (torch.rand(80, 2, generator=g) * 20).round()), 1)
    boxes[::17, 2] = boxes[::17, 0]  # zero-width boxes merge with nothing
    scores = torch.rand(80, generator=g).round(decimals=1)  # ties broken by index
    labels = torch.randint(0, 2, (80,), generator=g)
    ref = _naive_greedy(boxes, scores, labels, 0.4, metric)
    monkeypatch.setattr(sliced, "_BLOCK", block)  # candidate pairs per block: 1, several blocks, one block
    group = greedy_merge(boxes, scores, labels, 0.4, metric=metric)
    kept = torch.nonzero(group == torch.arange(80)).squeeze(1).tolist()
    assert sorted(kept) == sorted(ref)
    for i in kept:
        members = group == i
        union = torch.cat((boxes[members, :2].amin(0), boxes[members, 2:].amax(0)))
        assert torch.equal(union, ref[i])


def test_greedy_merge_empty_and_single():
    assert greedy_merge(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert greedy_merge(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.5]), torch.tensor([0])).tolist() == [0]


def test_sliced_detector_wraps_a_detector_for_evaluation():
    from fewsight.eval import evaluate_model

    gt = torch.tensor([[85.0, 20.0, 115.0, 50.0]])
    oracle = Oracle(gt, [0])
    oracle.classes = ["a"]
    sliced = SlicedDetector(oracle, tile=100, overlap=0.2, merge="greedy")
    assert sliced.classes == ["a"]
    ds = [(coordinate_image(100, 300), {"boxes": gt, "labels": torch.tensor([0])})]
    metrics = evaluate_model(sliced, ds, batch_size=1, progress=False)
    assert metrics["map50"] == pytest.approx(1.0)
    with pytest.raises(InvalidArgumentError, match="inference only"):
        sliced.train()([coordinate_image(10, 10)])
    with pytest.raises(TypeError, match="tiles"):
        SlicedDetector(oracle, tiles=3)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"merge": "wbf"}, InvalidArgumentError, "merge"),
    ({"match_metric": "giou"}, InvalidArgumentError, "match_metric"),
    ({"iou_threshold": 0.0}, InvalidArgumentError, "iou_threshold"),
    ({"batch_size": 0}, InvalidArgumentError, "batch_size"),
    ({"max_detections": 0}, InvalidArgumentError, "max_detections"),
    ({"tile": 0}, InvalidArgumentError, "size"),
    ({"overlap": 1.0}, InvalidArgumentError, "overlap"),
    ({"full_image": "yes"}, InvalidArgumentError, "full_image"),
])
def test_predict_sliced_refuses_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        predict_sliced(Oracle(torch.zeros(0, 4), []), coordinate_image(20, 20), **kwargs)


def test_predict_sliced_refuses_bad_images():
    model = Oracle(torch.zeros(0, 4), [])
    with pytest.raises(ShapeError, match="image"):
        predict_sliced(model, torch.rand(1, 3, 20, 20))
    with pytest.raises(DTypeError, match="image"):
        predict_sliced(model, torch.zeros(3, 20, 20, dtype=torch.int32))
    with pytest.raises(DTypeError, match="image"):
        predict_sliced(model, [[0.0]])


def test_output_follows_the_image_device():
    image = coordinate_image(50, 50)
    out = predict_sliced(Oracle([[5.0, 5.0, 20.0, 20.0]], [0]), image, tile=32)
    assert all(v.device == image.device for v in out.values())
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        model = Oracle([[5.0, 5.0, 20.0, 20.0]], [0])
        out = predict_sliced(model, image.cuda(), tile=32)
        assert all(v.device.type == "cuda" for v in out.values())


def test_tile_grid_is_what_predict_sliced_runs():
    model = Oracle(torch.zeros(0, 4), [])
    predict_sliced(model, coordinate_image(130, 170), tile=64, overlap=0.25, batch_size=2)
    assert len(model.calls) == len(tile_grid(130, 170, 64, 0.25))
