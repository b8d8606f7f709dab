"""Shared tiny training setups: 64 px digit canvases, a small MobileNetV2 P3-P5 detector, 1-3 epochs."""

from __future__ import annotations

import copy
from typing import Any

TINY_MODEL: dict[str, Any] = {
    "backbone": "mobilenet_v2",
    "levels": [3, 4, 5],
    "fpn_channels": 16,
    "head_convs": 1,
    "anchor_generator": {"levels": [3, 4, 5], "sizes": [16, 32, 64], "scales": [1.0], "aspect_ratios": [1.0, 2.0]},
    "detections_per_image": 20,
}


def digits_split(split: str, n: int, classes=(0, 1)) -> dict[str, Any]:
    return {
        "type": "digits",
        "split": split,
        "num_images": n,
        "image_size": 64,
        "digit_size": [16, 32],
        "max_digits": 2,
        "classes": list(classes),
    }


def tiny_config(out_dir, *, name: str = "retinanet", epochs: int = 1, train=None, val=None, **model: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {
            "train": train if train is not None else digits_split("train", 8),
            "val": val if val is not None else digits_split("val", 4),
            "batch_size": 4,
            "augment": {"photometric": True},
        },
        "model": {"name": name, **copy.deepcopy(TINY_MODEL), **model},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "trainer": {"max_epochs": epochs, "progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu"},
        "eval": {"plot_images": 2},
    }
