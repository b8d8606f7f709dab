"""DLDENet: a RetinaNet whose classification head emits directional embeddings (few-shot detection).

The classification subnet emits a ``D``-dim L2-normalised embedding ``e`` per anchor. Class ``c`` is a
direction ``mu_c`` on the sphere with a learnable scale ``w_c > 0`` and bias ``b_c``; its calibrated
probability is

    p_c(e) = sigmoid(w_c (cos(e, mu_c) + b_c)) / sigmoid(w_c (1 + b_c))          (so p in [0, 1], p(cos=1) = 1)

computed in log space (never the log of a clamped probability):

    log p       = logsigmoid(w (cos + b)) - logsigmoid(w (1 + b))
    log (1 - p) = log1mexp(-w (1 - cos)) - softplus(w (cos + b))

(the second line is exact algebra: ``1 - p = (sigma(a) - sigma(c)) / sigma(a)`` with ``a - c = w (1 - cos)``;
it keeps full precision when ``p`` is close to 1, where ``log1p(-exp(log p))`` would cancel).
:func:`directional_log_probs` is the reference form; training uses :func:`directional_focal_loss`,
the same loss with value and gradients computed in one chunked pass (tested equal).

Training loss (each term weighted by ``loss_weights`` and returned by name):

* ``"classification"``: focal loss (Lin et al. 2017) on these probabilities, with
  explicit ``log p`` / ``log(1 - p)``, normalised by the positive anchors of the batch;
* ``"box_regression"``: as RetinaNet;
* ``"ccs"``: CCS (Guo & Zhang 2017) between positive embeddings and their class directions, IoU-weighted;
* ``"dispersion"`` (``directions="learned"`` only, weight > 0): mean positive part of the cosine between
  different class directions.

Class directions: ``directions="tracked"`` (default) keeps the means ``mu`` as a buffer updated
without gradient from the positive embeddings of the loss's own matching (``means_update="batch"``:
EMA per batch; ``"manual"``: accumulate, :meth:`DLDENet.update_means` at epoch end; ``"none"``: frozen);
``directions="learned"`` makes them a parameter (a cosine classifier). New classes are added without
gradient steps by :meth:`DLDENet.enroll` from a few boxed examples.

Rivalry (enrolled classes, opt-in): a class ``c`` with rivalry ``r_c > 0`` has its probability gated by
how much closer the embedding is to its direction than to the best class the network was trained on
(the classes with ``r = 0``; a soft form of Lowe's ratio test, 2004):

    p'_c = p_c * sigmoid(r_c (cos_c - max_{j: r_j = 0} cos_j))                  (see :func:`rival_log_gate`)

A network trained on few classes embeds a new class near mixtures of them, so the plain ``p_c`` ranks
the trained classes' objects high for the new class; the gate does not, and background (far from every
direction) stays as unlikely as before.

Example:
    >>> import torch
    >>> from fewsight.models import DLDENet
    >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=32, embedding_dim=16)
    >>> images = torch.rand(1, 3, 96, 96)
    >>> targets = [{"boxes": torch.tensor([[20., 20., 70., 60.]]), "labels": torch.tensor([1])}]
    >>> sorted(model(images, targets))
    ['box_regression', 'ccs', 'classification']
    >>> support = [{"boxes": torch.tensor([[10., 30., 60., 90.]]), "labels": torch.tensor([0])}]
    >>> model.enroll(images, support, ["novel"]), model.classes
    ([2], ['0', '1', 'novel'])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import (
    CheckpointError,
    InvalidArgumentError,
    ShapeError,
    check_choice,
    check_floating,
    check_labels,
    check_ndim,
)
from fewsight.geometry import BACKGROUND, AnchorGenerator, BoxCoder
from fewsight.losses._common import check_reduction, compute_dtype, zero_loss
from fewsight.losses.ccs import ccs_loss
from fewsight.losses.focal import _check_alpha_gamma
from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from fewsight.models.detector import DenseDetector, prepare_targets
from fewsight.models.heads import DLDENetHead, NormSpec

__all__ = [
    "DLDENet",
    "DirectionalClassifier",
    "DirectionalFocalLoss",
    "DispersionLoss",
    "directional_focal_loss",
    "directional_log_probs",
    "directional_probabilities",
    "dispersion_loss",
    "focal_loss_from_log_probs",
    "log1mexp",
    "rival_log_gate",
]

DIRECTIONS = ("tracked", "learned")
MEANS_UPDATES = ("batch", "manual", "none")
#: Floor of ``1 - cos`` in ``log(1 - p)``: a float32 cosine cannot resolve closer to 1, and the floor
#: bounds ``-log(1 - p)`` and its gradient when an embedding sits on another class's direction.
MIN_ONE_MINUS_COS = 1e-6
_MIN_DISTANCE = 1e-12  # floor of w (1 - cos) when w itself underflows to 0
_LN2 = math.log(2.0)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable everywhere (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    ``log(-expm1(x))`` for ``x > -ln 2``, ``log1p(-exp(x))`` otherwise; each branch is evaluated on
    inputs valid for it, so no NaN leaks into the gradient of the other. ``x = 0`` gives ``-inf``.

    >>> log1mexp(torch.tensor([-1e-10, -1.0, -50.0]))
    tensor([-2.3026e+01, -4.5868e-01, -1.9287e-22])
    """
    near = x > -_LN2
    x_near = torch.where(near, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near, torch.full_like(x, -_LN2), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def rival_log_gate(cos: Tensor, rivalry: Tensor) -> Tensor:
    """``log g_c = logsigmoid(r_c (cos_c - max_{j: r_j = 0} cos_j))`` for ``r_c > 0``, ``0`` where ``r_c = 0``.

    The classes with ``r = 0`` (those a network was trained on) are the rivals and are not gated; with
    no rival the gate is 1. ``p'_c = p_c * g_c`` (module docstring).

    Args:
        cos: ``Tensor[..., C]`` cosines; rivalry: ``Tensor[C]`` ``r >= 0`` (the gate's sharpness).

    Returns:
        ``Tensor[..., C]`` ``<= 0`` in the dtype of ``cos``.

    Example:
        >>> rival_log_gate(torch.tensor([[0.9, 0.2, 0.8]]), torch.tensor([0.0, 0.0, 10.0])).exp()
        tensor([[1.0000, 1.0000, 0.2689]])
    """
    if rivalry.shape != cos.shape[-1:]:
        raise ShapeError(f"rivalry: expected Tensor[{cos.shape[-1]}] (one per class), got shape {tuple(rivalry.shape)}")
    r = rivalry.to(cos.dtype)
    gated = r > 0
    if cos.shape[-1] == 0:
        return torch.zeros_like(cos)
    best = cos.masked_fill(gated, float("-inf")).amax(dim=-1, keepdim=True)
    has_rival = torch.isfinite(best)  # False when every class is gated: gate 1
    margin = cos - torch.where(has_rival, best, torch.zeros_like(best))
    return torch.where(gated & has_rival, F.logsigmoid(r * margin), torch.zeros_like(cos))


def directional_log_probs(
    embeddings: Tensor,
    directions: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    eps: float = 1e-8,
    min_one_minus_cos: float = MIN_ONE_MINUS_COS,
    rivalry: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``log p`` and ``log(1 - p)`` of the calibrated directional probability (DLDENet, SPEC §4).

    ``p_c = sigmoid(w_c (cos(e, mu_c) + b_c)) / sigmoid(w_c (1 + b_c))``, with
    ``log p = logsigmoid(w (cos + b)) - logsigmoid(w (1 + b))`` and
    ``log(1 - p) = log1mexp(-w (1 - cos)) - softplus(w (cos + b))``.

    Args:
        embeddings: ``Tensor[..., D]`` (normalised here, need not be unit).
        directions: ``Tensor[C, D]`` class directions (normalised here).
        scale: ``Tensor[C]`` ``w >= 0``; bias: ``Tensor[C]`` ``b``.
        eps: norm floor of the cosine; min_one_minus_cos: floor of ``1 - cos`` in ``log(1 - p)``.
        rivalry: optional ``Tensor[C]``: gate the classes with ``r > 0`` (:func:`rival_log_gate`); their
            ``log(1 - p)`` is then ``log1mexp(log p)``.

    Returns:
        ``(log_p, log_1mp)``: two ``Tensor[..., C]`` in float32 (float64 for float64 inputs), both ``<= 0``
        and finite for any finite input, so ``p = exp(log_p)`` lies in ``[0, 1]``. Autocast is
        disabled inside: the cosine is always computed in full precision.

    Example:
        >>> e = torch.tensor([[1., 0.], [0., 1.], [-1., 0.]])
        >>> lp, l1mp = directional_log_probs(e, torch.tensor([[1., 0.]]), torch.tensor([7.]), torch.tensor([-0.5]))
        >>> lp.exp().squeeze(1), (lp.exp() + l1mp.exp()).squeeze(1)
        (tensor([1.0000e+00, 3.0197e-02, 2.8367e-05]), tensor([1.0000, 1.0000, 1.0000]))
    """
    check_floating("embeddings", embeddings)
    check_ndim("directions", directions, 2, "Tensor[C, D]")
    if embeddings.ndim < 1 or embeddings.shape[-1] != directions.shape[1]:
        raise ShapeError(
            f"embeddings: expected Tensor[..., {directions.shape[1]}] matching directions' D, got shape {tuple(embeddings.shape)}"
        )
    num_classes = directions.shape[0]
    for name, t in (("scale", scale), ("bias", bias)):
        if t.shape != (num_classes,):
            raise ShapeError(f"{name}: expected Tensor[{num_classes}] (one per class), got shape {tuple(t.shape)}")
    work = torch.float64 if torch.float64 in (embeddings.dtype, directions.dtype) else torch.float32
    with torch.autocast(embeddings.device.type, enabled=False):
        e = F.normalize(embeddings.to(work), dim=-1, eps=eps)
        d = F.normalize(directions.to(work), dim=-1, eps=eps)
        cos = torch.matmul(e, d.transpose(0, 1)).clamp(-1.0, 1.0)
        w, b = scale.to(work), bias.to(work)
        logit = w * (cos + b)
        log_p = torch.minimum(F.logsigmoid(logit) - F.logsigmoid(w * (1.0 + b)), logit.new_zeros(()))
        distance = (w * (1.0 - cos).clamp(min=min_one_minus_cos)).clamp(min=_MIN_DISTANCE)
        log_1mp = log1mexp(-distance) - F.softplus(logit)
        if rivalry is not None:
            gate = rival_log_gate(cos, rivalry)
            gated = gate < 0
            log_p = log_p + gate
            # log(1 - p') from log p' where the gate acts (log p' < 0 there); elsewhere the exact form above.
            log_1mp = torch.where(gated, log1mexp(torch.where(gated, log_p, log_p.new_full((), -1.0))), log_1mp)
    return log_p, log_1mp


def directional_probabilities(
    embeddings: Tensor, directions: Tensor, scale: Tensor, bias: Tensor, *, eps: float = 1e-8,
    rivalry: Tensor | None = None,
) -> Tensor:
    """``p = sigmoid(w (cos + b)) / sigmoid(w (1 + b))`` in ``[0, 1]`` -> ``Tensor[..., C]`` (inference scores).

    The ratio of two sigmoids is exact in float32 down to the smallest normal number (no log needed
    when nothing is differentiated); the same values as ``directional_log_probs(...)[0].exp()``.

    >>> directional_probabilities(torch.tensor([[1., 0.]]), torch.eye(2), torch.full((2,), 7.), torch.full((2,), -.5))
    tensor([[1.0000, 0.0302]])
    """
    check_floating("embeddings", embeddings)
    check_ndim("directions", directions, 2, "Tensor[C, D]")
    if embeddings.ndim < 1 or embeddings.shape[-1] != directions.shape[1]:
        raise ShapeError(
            f"embeddings: expected Tensor[..., {directions.shape[1]}] matching directions' D, got shape {tuple(embeddings.shape)}"
        )
    work = torch.float64 if torch.float64 in (embeddings.dtype, directions.dtype) else torch.float32
    with torch.autocast(embeddings.device.type, enabled=False):
        e = F.normalize(embeddings.to(work), dim=-1, eps=eps)
        d = F.normalize(directions.to(work), dim=-1, eps=eps)
        w, b = scale.to(work), bias.to(work)
        cos = torch.matmul(e, d.transpose(0, 1)).clamp_(-1.0, 1.0)
        gate = None if rivalry is None else rival_log_gate(cos, rivalry).exp_()
        p = torch.sigmoid(cos.add_(b).mul_(w)).div_(torch.sigmoid(w * (1.0 + b))).clamp_(max=1.0)
        return p if gate is None else p.mul_(gate)


def focal_loss_from_log_probs(
    log_p: Tensor,
    log_1mp: Tensor,
    labels: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Focal loss (Lin et al. 2017) from explicit ``log p`` and ``log(1 - p)``, detection form.

    ``FL = -alpha (1 - p)^gamma log p`` for the target class of a positive anchor,
    ``-(1 - alpha) p^gamma log(1 - p)`` for every other (anchor, class); powers as ``exp(gamma * log)``.

    Args:
        log_p, log_1mp: ``Tensor[..., C]`` (e.g. ``[B, A, C]``) from :func:`directional_log_probs`.
        labels: ``Long[...]`` per anchor: class ``>= 0``, ``BACKGROUND`` (-1), ``IGNORE`` (-2) / other
            negatives (excluded).
        alpha: positive weight (``None`` disables); gamma: focusing exponent ``>= 0``.
        reduction: ``"mean"`` = sum / max(1, #positive anchors) as RetinaNet, ``"sum"``, ``"none"``
            (``Tensor[..., C]``, 0 at excluded anchors).

    Raises:
        LabelError: a label ``>= C``.

    Example:
        >>> lp = torch.log(torch.tensor([[[0.9, 0.1]]]))
        >>> round(focal_loss_from_log_probs(lp, torch.log1p(-lp.exp()), torch.tensor([[0]])).item(), 5)
        0.00105
    """
    alpha = _check_alpha_gamma(alpha, gamma)
    gamma = float(gamma)
    check_reduction(reduction)
    check_floating("log_p", log_p)
    if log_1mp.shape != log_p.shape:
        raise ShapeError(f"log_1mp: expected shape {tuple(log_p.shape)} (same as log_p), got {tuple(log_1mp.shape)}")
    if labels.shape != log_p.shape[:-1]:
        raise ShapeError(f"labels: expected shape {tuple(log_p.shape[:-1])} (log_p without C), got {tuple(labels.shape)}")
    num_classes = log_p.shape[-1]
    check_labels("labels", labels, num_classes)
    labels = labels.to(device=log_p.device, dtype=torch.long)
    valid = labels >= BACKGROUND
    positive = labels >= 0
    if num_classes == 0 or labels.numel() == 0:
        out = zero_loss(log_p, log_1mp)
        return log_p * 0 if reduction == "none" else out
    work = compute_dtype(torch.promote_types(log_p.dtype, log_1mp.dtype))
    lp, l1mp = log_p.to(work), log_1mp.to(work)
    neg_weight = 1.0 if alpha is None else 1.0 - alpha
    pos_weight = 1.0 if alpha is None else alpha
    negative = -l1mp * (lp * gamma).exp() * neg_weight if gamma != 0.0 else -l1mp * neg_weight
    index = labels.clamp(min=0).unsqueeze(-1)
    lp_t = lp.gather(-1, index).squeeze(-1)
    l1mp_t = l1mp.gather(-1, index).squeeze(-1)
    pos_term = -lp_t * (l1mp_t * gamma).exp() * pos_weight if gamma != 0.0 else -lp_t * pos_weight
    patch = torch.where(positive, pos_term, negative.gather(-1, index).squeeze(-1))
    loss = negative.scatter(-1, index, patch.unsqueeze(-1))
    loss = torch.where(valid.unsqueeze(-1), loss, loss.new_zeros(()))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / positive.sum().clamp(min=1).to(total.dtype)


def _one_minus_exp_neg(d: Tensor, u: Tensor) -> Tensor:
    """``1 - exp(-d)`` for ``d >= 0`` given ``u = exp(-d)``, to full relative precision without ``expm1``
    (scalar on CPU): a 5-term series below 0.1 in float32 (relative error < 2e-8), ``expm1`` in float64."""
    if d.dtype == torch.float64:
        return -torch.expm1(-d)
    series = d * (1.0 - d / 2 * (1.0 - d / 3 * (1.0 - d / 4 * (1.0 - d / 5))))
    return torch.where(d < 0.1, series, 1.0 - u)


class _DirectionalFocalSum(torch.autograd.Function):
    """Sum of the focal loss on calibrated directional probabilities, from the cosines ``[N, C]``.

    Value and gradients (with respect to the cosines, ``w`` and ``b``) are computed in one chunked
    pass and kept for backward, instead of an autograd graph of ~40 ``[N, C]`` intermediates.
    With ``G_lp = dL/dlog p``, ``G_l1 = dL/dlog(1 - p)``, ``c = w (t + b)``, ``a = w (1 + b)``,
    ``d = w (1 - t)``:

        A = G_lp sigmoid(-c) - G_l1 sigmoid(c),   D = G_l1 / expm1(d)   (0 where d is floored)
        dL/dt = w (A - D),   dL/db = w (A - G_lp sigmoid(-a)),
        dL/dw = (t + b) A - (1 + b) sigmoid(-a) G_lp + (1 - t) D.
    """

    @staticmethod
    def forward(ctx, cos, scale, bias, labels, alpha, gamma, min_one_minus_cos):  # type: ignore[override]
        from fewsight.models.detector import chunk_rows

        work = compute_dtype(cos.dtype)
        n, num_classes = cos.shape
        w = scale.detach().to(work)
        b = bias.detach().to(work)
        a = w * (1.0 + b)
        log_sig_a = F.logsigmoid(a)
        sig_neg_a = torch.sigmoid(-a)
        neg_w = 1.0 if alpha is None else 1.0 - alpha
        pos_w = 1.0 if alpha is None else alpha
        grad_t = torch.empty((n, num_classes), dtype=work, device=cos.device)
        grad_w = torch.zeros(num_classes, dtype=work, device=cos.device)
        grad_b = torch.zeros(num_classes, dtype=work, device=cos.device)
        total = torch.zeros((), dtype=work, device=cos.device)
        step = chunk_rows(cos)
        for start in range(0, n, step):
            stop = min(start + step, n)
            t = cos[start:stop].detach().to(work).clamp(-1.0, 1.0)
            lab = labels[start:stop]
            c = (t + b) * w
            # logsigmoid / softplus / sigmoid(-c) from one sigmoid, one log and one exp: these
            # vectorise on CPU, unlike F.logsigmoid / F.softplus / log1p / expm1.
            log_sig_abs = (torch.sigmoid(c) - 0.5).abs_().add_(0.5).log_()  # log sigmoid(|c|) <= 0
            log_p = c.clamp(max=0.0).add_(log_sig_abs).sub_(log_sig_a).clamp_(max=0.0)
            softplus_c = c.clamp(min=0.0).sub_(log_sig_abs)
            sig_neg_c = torch.exp(-softplus_c)
            sig_c = 1.0 - sig_neg_c
            omt = 1.0 - t
            dist = omt.clamp(min=min_one_minus_cos).mul_(w)
            free = (omt > min_one_minus_cos) & (dist > _MIN_DISTANCE)  # where d is not floored
            dist.clamp_(min=_MIN_DISTANCE)
            u = torch.exp(-dist)
            omu = _one_minus_exp_neg(dist, u)  # log(1 - p) = log(1 - e^-d) - softplus(c)
            log_1mp = torch.log(omu).sub_(softplus_c)
            p_g = torch.exp(log_p * gamma) if gamma != 0.0 else torch.ones_like(log_p)
            g_l1 = p_g.mul_(-neg_w)  # dL/dlog(1-p) of a negative entry: -(1 - a) p^g
            loss = g_l1 * log_1mp  # -(1 - a) p^g log(1 - p)
            g_lp = loss * gamma  # dL/dlog p of a negative entry
            # The target entry of each positive anchor: -a (1 - p)^g log p.
            pos = lab >= 0
            col = lab.clamp(min=0).unsqueeze(1)
            lp_y = log_p.gather(1, col).squeeze(1)
            q_y = torch.exp(log_1mp.gather(1, col).squeeze(1) * gamma) if gamma != 0.0 else torch.ones_like(lp_y)
            loss_y = -pos_w * q_y * lp_y
            for target, value in ((loss, loss_y), (g_lp, -pos_w * q_y), (g_l1, loss_y * gamma)):
                target.scatter_(1, col, torch.where(pos, value, target.gather(1, col).squeeze(1)).unsqueeze(1))
            valid = (lab >= -1).to(work).unsqueeze(1)
            loss.mul_(valid)
            g_lp.mul_(valid)
            g_l1.mul_(valid)
            total = total + loss.sum()
            big_a = g_lp * sig_neg_c - g_l1 * sig_c
            big_d = g_l1.mul_(u).div_(omu).mul_(free)  # G_l1 / expm1(d)
            torch.mul(big_a - big_d, w, out=grad_t[start:stop])
            sum_a, sum_g, sum_d = big_a.sum(0), g_lp.sum(0), big_d.sum(0)
            grad_b += w * (sum_a - sig_neg_a * sum_g)
            grad_w += (t * big_a).sum(0) + b * sum_a - (1.0 + b) * sig_neg_a * sum_g + sum_d - (t * big_d).sum(0)
        ctx.save_for_backward(grad_t, grad_w, grad_b)
        ctx.dtypes = (cos.dtype, scale.dtype, bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_t, grad_w, grad_b = ctx.saved_tensors
        g = grad_out.to(grad_t.dtype)
        dt, dw, db = ctx.dtypes
        return (grad_t * g).to(dt), (grad_w * g).to(dw), (grad_b * g).to(db), None, None, None, None


def directional_focal_loss(
    embeddings: Tensor,
    directions: Tensor,
    scale: Tensor,
    bias: Tensor,
    labels: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    *,
    eps: float = 1e-8,
    min_one_minus_cos: float = MIN_ONE_MINUS_COS,
    normalized: bool = False,
    rivalry: Tensor | None = None,
) -> Tensor:
    """DLDENet classification loss: the focal loss on the calibrated probabilities of
    :func:`directional_log_probs`, i.e. ``focal_loss_from_log_probs(*directional_log_probs(...), labels)``,
    fused: the ``[N, C]`` cosines come from one matmul and value and gradients from one chunked pass.

    Args:
        embeddings: ``Tensor[..., D]`` (e.g. ``[B, A, D]``); directions: ``Tensor[C, D]``;
        scale, bias: ``Tensor[C]``; labels: ``Long[...]`` per embedding: class, ``BACKGROUND`` (-1)
        or ``IGNORE`` (-2). reduction: ``"mean"`` (sum / max(1, #positives)) or ``"sum"``.
        normalized: the embeddings are already unit vectors (e.g. an :class:`~fewsight.models.heads.EmbeddingHead`
            output): skip their normalisation, which on ``[B, A, 256]`` costs more than the loss itself.
            The gradient is the same after the head's own normalisation (its Jacobian is a projection).
        rivalry: optional ``Tensor[C]``: gated probabilities (:func:`rival_log_gate`); computed by the
            reference form (``focal_loss_from_log_probs(*directional_log_probs(...))``), not fused.

    Example:
        >>> e, d = torch.randn(1, 6, 4), torch.randn(3, 4)
        >>> w, b, y = torch.full((3,), 7.0), torch.full((3,), -0.5), torch.tensor([[0, 2, -1, -1, -2, 1]])
        >>> fused = directional_focal_loss(e, d, w, b, y)
        >>> bool(torch.allclose(fused, focal_loss_from_log_probs(*directional_log_probs(e, d, w, b), y)))
        True
    """
    alpha = _check_alpha_gamma(alpha, gamma)
    check_choice("reduction", reduction, ("mean", "sum"))
    check_floating("embeddings", embeddings)
    check_ndim("directions", directions, 2, "Tensor[C, D]")
    if embeddings.ndim < 1 or embeddings.shape[-1] != directions.shape[1]:
        raise ShapeError(
            f"embeddings: expected Tensor[..., {directions.shape[1]}] matching directions' D, got shape {tuple(embeddings.shape)}"
        )
    if labels.shape != embeddings.shape[:-1]:
        raise ShapeError(f"labels: expected shape {tuple(embeddings.shape[:-1])} (embeddings without D), got {tuple(labels.shape)}")
    num_classes = directions.shape[0]
    for name, t in (("scale", scale), ("bias", bias)):
        if t.shape != (num_classes,):
            raise ShapeError(f"{name}: expected Tensor[{num_classes}] (one per class), got shape {tuple(t.shape)}")
    check_labels("labels", labels, num_classes)
    labels = labels.to(device=embeddings.device, dtype=torch.long).reshape(-1)
    if num_classes == 0 or labels.numel() == 0:
        return zero_loss(embeddings, directions, scale, bias)
    if rivalry is not None:
        log_p, log_1mp = directional_log_probs(
            embeddings, directions, scale, bias, eps=eps, min_one_minus_cos=min_one_minus_cos, rivalry=rivalry
        )
        return focal_loss_from_log_probs(log_p, log_1mp, labels.reshape(embeddings.shape[:-1]), alpha, gamma, reduction)
    work = torch.float64 if torch.float64 in (embeddings.dtype, directions.dtype) else torch.float32
    with torch.autocast(embeddings.device.type, enabled=False):
        e = embeddings.reshape(-1, embeddings.shape[-1]).to(work)
        if not normalized:
            e = F.normalize(e, dim=-1, eps=eps)
        d = F.normalize(directions.to(work), dim=-1, eps=eps)
        cos = e @ d.transpose(0, 1)
        total = _DirectionalFocalSum.apply(cos, scale, bias, labels, alpha, float(gamma), float(min_one_minus_cos))
    if reduction == "sum":
        return total
    return total / (labels >= 0).sum().clamp(min=1).to(total.dtype)


def dispersion_loss(directions: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean positive part of the cosine between different class directions:
    ``sum_{i != j} max(cos(mu_i, mu_j), 0) / (C (C - 1))`` (0 with a graph for ``C < 2``).

    >>> dispersion_loss(torch.tensor([[1., 0.], [1., 1.], [-1., 0.]]))
    tensor(0.2357)
    """
    check_ndim("directions", directions, 2, "Tensor[C, D]")
    check_floating("directions", directions)
    c = directions.shape[0]
    if c < 2:
        return zero_loss(directions)
    d = F.normalize(directions.to(compute_dtype(directions.dtype)), dim=-1, eps=eps)
    cos = d @ d.transpose(0, 1)
    off = ~torch.eye(c, dtype=torch.bool, device=d.device)
    return torch.where(off, cos.clamp(min=0), cos.new_zeros(())).sum() / (c * (c - 1))


class DirectionalFocalLoss(nn.Module):
    """Module form of :func:`focal_loss_from_log_probs`: ``forward(log_p, log_1mp, labels)``.

    >>> lp = torch.full((1, 2, 3), -0.1)
    >>> DirectionalFocalLoss()(lp, torch.log1p(-lp.exp()), torch.tensor([[0, -1]])).shape
    torch.Size([])
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = _check_alpha_gamma(alpha, gamma)
        self.gamma = float(gamma)
        self.reduction = check_reduction(reduction)

    def forward(self, log_p: Tensor, log_1mp: Tensor, labels: Tensor) -> Tensor:
        return focal_loss_from_log_probs(log_p, log_1mp, labels, self.alpha, self.gamma, self.reduction)


class DispersionLoss(nn.Module):
    """Module form of :func:`dispersion_loss`: ``forward(directions)``.

    >>> DispersionLoss()(torch.eye(3))
    tensor(0.)
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, directions: Tensor) -> Tensor:
        return dispersion_loss(directions, self.eps)


def _all_reduce_sum_(t: Tensor) -> Tensor:
    # Every rank calls this at the same point of every training step (even without positives),
    # so the collective never deadlocks.
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _random_directions(num: int, dim: int) -> Tensor:
    return F.normalize(torch.randn(num, dim), dim=-1)


class DirectionalClassifier(nn.Module):
    """Class directions, scales ``w = softplus(raw_scale)`` and biases ``b``; ``forward(e) -> (log p, log(1-p))``.

    Args:
        num_classes: ``C`` (may be 0: classes can be added with :meth:`add_classes`).
        embedding_dim: ``D``.
        directions: ``"tracked"`` (buffer ``means``, updated without gradient) or ``"learned"``
            (parameter ``weight``, trained by gradient; a cosine classifier).
        init_scale: initial ``w`` (7); init_bias: initial ``b`` (-0.5).

    Buffer ``rivalry`` (``Tensor[C]``, zeros): per-class ``r`` of :func:`rival_log_gate`, set by enrollment.

    Initial directions: random unit vectors from torch's global RNG (seed it for reproducibility).
    ``w`` is ``softplus`` of a raw parameter, so it stays ``> 0`` whatever the optimiser does.

    Shapes:
        forward(``Tensor[..., D]``) -> two ``Tensor[..., C]`` (see :func:`directional_log_probs`).

    Example:
        >>> clf = DirectionalClassifier(3, 8)
        >>> lp, l1mp = clf(torch.randn(2, 5, 8))
        >>> lp.shape, bool((lp <= 0).all())
        (torch.Size([2, 5, 3]), True)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int = 256,
        *,
        directions: str = "tracked",
        init_scale: float = 7.0,
        init_bias: float = -0.5,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise InvalidArgumentError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise InvalidArgumentError(f"embedding_dim: expected an int >= 1, got {embedding_dim!r}")
        check_choice("directions", directions, DIRECTIONS)
        if not float(init_scale) > 0:
            raise InvalidArgumentError(f"init_scale: expected a float > 0, got {init_scale!r}")
        self.embedding_dim = embedding_dim
        self.mode = directions
        self.init_scale = float(init_scale)
        self.init_bias = float(init_bias)
        init = _random_directions(num_classes, embedding_dim)
        if directions == "tracked":
            self.register_buffer("means", init)
            self.register_buffer("mean_sums", torch.zeros(num_classes, embedding_dim))
            self.register_buffer("mean_counts", torch.zeros(num_classes))
        else:
            self.weight = nn.Parameter(init)
        self.raw_scale = nn.Parameter(torch.full((num_classes,), _softplus_inverse(self.init_scale)))
        self.bias = nn.Parameter(torch.full((num_classes,), self.init_bias))
        self.register_buffer("rivalry", torch.zeros(num_classes))

    @property
    def num_classes(self) -> int:
        return self.raw_scale.shape[0]

    @property
    def scale(self) -> Tensor:
        """``Tensor[C]`` ``w = softplus(raw_scale) >= 0``."""
        return F.softplus(self.raw_scale)

    def directions(self) -> Tensor:
        """``Tensor[C, D]`` the class directions (means, or the learned weight), as stored."""
        return self.means if self.mode == "tracked" else self.weight

    def active_rivalry(self) -> Tensor | None:
        """The ``rivalry`` buffer, or ``None`` when every entry is 0 (nothing to adjust)."""
        return self.rivalry if bool((self.rivalry != 0).any()) else None

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        return directional_log_probs(embeddings, self.directions(), self.scale, self.bias, rivalry=self.active_rivalry())

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """``Tensor[..., C]`` calibrated probabilities ``p`` in ``[0, 1]`` (see :func:`directional_probabilities`)."""
        return directional_probabilities(
            embeddings, self.directions(), self.scale, self.bias, rivalry=self.active_rivalry()
        )

    # --- tracked means ---

    def _check_tracked(self, what: str) -> None:
        if self.mode != "tracked":
            raise InvalidArgumentError(f"directions: expected 'tracked' for {what}, got {self.mode!r}")

    def _class_sums(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        sums = self.means.new_zeros(self.means.shape).index_add_(0, labels, embeddings.to(self.means.dtype))
        counts = torch.bincount(labels, minlength=self.num_classes).to(self.means.dtype)
        return sums, counts

    @torch.no_grad()
    def update_means_ema(self, embeddings: Tensor, labels: Tensor, lr: float = 0.1) -> None:
        """One EMA step per class present in the batch (out of place, no gradient, all-reduced under DDP):
        ``mu_c <- normalize((1 - lr) mu_c + lr normalize(sum_{i: y_i = c} e_i))``; other classes keep ``mu_c``.

        Args: embeddings ``Tensor[P, D]``, labels ``Long[P]`` in ``[0, C)`` (``< 0`` ignored).
        """
        self._check_tracked("update_means_ema")
        known = labels >= 0
        sums, counts = self._class_sums(embeddings[known], labels[known])
        packed = _all_reduce_sum_(torch.cat((sums, counts.unsqueeze(1)), dim=1))
        sums, counts = packed[:, :-1], packed[:, -1]
        self.means = self._blend(sums, counts, lr)

    @torch.no_grad()
    def accumulate(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add embeddings to the per-class sums (``"manual"`` mode); :meth:`update_means` uses them."""
        self._check_tracked("accumulate")
        known = labels >= 0
        sums, counts = self._class_sums(embeddings[known], labels[known])
        self.mean_sums = self.mean_sums + sums
        self.mean_counts = self.mean_counts + counts

    @torch.no_grad()
    def update_means(self, lr: float = 1.0) -> None:
        """Set each class's mean from the accumulated sums, then clear them (all-reduced under DDP):
        ``mu_c <- normalize((1 - lr) mu_c + lr normalize(sums_c))`` (``lr = 1``: the epoch's mean
        direction). A class without sums keeps its mean."""
        self._check_tracked("update_means")
        packed = _all_reduce_sum_(torch.cat((self.mean_sums, self.mean_counts.unsqueeze(1)), dim=1))
        self.means = self._blend(packed[:, :-1], packed[:, -1], lr)
        self.mean_sums = torch.zeros_like(self.mean_sums)
        self.mean_counts = torch.zeros_like(self.mean_counts)

    def _blend(self, sums: Tensor, counts: Tensor, lr: float) -> Tensor:
        norm = torch.linalg.vector_norm(sums, dim=1, keepdim=True)
        # A class is updated only with a usable direction (some embeddings, not cancelling out).
        present = (counts > 0).unsqueeze(1) & (norm > 1e-12)
        batch_mean = sums / norm.clamp(min=1e-12)
        blended = F.normalize((1.0 - lr) * self.means + lr * batch_mean, dim=1, eps=1e-12)
        # (1 - lr) mu + lr m can vanish only if m = -mu and lr = 0.5: keep mu then.
        ok = present & (torch.linalg.vector_norm((1.0 - lr) * self.means + lr * batch_mean, dim=1, keepdim=True) > 1e-12)
        return torch.where(ok, blended, self.means)

    # --- growing ---

    def add_classes(
        self, directions: Tensor, scale: float | None = None, bias: float | None = None, rivalry: float = 0.0
    ) -> None:
        """Append ``Tensor[N, D]`` directions (normalised) with default ``w``, ``b`` (and ``rivalry``,
        default 0). Parameters are replaced by larger ones: build the optimiser after adding classes."""
        if not float(rivalry) >= 0:
            raise InvalidArgumentError(f"rivalry: expected a float >= 0, got {rivalry!r}")
        check_ndim("directions", directions, 2, f"Tensor[N, {self.embedding_dim}]")
        if directions.shape[1] != self.embedding_dim:
            raise ShapeError(f"directions: expected Tensor[N, {self.embedding_dim}], got shape {tuple(directions.shape)}")
        ref = self.raw_scale
        n = directions.shape[0]
        new_dirs = F.normalize(directions.detach().to(device=ref.device, dtype=self.directions().dtype), dim=1, eps=1e-12)
        raw = _softplus_inverse(self.init_scale if scale is None else float(scale))
        b = self.init_bias if bias is None else float(bias)
        self._grow(
            new_dirs,
            torch.full((n,), raw, dtype=ref.dtype, device=ref.device),
            torch.full((n,), b, dtype=self.bias.dtype, device=ref.device),
            float(rivalry),
        )

    def _grow(self, dirs: Tensor, raw: Tensor, bias: Tensor, rivalry: float = 0.0) -> None:
        with torch.no_grad():
            if self.mode == "tracked":
                self.means = torch.cat((self.means, dirs))
                self.mean_sums = torch.cat((self.mean_sums, self.mean_sums.new_zeros(dirs.shape)))
                self.mean_counts = torch.cat((self.mean_counts, self.mean_counts.new_zeros(dirs.shape[0])))
            else:
                self.weight = nn.Parameter(torch.cat((self.weight.detach(), dirs)), self.weight.requires_grad)
            self.raw_scale = nn.Parameter(torch.cat((self.raw_scale.detach(), raw)), self.raw_scale.requires_grad)
            self.bias = nn.Parameter(torch.cat((self.bias.detach(), bias)), self.bias.requires_grad)
            self.rivalry = torch.cat((self.rivalry, self.rivalry.new_full(bias.shape, rivalry)))

    def _resize(self, num_classes: int) -> None:
        c = self.num_classes
        if num_classes > c:
            ref = self.raw_scale
            n = num_classes - c
            self._grow(
                _random_directions(n, self.embedding_dim).to(device=ref.device, dtype=self.directions().dtype),
                torch.full((n,), _softplus_inverse(self.init_scale), dtype=ref.dtype, device=ref.device),
                torch.full((n,), self.init_bias, dtype=self.bias.dtype, device=ref.device),
            )
        elif num_classes < c:
            with torch.no_grad():
                if self.mode == "tracked":
                    self.means = self.means[:num_classes].clone()
                    self.mean_sums = self.mean_sums[:num_classes].clone()
                    self.mean_counts = self.mean_counts[:num_classes].clone()
                else:
                    self.weight = nn.Parameter(self.weight.detach()[:num_classes].clone(), self.weight.requires_grad)
                self.raw_scale = nn.Parameter(self.raw_scale.detach()[:num_classes].clone(), self.raw_scale.requires_grad)
                self.bias = nn.Parameter(self.bias.detach()[:num_classes].clone(), self.bias.requires_grad)
                self.rivalry = self.rivalry[:num_classes].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # A checkpoint may hold more (enrolled) or fewer classes than this module: resize first.
        raw = state_dict.get(prefix + "raw_scale")
        if isinstance(raw, Tensor) and raw.ndim == 1 and raw.shape[0] != self.num_classes:
            self._resize(int(raw.shape[0]))
        if isinstance(raw, Tensor) and raw.ndim == 1 and prefix + "rivalry" not in state_dict:
            # Files written before rivalry existed: no class has any.
            state_dict[prefix + "rivalry"] = raw.new_zeros(raw.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, directions={self.mode!r}"


class DLDENet(DenseDetector):
    """DLDENet detector: RetinaNet with a directional-embedding classification head (SPEC §4).

    Args (besides those of :class:`~fewsight.models.RetinaNet`, same meaning and defaults):
        num_classes: initial classes ``C`` (0 allowed: enroll every class later).
        embedding_dim: ``D`` (256).
        directions: ``"tracked"`` (means buffer, default) or ``"learned"`` (cosine classifier).
        means_update: ``"batch"`` (EMA with ``means_lr`` once per class per training batch),
            ``"manual"`` (accumulate; call :meth:`update_means` at epoch end) or ``"none"``.
        means_lr: EMA rate (0.1).
        init_scale, init_bias: initial ``w`` (7) and ``b`` (-0.5) of every class, enrolled ones too.
        ccs_iou_weighted: weight each positive's CCS term by its IoU (soft CCS).
        loss_weights: overrides of ``{"classification": 1, "box_regression": 1, "ccs": 1, "dispersion": 0}``;
            ``"dispersion"`` needs ``directions="learned"``. Returned losses are weighted; the
            dispersion term is returned only when its weight is > 0.
        head: module returning ``{"embeddings": [B, A, D], "bbox_regression": [B, A, 4]}``
            (default :class:`~fewsight.models.heads.DLDENetHead` with ``head_convs`` convs). The loss
            normalises the embeddings unless the head has ``normalized_embeddings = True``.
        head_norm: ``"group"`` by default (GroupNorm in the towers; ``None`` for the paper's plain
            RetinaNet towers): without it, ReLU features with a large common component make every
            anchor's initial embedding point the same way, and the tracked means chase that cluster
            for many more steps before classes separate.

    Means updates happen inside :meth:`compute_loss` when the module is in training mode, under
    ``no_grad``, out of place, from the positive anchors of the loss's own matching.

    Class names, directions, ``w`` and ``b`` travel in the ``state_dict``; loading a checkpoint with a
    different number of classes resizes the model.
    """

    default_loss_weights = {"classification": 1.0, "box_regression": 1.0, "ccs": 1.0, "dispersion": 0.0}

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str | nn.Module = "resnet18",
        weights: Any = None,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        fpn_channels: int = 256,
        frozen_bn: bool = False,
        trainable_layers: int | None = None,
        p6_from: str = "p5",
        anchor_generator: AnchorGenerator | None = None,
        coder: BoxCoder | None = None,
        object_threshold: float = 0.5,
        background_threshold: float = 0.4,
        low_quality: bool = True,
        embedding_dim: int = 256,
        directions: str = "tracked",
        means_update: str = "batch",
        means_lr: float = 0.1,
        init_scale: float = 7.0,
        init_bias: float = -0.5,
        head: nn.Module | None = None,
        head_convs: int = 4,
        head_norm: NormSpec = "group",
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        ccs_iou_weighted: bool = True,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        loss_weights: Mapping[str, float] | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        size_divisible: int = 1,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        score_threshold: float = 0.05,
        topk_per_level: int = 1000,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            backbone=backbone, weights=weights, levels=levels, fpn_channels=fpn_channels, frozen_bn=frozen_bn,
            trainable_layers=trainable_layers, p6_from=p6_from, anchor_generator=anchor_generator, coder=coder,
            object_threshold=object_threshold, background_threshold=background_threshold, low_quality=low_quality,
            min_size=min_size, max_size=max_size, image_size=image_size, size_divisible=size_divisible,
            image_mean=image_mean, image_std=image_std, score_threshold=score_threshold,
            topk_per_level=topk_per_level, nms_threshold=nms_threshold, detections_per_image=detections_per_image,
            box_loss=box_loss, smooth_l1_beta=smooth_l1_beta, loss_weights=loss_weights, class_names=class_names,
            min_classes=0,
        )
        check_choice("directions", directions, DIRECTIONS)
        check_choice("means_update", means_update, MEANS_UPDATES)
        if isinstance(means_lr, bool) or not isinstance(means_lr, (int, float)) or not 0.0 < means_lr <= 1.0:
            raise InvalidArgumentError(f"means_lr: expected a float in (0, 1], got {means_lr!r}")
        if directions != "learned" and self.loss_weights["dispersion"] > 0:
            raise InvalidArgumentError(
                f"loss_weights['dispersion']: expected 0 with directions={directions!r} (only 'learned' directions "
                f"move by gradient), got {self.loss_weights['dispersion']}"
            )
        self.directions = directions
        self.means_update = means_update
        self.means_lr = float(means_lr)
        self.focal_alpha = _check_alpha_gamma(focal_alpha, focal_gamma)
        self.focal_gamma = float(focal_gamma)
        self.ccs_iou_weighted = bool(ccs_iou_weighted)
        self.classifier = DirectionalClassifier(
            num_classes, embedding_dim, directions=directions, init_scale=init_scale, init_bias=init_bias
        )
        k = self.anchor_generator.num_anchors_per_location
        if head is None:
            head = DLDENetHead(self.in_channels, k, embedding_dim, num_convs=head_convs, norm=head_norm)
        elif not isinstance(head, nn.Module):
            raise InvalidArgumentError(f"head: expected an nn.Module or None, got {type(head).__name__}")
        self.head = head
        self._check_head(k)
        self.embedding_dim = embedding_dim
        self.register_load_state_dict_post_hook(DLDENet._check_after_load)

    # --- classes ---

    @property
    def num_classes(self) -> int:
        # During __init__ (before the classifier exists) the names are the truth.
        clf = self._modules.get("classifier")
        return len(self.classes) if clf is None else clf.num_classes

    def _check_loaded_classes(self, names: list[str]) -> None:
        pass  # the classifier is resized after the names are set; checked in _check_after_load

    @staticmethod
    def _check_after_load(module: DLDENet, incompatible_keys: Any) -> None:
        if len(module.classes) != module.classifier.num_classes:
            raise CheckpointError(
                f"state_dict: expected as many class names as class directions ({module.classifier.num_classes}), "
                f"got {len(module.classes)} names"
            )

    # --- losses ---

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Weighted ``{"classification", "box_regression", "ccs"[, "dispersion"]}`` from head outputs,
        ``Tensor[A, 4]`` anchors and targets in network coordinates. One batched match; in training
        mode it also updates the tracked means from the same positives."""
        embeddings = head_outputs["embeddings"]
        deltas = head_outputs["bbox_regression"]
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.classifier.embedding_dim:
            raise ShapeError(
                f"head_outputs['embeddings']: expected Tensor[B, A, {self.classifier.embedding_dim}], "
                f"got shape {tuple(embeddings.shape)}"
            )
        padded = self._padded(targets, head_outputs)
        assignment = self.assign(anchors, padded)
        clf = self.classifier
        cls = directional_focal_loss(
            embeddings, clf.directions(), clf.scale, clf.bias, assignment.labels, self.focal_alpha, self.focal_gamma,
            normalized=bool(getattr(self.head, "normalized_embeddings", False)), rivalry=clf.active_rivalry(),
        )
        num_pos = assignment.positive.sum().clamp(min=1)
        box = self._box_term(deltas, anchors, padded, assignment)
        image, anchor = assignment.positive.nonzero(as_tuple=True)
        pos_embeddings = embeddings[image, anchor]
        pos_labels = assignment.labels[image, anchor]
        ccs = ccs_loss(
            pos_embeddings,
            self.classifier.directions(),
            pos_labels,
            assignment.iou[image, anchor].detach().float() if self.ccs_iou_weighted else None,
            reduction="sum",
        )
        losses = {
            "classification": cls * self.loss_weights["classification"],
            "box_regression": box / num_pos.to(box.dtype) * self.loss_weights["box_regression"],
            "ccs": ccs / num_pos.to(ccs.dtype) * self.loss_weights["ccs"],
        }
        if self.directions == "learned" and self.loss_weights["dispersion"] > 0:
            losses["dispersion"] = dispersion_loss(self.classifier.weight) * self.loss_weights["dispersion"]
        if self.training and self.directions == "tracked":
            # After the loss graph is built: the update replaces the buffer, the graph keeps the old one.
            if self.means_update == "batch":
                self.classifier.update_means_ema(pos_embeddings.detach(), pos_labels, self.means_lr)
            elif self.means_update == "manual":
                self.classifier.accumulate(pos_embeddings.detach(), pos_labels)
        return losses

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return self.classifier.probabilities(head_outputs["embeddings"].detach())

    def update_means(self, lr: float = 1.0) -> None:
        """``"manual"`` mode: set the class means from the sums accumulated since the last call (see
        :meth:`DirectionalClassifier.update_means`). Call it on every rank at the end of each epoch."""
        self.classifier.update_means(lr)

    # --- enrollment ---

    def _matched_embeddings(
        self, images: Tensor | Sequence[Tensor], targets: Any, num_labels: int, batch_size: int | None,
        background: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """Eval-mode forward over chunks of ``images``; yields per chunk the float32 embeddings
        ``Tensor[P, D]`` of the positive anchors (this model's matching), their labels ``Long[P]``, the
        global index ``Long[P]`` of the box each matched (boxes numbered image by image, in order) and,
        with ``background``, the embeddings ``Tensor[N, D]`` of the background anchors (else ``None``)."""
        num_images = images.shape[0] if isinstance(images, Tensor) else len(images)
        if len(targets) != num_images:
            raise ShapeError(f"targets: expected {num_images} entries (one per image), got {len(targets)}")
        step = max(num_images, 1) if batch_size is None else batch_size
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InvalidArgumentError(f"batch_size: expected None or an int >= 1, got {batch_size!r}")
        was_training = self.training
        self.eval()
        offset = 0
        try:
            for start in range(0, num_images, step):  # chunks of images, not single images
                chunk = targets[start : start + step]
                out = self.forward_head(images[start : start + step])
                padded = prepare_targets(
                    chunk, out.batch.tensor.shape[0], scales=out.batch.scales, num_classes=num_labels,
                    device=out.batch.tensor.device,
                )
                assignment = self.assign(out.anchors, padded)
                image, anchor = assignment.positive.nonzero(as_tuple=True)
                if isinstance(chunk, Tensor):  # padded Tensor[B, M, 5]: boxes numbered by row
                    counts = torch.full((chunk.shape[0],), chunk.shape[1], device=image.device)
                else:
                    counts = torch.tensor([len(t["boxes"]) for t in chunk], device=image.device, dtype=torch.long)
                first_box = torch.cumsum(counts, 0) - counts + offset
                offset += int(counts.sum())
                yield (
                    out.outputs["embeddings"][image, anchor].float(),
                    assignment.labels[image, anchor],
                    first_box[image] + assignment.matched[image, anchor],
                    out.outputs["embeddings"][assignment.labels == BACKGROUND].float() if background else None,
                )
        finally:
            self.train(was_training)

    @torch.no_grad()
    def embed_boxes(
        self, images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor], *, batch_size: int | None = None
    ) -> list[Tensor]:
        """The embedding of each given box: the normalised mean embedding of the anchors this model
        matches to it (the anchors :meth:`enroll` and training would use), for retrieval galleries and queries.

        Args:
            images: ``Tensor[B, 3, H, W]`` or a list of ``Tensor[3, H_i, W_i]`` floats in ``[0, 1]``.
            boxes: one ``Tensor[N_i, 4]`` (xyxy, input-image pixels) per image.
            batch_size: images per forward pass (default: all at once).

        Returns:
            One ``Tensor[N_i, D]`` float32 per image; a box that matches no anchor (degenerate, or outside
            the image) gets a zero row, whose cosine with anything is 0.

        Example:
            >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=32, embedding_dim=16)
            >>> [e.shape for e in model.embed_boxes(torch.rand(2, 3, 96, 96), [torch.tensor([[10., 10., 60., 50.]]), torch.zeros(0, 4)])]
            [torch.Size([1, 16]), torch.Size([0, 16])]
        """
        if len(boxes) != (images.shape[0] if isinstance(images, Tensor) else len(images)):
            raise ShapeError(f"boxes: expected one Tensor[N_i, 4] per image, got {len(boxes)} for {len(images)} images")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.ndim != 2 or b.shape[1] != 4:
                raise ShapeError(f"boxes[{i}]: expected Tensor[N, 4], got {getattr(b, 'shape', type(b).__name__)}")
        sizes = [int(b.shape[0]) for b in boxes]
        targets = [{"boxes": b, "labels": torch.zeros(n, dtype=torch.long, device=b.device)} for b, n in zip(boxes, sizes)]
        sums = torch.zeros(sum(sizes), self.classifier.embedding_dim, device=self.classifier.raw_scale.device)
        for emb, _, box, _ in self._matched_embeddings(images, targets, 1, batch_size):
            sums.index_add_(0, box, emb)
        return list(F.normalize(sums, dim=1, eps=1e-12).split(sizes))


    @torch.no_grad()
    def _calibrated_bias(self, images: Any, targets: Any, directions: Tensor, batch_size: int | None) -> Tensor:
        """``Tensor[n]`` biases ``b = -(mean positive cos + q_99.9 background cos) / 2`` of new directions."""
        n = directions.shape[0]
        pos_sum = torch.zeros(n, device=directions.device)
        pos_count = torch.zeros(n, device=directions.device)
        background = []

        def new_cos(emb: Tensor) -> Tensor:  # Tensor[P, n]: cosines with the new directions
            return F.normalize(emb, dim=1, eps=1e-12) @ directions.T

        for emb, lab, _, bg in self._matched_embeddings(images, targets, n, batch_size, background=True):
            cos = new_cos(emb).gather(1, lab[:, None]).squeeze(1)
            pos_sum.index_add_(0, lab, cos)
            pos_count.index_add_(0, lab, torch.ones_like(cos))
            background.append(new_cos(bg))
        bg_cos = torch.cat(background) if background else directions.new_zeros(0, n)
        if bg_cos.shape[0]:  # kthvalue, not quantile: quantile refuses inputs above 2^24 elements
            q = bg_cos.kthvalue(max(1, math.ceil(0.999 * bg_cos.shape[0])), dim=0).values
        else:
            q = directions.new_full((n,), -1.0)
        return -(pos_sum / pos_count.clamp(min=1) + q) / 2

    @torch.no_grad()
    def enroll(
        self,
        images: Tensor | Sequence[Tensor],
        targets: Any,
        names: Sequence[str],
        *,
        batch_size: int | None = None,
        calibrate: bool = False,
        rivalry: float = 0.0,
    ) -> list[int]:
        """Add classes from a few boxed examples, without gradient steps.

        The direction of new class ``names[j]`` is the normalised mean of the embeddings of the
        anchors matched (same thresholds and low-quality rule as training) to the boxes labelled ``j``
        in ``targets``; its ``w`` and ``b`` are the defaults. The model runs in eval mode (BatchNorm
        statistics untouched); its mode is restored afterwards.

        Args:
            images: the support images (``Tensor[B, 3, H, W]`` or a list), floats in ``[0, 1]``.
            targets: one per image, labels index ``names`` (``< 0``: ignored).
            names: the new class names (unique, not already in :attr:`classes`).
            batch_size: process the support set in chunks of this many images (default: at once).
            calibrate: instead of the default ``b``, set each new class's bias from the support images
                (:meth:`_calibrated_bias`): its threshold ``-b`` halfway between the mean cosine of its
                positive anchors and the 99.9th percentile over the support images' background anchors,
                so a direction that lies near background cannot flood every image with detections.
            rivalry: ``r >= 0`` of the new classes: multiply their probability by
                ``sigmoid(r (cos - best cos of a trained class))`` (:func:`rival_log_gate`; ``0``: no gate).
                A network trained on few classes embeds a new class near mixtures of them, whose objects
                the plain probability then ranks high for the new class; ``r = 5`` lifts 5-shot novel AP50
                on digits from 0.54 to 0.69 (docs/results.md).

        Returns:
            The indices of the new classes.

        Raises:
            InvalidArgumentError: duplicate names, or a name with no matched anchor. LabelError: a
            label ``>= len(names)``.
        """
        names = list(names)
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentError(f"names: expected a non-empty list of str, got {names!r}")
        clash = sorted(set(names) & set(self.classes)) + sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise InvalidArgumentError(f"names: expected new, unique class names, got duplicates {clash}")
        n = len(names)
        device = self.classifier.raw_scale.device
        sums = torch.zeros(n, self.classifier.embedding_dim, device=device)
        counts = torch.zeros(n, dtype=torch.long, device=device)
        for emb, lab, _, _ in self._matched_embeddings(images, targets, n, batch_size):
            sums.index_add_(0, lab, emb)
            counts += torch.bincount(lab, minlength=n)
        missing = [names[i] for i in (counts == 0).nonzero().flatten().tolist()]
        if missing:
            raise InvalidArgumentError(
                f"targets: expected at least one box matching an anchor for every new class, got none for {missing} "
                "(labels index `names`)"
            )
        if not float(rivalry) >= 0:
            raise InvalidArgumentError(f"rivalry: expected a float >= 0, got {rivalry!r}")
        bias = None
        if calibrate:
            bias = self._calibrated_bias(images, targets, F.normalize(sums, dim=1, eps=1e-12), batch_size)
        first = self.num_classes
        self.classifier.add_classes(sums, rivalry=float(rivalry))
        if bias is not None:
            with torch.no_grad():
                self.classifier.bias[first:] = bias.to(self.classifier.bias)
        self.classes.extend(names)
        return list(range(first, first + n))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", directions={self.directions!r}, means_update={self.means_update!r}"
