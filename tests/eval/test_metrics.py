"""COCO metrics through torchmetrics: hand-computed cases, per-class AP50, stateful use, JSON, figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from fewsight.errors import InvalidArgumentError, LabelError, ShapeError
from fewsight.eval import DetectionEvaluator, detections_to_json, evaluate_detections, plot_detection_grid, plot_detections, plot_precision_recall, write_json
from fewsight.eval.io import to_jsonable


def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


EMPTY_PRED = _pred([], [], [])

TARGETS = [
    _gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]),
    _gt([[5, 5, 25, 30]], [1]),
]


def test_perfect_predictions_give_one():
    preds = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS]
    m = evaluate_detections(preds, TARGETS, class_names=["cat", "dog"])
    assert m["map"] == 1.0 and m["map50"] == 1.0 and m["map75"] == 1.0 and m["mar100"] == 1.0
    assert m["per_class"] == {
        "cat": {"ap": 1.0, "ap50": 1.0, "ar100": 1.0},
        "dog": {"ap": 1.0, "ap50": 1.0, "ar100": 1.0},
    }
    assert m["num_images"] == 2


def test_empty_predictions_give_zero():
    m = evaluate_detections([EMPTY_PRED, EMPTY_PRED], TARGETS, class_names=["cat", "dog"])
    assert m["map"] == 0.0 and m["map50"] == 0.0
    assert m["per_class"]["cat"]["ap50"] == 0.0 and m["per_class"]["dog"]["ap"] == 0.0


def test_hand_computed_ap50_one_of_two_found_after_a_false_positive():
    # Class 0, two GT boxes. Ranked detections: FP (0.9), TP on GT A (0.8); GT B missed.
    # PR points: (r=0, p=0), (r=0.5, p=0.5). COCO's interpolated precision is 0.5 for recall 0..0.5
    # (51 of the 101 recall thresholds) and 0 above: AP50 = 0.5 * 51 / 101.
    target = [_gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])]
    pred = [_pred([[100, 100, 110, 110], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    m = evaluate_detections(pred, target, class_names=["a"])
    expected = 0.5 * 51 / 101
    assert m["map50"] == pytest.approx(expected, abs=1e-6)
    assert m["per_class"]["a"]["ap50"] == pytest.approx(expected, abs=1e-6)
    # Exact box: the TP is a TP at every IoU threshold, so AP@[.5:.95] equals AP50 here.
    assert m["map"] == pytest.approx(expected, abs=1e-6)


def test_hand_computed_iou_between_thresholds():
    # IoU of the single detection with the GT is 0.6: a TP at IoU 0.50 and 0.55, a FP from 0.60 up
    # (pycocotools matches with iou >= threshold... and its thresholds are rounded, so stay clear of 0.6).
    gt = [_gt([[0, 0, 100, 100]], [0])]
    # width 100, height 62 box inside GT: IoU = 0.62 -> TP at 0.50, 0.55, 0.60; FP at 0.65 .. 0.95.
    pred = [_pred([[0, 0, 100, 62]], [0.9], [0])]
    m = evaluate_detections(pred, gt)
    assert m["map50"] == 1.0
    assert m["map75"] == 0.0
    assert m["map"] == pytest.approx(3 / 10, abs=1e-6)


def test_per_class_ap50_matches_torchmetrics_single_threshold():
    g = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(6):
        n = 4
        xy = torch.rand(n, 2, generator=g) * 50
        wh = 5 + torch.rand(n, 2, generator=g) * 20
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
        jitter = boxes + torch.randn(n, 4, generator=g) * 3
        preds.append({"boxes": jitter, "scores": torch.rand(n, generator=g), "labels": labels.roll(1)})
    m = evaluate_detections(preds, targets, class_names=["x", "y", "z"])
    ref = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True)
    ref.update(preds, targets)
    r = ref.compute()
    for k, label in enumerate(r["classes"].tolist()):
        assert m["per_class"][["x", "y", "z"][label]]["ap50"] == pytest.approx(float(r["map_per_class"][k]))
    full = MeanAveragePrecision(class_metrics=True)
    full.update(preds, targets)
    f = full.compute()
    assert m["map"] == pytest.approx(float(f["map"]))
    assert m["map50"] == pytest.approx(float(f["map_50"]))


def test_stateful_evaluator_equals_one_shot_and_resets():
    preds = [_pred([[0, 0, 10, 10]], [0.7], [0]), _pred([[5, 5, 20, 30]], [0.6], [1])]
    one_shot = evaluate_detections(preds, TARGETS, class_names=["cat", "dog"])
    ev = DetectionEvaluator(["cat", "dog"])
    ev.update(preds[:1], TARGETS[:1])
    ev.update(preds[1:], TARGETS[1:])
    assert ev.compute() == one_shot
    ev.reset()
    ev.update([EMPTY_PRED], TARGETS[:1])
    assert ev.compute()["map"] == 0.0 and ev.num_images == 1


def test_undefined_values_are_nan_and_written_as_null(tmp_path):
    # No ground truth of "bird": its AP is undefined (COCO's -1) -> nan; no GT at all -> map nan.
    m = evaluate_detections([_pred([[0, 0, 5, 5]], [0.5], [0])], [_gt([[0, 0, 5, 5]], [0])], ["cat", "bird"])
    assert m["per_class"]["cat"]["ap"] == 1.0
    assert math.isnan(m["per_class"]["bird"]["ap"])
    none = evaluate_detections([EMPTY_PRED], [_gt([], [])], ["cat"])
    assert math.isnan(none["map"])
    path = write_json(m, tmp_path / "m.json")
    back = json.loads(path.read_text())
    assert back["per_class"]["bird"]["ap"] is None and back["map"] == 1.0


def test_unknown_labels_are_ignored_and_out_of_range_labels_rejected():
    gt = [_gt([[0, 0, 10, 10], [30, 30, 40, 40]], [0, -1])]
    pred = [_pred([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8], [0, -1])]
    assert evaluate_detections(pred, gt, ["a"])["map"] == 1.0
    with pytest.raises(LabelError, match="labels"):
        evaluate_detections([_pred([[0, 0, 1, 1]], [0.5], [3])], [_gt([], [])], ["a", "b"])
    with pytest.raises(LabelError, match="targets\\[0\\]"):
        evaluate_detections([EMPTY_PRED], [_gt([[0, 0, 1, 1]], [2])], ["a", "b"])


def test_bad_inputs_name_the_argument():
    with pytest.raises(InvalidArgumentError, match="one entry per image"):
        evaluate_detections([EMPTY_PRED], TARGETS)
    with pytest.raises(InvalidArgumentError, match="'scores'"):
        evaluate_detections([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}], [_gt([], [])])
    with pytest.raises(ShapeError, match="boxes"):
        evaluate_detections([_pred([], [], [])], [{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}])
    with pytest.raises(InvalidArgumentError, match="list of dicts"):
        evaluate_detections(EMPTY_PRED, TARGETS)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="one length"):
        evaluate_detections([_pred([[0, 0, 1, 1]], [0.5, 0.4], [0])], [_gt([], [])])


def test_class_names_default_to_labels_seen():
    m = evaluate_detections([_pred([[0, 0, 10, 10]], [0.9], [2])], [_gt([[0, 0, 10, 10]], [2])])
    assert list(m["per_class"]) == ["2"]


def test_pr_curves_and_plots(tmp_path):
    ev = DetectionEvaluator(["cat", "dog"], pr_curves=True)
    preds = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS]
    ev.update(preds, TARGETS)
    ev.compute()
    curves = ev.pr_curves
    assert curves is not None and set(curves["precision"]) == {"cat", "dog"}
    assert curves["recall"].shape == (101,) and torch.all(curves["precision"]["cat"] == 1.0)
    fig = plot_precision_recall(curves, path=tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 0 and fig.axes
    image = torch.rand(3, 48, 64)
    plot_detections(image, preds[0], TARGETS[0], ["cat", "dog"], tmp_path / "d.png")
    plot_detection_grid([image, image], preds, TARGETS, ["cat", "dog"], tmp_path / "g.png", ncols=2)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "g.png").stat().st_size > 0
    # A torchmetrics precision tensor works too.
    full = MeanAveragePrecision(class_metrics=True, extended_summary=True)
    full.update(preds, TARGETS)
    plot_precision_recall(full.compute()["precision"], ["cat", "dog"], tmp_path / "pr2.png")
    assert (tmp_path / "pr2.png").is_file()


def test_json_helpers(tmp_path):
    pred = _pred([[1.234, 2, 3, 4]], [0.625], [1])
    assert detections_to_json(pred, ["a", "b"]) == [{"box": [1.23, 2.0, 3.0, 4.0], "score": 0.625, "label": 1, "class": "b"}]
    assert to_jsonable({"t": torch.tensor([1.0, float("inf")]), "p": tmp_path}) == {"t": [1.0, None], "p": str(tmp_path)}
    write_json({"a": 1}, tmp_path / "sub" / "x.json")
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.json"]  # no temporary file left


def _random_scene(seed: int, images: int = 6, n: int = 30):
    g = torch.Generator().manual_seed(seed)
    preds, gts = [], []
    for _ in range(images):
        xy = torch.rand(n, 2, generator=g) * 200
        b = torch.cat((xy, xy + 10 + torch.rand(n, 2, generator=g) * 30), 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        gts.append({"boxes": b, "labels": labels})
        pb = b + torch.randn(n, 4, generator=g) * 3
        preds.append({"boxes": torch.cat((pb, pb[:10] + 20)), "scores": torch.rand(n + 10, generator=g),
                      "labels": torch.cat((labels, labels[:10]))})
    return preds, gts


def test_summary_from_the_tables_equals_cocos_at_100_detections():
    from fewsight.eval.metrics import _make_metric, _summary_at_cap

    preds, gts = _random_scene(0)
    metric = _make_metric(None, 100, True, False)
    metric.update(preds, gts)
    coco = metric.compute()
    table, ap50 = _summary_at_cap(coco)
    for key in ("map", "map_50", "map_75", "mar_100", "map_per_class", "mar_100_per_class"):
        torch.testing.assert_close(table[key].float(), coco[key].float(), atol=1e-6, rtol=0)
    single = _make_metric([0.5], 100, False, False)
    single.update(preds, gts)
    torch.testing.assert_close(ap50["map_per_class"].float(), single.compute()["map_per_class"].float(), atol=1e-6, rtol=0)


def test_a_crowd_of_one_class_is_scored_beyond_100_detections():
    # 150 objects of one class in one image, all found: COCO's 100-detection summary caps recall at 2/3.
    g = torch.Generator().manual_seed(1)
    xy = torch.arange(150, dtype=torch.float32)[:, None].repeat(1, 2) * torch.tensor([40.0, 0.0])
    boxes = torch.cat((xy, xy + 30), 1)
    gt = [{"boxes": boxes, "labels": torch.zeros(150, dtype=torch.long)}]
    pred = [{"boxes": boxes, "scores": torch.rand(150, generator=g), "labels": torch.zeros(150, dtype=torch.long)}]
    capped = evaluate_detections(pred, gt, ["cell"])
    assert capped["map50"] < 0.7 and capped["mar100"] == pytest.approx(100 / 150)
    full = evaluate_detections(pred, gt, ["cell"], max_detections=200)
    assert full["map50"] == full["map"] == full["mar100"] == pytest.approx(1.0)
    assert full["per_class"]["cell"] == pytest.approx({"ap": 1.0, "ap50": 1.0, "ar100": 1.0})
