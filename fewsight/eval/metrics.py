"""COCO-style detection metrics through ``torchmetrics`` (pycocotools backend), not re-implemented.

:func:`evaluate_detections` scores a whole list of predictions at once; :class:`DetectionEvaluator`
is the stateful form (``update`` per batch, ``compute``, ``reset``) used by validation loops. Both
return a plain dict::

    {"map": AP@[.50:.95], "map50": AP@.50, "map75": AP@.75, "mar100": AR@100,
     "per_class": {name: {"ap": ..., "ap50": ..., "ar100": ...}}, "num_images": n,
     "num_ground_truth": ground-truth boxes}

All values are Python floats. A quantity COCO leaves undefined (no ground truth at all, or none of
a class) is ``nan`` (COCO's ``-1``); :func:`fewsight.eval.write_json` writes it as ``null``.

Per-class AP50 needs the AP at IoU 0.5 alone, which torchmetrics reports per class only when 0.5 is
the sole threshold, so a second ``MeanAveragePrecision(iou_thresholds=[0.5])`` runs alongside the
COCO one.

Ground-truth boxes with a label ``< 0`` (unknown objects) and predictions with a label ``< 0`` are
left out of the evaluation; a label ``>= len(class_names)`` is a :class:`~fewsight.errors.LabelError`.

Example:
    >>> import torch
    >>> gt = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([1])}]
    >>> pred = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "scores": torch.tensor([0.9]),
    ...          "labels": torch.tensor([1])}]
    >>> m = evaluate_detections(pred, gt, class_names=["cat", "dog"])
    >>> m["map"], m["map50"], m["per_class"]["dog"]["ap50"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from fewsight.errors import InvalidArgumentError, check_labels, check_last_dim, check_ndim

__all__ = ["DetectionEvaluator", "evaluate_detections", "normalize_predictions", "normalize_targets"]

Detection = dict[str, Tensor]


def _nan_if_undefined(value: Tensor | float) -> float:
    v = float(value)
    return float("nan") if v < 0 else v


def _check_list(name: str, items: Any) -> list[Mapping[str, Tensor]]:
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise InvalidArgumentError(f"{name}: expected a list of dicts (one per image), got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidArgumentError(f"{name}[{i}]: expected a dict, got {type(item).__name__}")
    return list(items)


def _get(name: str, item: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in item:
        raise InvalidArgumentError(f"{name}: expected a {key!r} entry, got keys {sorted(item)}")
    value = item[key]
    if not isinstance(value, Tensor):
        raise InvalidArgumentError(f"{name}[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach()


def normalize_targets(targets: Any, num_classes: int | None = None) -> list[Detection]:
    """Validate ground truth and convert it to what torchmetrics expects.

    ``targets``: list (one per image) of ``{"boxes": Tensor[N, 4] xyxy, "labels": Tensor[N]}``.
    Returns float32 boxes / int64 labels on the inputs' device, without the ``label < 0`` rows.
    """
    out: list[Detection] = []
    for i, t in enumerate(_check_list("targets", targets)):
        boxes = _get(f"targets[{i}]", t, "boxes")
        labels = _get(f"targets[{i}]", t, "labels")
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        check_ndim(f"targets[{i}]['boxes']", boxes, 2, "Tensor[N, 4]")
        check_last_dim(f"targets[{i}]['boxes']", boxes, 4, "Tensor[N, 4]")
        labels = labels.reshape(-1)
        check_labels(f"targets[{i}]['labels']", labels, num_classes)
        if labels.shape[0] != boxes.shape[0]:
            raise InvalidArgumentError(
                f"targets[{i}]: expected as many labels as boxes ({boxes.shape[0]}), got {labels.shape[0]}"
            )
        keep = labels >= 0
        out.append({"boxes": boxes[keep].float(), "labels": labels[keep].long()})
    return out


def normalize_predictions(predictions: Any, num_classes: int | None = None) -> list[Detection]:
    """Validate predictions (``{"boxes": Tensor[N, 4], "scores": Tensor[N], "labels": Tensor[N]}`` per image)."""
    out: list[Detection] = []
    for i, p in enumerate(_check_list("predictions", predictions)):
        boxes = _get(f"predictions[{i}]", p, "boxes")
        scores = _get(f"predictions[{i}]", p, "scores").reshape(-1)
        labels = _get(f"predictions[{i}]", p, "labels").reshape(-1)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        check_ndim(f"predictions[{i}]['boxes']", boxes, 2, "Tensor[N, 4]")
        check_last_dim(f"predictions[{i}]['boxes']", boxes, 4, "Tensor[N, 4]")
        check_labels(f"predictions[{i}]['labels']", labels, num_classes)
        if not (scores.shape[0] == labels.shape[0] == boxes.shape[0]):
            raise InvalidArgumentError(
                f"predictions[{i}]: expected boxes, scores and labels of one length, got "
                f"{boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}"
            )
        keep = labels >= 0
        out.append({"boxes": boxes[keep].float(), "scores": scores[keep].float(), "labels": labels[keep].long()})
    return out


def _make_metric(
    iou_thresholds: list[float] | None, max_detections: int, extended: bool, sync: bool
) -> MeanAveragePrecision:
    metric = MeanAveragePrecision(
        sync_on_compute=sync,
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=iou_thresholds,
        max_detection_thresholds=[1, 10, max_detections],
        class_metrics=True,
        extended_summary=extended,
        backend="pycocotools",
    )
    # A detector capped at max_detections per image is normal; torchmetrics' warning is noise here.
    metric.warn_on_many_detections = False
    return metric


def _mean_valid(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of the entries ``> -1`` over ``dims`` (COCO's -1: undefined), -1 where none is valid."""
    valid = x > -1
    count = valid.sum(dim=dims)
    total = torch.where(valid, x, torch.zeros_like(x)).sum(dim=dims)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, -1.0))


def _summary_at_cap(coco: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO's summary (pycocotools ``summarize``) at the largest max-detections threshold, from the
    tables of an extended summary: ``precision: Tensor[T, R, K, A, M]``, ``recall: Tensor[T, K, A, M]``
    (area ``A = 0`` all, ``M = -1`` the cap). Returns the ``coco`` and ``ap50`` dicts :meth:`compute`
    reads, under the keys of the 100-detection summary."""
    precision = coco["precision"][..., 0, -1].double()  # [T, R, K]
    recall = coco["recall"][..., 0, -1].double()  # [T, K]
    out = dict(coco)
    out["map"] = _mean_valid(precision.reshape(-1), (0,))
    out["map_50"] = _mean_valid(precision[0].reshape(-1), (0,))
    out["map_75"] = _mean_valid(precision[5].reshape(-1), (0,))
    out["mar_100"] = _mean_valid(recall.reshape(-1), (0,))
    out["map_per_class"] = _mean_valid(precision, (0, 1))
    out["mar_100_per_class"] = _mean_valid(recall, (0,))
    ap50 = {"classes": coco["classes"], "map_per_class": _mean_valid(precision[0], (0,))}
    return out, ap50


class DetectionEvaluator(nn.Module):
    """Stateful COCO evaluation: ``update(predictions, targets)`` per batch, then ``compute()``.

    An ``nn.Module`` holding two ``torchmetrics`` metrics, so a LightningModule that owns one moves
    it to its device and torchmetrics gathers the states across DDP processes in ``compute()``.

    Args:
        class_names: name of each label (``per_class`` keys; every class is listed, ``nan`` where
            it has no ground truth). ``None``: the labels seen, as strings.
        max_detections: the detections per image and class COCO scores (its largest max-detections
            threshold; ``mar100`` is AR at it): raise it for crowded images.
        pr_curves: also keep COCO's precision tensor and expose the IoU-0.5 precision-recall curves
            of the last ``compute()`` in :attr:`pr_curves`.
        distributed: gather the states of every process in ``compute()`` when ``torch.distributed``
            is initialised (every rank must then call it); ``False`` evaluates this process's data.

    Example:
        >>> import torch
        >>> ev = DetectionEvaluator(["a"])
        >>> ev.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}],
        ...           [{"boxes": torch.tensor([[0., 0., 4., 4.]]), "labels": torch.tensor([0])}])
        >>> ev.compute()["map50"]
        0.0
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        *,
        max_detections: int = 100,
        pr_curves: bool = False,
        distributed: bool = True,
    ) -> None:
        super().__init__()
        if int(max_detections) < 10:
            raise InvalidArgumentError(f"max_detections: expected an int >= 10, got {max_detections}")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.max_detections = int(max_detections)
        self.with_pr_curves = bool(pr_curves)
        # COCO's summary counts 100 detections per image and class whatever the thresholds say; at
        # another cap the metrics are read from the precision / recall tables (extended summary).
        self.coco = _make_metric(None, self.max_detections, self.with_pr_curves or self.max_detections != 100,
                                 distributed)
        self.ap50 = _make_metric([0.5], self.max_detections, False, distributed)
        self.num_images = 0
        self.num_ground_truth = 0
        #: ``{"recall": Tensor[R], "precision": {name: Tensor[R]}}`` at IoU 0.5 after ``compute()``
        #: when ``pr_curves=True`` (a class without ground truth has no curve).
        self.pr_curves: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def update(self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Add a batch: ``predictions[i]`` (boxes, scores, labels) and ``targets[i]`` (boxes, labels) per image."""
        preds = normalize_predictions(predictions, self.num_classes)
        gts = normalize_targets(targets, self.num_classes)
        if len(preds) != len(gts):
            raise InvalidArgumentError(
                f"predictions, targets: expected one entry per image in both, got {len(preds)} and {len(gts)}"
            )
        device = self.coco.device
        preds = [{k: v.to(device) for k, v in p.items()} for p in preds]
        gts = [{k: v.to(device) for k, v in t.items()} for t in gts]
        self.coco.update(preds, gts)
        self.ap50.update(preds, gts)
        self.num_images += len(preds)
        self.num_ground_truth += sum(int(t["labels"].numel()) for t in gts)

    def reset(self) -> None:
        self.coco.reset()
        self.ap50.reset()
        self.num_images = 0
        self.num_ground_truth = 0

    def _name(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def compute(self) -> dict[str, Any]:
        """The metrics of everything added since the last :meth:`reset` (see the module docstring)."""
        coco = self.coco.compute()
        ap50 = self.ap50.compute()
        if self.max_detections != 100:
            coco, ap50 = _summary_at_cap(coco)
        result: dict[str, Any] = {
            "map": _nan_if_undefined(coco["map"]),
            "map50": _nan_if_undefined(coco["map_50"]),
            "map75": _nan_if_undefined(coco["map_75"]),
            "mar100": _nan_if_undefined(coco["mar_100"]),
        }
        per_class: dict[str, dict[str, float]] = {}
        names = list(self.class_names) if self.class_names is not None else []
        for name in names:
            per_class[name] = {"ap": float("nan"), "ap50": float("nan"), "ar100": float("nan")}
        classes = coco["classes"].reshape(-1).tolist()
        ap = coco["map_per_class"].reshape(-1).tolist()
        ar = coco["mar_100_per_class"].reshape(-1).tolist()
        ap50_by_class = dict(zip(ap50["classes"].reshape(-1).tolist(), ap50["map_per_class"].reshape(-1).tolist()))
        for k, label in enumerate(classes):
            per_class[self._name(int(label))] = {
                "ap": _nan_if_undefined(ap[k]) if k < len(ap) else float("nan"),
                "ap50": _nan_if_undefined(ap50_by_class.get(label, -1.0)),
                "ar100": _nan_if_undefined(ar[k]) if k < len(ar) else float("nan"),
            }
        if self.class_names is None:
            per_class = dict(sorted(per_class.items(), key=lambda kv: int(kv[0]) if kv[0].lstrip("-").isdigit() else 0))
        result["per_class"] = per_class
        result["num_images"] = self.num_images  # in this process (not gathered across DDP ranks)
        result["num_ground_truth"] = self.num_ground_truth
        self.pr_curves = self._pr_curves(coco, classes) if self.with_pr_curves else None
        return result

    def _pr_curves(self, coco: dict[str, Any], classes: list[int]) -> dict[str, Any]:
        # precision: Tensor[T, R, K, A, M]; T=0 is IoU 0.5, A=0 all areas, M=-1 the largest max-dets.
        precision = coco.get("precision")
        recall = torch.linspace(0.0, 1.0, 101)
        curves: dict[str, Tensor] = {}
        if isinstance(precision, Tensor) and precision.ndim == 5 and precision.shape[2] == len(classes):
            at50 = precision[0, :, :, 0, -1].float()  # [R, K]
            for k, label in enumerate(classes):
                column = at50[:, k]
                if bool((column >= 0).any()):
                    curves[self._name(int(label))] = column.clamp(min=0.0).cpu()
            recall = torch.linspace(0.0, 1.0, at50.shape[0])
        return {"recall": recall, "precision": curves}

    def forward(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - not a layer
        raise TypeError("DetectionEvaluator: call update(predictions, targets) and compute(), not the module")


def evaluate_detections(
    predictions: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    class_names: Sequence[str] | None = None,
    *,
    max_detections: int = 100,
) -> dict[str, Any]:
    """COCO mAP, mAP50, mAP75, AR@100 and per-class AP / AP50 of ``predictions`` against ``targets``.

    ``predictions[i]``: ``{"boxes": Tensor[N, 4] xyxy, "scores": Tensor[N], "labels": Tensor[N]}``;
    ``targets[i]``: ``{"boxes": Tensor[M, 4], "labels": Tensor[M]}`` (one entry per image).
    AP is the area under COCO's 101-point interpolated precision-recall curve (Lin et al. 2014),
    averaged over IoU 0.50:0.05:0.95 for ``map``.
    """
    evaluator = DetectionEvaluator(class_names, max_detections=max_detections, distributed=False)
    evaluator.update(predictions, targets)
    return evaluator.compute()

