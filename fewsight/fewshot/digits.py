"""The digits few-shot benchmark's data: support canvases to sample k shots from, held-out test canvases.

Both draw every digit; a base model trained on 0–7 (``configs/digits_fewshot.yaml``) gets 8 and 9
from the support set. The seeds keep support, test and training canvases apart.

Example:
    >>> support, test = digits_fewshot_datasets(num_test=2)
    >>> len(support), len(test), test.classes[-2:]
    (300, 2, ['8', '9'])
"""

from __future__ import annotations

from typing import Any

from fewsight.data import DigitsDataset

__all__ = ["digits_fewshot_datasets"]

SUPPORT_SEED = 100
TEST_SEED = 1


def digits_fewshot_datasets(num_test: int = 200, num_support: int = 300) -> tuple[Any, Any]:
    """``(support, test)``: ``num_support`` training-split canvases and ``num_test`` test-split canvases."""
    return (DigitsDataset("train", num_support, seed=SUPPORT_SEED), DigitsDataset("test", num_test, seed=TEST_SEED))
