"""The few-shot protocol: k-shot support sets, enrollment (+ optional fine-tuning), novel / base AP50.

A detector trained on base classes gets novel classes from ``k`` boxed examples each:

1. :func:`sample_support` draws, with a seed, ``k`` annotated instances per class from a support
   dataset (images in a seeded order, instances taken until each class has ``k``; the other boxes of
   those images are kept with label ``-1``, i.e. unknown: neither a class nor background).
2. ``"enroll"`` mode: ``model.enroll`` sets each novel class's direction from its ``k`` examples, no
   gradient step. ``"finetune"`` mode: then :func:`finetune` runs a few steps of the detector's own loss
   on a balanced support set (``k`` instances of every class, base and novel, as in TFA, Wang et al. 2020).
3. Both are evaluated on the same test images (every class annotated); base AP50 is also measured
   before enrollment (novel objects unannotated there, so a base detection on them is a false positive).

:func:`run_fewshot` repeats this over shots and seeds and reports mean ± 95% interval (Student t).

Example:
    >>> mean_interval([0.70, 0.74, 0.72])
    (0.72, 0.0497)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from fewsight.data import RelabeledDataset
from fewsight.errors import InvalidArgumentError
from fewsight.eval import evaluate_model
from fewsight.fewshot.enroll import EnrollSettings, enroll_support
from fewsight.fewshot.finetune import finetune
from fewsight.fewshot.support import sample_support

__all__ = ["MODES", "FewShotResult", "mean_interval", "run_fewshot"]

MODES = ("enroll", "finetune")

# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width of the 95% Student-t interval)``, rounded to 4 decimals; half-width 0 for one value."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise InvalidArgumentError("values: expected at least one value, got none")
    mean = float(x.mean())
    if x.size == 1:
        return round(mean, 4), 0.0
    return round(mean, 4), round(float(_t95(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)), 4)


def _t95(df: int) -> float:
    """Two-sided 95% Student t quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher
    expansion around z = 1.96 (Abramowitz & Stegun 26.7.5; error < 1e-4 from 30 on)."""
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass
class FewShotResult:
    """Per-run rows and the summary table of :func:`run_fewshot`."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    base_before: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per (mode, k): novel / base AP50 mean ± 95% half-width, and the base drop."""
        rows = []
        keys = sorted({(r["mode"], r["k"]) for r in self.runs}, key=lambda t: (MODES.index(t[0]), t[1]))
        for mode, k in keys:
            runs = [r for r in self.runs if r["mode"] == mode and r["k"] == k]
            novel = mean_interval([r["novel_ap50"] for r in runs])
            base = mean_interval([r["base_ap50"] for r in runs])
            rows.append({
                "mode": mode, "k": k, "seeds": len(runs),
                "novel_ap50": novel[0], "novel_ap50_ci95": novel[1],
                "base_ap50": base[0], "base_ap50_ci95": base[1],
                "base_ap50_drop": round(self.base_before["ap50"] - base[0], 4) if self.base_before else None,
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"base_before": self.base_before, "summary": self.summary(), "runs": self.runs}


def _ap50(metrics: Mapping[str, Any], names: Sequence[str]) -> float:
    vals = [metrics["per_class"][n]["ap50"] for n in names]
    vals = [v for v in vals if v == v]  # a class absent from the test set has no AP
    return float(np.mean(vals)) if vals else float("nan")


def run_fewshot(
    model: nn.Module,
    *,
    support_dataset: Any,
    test_dataset: Any,
    novel_classes: Sequence[int],
    shots: Sequence[int] = (1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    modes: Sequence[str] = ("enroll",),
    finetune_steps: int = 50,
    finetune_lr: float = 1e-4,
    batch_size: int = 8,
    settings: EnrollSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FewShotResult:
    """The few-shot protocol for a base-trained ``model`` (see the module docstring).

    Args:
        model: a trained DLDENet whose classes are the base classes; not modified (runs use copies).
        support_dataset, test_dataset: datasets over the same class list (``dataset.classes``), base
            classes named as the model's; ``novel_classes`` index that list.
        shots, seeds, modes: the grid (``modes`` from ``"enroll"``, ``"finetune"``).
        finetune_steps, finetune_lr: :func:`finetune` settings of ``"finetune"`` mode.
        settings: enrollment settings (default :class:`~fewsight.fewshot.EnrollSettings`).
    """
    for mode in modes:
        if mode not in MODES:
            raise InvalidArgumentError(f"modes: expected values from {MODES}, got {mode!r}")
    shots, seeds = list(shots), list(seeds)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise InvalidArgumentError(f"shots: expected a non-empty list of ints >= 1, got {shots}")
    if not seeds:
        raise InvalidArgumentError("seeds: expected at least one seed, got none")
    if not modes:
        raise InvalidArgumentError("modes: expected at least one of 'enroll', 'finetune', got none")
    if "finetune" in modes and (isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0):
        raise InvalidArgumentError(f"finetune_steps: expected an int >= 0, got {finetune_steps!r}")
    if len(test_dataset) == 0:
        raise InvalidArgumentError("test_dataset: expected at least one image, got an empty dataset")
    names = list(test_dataset.classes)
    if list(support_dataset.classes) != names:
        raise InvalidArgumentError(
            f"support_dataset: expected the test dataset's classes {names}, got {list(support_dataset.classes)}"
        )
    novel = [int(c) for c in novel_classes]
    if not novel or any(not 0 <= c < len(names) for c in novel) or len(set(novel)) != len(novel):
        raise InvalidArgumentError(
            f"novel_classes: expected distinct indices into the dataset's {len(names)} classes, got {list(novel_classes)}"
        )
    base_names = list(model.classes)
    novel_names = [names[c] for c in novel]
    missing = [n for n in base_names if n not in names]
    if missing or set(novel_names) & set(base_names):
        raise InvalidArgumentError(
            f"novel_classes: expected the model's classes {base_names} to be the dataset's non-novel classes, "
            f"dataset has {names}, novel {novel_names}"
        )
    say = log or (lambda _msg: None)
    # Model label order after enrollment: base (the model's), then novel in the given order.
    order = base_names + novel_names
    to_model = [order.index(n) if n in order else -1 for n in names]
    base_only = [order.index(n) if n in base_names else -1 for n in names]
    result = FewShotResult()
    start = time.perf_counter()
    before = evaluate_model(model, RelabeledDataset(test_dataset, base_only), batch_size, class_names=base_names,
                            progress=progress, description="base model")
    result.base_before = {"ap50": round(_ap50(before, base_names), 4), "map50": before["map50"]}
    say(f"base model: base AP50 {result.base_before['ap50']:.4f}")
    test_view = RelabeledDataset(test_dataset, to_model)
    for k in shots:
        for seed in seeds:
            support = sample_support(support_dataset, novel, k, seed)
            images = support.images(support_dataset)
            balanced = None
            for mode in modes:
                run_model = copy.deepcopy(model)
                enroll_support(run_model, images, support, novel_names, settings)
                steps = 0
                if mode == "finetune":
                    if balanced is None:
                        all_classes = [names.index(n) for n in order]
                        balanced = sample_support(support_dataset, all_classes, k, seed)
                        balanced_images = balanced.images(support_dataset)
                    finetune(run_model, balanced_images, balanced.targets, steps=finetune_steps, lr=finetune_lr,
                             batch_size=batch_size, seed=seed)
                    steps = finetune_steps
                metrics = evaluate_model(run_model, test_view, batch_size, class_names=order, progress=progress,
                                         description=f"{mode} k={k} seed={seed}")
                row = {
                    "mode": mode, "k": k, "seed": seed, "finetune_steps": steps,
                    "novel_ap50": round(_ap50(metrics, novel_names), 4),
                    "base_ap50": round(_ap50(metrics, base_names), 4),
                    "per_class_ap50": {n: round(metrics["per_class"][n]["ap50"], 4) for n in order},
                }
                result.runs.append(row)
                say(f"{mode:8s} k={k:<2d} seed={seed}: novel AP50 {row['novel_ap50']:.4f}  base AP50 "
                    f"{row['base_ap50']:.4f}  ({time.perf_counter() - start:.0f} s)")
    return result


