"""Run a detector over a dataset or images: :func:`evaluate_model` and :func:`predict`.

Inference follows the model's device (the images are moved to it), runs under
``torch.inference_mode`` in eval mode (the previous mode is restored afterwards) and shows a
``rich`` progress bar unless ``progress=False``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Empty(nn.Module):  # a stand-in detector: no detections
    ...     classes = ["a"]
    ...     def forward(self, images):
    ...         return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ...                 for _ in images]
    >>> ds = [(torch.rand(3, 8, 8), {"boxes": torch.tensor([[0., 0., 4., 4.]]), "labels": torch.tensor([0])})]
    >>> evaluate_model(Empty(), ds, batch_size=1, progress=False)["map50"]
    0.0
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fewsight.data.collate import collate_detection
from fewsight.errors import InvalidArgumentError
from fewsight.eval.metrics import DetectionEvaluator

__all__ = ["evaluate_model", "model_device", "predict", "progress_bar"]


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); ``None`` for a model with neither
    (its inputs are then left where they are)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to(images: Sequence[Tensor], device: torch.device | None) -> list[Tensor]:
    return [im if device is None else im.to(device) for im in images]


def progress_bar(enabled: bool = True, *, transient: bool = False) -> Progress:
    """The rich progress bar used by fewsight's long-running loops (disabled when ``enabled=False``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=transient,
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _batches(items: Sequence[Tensor], batch_size: int) -> Iterable[list[Tensor]]:
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise InvalidArgumentError(f"batch_size: expected an int >= 1, got {batch_size}")
    return int(batch_size)


def predict(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "predict",
) -> list[dict[str, Tensor]]:
    """Detections (on CPU) for a list of ``Tensor[3, H_i, W_i]`` images in [0, 1], in original coordinates."""
    batch_size = _check_batch_size(batch_size)
    device = model_device(model)
    out: list[dict[str, Tensor]] = []
    with _eval_mode(model), progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(images))
        for batch in _batches(images, batch_size):
            preds = model(_to(batch, device))
            out.extend({k: v.detach().cpu() for k, v in p.items()} for p in preds)
            bar.advance(task, len(batch))
    return out


def evaluate_model(
    model: nn.Module,
    dataset: Dataset[Any],
    batch_size: int = 8,
    *,
    num_workers: int = 0,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    pr_curves: bool = False,
    return_predictions: bool = False,
    description: str = "evaluate",
    max_detections: int = 100,
) -> Any:
    """COCO metrics of ``model`` on ``dataset`` (items ``(image, target)``) via :class:`DetectionEvaluator`.

    ``max_detections``: the detections per image and class COCO scores (raise it for crowds).

    Returns the metrics dict of :func:`~fewsight.eval.evaluate_detections` plus
    ``"seconds"`` and ``"images_per_second"`` (inference + evaluation wall time); with
    ``pr_curves=True`` also ``"pr_curves"`` (tensors: see :attr:`DetectionEvaluator.pr_curves`).
    With ``return_predictions=True`` returns ``(metrics, predictions)`` (predictions on CPU).
    ``class_names`` defaults to ``model.classes``, then ``dataset.classes``.
    """
    batch_size = _check_batch_size(batch_size)
    if class_names is None:
        class_names = getattr(model, "classes", None) or getattr(dataset, "classes", None)
    # This process's data only: after a DDP fit, rank 0 may evaluate alone.
    evaluator = DetectionEvaluator(class_names, max_detections=max_detections, pr_curves=pr_curves, distributed=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_detection)
    device = model_device(model)
    kept: list[dict[str, Tensor]] = []
    start = time.perf_counter()
    with _eval_mode(model), progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(dataset))  # type: ignore[arg-type]
        for images, targets in loader:
            preds = model(_to(images, device))
            preds = [{k: v.detach().cpu() for k, v in p.items()} for p in preds]
            evaluator.update(preds, targets)
            if return_predictions:
                kept.extend(preds)
            bar.advance(task, len(images))
    metrics = evaluator.compute()
    seconds = time.perf_counter() - start
    metrics["seconds"] = seconds
    metrics["images_per_second"] = metrics["num_images"] / seconds if seconds > 0 else float("nan")
    if pr_curves:
        metrics["pr_curves"] = evaluator.pr_curves
    return (metrics, kept) if return_predictions else metrics
