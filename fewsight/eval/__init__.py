"""fewsight.eval: COCO detection metrics (torchmetrics + pycocotools), model evaluation, figures, JSON.

* :func:`evaluate_detections` / :class:`DetectionEvaluator` — mAP, mAP50, mAP75, AR@100 and
  per-class AP / AP50 through ``torchmetrics.detection.MeanAveragePrecision``.
* :func:`evaluate_model` / :func:`predict` — run a detector over a dataset / images (progress bar).
* :func:`plot_detections`, :func:`plot_detection_grid`, :func:`plot_precision_recall` — figures.
* :func:`write_json`, :func:`to_jsonable`, :func:`detections_to_json` — standard-JSON output.

Example:
    >>> import torch
    >>> gt = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0])}]
    >>> pred = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "scores": torch.tensor([0.9]),
    ...          "labels": torch.tensor([0])}]
    >>> evaluate_detections(pred, gt, class_names=["cat"])["map50"]
    1.0
"""

from fewsight.eval.evaluate import evaluate_model, model_device, predict
from fewsight.eval.io import detections_to_json, write_json
from fewsight.eval.metrics import DetectionEvaluator, evaluate_detections
from fewsight.eval.plots import (
    draw_detections,
    plot_detection_grid,
    plot_detections,
    plot_fewshot,
    plot_precision_recall,
    plot_search_results,
)

__all__ = [
    "model_device",
    "DetectionEvaluator",
    "detections_to_json",
    "draw_detections",
    "evaluate_detections",
    "evaluate_model",
    "plot_detection_grid",
    "plot_detections",
    "plot_fewshot",
    "plot_precision_recall",
    "plot_search_results",
    "predict",
    "write_json",
]
