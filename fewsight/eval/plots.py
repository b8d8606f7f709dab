"""Figures: detections drawn on images and precision-recall curves (matplotlib, Agg, no pyplot).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, so nothing
here touches pyplot's global state or needs a display. Each function returns the figure and, given
``path``, also writes it (the format follows the suffix; PNG for the CLI).

Example:
    >>> import torch, tempfile, os
    >>> img = torch.rand(3, 32, 32)
    >>> pred = {"boxes": torch.tensor([[2., 2., 20., 20.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    >>> fig = plot_detections(img, pred, class_names=["cat"], path=os.path.join(tempfile.mkdtemp(), "d.png"))
    >>> len(fig.axes)
    1
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError

__all__ = [
    "draw_detections",
    "plot_detection_grid",
    "plot_detections",
    "plot_fewshot",
    "plot_precision_recall",
    "plot_search_results",
]

_PRED_COLOR = "#ff3b30"
_GT_COLOR = "#34c759"


def _to_hwc(image: Tensor) -> Any:
    if not isinstance(image, Tensor):
        raise InvalidArgumentError(f"image: expected a torch.Tensor[3, H, W], got {type(image).__name__}")
    t = image.detach().cpu().float()
    if t.ndim == 3 and t.shape[0] in (1, 3):
        t = t.permute(1, 2, 0)
        if t.shape[2] == 1:
            t = t[:, :, 0]
    elif t.ndim != 2:
        raise ShapeError(f"image: expected Tensor[3, H, W] or Tensor[H, W], got shape {tuple(image.shape)}")
    return t.clamp(0.0, 1.0).numpy()


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi)
    return fig


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def draw_detections(
    ax: Any,
    image: Tensor,
    prediction: Mapping[str, Tensor] | None = None,
    target: Mapping[str, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.3,
    title: str | None = None,
) -> None:
    """Draw ``image`` on a matplotlib ``ax`` with predicted (red, ``name score``) and ground-truth
    (green, dashed) boxes; predictions below ``score_threshold`` are not drawn."""
    arr = _to_hwc(image)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    from matplotlib.patches import Rectangle

    if target is not None:
        for (x1, y1, x2, y2), label in zip(
            target["boxes"].detach().cpu().reshape(-1, 4).tolist(), target["labels"].detach().cpu().reshape(-1).tolist()
        ):
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=_GT_COLOR, linewidth=1.0, linestyle="--")
            )
    if prediction is not None:
        scores = prediction["scores"].detach().cpu().float().reshape(-1)
        keep = scores >= score_threshold
        boxes = prediction["boxes"].detach().cpu().float().reshape(-1, 4)[keep].tolist()
        labels = prediction["labels"].detach().cpu().reshape(-1)[keep].tolist()
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores[keep].tolist()):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=_PRED_COLOR, linewidth=1.2))
            ax.text(
                x1,
                y1,
                f"{_name(int(label), class_names)} {score:.2f}",
                fontsize=6,
                color="white",
                va="bottom",
                bbox={"facecolor": _PRED_COLOR, "alpha": 0.8, "pad": 0.5, "edgecolor": "none"},
            )


def plot_detections(
    image: Tensor,
    prediction: Mapping[str, Tensor] | None,
    target: Mapping[str, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    score_threshold: float = 0.3,
    title: str | None = None,
) -> Figure:
    """One image (``Tensor[3, H, W]`` in [0, 1]) with its detections (and ground truth if given)."""
    h, w = _to_hwc(image).shape[:2]
    scale = 6.0 / max(h, w)
    fig = Figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.94 if title else 1.0))
    draw_detections(ax, image, prediction, target, class_names, score_threshold=score_threshold, title=title)
    return _save(fig, path)


def plot_detection_grid(
    images: Sequence[Tensor],
    predictions: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]] | None = None,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    ncols: int = 4,
    score_threshold: float = 0.3,
) -> Figure:
    """A grid of :func:`draw_detections` panels, one per image."""
    n = len(images)
    if n == 0 or len(predictions) != n or (targets is not None and len(targets) != n):
        raise InvalidArgumentError(
            f"images, predictions, targets: expected the same non-zero length, got {n}, {len(predictions)}, "
            f"{None if targets is None else len(targets)}"
        )
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < n:
            draw_detections(
                ax,
                images[k],
                predictions[k],
                None if targets is None else targets[k],
                class_names,
                score_threshold=score_threshold,
            )
        else:
            ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    return _save(fig, path)


def _curves_from_precision(precision: Tensor, class_names: Sequence[str] | None) -> dict[str, Any]:
    if precision.ndim != 5:
        raise ShapeError(f"precision: expected torchmetrics' Tensor[T, R, K, A, M], got shape {tuple(precision.shape)}")
    at50 = precision[0, :, :, 0, -1].float().cpu()
    curves = {}
    for k in range(at50.shape[1]):
        if bool((at50[:, k] >= 0).any()):
            curves[_name(k, class_names)] = at50[:, k].clamp(min=0.0)
    return {"recall": torch.linspace(0.0, 1.0, at50.shape[0]), "precision": curves}


def plot_precision_recall(
    curves: Mapping[str, Any] | Tensor,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    title: str = "Precision-recall at IoU 0.5",
) -> Figure:
    """Per-class precision-recall curves at IoU 0.5.

    ``curves``: :attr:`DetectionEvaluator.pr_curves` (``{"recall": Tensor[R], "precision": {name: Tensor[R]}}``)
    or torchmetrics' ``precision`` tensor ``Tensor[T, R, K, A, M]`` from
    ``MeanAveragePrecision(extended_summary=True)`` (T index 0 must be IoU 0.5; K indexes
    ``class_names`` when the metric saw every class).
    """
    if isinstance(curves, Tensor):
        curves = _curves_from_precision(curves, class_names)
    if not isinstance(curves, Mapping) or "recall" not in curves or "precision" not in curves:
        raise InvalidArgumentError("curves: expected {'recall': Tensor[R], 'precision': {name: Tensor[R]}} or a Tensor")
    recall = torch.as_tensor(curves["recall"]).float().cpu()
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, prec in curves["precision"].items():
        p = torch.as_tensor(prec).float().cpu()
        ax.plot(recall.numpy(), p.numpy(), label=f"{name} (AP50 {float(p.mean()):.2f})", linewidth=1.2)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves["precision"]:
        ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_fewshot(
    summary: Sequence[Mapping[str, Any]],
    path: str | Path | None = None,
    *,
    base_before: float | None = None,
    title: str = "Few-shot detection",
) -> Figure:
    """Novel (solid) and base (dashed) AP50 against ``k`` with 95% intervals, one colour per mode.

    ``summary``: rows of :meth:`fewsight.fewshot.protocol.FewShotResult.summary` (``mode``, ``k``,
    ``novel_ap50``, ``novel_ap50_ci95``, ``base_ap50``, ``base_ap50_ci95``); ``base_before``: base AP50
    of the model before enrollment (a grey line).
    """
    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    for i, mode in enumerate(modes):
        rows = sorted((r for r in summary if r["mode"] == mode), key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        color = f"C{i}"
        ax.errorbar(ks, [r["novel_ap50"] for r in rows], yerr=[r["novel_ap50_ci95"] for r in rows], color=color,
                    marker="o", capsize=3, label=f"novel, {mode}")
        ax.errorbar(ks, [r["base_ap50"] for r in rows], yerr=[r["base_ap50_ci95"] for r in rows], color=color,
                    marker="s", linestyle="--", capsize=3, label=f"base, {mode}")
    if base_before is not None:
        ax.axhline(base_before, color="0.5", linewidth=1, label="base, before enrollment")
    ax.set_xscale("log")
    ks = sorted({r["k"] for r in summary})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("shots per novel class (k)")
    ax.set_ylabel("AP50")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_search_results(
    query: Tensor,
    results: Sequence[tuple[str, Tensor]],
    path: str | Path | None = None,
) -> Figure:
    """A row of crops: the query, then each result with its title (e.g. ``"#1 0.93"``).

    ``query`` and each result crop: ``Tensor[3, H, W]`` in [0, 1] (any sizes).
    """
    items = [("query", query), *results]
    fig = Figure(figsize=(1.6 * len(items), 1.9), dpi=100)
    FigureCanvasAgg(fig)
    for j, (title, crop) in enumerate(items):
        ax = fig.add_subplot(1, len(items), j + 1)
        ax.imshow(_to_hwc(crop))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return _save(fig, path)
