"""Sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", RetinaNet).

``FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)`` with ``p_t = p`` for a positive target and
``1 - p`` for a negative one, ``p = sigmoid(logit)``.

Two forms:

* :func:`focal_loss` -- elementwise, from logits and 0/1 (or soft) float targets of the same shape;
  the same value as ``torchvision.ops.sigmoid_focal_loss`` (default reduction ``"mean"`` here,
  ``"none"`` there).
* :func:`focal_loss_detection` -- the RetinaNet classification loss from per-anchor logits
  ``[B, A, C]`` and per-anchor class labels (:data:`~fewsight.geometry.BACKGROUND`,
  :data:`~fewsight.geometry.IGNORE`), summed and divided by the number of positive anchors of
  the whole batch (at least 1), as in Detectron / the paper.

Both run through an autograd function with a closed-form gradient: only the logits (and the
targets, or for the detection form the ``Long[B, A]`` labels) are kept for backward, instead of
the five or six ``[B, A, C]`` intermediates an autograd composition holds. The detection form
never builds a one-hot tensor (the one positive entry per anchor is patched on a gathered
vector) and works through row chunks with in-place ops, so its temporaries stay small. A fused
variant (``focal_loss_detection(..., fused=True)``, for training) computes the summed loss and its
gradient in the same chunked pass. Everything is
computed from ``softplus``/``sigmoid`` of the logits (never the log of a clamped probability), so
logits of +-100 give exact, finite values; fp16/bf16 logits are computed in float32 and the loss
is returned in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fewsight.errors import DTypeError, InvalidArgumentError, ShapeError, check_finite, check_floating, check_labels, check_ndim, check_real
from fewsight.geometry.matching import BACKGROUND, IGNORE
from fewsight.losses._common import check_reduction, compute_dtype, reduce_loss

__all__ = ["FocalLoss", "anchor_labels", "check_focal_options", "focal_loss", "focal_loss_detection"]


def check_focal_options(alpha: float | None, gamma: float) -> float | None:
    """Validate focal-loss options; returns ``alpha`` as a float, or ``None`` when the weighting is off.

    ``alpha`` in ``[0, 1]``, or ``None`` / ``-1`` (torchvision's spelling) to disable it; ``gamma >= 0``.
    For modules that store these options and must reject bad ones at construction.

    Raises:
        InvalidArgumentError: either value out of range.

    >>> check_focal_options(-1, 2.0) is None, check_focal_options(0.25, 0)
    (True, 0.25)
    """
    if alpha is not None and alpha != -1:
        check_real("alpha", alpha)
        if not 0.0 <= float(alpha) <= 1.0:
            raise InvalidArgumentError(f"alpha: expected a float in [0, 1], or None / -1 to disable, got {alpha!r}")
    check_real("gamma", gamma, low=0)
    # torchvision disables the weighting with alpha=-1; None is the spelled-out form.
    return None if alpha is None or alpha == -1 else float(alpha)


def _alpha_t(t: Tensor, alpha: float | None) -> Tensor | float:
    if alpha is None:
        return 1.0
    return (1.0 - alpha) + (2.0 * alpha - 1.0) * t


# --- soft targets ---------------------------------------------------------------------------------
# q = 1 - p_t = (1 - t) * sigmoid(x) + t * sigmoid(-x): both terms are >= 0, so no cancellation.
# dL/dx = alpha_t * [(sigmoid(x) - t) * q^g + g * ce * q^g * (sigmoid(x) sigmoid(-x) / q) * (1 - 2t)],
# and sigmoid(x) sigmoid(-x) / q lies in [0, 1], so the gradient stays finite for every gamma >= 0.


def _soft_forward(x: Tensor, t: Tensor, alpha: float | None, gamma: float) -> Tensor:
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma != 0.0:
        q = torch.sigmoid(x) * (1.0 - t) + torch.sigmoid(-x) * t
        ce = ce * (q * q if gamma == 2.0 else q.pow(gamma))
    return ce * _alpha_t(t, alpha)


def _soft_grad(x: Tensor, t: Tensor, alpha: float | None, gamma: float) -> Tensor:
    p, p_neg = torch.sigmoid(x), torch.sigmoid(-x)
    grad = p - t
    if gamma != 0.0:
        q = p * (1.0 - t) + p_neg * t
        mod = q * q if gamma == 2.0 else q.pow(gamma)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        ratio = torch.where(q > 0, p * p_neg / q.clamp(min=torch.finfo(q.dtype).tiny), q.new_zeros(()))
        # ce * ratio first: ce is ~|x| and ratio ~exp(-|x|), so their product never overflows.
        grad = mod * (grad + (ce * ratio) * gamma * (1.0 - 2.0 * t))
    return grad * _alpha_t(t, alpha)


# --- one-hot targets from labels (detection) ----------------------------------------------------
# Targets are one-hot, so the dense work uses the negative-target formula for every entry and the
# (at most one per anchor) positive entry is patched afterwards on a gathered [n] vector:
#   negative: L = (1 - a) * softplus(x) * s^g,            dL/dx = (1 - a) * s^g * (s + g * softplus(x) * (1 - s))
#   positive: L = a * softplus(-x) * (1 - s)^g,           dL/dx = -a * (1 - s)^g * ((1 - s) + g * softplus(-x) * s)
# with s = sigmoid(x). The dense part runs over row chunks with in-place ops: on CPU every fresh
# [B, A, C] buffer costs more in page faults than the arithmetic, and chunks stay in cache.

_CPU_CHUNK = 1 << 18  # elements per chunk on CPU: the temporaries stay in cache and in the heap
_FUSED_CPU_CHUNK = 1 << 19  # the same for the fused value-and-gradient pass
_ACCEL_CHUNK = 1 << 24  # elsewhere: few kernel launches, temporaries bounded to 64 MiB each


def _softplus_from_sigmoid(x: Tensor, s: Tensor) -> Tensor:
    """softplus(x) = relu(x) - log(sigmoid(|x|)), with sigmoid(|x|) = 0.5 + |s - 0.5| in [0.5, 1].

    Vectorised ops only (``F.softplus`` goes through a scalar ``log1p`` on CPU, which does not vectorise);
    the absolute error is one ulp of 1, and nothing overflows for any finite ``x``.
    """
    log_s_abs = (s - 0.5).abs_().add_(0.5).log_()
    return torch.clamp(x, min=0).sub_(log_s_abs)


def _neg_grad_factor(sp: Tensor, s: Tensor, gamma: float, out: Tensor | None = None) -> Tensor:
    """``s + gamma * softplus(x) * (1 - s)`` (into ``out`` when given, which must not be ``sp`` or ``s``)."""
    out = torch.mul(sp, s, out=out)
    torch.sub(sp, out, out=out)  # softplus(x) * (1 - s)
    return out.mul_(gamma).add_(s)


def _neg_focal_(x: Tensor, alpha: float | None, gamma: float) -> Tensor:
    s = torch.sigmoid(x)
    loss = _softplus_from_sigmoid(x, s)
    if gamma != 0.0:
        loss.mul_(s.square_() if gamma == 2.0 else s.pow_(gamma))
    if alpha is not None:
        loss.mul_(1.0 - alpha)
    return loss


def _neg_focal_grad_(x: Tensor, alpha: float | None, gamma: float) -> Tensor:
    s = torch.sigmoid(x)
    if gamma == 0.0:
        grad = s
    else:
        grad = _neg_grad_factor(_softplus_from_sigmoid(x, s), s, gamma)
        grad.mul_(s.square_() if gamma == 2.0 else s.pow_(gamma))
    if alpha is not None:
        grad.mul_(1.0 - alpha)
    return grad


def _pos_focal(x: Tensor, alpha: float | None, gamma: float) -> Tensor:
    loss = F.softplus(-x)
    if gamma != 0.0:
        loss = loss * torch.sigmoid(-x).pow(gamma)
    return loss if alpha is None else loss * alpha


def _pos_focal_grad(x: Tensor, alpha: float | None, gamma: float) -> Tensor:
    r = torch.sigmoid(-x)
    grad = r if gamma == 0.0 else r.pow(gamma) * (r + gamma * F.softplus(-x) * torch.sigmoid(x))
    return -grad if alpha is None else -alpha * grad


def _chunk_rows(x2: Tensor, cpu_chunk: int | None = None) -> int:
    """Rows per chunk for a row-wise pass over ``Tensor[N, C]`` (``cpu_chunk`` elements on CPU)."""
    per_chunk = (_CPU_CHUNK if cpu_chunk is None else cpu_chunk) if x2.device.type == "cpu" else _ACCEL_CHUNK
    return max(1, per_chunk // max(1, x2.shape[1]))


class _LabelChunk(NamedTuple):
    rows: slice  # rows of the flattened ``[N, C]`` logits
    x: Tensor  # Tensor[n, C] logits in the compute dtype
    valid: Tensor  # Bool[n, 1]: rows that contribute
    pos: Tensor  # Bool[n]: rows with a positive target
    col: Tensor  # Long[n, 1]: the target column (0 where not positive)


def _label_chunks(
    logits: Tensor, labels: Tensor, valid: Tensor, work: torch.dtype, cpu_chunk: int | None = None
) -> Iterator[_LabelChunk]:
    x2 = logits.reshape(-1, logits.shape[-1])
    lab, val = labels.reshape(-1), valid.reshape(-1)
    step = _chunk_rows(x2, cpu_chunk)
    for start in range(0, x2.shape[0], step):
        rows = slice(start, min(start + step, x2.shape[0]))
        lab_c = lab[rows]
        yield _LabelChunk(rows, x2[rows].to(work), val[rows].unsqueeze(1), lab_c >= 0, lab_c.clamp(min=0).unsqueeze(1))


def _patch_positive_(dense: Tensor, chunk: _LabelChunk, values: Tensor) -> Tensor:
    """Writes ``values`` (``Tensor[n]``) at the target column of the positive rows of ``dense``, in place."""
    kept = dense.gather(1, chunk.col).squeeze(1)
    return dense.scatter_(1, chunk.col, torch.where(chunk.pos, values, kept).unsqueeze(1))


def _one_hot_focal(
    chunk: _LabelChunk,
    neg: Callable[[Tensor, float | None, float], Tensor],
    pos: Callable[[Tensor, float | None, float], Tensor],
    alpha: float | None,
    gamma: float,
) -> Tensor:
    """Loss (``neg=_neg_focal_, pos=_pos_focal``) or gradient (the ``_grad`` pair) of one chunk, ``Tensor[n, C]``."""
    out = neg(chunk.x, alpha, gamma)
    _patch_positive_(out, chunk, pos(chunk.x.gather(1, chunk.col).squeeze(1), alpha, gamma))
    return out.masked_fill_(~chunk.valid, 0.0)


class _LabelFocal(torch.autograd.Function):
    """Focal loss of ``[..., C]`` logits against one-hot targets given as ``Long[...]`` labels.

    Saves only the logits and the labels (no one-hot); rows where ``valid`` is False contribute
    neither loss nor gradient. ``total=True`` returns the sum (no ``[..., C]`` output is built).
    """

    @staticmethod
    def forward(ctx, logits, labels, valid, alpha, gamma, total):  # type: ignore[override]
        work = compute_dtype(logits.dtype)
        ctx.save_for_backward(logits, labels, valid)
        ctx.alpha, ctx.gamma, ctx.total = alpha, gamma, total
        out = logits.new_zeros((), dtype=work) if total else logits.new_empty(logits.shape, dtype=work)
        for chunk in _label_chunks(logits, labels, valid, work):
            loss = _one_hot_focal(chunk, _neg_focal_, _pos_focal, alpha, gamma)
            if total:
                out = out + loss.sum()
            else:
                out.view(-1, logits.shape[-1])[chunk.rows] = loss
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, labels, valid = ctx.saved_tensors
        work = compute_dtype(logits.dtype)
        num_classes = logits.shape[-1]
        g_out = grad_out.to(work) if ctx.total else grad_out.reshape(-1, num_classes)
        grad = logits.new_empty(logits.shape)
        grad2 = grad.view(-1, num_classes)
        for chunk in _label_chunks(logits, labels, valid, work):
            g = _one_hot_focal(chunk, _neg_focal_grad_, _pos_focal_grad, ctx.alpha, ctx.gamma)
            scale = g_out if ctx.total else g_out[chunk.rows]
            if grad.dtype == work:
                torch.mul(g, scale, out=grad2[chunk.rows])  # straight into the result: no extra copy
            else:
                grad2[chunk.rows] = g.mul_(scale)
        return grad, None, None, None, None, None


class _FocalSumWithGrad(torch.autograd.Function):
    """Sum of the detection focal loss whose gradient is computed in the same chunked pass.

    ``apply(logits: Tensor[..., C], labels: Long[...], alpha, gamma) -> Tensor[]``: labels as in
    :func:`focal_loss_detection` (``< BACKGROUND`` rows are ignored). Training always differentiates
    this loss, so computing ``sigmoid``/``softplus`` once for the value and the gradient halves the
    elementwise work of a separate backward; the price is one ``[..., C]`` gradient buffer held until
    backward (the size of the logits).
    """

    @staticmethod
    def forward(ctx, logits, labels, alpha, gamma):  # type: ignore[override]
        work = compute_dtype(logits.dtype)
        grad = torch.empty(logits.shape, dtype=work, device=logits.device)
        grad2 = grad.view(-1, logits.shape[-1])
        total = torch.zeros((), dtype=work, device=logits.device)
        neg_w = 1.0 if alpha is None else 1.0 - alpha
        valid = labels >= BACKGROUND
        for chunk in _label_chunks(logits.detach(), labels, valid, work, _FUSED_CPU_CHUNK):
            x = chunk.x
            s = torch.sigmoid(x)
            sp = _softplus_from_sigmoid(x, s)
            if gamma == 0.0:
                mod = torch.ones_like(s)
            else:
                mod = s.square() if gamma == 2.0 else s.pow(gamma)
            # (1 - alpha) and the row validity folded into the modulating factor: one pass.
            mod.mul_(chunk.valid.to(work) * neg_w)
            total = total + torch.dot(sp.view(-1), mod.view(-1))
            g = _neg_grad_factor(sp, s, gamma, out=grad2[chunk.rows]).mul_(mod)
            # The target entry of each positive anchor replaces the negative term counted above.
            xp = x.gather(1, chunk.col).squeeze(1)
            neg_here = (sp.gather(1, chunk.col) * mod.gather(1, chunk.col)).squeeze(1)
            loss_p = _pos_focal(xp, alpha, gamma)
            total = total + torch.where(chunk.pos, loss_p - neg_here, torch.zeros_like(loss_p)).sum()
            _patch_positive_(g, chunk, _pos_focal_grad(xp, alpha, gamma))
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).to(ctx.logits_dtype), None, None, None


class _SoftFocal(torch.autograd.Function):
    """Elementwise focal loss with float targets; gradient with respect to the logits only."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, alpha: float | None, gamma: float) -> Tensor:  # type: ignore[override]
        work = compute_dtype(logits.dtype)
        ctx.save_for_backward(logits, targets)
        ctx.alpha, ctx.gamma = alpha, gamma
        return _soft_forward(logits.to(work), targets.to(work), alpha, gamma)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        work = compute_dtype(logits.dtype)
        grad = _soft_grad(logits.to(work), targets.to(work), ctx.alpha, ctx.gamma) * grad_out
        return grad.to(logits.dtype), None, None, None


def _focal_autograd(logits: Tensor, targets: Tensor, alpha: float | None, gamma: float) -> Tensor:
    # Plain autograd composition, used when the targets need a gradient too (e.g. distillation).
    work = compute_dtype(torch.promote_types(logits.dtype, targets.dtype))
    x, t = logits.to(work), targets.to(work)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma != 0.0:
        q = torch.sigmoid(x) * (1.0 - t) + torch.sigmoid(-x) * t
        # The clamp only matters where q underflows to 0, where the loss and its gradient are ~0.
        ce = ce * q.clamp(min=torch.finfo(work).tiny).pow(gamma)
    return ce * _alpha_t(t, alpha)


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Sigmoid focal loss, elementwise (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    Args:
        logits: ``Tensor[...]`` raw scores (any shape, any floating dtype).
        targets: ``Tensor[...]`` same shape, 0/1 (or soft, in ``[0, 1]``) float or bool targets.
        alpha: weight of the positive term (``1 - alpha`` for the negative); ``None`` or ``-1``
            disables the weighting (torchvision's convention).
        gamma: focusing exponent ``>= 0``; ``gamma=0, alpha=None`` is binary cross-entropy.
        reduction: ``"mean"`` over all elements, ``"sum"``, or ``"none"`` (``Tensor[...]``).

    Returns:
        The loss (float32 for half-precision logits). Equals
        ``torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)``.

    Example:
        >>> logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
        >>> targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> round(focal_loss(logits, targets, reduction="sum").item(), 4)
        0.3006
    """
    alpha = check_focal_options(alpha, gamma)
    check_reduction(reduction)
    if not isinstance(logits, Tensor):
        raise DTypeError(f"logits: expected a floating torch.Tensor, got {type(logits).__name__}")
    check_floating("logits", logits)
    if not isinstance(targets, Tensor):
        raise DTypeError(f"targets: expected a torch.Tensor shaped like logits, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ShapeError(f"targets: expected shape {tuple(logits.shape)} (same as logits), got {tuple(targets.shape)}")
    check_finite("logits", logits)
    check_finite("targets", targets)
    # Targets outside [0, 1] make (1 - t) negative and the loss negative: refuse them.
    if targets.numel() and bool(((targets < 0) | (targets > 1)).any()):
        lo, hi = float(targets.min()), float(targets.max())
        raise InvalidArgumentError(f"targets: expected values in [0, 1], got values in [{lo}, {hi}]")
    if targets.dtype == torch.bool:
        targets = targets.to(compute_dtype(logits.dtype))
    elif not targets.is_floating_point():
        raise DTypeError(f"targets: expected a float or bool tensor of 0/1 targets, got dtype {targets.dtype}")
    if targets.requires_grad:
        per = _focal_autograd(logits, targets, alpha, float(gamma))
    else:
        per = _SoftFocal.apply(logits, targets, alpha, float(gamma))
    return reduce_loss(per, reduction)


def anchor_labels(indices: Tensor, gt_labels: Tensor) -> Tensor:
    """Per-anchor class labels from a match: ``Long[B, A]`` indices + ``Long[B, G]`` -> ``Long[B, A]``.

    ``indices`` is :attr:`fewsight.geometry.Match.indices` (GT index, ``BACKGROUND`` or ``IGNORE``);
    the result is the matched GT's label for positive anchors, and ``BACKGROUND`` / ``IGNORE`` as
    given otherwise. A positive anchor whose GT label is unknown (``< 0``) becomes ``IGNORE``: it is
    neither taught its (unknown) class nor taught background.

    >>> anchor_labels(torch.tensor([[0, -1, 1, -2]]), torch.tensor([[4, 7]]))
    tensor([[ 4, -1,  7, -2]])
    """
    check_ndim("indices", indices, 2, "Long[B, A]")
    check_ndim("gt_labels", gt_labels, 2, "Long[B, G]")
    if gt_labels.shape[0] != indices.shape[0]:
        raise ShapeError(f"gt_labels: expected Long[{indices.shape[0]}, G] (batch of indices), got {tuple(gt_labels.shape)}")
    positive = indices >= 0
    if gt_labels.shape[1] == 0:
        return torch.where(positive, IGNORE, indices)
    matched = gt_labels.long().gather(1, indices.clamp(min=0))
    matched = torch.where(matched >= 0, matched, IGNORE)
    return torch.where(positive, matched, indices)


def focal_loss_detection(
    logits: Tensor,
    labels: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    *,
    fused: bool = False,
) -> Tensor:
    """RetinaNet classification loss over a batch of anchors (Lin et al. 2017, Sec. 3.3 / 5.1).

    ``L = sum_{b, a not ignored, c} FL(logits[b, a, c], onehot(labels[b, a])[c]) / max(1, #positives)``

    Args:
        logits: ``Tensor[B, A, C]`` per-anchor class logits (no background logit).
        labels: ``Long[B, A]`` per anchor: a class index in ``[0, C)`` (positive),
            ``BACKGROUND`` (-1: all-zero target) or ``IGNORE`` (-2: excluded). Other negative
            values are unknown and treated as ignored (see :func:`anchor_labels`).
        alpha, gamma: as in :func:`focal_loss`.
        reduction: ``"mean"`` -- the sum divided by the number of positive anchors of the whole
            batch (at least 1; so a batch without objects gives the plain sum over its background
            anchors), ``"sum"``, or ``"none"`` (``Tensor[B, A, C]``, zero at ignored anchors).
        fused: when a gradient is needed (``"mean"`` / ``"sum"``), compute value and gradient in one
            chunked pass and hold the ``Tensor[B, A, C]`` gradient until backward: less elementwise
            work for a loss that is always differentiated (training). Same value; without a gradient
            it changes nothing.

    Raises:
        LabelError: a label ``>= C``.

    Example:
        >>> logits = torch.full((1, 3, 2), -4.0)
        >>> labels = torch.tensor([[1, -1, -2]])  # positive of class 1, background, ignored
        >>> round(focal_loss_detection(logits, labels).item(), 4)
        0.9687
    """
    alpha = check_focal_options(alpha, gamma)
    check_reduction(reduction)
    check_ndim("logits", logits, 3, "Tensor[B, A, C]")
    check_floating("logits", logits)
    check_finite("logits", logits)
    check_ndim("labels", labels, 2, "Long[B, A]")
    if labels.shape != logits.shape[:2]:
        raise ShapeError(f"labels: expected Long[{logits.shape[0]}, {logits.shape[1]}] (logits' B, A), got {tuple(labels.shape)}")
    check_labels("labels", labels, logits.shape[-1])
    labels = labels.to(device=logits.device, dtype=torch.long)
    if fused and reduction != "none" and torch.is_grad_enabled() and logits.requires_grad and logits.numel() > 0:
        total = _FocalSumWithGrad.apply(logits, labels, alpha, float(gamma))
        return total if reduction == "sum" else total / (labels >= 0).sum().clamp(min=1).to(total.dtype)
    valid = labels >= BACKGROUND
    if reduction == "none":
        return _LabelFocal.apply(logits, labels, valid, alpha, float(gamma), False)
    total = _LabelFocal.apply(logits, labels, valid, alpha, float(gamma), True)
    if reduction == "sum":
        return total
    return total / (labels >= 0).sum().clamp(min=1).to(total.dtype)


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss` / :func:`focal_loss_detection`.

    ``forward(logits, targets)``: float/bool ``targets`` of the logits' shape -> :func:`focal_loss`;
    integer ``targets`` of shape ``logits.shape[:-1]`` (per-anchor labels, ``Tensor[B, A, C]``
    logits) -> :func:`focal_loss_detection`, where ``"mean"`` divides by the number of positives.

    >>> loss = FocalLoss()(torch.zeros(2, 5, 3), torch.tensor([[0, -1, -1, 2, -2], [-1] * 5]))
    >>> round(loss.item(), 4)
    1.6679
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = check_focal_options(alpha, gamma)
        self.gamma = float(gamma)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if (
            isinstance(targets, Tensor)
            and not targets.is_floating_point()
            and targets.dtype != torch.bool
            and targets.ndim == logits.ndim - 1
        ):
            return focal_loss_detection(logits, targets, self.alpha, self.gamma, self.reduction)
        return focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)
