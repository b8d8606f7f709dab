"""Typed errors for fewsight.

Every user-facing error names the argument, what was expected and what was received, so a
message reads like ``boxes: expected Tensor[..., 4], got shape (3, 5)``. Each class also
subclasses the builtin that callers would naturally catch (``ValueError`` / ``TypeError``).

Example:
    >>> import torch, fewsight as fs
    >>> try:
    ...     fs.geometry.box_area(torch.zeros(3, 5))
    ... except fs.errors.ShapeError as e:
    ...     print(e)
    boxes: expected Tensor[..., 4], got shape (3, 5)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FewsightError",
    "ShapeError",
    "DTypeError",
    "InvalidArgumentError",
    "LabelError",
    "DataError",
    "CheckpointError",
    "ConfigError",
    "MissingDependencyError",
    "check_last_dim",
    "check_ndim",
    "check_floating",
    "check_choice",
    "check_labels",
]


class FewsightError(Exception):
    """Base class of every error fewsight raises on purpose."""


class ShapeError(FewsightError, ValueError):
    """A tensor has the wrong number of dimensions or the wrong size along one."""


class DTypeError(FewsightError, TypeError):
    """A tensor has the wrong dtype (e.g. integer embeddings, float labels)."""


class InvalidArgumentError(FewsightError, ValueError):
    """A non-tensor argument is out of range or not one of the allowed choices."""


class LabelError(FewsightError, ValueError):
    """A class label is outside ``[0, num_classes)`` (labels ``< 0`` mean unknown and are allowed)."""


class DataError(FewsightError, ValueError):
    """A dataset file (image or annotation) is missing, corrupt or inconsistent.

    ``path`` is the offending file, also included in the message.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointError(FewsightError, ValueError):
    """A checkpoint file is missing, truncated, or not a fewsight checkpoint."""


class ConfigError(FewsightError, ValueError):
    """A YAML configuration has an unknown key or a value of the wrong kind."""


class MissingDependencyError(FewsightError, ImportError):
    """An optional dependency is needed for this feature; the message says which extra to install."""


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_ndim(name: str, t: Any, ndims: int | Iterable[int], expected: str) -> None:
    """Raise :class:`ShapeError` unless ``t`` is a tensor with one of ``ndims`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor {expected}, got {type(t).__name__}")
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if t.ndim not in allowed:
        raise ShapeError(f"{name}: expected {expected}, got shape {_shape(t)}")


def check_last_dim(name: str, t: Any, size: int, expected: str | None = None) -> None:
    """Raise :class:`ShapeError` unless ``t.shape[-1] == size``."""
    expected = expected or f"Tensor[..., {size}]"
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor {expected}, got {type(t).__name__}")
    if t.ndim == 0 or t.shape[-1] != size:
        raise ShapeError(f"{name}: expected {expected}, got shape {_shape(t)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    """Raise :class:`DTypeError` unless ``t`` has a floating dtype."""
    if not t.is_floating_point():
        raise DTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise InvalidArgumentError(f"{name}: expected one of {choices}, got {value!r}")


def check_labels(name: str, labels: Any, num_classes: int | None = None) -> None:
    """Validate an integer label tensor; ``< 0`` means unknown and is allowed.

    Raises :class:`DTypeError` for non-integer labels and :class:`LabelError` for a label
    ``>= num_classes`` when ``num_classes`` is given. Only the maximum is read back, so this costs
    one device sync when ``num_classes`` is given and none otherwise.
    """
    if not isinstance(labels, torch.Tensor):
        raise DTypeError(f"{name}: expected an integer torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if num_classes is not None and labels.numel() > 0:
        top = int(labels.max())
        if top >= num_classes:
            raise LabelError(
                f"{name}: expected labels in [0, {num_classes}) (or < 0 for unknown), got {top}"
            )
