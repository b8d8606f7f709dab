"""fewsight: few-shot object detection and metric learning with directional embeddings.

>>> import torch, fewsight as fs
>>> fs.geometry.box_iou(torch.tensor([[0., 0., 2., 2.]]), torch.tensor([[1., 1., 3., 3.]]))
tensor([[0.1429]])
"""

from __future__ import annotations

import importlib
from typing import Any

from fewsight import errors, geometry, losses

__version__ = "0.1.0"
__all__ = ["errors", "geometry", "losses", "models", "data", "train", "eval", "retrieval"]

# Heavier subpackages (torchvision models, Lightning, faiss) load on first use.
_LAZY = {"models", "data", "train", "eval", "retrieval"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"fewsight.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fewsight' has no attribute {name!r}")
