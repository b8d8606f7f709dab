"""Directional classification losses: calibrated probabilities of an embedding against class directions.

An embedding ``e`` (``Tensor[..., D]``) is scored against class directions ``mu`` (``Tensor[C, D]``) with
a per-class scale ``w > 0`` and bias ``b``:

    p_c(e) = sigmoid(w_c (cos(e, mu_c) + b_c)) / sigmoid(w_c (1 + b_c))          (so p in [0, 1], p(cos=1) = 1)

computed in log space (never the log of a clamped probability):

    log p       = logsigmoid(w (cos + b)) - logsigmoid(w (1 + b))
    log (1 - p) = log1mexp(-w (1 - cos)) - softplus(w (cos + b))

The second line is exact algebra (``1 - p = (sigma(a) - sigma(c)) / sigma(a)`` with ``a - c = w (1 - cos)``);
it keeps full precision when ``p`` is close to 1, where ``log1p(-exp(log p))`` would cancel.

* :func:`directional_log_probs` / :func:`directional_probabilities` -- the scores (training / inference).
* :func:`focal_loss_from_log_probs` -- the focal loss (Lin et al. 2017) from explicit ``log p`` and
  ``log(1 - p)`` (module :class:`DirectionalFocalLoss`).
* :func:`directional_focal_loss` -- ``focal_loss_from_log_probs(*directional_log_probs(...))`` with value
  and gradients from one chunked pass, for training.
* :func:`dispersion_loss` -- mean positive cosine between different class directions (module
  :class:`DispersionLoss`), pushing learned directions apart.
* :func:`rival_log_gate` -- an optional per-class gate ``p'_c = p_c sigmoid(r_c (cos_c - max_{j: r_j = 0} cos_j))``
  (a soft form of Lowe's ratio test, 2004): a class with ``r_c > 0`` scores high only where the embedding
  is closer to its direction than to every class with ``r = 0``. A network trained on few classes embeds
  a new class near mixtures of them; the gate keeps those classes' objects from ranking high for it.

Half-precision inputs are computed in float32; every function follows its inputs' device.

Example:
    >>> e, mu = torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[1., 0.]])
    >>> lp, l1mp = directional_log_probs(e, mu, torch.tensor([7.]), torch.tensor([-0.5]))
    >>> lp.exp().squeeze(1)
    tensor([1.0000, 0.0302])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import ShapeError, check_choice, check_finite, check_floating, check_labels, check_ndim
from fewsight.geometry.matching import BACKGROUND
from fewsight.losses._common import check_reduction, compute_dtype, normalize, zero_loss
from fewsight.losses.focal import _FUSED_CPU_CHUNK, _chunk_rows, check_focal_options

__all__ = [
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

#: Floor of ``1 - cos`` in ``log(1 - p)``: a float32 cosine cannot resolve closer to 1, and the floor
#: bounds ``-log(1 - p)`` and its gradient when an embedding sits on another class's direction.
MIN_ONE_MINUS_COS = 1e-6
_MIN_DISTANCE = 1e-12  # floor of w (1 - cos) when w itself underflows to 0
_LN2 = math.log(2.0)


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
    no rival the gate is 1. ``p'_c = p_c * g_c`` (see the module docstring).

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


def _check_directional_args(embeddings: Tensor, directions: Tensor, scale: Tensor, bias: Tensor) -> None:
    """Dtypes, shapes (``Tensor[..., D]``, ``Tensor[C, D]``, ``Tensor[C]`` x 2) and finiteness of the inputs."""
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
    for name, t in (("embeddings", embeddings), ("directions", directions), ("scale", scale), ("bias", bias)):
        check_finite(name, t)


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
    """``log p`` and ``log(1 - p)`` of the calibrated directional probability.

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
    _check_directional_args(embeddings, directions, scale, bias)
    work = torch.float64 if torch.float64 in (embeddings.dtype, directions.dtype) else torch.float32
    with torch.autocast(embeddings.device.type, enabled=False):
        e = normalize(embeddings.to(work), eps)
        d = normalize(directions.to(work), eps)
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
    when nothing is differentiated); the same values as ``directional_log_probs(...)[0].exp()`` while
    ``sigmoid(w (1 + b))`` is a normal float (``w (1 + b) > -87`` in float32: always for ``b >= -1``).
    Beyond that use ``directional_log_probs(...)[0].exp()``.

    >>> directional_probabilities(torch.tensor([[1., 0.]]), torch.eye(2), torch.full((2,), 7.), torch.full((2,), -.5))
    tensor([[1.0000, 0.0302]])
    """
    _check_directional_args(embeddings, directions, scale, bias)
    work = torch.float64 if torch.float64 in (embeddings.dtype, directions.dtype) else torch.float32
    with torch.autocast(embeddings.device.type, enabled=False):
        e = normalize(embeddings.to(work), eps)
        d = normalize(directions.to(work), eps)
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
    alpha = check_focal_options(alpha, gamma)
    gamma = float(gamma)
    check_reduction(reduction)
    check_floating("log_p", log_p)
    check_finite("log_p", log_p)
    check_finite("log_1mp", log_1mp)
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
    pass and kept for backward, instead of an autograd graph holding dozens of ``[N, C]`` intermediates.
    With ``G_lp = dL/dlog p``, ``G_l1 = dL/dlog(1 - p)``, ``c = w (t + b)``, ``a = w (1 + b)``,
    ``d = w (1 - t)``:

        A = G_lp sigmoid(-c) - G_l1 sigmoid(c),   D = G_l1 / expm1(d)   (0 where d is floored)
        dL/dt = w (A - D),   dL/db = w (A - G_lp sigmoid(-a)),
        dL/dw = (t + b) A - (1 + b) sigmoid(-a) G_lp + (1 - t) D.
    """

    @staticmethod
    def forward(ctx, cos, scale, bias, labels, alpha, gamma, min_one_minus_cos):  # type: ignore[override]
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
        step = _chunk_rows(cos, _FUSED_CPU_CHUNK)
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
    """Directional classification loss (DLDENet's): the focal loss on the calibrated probabilities of
    :func:`directional_log_probs`, i.e. ``focal_loss_from_log_probs(*directional_log_probs(...), labels)``,
    fused: the ``[N, C]`` cosines come from one matmul and value and gradients from one chunked pass.

    Args:
        embeddings: ``Tensor[..., D]`` (e.g. ``[B, A, D]``); directions: ``Tensor[C, D]``;
        scale, bias: ``Tensor[C]``; labels: ``Long[...]`` per embedding: class, ``BACKGROUND`` (-1)
        or ``IGNORE`` (-2). reduction: ``"mean"`` (sum / max(1, #positives)) or ``"sum"``.
        normalized: the embeddings are already unit vectors (e.g. an :class:`~fewsight.models.heads.EmbeddingHead`
            output): skip their normalisation, a full pass over the ``[B, A, D]`` embeddings.
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
    alpha = check_focal_options(alpha, gamma)
    check_choice("reduction", reduction, ("mean", "sum"))
    _check_directional_args(embeddings, directions, scale, bias)
    if labels.shape != embeddings.shape[:-1]:
        raise ShapeError(f"labels: expected shape {tuple(embeddings.shape[:-1])} (embeddings without D), got {tuple(labels.shape)}")
    num_classes = directions.shape[0]
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
            e = normalize(e, eps)
        d = normalize(directions.to(work), eps)
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
    check_finite("directions", directions)
    c = directions.shape[0]
    if c < 2:
        return zero_loss(directions)
    d = normalize(directions.to(compute_dtype(directions.dtype)), eps)
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
        self.alpha = check_focal_options(alpha, gamma)
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
