"""Hubness correction for cross-domain retrieval: CSLS (Conneau et al. 2018, ICLR "Word translation
without parallel data", §2.3).

In high dimension some gallery items (hubs) are close to many queries and win the nearest-neighbour
search of queries that are not theirs. CSLS lowers each gallery item's score by how close it is to
the query domain in general:

    csls(q, g) = 2 cos(q, g) − r(g) − r_Q(q),   r(g) = mean of the k largest cos(g, z), z ∈ reference

``r_Q(q)`` is the same per query and does not change its ranking, so :func:`csls_similarity` leaves it
out. ``reference`` is a sample of the query domain: Conneau et al. use the queries themselves
(transductive); a set of *training-class* images of the query domain keeps test classes out of it.
As ``2 q·g − r(g) = [q, 1]·[2g, −r(g)]``, a gallery can also be searched with an inner-product index
on vectors extended by one coordinate (:func:`csls_penalty` gives ``r``).

Example:
    >>> import torch
    >>> q = torch.tensor([[1., 0.], [0.6, 0.8]])
    >>> g = torch.tensor([[0.8, 0.6], [0., 1.]])   # the first gallery item is a hub
    >>> (q @ g.T).argmax(1)
    tensor([0, 0])
    >>> csls_similarity(q, g, reference=q, k=2).argmax(1)
    tensor([0, 1])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import InvalidArgumentError, ShapeError, check_floating, check_ndim

__all__ = ["csls_penalty", "csls_similarity"]

_BLOCK_ELEMENTS = 1 << 22


def _unit(name: str, t: Tensor, expected: str, d: int | None = None) -> Tensor:
    check_ndim(name, t, 2, expected)
    check_floating(name, t)
    if d is not None and t.shape[1] != d:
        raise ShapeError(f"{name}: expected {expected} with D={d} (the gallery's), got shape {tuple(t.shape)}")
    return F.normalize(t, dim=1)


def csls_penalty(gallery: Tensor, reference: Tensor, k: int = 10) -> Tensor:
    """``r(g)``: mean cosine of each gallery item to its ``k`` nearest reference items.

    Args:
        gallery: ``Tensor[G, D]``; reference: ``Tensor[R, D]`` (both normalised here), ``R >= 1``.
        k: neighbourhood size (Conneau et al.: 10); ``k > R`` uses all of ``R``.

    Returns:
        ``Tensor[G]`` in the promoted dtype of the inputs. Computed in blocks of gallery rows (no
        ``G × R`` matrix).
    """
    g = _unit("gallery", gallery, "Tensor[G, D]")
    ref = _unit("reference", reference, "Tensor[R, D]", g.shape[1])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k: expected an int >= 1, got {k!r}")
    if ref.shape[0] == 0:
        raise InvalidArgumentError("reference: expected at least one row, got 0")
    if ref.device != g.device:
        raise InvalidArgumentError(f"reference: expected a tensor on {g.device} (the gallery's device), got {ref.device}")
    dtype = torch.promote_types(g.dtype, ref.dtype)
    g, ref = g.to(dtype), ref.to(dtype)
    k = min(k, ref.shape[0])
    block = max(1, _BLOCK_ELEMENTS // ref.shape[0])
    out = [(g[i : i + block] @ ref.T).topk(k, dim=1).values.mean(1) for i in range(0, g.shape[0], block)]
    return torch.cat(out) if out else g.new_zeros(0)


def csls_similarity(queries: Tensor, gallery: Tensor, reference: Tensor, k: int = 10) -> Tensor:
    """CSLS scores ``2 cos(q, g) − r(g)`` of every query against every gallery item.

    Args:
        queries: ``Tensor[Q, D]``; gallery: ``Tensor[G, D]``; reference: ``Tensor[R, D]``, a sample of
            the query domain (all normalised here).
        k: neighbourhood size of :func:`csls_penalty`.

    Returns:
        ``Tensor[Q, G]``: rank each row to retrieve (higher = closer).
    """
    r = csls_penalty(gallery, reference, k)
    q = _unit("queries", queries, "Tensor[Q, D]", gallery.shape[1])
    if q.device != gallery.device:
        raise InvalidArgumentError(f"queries: expected a tensor on {gallery.device} (the gallery's device), got {q.device}")
    g = F.normalize(gallery, dim=1).to(r.dtype)
    return 2 * q.to(r.dtype) @ g.T - r[None, :]
