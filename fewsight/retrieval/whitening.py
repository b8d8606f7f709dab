"""Learned whitening of embeddings for retrieval (Radenović et al. 2018, TPAMI "Fine-tuning CNN image
retrieval with no human annotation", §3.3).

Fitted once on labelled data of *training* classes, applied to queries and gallery of any class:

    C_S = 1/|S| Σ_(i,j)∈S (x_i − x_j)(x_i − x_j)ᵀ      S: within-class differences
    P   = eig(C_S^(−½) C_D C_S^(−½))ᵀ C_S^(−½),        x ↦ normalise(P (x − μ))

so the directions along which views of one class vary are shrunk and those that separate classes
are kept. ``S`` is either each sample against its class mean (``domains=None``), or — for cross-domain
retrieval such as Google-style queries against a Twitter-style gallery — the matching pairs across two
domains, the differences a query and its gallery item actually show (Radenović et al.'s ``C_S`` over
matching pairs). ``C_D`` is the scatter of the class means around ``μ`` after the first step.

Embeddings are L2-normalised before fitting and applying, as the cosine retrieval that follows.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 8, generator=g)
    >>> labels = torch.arange(40) % 5
    >>> w = learn_whitening(x, labels)
    >>> w(x).shape, w.projection.shape
    (torch.Size([40, 8]), torch.Size([8, 8]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, check_floating, check_labels, check_ndim

__all__ = ["Whitening", "learn_whitening"]


class Whitening(NamedTuple):
    """``x ↦ normalise(P (normalise(x) − μ))``: ``mean`` ``Tensor[D]``, ``projection`` ``Tensor[D', D]``.

    Calling it maps ``Tensor[N, D]`` to unit ``Tensor[N, D']`` in the embeddings' dtype and device.
    """

    mean: Tensor
    projection: Tensor

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        check_ndim("x", x, 2, "Tensor[N, D]")
        if x.shape[1] != self.mean.shape[0]:
            raise ShapeError(f"x: expected Tensor[N, {self.mean.shape[0]}] (the fitted D), got shape {tuple(x.shape)}")
        mean, proj = self.mean.to(x), self.projection.to(x)
        return F.normalize((F.normalize(x, dim=1) - mean) @ proj.T, dim=1)


def learn_whitening(
    embeddings: Tensor,
    labels: Tensor,
    *,
    domains: Tensor | None = None,
    shrink: float = 0.0,
    dim: int | None = None,
) -> Whitening:
    """Fit a learned whitening on labelled embeddings (see the module docstring for the formula).

    Args:
        embeddings: ``Tensor[N, D]`` (normalised here); fitted in float64.
        labels: ``Long[N]`` class of each row, ``>= 0``; at least two classes.
        domains: optional ``Long[N]`` in {0, 1}: whiten the differences of same-class pairs across the
            two domains (every 0-row with every 1-row of its class) instead of the scatter around the
            class means.
        shrink: ``C_S ← (1 − shrink) C_S + shrink · tr(C_S)/D · I`` (Ledoit-Wolf style), in [0, 1].
        dim: keep the first ``dim`` output axes (largest between-class variance); default all ``D``.

    Returns:
        :class:`Whitening` with ``mean`` ``Tensor[D]`` and ``projection`` ``Tensor[dim, D]`` (float64,
        on the embeddings' device).
    """
    check_ndim("embeddings", embeddings, 2, "Tensor[N, D]")
    check_floating("embeddings", embeddings)
    check_labels("labels", labels)
    n, d = embeddings.shape
    if labels.shape != (n,):
        raise ShapeError(f"labels: expected Tensor[N] with N={n}, got shape {tuple(labels.shape)}")
    if bool((labels < 0).any()):
        raise InvalidArgumentError(f"labels: expected class indices >= 0, got minimum {int(labels.min())}")
    if not 0.0 <= shrink <= 1.0:
        raise InvalidArgumentError(f"shrink: expected a float in [0, 1], got {shrink!r}")
    if dim is not None and not 1 <= dim <= d:
        raise InvalidArgumentError(f"dim: expected None or an int in [1, {d}], got {dim!r}")
    x = F.normalize(embeddings.detach().double(), dim=1)
    labels = labels.detach().long()
    classes, labels = torch.unique(labels, return_inverse=True)
    k = classes.numel()
    if k < 2:
        raise InvalidArgumentError(f"labels: expected at least 2 classes, got {k}")
    means = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    means = means / torch.bincount(labels, minlength=k).to(x.dtype)[:, None]

    if domains is None:
        diff = x - means[labels]
    else:
        if domains.shape != (n,):
            raise ShapeError(f"domains: expected Tensor[N] with N={n}, got shape {tuple(domains.shape)}")
        if not bool(((domains == 0) | (domains == 1)).all()):
            raise InvalidArgumentError("domains: expected values in {0, 1}, got others")
        first = torch.nonzero(domains == 0).squeeze(1)
        second = torch.nonzero(domains == 1).squeeze(1)
        # Every cross-domain pair of a class: sum over classes of n0·n1 rows, small for few views.
        i, j = torch.nonzero(labels[first][:, None] == labels[second][None, :], as_tuple=True)
        if i.numel() == 0:
            raise InvalidArgumentError("domains: expected at least one class present in both domains, got none")
        diff = x[first[i]] - x[second[j]]
    cs = diff.T @ diff / max(len(diff), 1)
    cs = (1 - shrink) * cs + shrink * torch.eye(d, dtype=x.dtype, device=x.device) * cs.trace() / d
    e, v = torch.linalg.eigh(cs)
    # Directions with no within-class spread would be blown up without bound: floor their variance.
    floor = e.max().clamp(min=1e-12) * 1e-9
    p1 = v @ torch.diag(e.clamp(min=floor) ** -0.5) @ v.T
    mu = x.mean(0)
    centred = (means - mu) @ p1.T
    _, v2 = torch.linalg.eigh(centred.T @ centred / k)
    proj = v2.flip(1).T @ p1
    return Whitening(mean=mu, projection=proj[: dim or d])
