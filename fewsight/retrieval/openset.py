"""Open-set rejection metrics: how well unknown objects are told apart from known ones.

Scores follow the "known-ness" convention: **higher = more likely a known class** (e.g. the best
cosine similarity to a class direction). Known objects are the positive class.

    AUROC        = P(s_known > s_unknown) + ½ P(s_known = s_unknown)     (Mann & Whitney 1947; Hanley &
                                                                          McNeil 1982, Radiology)
    FPR@TPR=95%  = #{unknown: s ≥ t} / M,   t = the ⌈0.95·N⌉-th highest known score
                                                                         (Hendrycks & Gimpel 2017, ICLR)

Threshold convention of :func:`fpr_at_tpr`: an object is accepted as known when ``score >= t``;
``t`` is the highest threshold that accepts at least ``tpr`` of the known objects (the first point
of the ROC curve with TPR ≥ ``tpr``, no interpolation); unknowns tied with ``t`` count as accepted
(false positives). This equals ``sklearn.metrics.roc_curve`` read at its first TPR ≥ ``tpr`` and
pytorch-ood's ``FPRAtTPR`` when knowns are passed as its positive ("OOD", label < 0) class with the
known-ness scores as its outlier scores (pytorch-ood's own positives are the OOD samples, so its
``FPR95TPR`` on ``-scores`` is a different quantity: the fraction of *knowns* rejected when 95% of
the unknowns are). AUROC is symmetric: ``auroc(k, u)`` equals pytorch-ood's AUROC on outlier
scores ``-s`` with unknowns labelled ``< 0``.

Both are O((N + M) log(N + M)) (a sort and binary searches, no N x M matrix) and exact in the
presence of ties; counts are int64. No known or no unknown score: ``nan`` (undefined).

Example:
    >>> import torch
    >>> known = torch.tensor([0.9, 0.8, 0.7, 0.4])
    >>> unknown = torch.tensor([0.5, 0.3, 0.7])
    >>> auroc(known, unknown)
    0.7916666666666666
    >>> fpr_at_tpr(known, unknown, tpr=0.75)
    0.3333333333333333
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewsight.errors import DTypeError, InvalidArgumentError, check_ndim

__all__ = ["auroc", "fpr_at_tpr"]


def _check_scores(known_scores: Tensor, unknown_scores: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("known_scores", known_scores), ("unknown_scores", unknown_scores)):
        check_ndim(name, t, 1, "Tensor[N]")
        if t.dtype == torch.bool or t.is_complex():
            raise DTypeError(f"{name}: expected a real-valued (float or integer) tensor, got dtype {t.dtype}")
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            count = int(torch.isnan(t).sum())
            raise InvalidArgumentError(f"{name}: expected scores without NaN, got {count} NaN values")
    if unknown_scores.device != known_scores.device:
        raise InvalidArgumentError(
            f"unknown_scores: expected a tensor on {known_scores.device} (known_scores' device), "
            f"got {unknown_scores.device}"
        )
    dtype = torch.promote_types(known_scores.dtype, unknown_scores.dtype)
    # Half precision is compared in float32: the comparisons are exact either way, this only
    # avoids kernels missing for half on some backends.
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return known_scores.detach().to(dtype), unknown_scores.detach().to(dtype)


def auroc(known_scores: Tensor, unknown_scores: Tensor) -> float:
    """Area under the ROC curve with known objects as positives (Mann-Whitney U / (N·M)).

    ``AUROC = P(s_known > s_unknown) + ½ P(s_known = s_unknown)``: 1 = perfect separation, 0.5 =
    chance. Computed from the sorted unknown scores by binary search (no ``N x M`` matrix).

    Args:
        known_scores: ``Tensor[N]``, scores of known objects (higher = more known).
        unknown_scores: ``Tensor[M]``, scores of unknown objects.

    Returns:
        AUROC in ``[0, 1]``; ``nan`` when N or M is 0.

    Example:
        >>> auroc(torch.tensor([3., 2.]), torch.tensor([2., 1.]))
        0.875
    """
    known, unknown = _check_scores(known_scores, unknown_scores)
    n, m = known.numel(), unknown.numel()
    if n == 0 or m == 0:
        return math.nan
    ref = torch.sort(unknown).values
    below = torch.searchsorted(ref, known, side="left")
    below_or_tied = torch.searchsorted(ref, known, side="right")
    # 2U = Σ (#below + #below_or_tied) counts each tie once: exactly ½ per tied pair, in int64.
    twice_u = int((below + below_or_tied).sum())
    return twice_u / (2.0 * n * m)


def _min_accepted(n: int, tpr: float) -> int:
    # Smallest c with c / n >= tpr as compared in float64 (ceil(tpr * n) alone can be one off:
    # 0.07 * 100 = 7.000000000000001).
    c = min(max(math.ceil(tpr * n), 0), n)
    while c > 0 and (c - 1) / n >= tpr:
        c -= 1
    while c < n and c / n < tpr:
        c += 1
    return c


def fpr_at_tpr(known_scores: Tensor, unknown_scores: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate of unknowns at the threshold that accepts ``tpr`` of the knowns.

    ``FPR = #{unknown: s ≥ t} / M`` with ``t`` the ``c``-th highest known score, ``c`` the smallest
    count with ``c / N ≥ tpr`` (accept when ``score >= t``; see the module docstring). ``tpr = 0``
    accepts nothing (FPR 0).

    Args:
        known_scores: ``Tensor[N]``, scores of known objects (higher = more known).
        unknown_scores: ``Tensor[M]``, scores of unknown objects.
        tpr: the fraction of known objects to accept, in ``[0, 1]``.

    Returns:
        FPR in ``[0, 1]`` (lower is better); ``nan`` when N or M is 0.

    Example:
        >>> fpr_at_tpr(torch.arange(100.), torch.tensor([4.5, 5., 50.]), tpr=0.95)
        0.6666666666666666
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 <= float(tpr) <= 1.0:
        raise InvalidArgumentError(f"tpr: expected a fraction in [0, 1], got {tpr!r}")
    known, unknown = _check_scores(known_scores, unknown_scores)
    n, m = known.numel(), unknown.numel()
    if n == 0 or m == 0:
        return math.nan
    c = _min_accepted(n, float(tpr))
    if c == 0:
        return 0.0
    # The c-th highest known score is the (n - c + 1)-th lowest.
    threshold = torch.kthvalue(known, n - c + 1).values
    return int((unknown >= threshold).sum()) / m
