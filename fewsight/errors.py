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

import math
import numbers

import torch

__all__ = [
    "FewsightError",
    "ShapeError",
    "DTypeError",
    "InvalidArgumentError",
    "NonFiniteError",
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
    "check_finite",
    "check_real",
    "as_tensor",
    "as_floating",
]


class FewsightError(Exception):
    """Base class of every error fewsight raises on purpose."""


class ShapeError(FewsightError, ValueError):
    """A tensor has the wrong number of dimensions or the wrong size along one."""


class DTypeError(FewsightError, TypeError):
    """A tensor has the wrong dtype (e.g. integer embeddings, float labels)."""


class InvalidArgumentError(FewsightError, ValueError):
    """A non-tensor argument is out of range or not one of the allowed choices."""


class NonFiniteError(InvalidArgumentError):
    """A tensor or number holds NaN or +-inf where finite values are required.

    Raised for every tensor argument of the geometry ops, losses and models, and for every numeric
    hyper-parameter. A subclass of :class:`InvalidArgumentError` (and so of ``ValueError``).
    """


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


def check_finite(name: str, value: Any) -> None:
    """Raise :class:`NonFiniteError` if ``value`` (a tensor or a number) holds NaN or +-inf.

    Integer and boolean tensors are always finite and cost nothing. A floating tensor costs one
    reduction and one device sync; the count of bad values is computed only on failure.

    >>> check_finite("scores", torch.tensor([0.5, float("nan")]))
    Traceback (most recent call last):
    ...
    fewsight.errors.NonFiniteError: scores: expected finite values, got 1 NaN/inf of 2
    """
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return
        ok = torch.isfinite(value)
        if bool(ok.all()):
            return
        bad = int((~ok).sum())
        raise NonFiniteError(f"{name}: expected finite values, got {bad} NaN/inf of {value.numel()}")
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        raise NonFiniteError(f"{name}: expected a finite number, got {value!r}")


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` inside ``[low, high]`` (open ends if asked), else raise.

    Accepts python / numpy reals and one-element tensors; booleans and strings are refused with
    :class:`InvalidArgumentError`, NaN / +-inf with :class:`NonFiniteError` (``nan <= 0`` is False, so
    a plain range test would let NaN through).

    >>> check_real("margin", 0.25, low=0)
    0.25
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name}: expected a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{name}: expected a finite number, got {v!r}")
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise InvalidArgumentError(f"{name}: expected a number in {span}, got {v}")
    return v


def as_tensor(name: str, value: Any, *, dtype: torch.dtype | None = None, expected: str = "a torch.Tensor") -> torch.Tensor:
    """``value`` as a tensor: tensors pass through, lists / tuples / numpy arrays / numbers are converted.

    Raises :class:`DTypeError` naming ``name`` when the value cannot become a numeric tensor (a
    string, a ragged list, ``None``). ``dtype`` is applied only to converted values.

    >>> as_tensor("boxes", [[0, 0, 2, 2]])
    tensor([[0, 0, 2, 2]])
    """
    if isinstance(value, torch.Tensor):
        return value
    if value is None or isinstance(value, (str, bytes, dict, set)):
        raise DTypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DTypeError(f"{name}: expected {expected} (or a nested list of numbers), got {type(value).__name__}: {e}") from None


def as_floating(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged if floating; integer / boolean tensors promoted to the default float dtype.

    Raises :class:`DTypeError` for complex tensors (and for non-tensors).
    """
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point():
        return t
    if t.is_complex():
        raise DTypeError(f"{name}: expected a real (floating or integer) tensor, got dtype {t.dtype}")
    return t.to(torch.get_default_dtype())


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
