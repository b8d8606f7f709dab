"""Small helpers shared by every loss: reduction, masking, "zero with graph", cosine, dtypes.

Stable internal API (other loss modules import these):

* :func:`check_reduction` -- validate ``reduction`` in ``{"mean", "sum", "none"}``.
* :func:`reduce_loss` -- apply a reduction to per-sample losses, optionally over a validity mask.
* :func:`zero_loss` -- a scalar 0 connected to the graph of the given tensors (never NaN).
* :func:`cosine_similarity` / :func:`cosine_matrix` / :func:`normalize` -- cosine with an epsilon,
  free of overflow for any finite input, zero vectors mapped to zero with a zero gradient.
* :func:`check_squared_distances` -- refuse Euclidean distances that overflow (value or gradient).
* :func:`compute_dtype` / :func:`upcast` -- float32 compute for half-precision inputs.
* :func:`check_embeddings` / :func:`check_embeddings_labels` -- argument validation.

Dtype convention: fp16/bf16 inputs are computed in float32 and the loss is returned in float32
(as torch autocast does for its losses); float32/float64 inputs are computed and returned as is.

Example:
    >>> import torch
    >>> per = torch.tensor([1.0, 2.0, 3.0])
    >>> reduce_loss(per, "mean", valid_mask=torch.tensor([True, False, True]))
    tensor(2.)
"""

from __future__ import annotations

import torch
from torch import Tensor

import math

from fewsight.errors import DTypeError, NonFiniteError, ShapeError, check_choice, check_finite, check_floating, check_labels, check_ndim

__all__ = [
    "REDUCTIONS",
    "check_reduction",
    "reduce_loss",
    "zero_loss",
    "cosine_similarity",
    "cosine_matrix",
    "normalize",
    "check_squared_distances",
    "compute_dtype",
    "upcast",
    "check_embeddings",
    "check_embeddings_labels",
]

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, name: str = "reduction") -> str:
    """Return ``reduction`` if it is ``"mean"``, ``"sum"`` or ``"none"``, else raise InvalidArgumentError."""
    check_choice(name, reduction, REDUCTIONS)
    return reduction


def zero_loss(*tensors: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """A scalar ``0`` that depends on every floating tensor given, so ``backward()`` works.

    Built as the sum of an empty slice of each tensor: the value is exactly 0 even when a tensor
    holds inf/NaN (``x.sum() * 0`` would be NaN there), and each input receives a zero gradient.
    The dtype is ``dtype`` if given, else float32 for half inputs, else the first floating input's.

    >>> x = torch.randn(3, 2, requires_grad=True)
    >>> z = zero_loss(x); z.backward(); z.item(), x.grad.abs().sum().item()
    (0.0, 0.0)
    """
    floats = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if dtype is None:
        dtype = compute_dtype(floats[0].dtype) if floats else torch.float32
    if not floats:
        device = next((t.device for t in tensors if isinstance(t, Tensor)), None)
        return torch.zeros((), dtype=dtype, device=device)
    out = floats[0].reshape(-1)[:0].sum().to(dtype)
    for t in floats[1:]:
        out = out + t.reshape(-1)[:0].sum().to(dtype)
    return out


def reduce_loss(
    per_sample: Tensor,
    reduction: str,
    valid_mask: Tensor | None = None,
    *,
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """Reduce per-sample losses, ignoring entries where ``valid_mask`` is False.

    Args:
        per_sample: ``Tensor[...]`` per-sample losses.
        reduction: ``"mean"`` (sum over valid entries / their number, or / ``normalizer`` when
            given), ``"sum"`` (sum over valid entries) or ``"none"`` (``per_sample`` with invalid
            entries set to 0, same shape).
        valid_mask: ``Bool[...]`` broadcastable to ``per_sample`` (default: all valid).
        normalizer: optional denominator for ``"mean"`` (clamped to at least 1 when it is a count
            of valid entries; used as given otherwise).

    With no valid entry, ``"mean"`` and ``"sum"`` return 0 with a gradient graph, never NaN.
    Invalid entries are replaced with ``torch.where``, so inf/NaN there never reach the result
    (compute them from safe values if their backward could produce NaN).
    """
    check_reduction(reduction)
    if valid_mask is not None:
        valid_mask = valid_mask.to(device=per_sample.device, dtype=torch.bool)
        per_sample = torch.where(valid_mask, per_sample, per_sample.new_zeros(()))
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    if valid_mask is None:
        count = per_sample.numel()
        return total / max(count, 1)
    count = valid_mask.expand_as(per_sample).sum().clamp(min=1)
    return total / count.to(total.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses compute in: float32 for fp16/bf16 (and other <32-bit floats), else ``dtype``."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast floating tensors to a common compute dtype (float32 for half inputs, float64 if any is).

    Differentiable: gradients flow back to the original half-precision tensors.
    """
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    target = torch.float64 if torch.float64 in floats else torch.float32
    if floats and all(d == floats[0] for d in floats) and compute_dtype(floats[0]) == floats[0]:
        target = floats[0]
    return tuple(t.to(target) if t.is_floating_point() else t for t in tensors)


def _plain_range(dtype: torch.dtype) -> tuple[float, float]:
    # Rows whose max-abs lies in [2**-q, 2**q], q a quarter of the dtype's exponent range, have sums of
    # squares far from overflow and underflow: they are normalised as they are (bit-identical to the
    # plain formula); others are divided by their max-abs first.
    q = math.floor(math.log2(torch.finfo(dtype).max)) // 4
    return 2.0 ** -q, 2.0 ** q


def normalize(x: Tensor, eps: float = 1e-8, dim: int = -1) -> Tensor:
    """``x / max(|x|, eps)`` along ``dim``; fp16/bf16 inputs are computed and returned in float32.

    Finite for every finite ``x``: a row whose magnitude is far from 1 (up to the dtype's largest
    value, down to its smallest subnormal) is divided by its max-abs before its norm is taken, so
    its squares neither overflow nor underflow. A zero row maps to zero with a zero gradient.

    >>> normalize(torch.tensor([[3e38, -3e38], [0., 0.]]))
    tensor([[ 0.7071, -0.7071],
            [ 0.0000,  0.0000]])
    """
    x = x.to(compute_dtype(x.dtype))
    if x.numel() == 0:
        return x
    # The result does not depend on the rescaling factor c (x / max(|x|, eps) equals
    # (x / c) / max(|x / c|, eps / c)), so c is taken without a graph.
    m = x.detach().abs().amax(dim=dim, keepdim=True)
    lo, hi = _plain_range(x.dtype)
    nonzero = m > 0
    c = torch.where(((m >= lo) & (m <= hi)) | ~nonzero, torch.ones_like(m), m)
    s = x / c
    out = s / torch.maximum(torch.linalg.vector_norm(s, dim=dim, keepdim=True), eps / c)
    # A zero row: value 0 either way, but its gradient would be 1 / eps (inf once cast back to fp16).
    return torch.where(nonzero, out, out.new_zeros(()))


def check_squared_distances(
    name: str, sq: Tensor, *inputs: Tensor, squared: bool = True, valid: Tensor | None = None
) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` when a Euclidean distance would overflow.

    ``sq`` holds the squared distances a loss uses (entries where ``valid`` is False are not read),
    computed from ``inputs`` (the tensors the loss differentiates). Refused: a squared distance
    that is not finite in its dtype (NaN included, e.g. ``inf - inf`` in a Gram-matrix form) and,
    when ``squared`` (the loss uses the squared distance, whose gradient is ``2 (x - y)``), one above
    ``(max / 2)**2`` of an input's dtype (half precision, or float32 next to float64 centres), whose
    gradient would not fit that dtype.
    One reduction and one device sync.
    """
    if sq.numel() == 0:
        return
    v = sq.detach()
    if valid is not None:
        v = torch.where(valid.to(device=v.device, dtype=torch.bool), v, v.new_zeros(()))
    limit, why = torch.finfo(v.dtype).max, f"finite in {v.dtype}"
    if squared:
        for t in inputs:
            if isinstance(t, Tensor) and t.is_floating_point():
                half = torch.finfo(t.dtype).max / 2
                grad_limit = half * half  # a Python float: inf where the square exceeds float64
                if grad_limit < limit:
                    limit, why = grad_limit, f"at most {grad_limit:.4g}, so that their gradient fits {t.dtype}"
    worst = float(v.max())
    if not worst <= limit:  # NaN included
        raise NonFiniteError(
            f"{name}: expected squared distances {why}, got {worst:.4g}; scale the embeddings down or normalise them"
        )


def cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-8, dim: int = -1) -> Tensor:
    """Row-wise (broadcast) cosine ``a·b / (max(|a|, eps) · max(|b|, eps))`` along ``dim``.

    >>> cosine_similarity(torch.tensor([[1., 0.]]), torch.tensor([[1., 1.]]))
    tensor([0.7071])
    """
    return (normalize(a, eps, dim) * normalize(b, eps, dim)).sum(dim=dim)


def cosine_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """All-pairs cosine ``Tensor[N, D] x Tensor[M, D] -> Tensor[N, M]`` via one matmul."""
    return normalize(a, eps) @ normalize(b, eps).transpose(-1, -2)


def check_embeddings(name: str, embeddings: Tensor, expected: str = "Tensor[N, D]") -> None:
    """Raise unless ``embeddings`` is a 2-D floating tensor of finite values (``NonFiniteError`` otherwise)."""
    check_ndim(name, embeddings, 2, expected)
    check_floating(name, embeddings)
    check_finite(name, embeddings)


def check_embeddings_labels(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    *,
    embeddings_name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Validate ``embeddings: Tensor[N, D]`` (floating) and ``labels: Long[N]`` (integer, ``< num_classes``)."""
    check_embeddings(embeddings_name, embeddings)
    if not isinstance(labels, Tensor):
        raise DTypeError(f"{labels_name}: expected an integer torch.Tensor, got {type(labels).__name__}")
    n = embeddings.shape[0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ShapeError(f"{labels_name}: expected Tensor[{n}] matching {embeddings_name}, got shape {tuple(labels.shape)}")
    check_labels(labels_name, labels, num_classes)
