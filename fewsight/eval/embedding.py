"""Retrieval figures of a crop embedder: Recall@k and MAP@R of query crops against a gallery of crops.

* :func:`embed_dataset` — every item of a crop dataset (``(Tensor[3, S, S], label)`` items) through
  :meth:`~fewsight.fewshot.CropEmbedder.embed_crops` (its test-time augmentation and whitening).
* :func:`retrieval_metrics` — Recall@k / MAP@R of embeddings (cosine), and optionally under CSLS
  (``2 cos(q, g) − r(g)``, ``r(g)`` the mean cosine of gallery item g to its ``k`` nearest reference
  items, a sample of the query domain): a gallery item close to everything stops winning the queries
  of other classes.
* :func:`evaluate_embedder` — both together on datasets (or precomputed embeddings).
* :func:`emoji_retrieval` — the cross-style emoji protocol: novel classes, Google-style queries against
  the Twitter-style gallery (one image per class), CSLS reference from augmented base-class Google views.

Example:
    >>> import torch
    >>> q, g = torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[0.9, 0.1], [0.2, 1.]])
    >>> labels = torch.tensor([0, 1])
    >>> retrieval_metrics(q, labels, g, labels, ks=(1,))
    {'recall@1': 1.0, 'map@r': 1.0, 'num_queries': 2, 'gallery_size': 2}
    >>> sorted(retrieval_metrics(q, labels, g, labels, ks=(1,), csls_reference=q)["csls"])
    ['map@r', 'recall@1']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_ndim
from fewsight.retrieval import csls_penalty, mean_average_precision_at_r, ordered_topk, recall_at_k

__all__ = ["embed_dataset", "emoji_retrieval", "evaluate_embedder", "retrieval_metrics"]


@torch.no_grad()
def embed_dataset(
    embedder: nn.Module, dataset: Any, *, batch_size: int = 128, raw: bool = False, epoch: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(Tensor[N, D] float32 on CPU, Long[N])``: every item of ``dataset`` embedded by ``embedder``.

    ``raw``: the unit network output at one scale (``head_embeddings``), no TTA nor whitening (what
    training validates and what a whitening is fitted on when there is no TTA). ``epoch``: call
    ``dataset.set_epoch(epoch)`` first (augmented views of a given epoch). Runs on the embedder's
    device, in eval mode (restored afterwards).
    """
    if epoch is not None:
        dataset.set_epoch(epoch)
    device = next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    out, labels = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            crops = torch.stack([x for x, _ in items]).to(device)
            e = F.normalize(embedder.head_embeddings(crops).float(), dim=1) if raw else embedder.embed_crops(crops)
            out.append(e.float().cpu())
            labels.append(torch.tensor([int(y) for _, y in items], dtype=torch.long))
    finally:
        embedder.train(was_training)
    if not out:
        return torch.zeros(0, getattr(embedder, "dim", 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.cat(labels)


def _csls_metrics(q: Tensor, ql: Tensor, g: Tensor, gl: Tensor, reference: Tensor, k: int, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k and MAP@R ranking by CSLS scores (queries without a same-label gallery item excluded)."""
    r = csls_penalty(g, reference, k)
    qn, gn = F.normalize(q.double(), dim=1), F.normalize(g.double(), dim=1)
    relevant = (ql[:, None] == gl[None, :]).sum(1)
    keep = (ql >= 0) & (relevant > 0)
    qn, ql, relevant = qn[keep], ql[keep], relevant[keep]
    if len(qn) == 0:
        return {**{f"recall@{kk}": math.nan for kk in ks}, "map@r": math.nan}
    hits = torch.zeros(len(ks), dtype=torch.long)
    ap = torch.zeros((), dtype=torch.float64)
    depth = max(max(ks), int(relevant.max()))
    block = max(1, (1 << 22) // max(len(gn), 1))
    for s in range(0, len(qn), block):
        scores = 2 * qn[s : s + block] @ gn.T - r.double()[None, :]
        _, idx = ordered_topk(scores, depth)
        match = gl[idx] == ql[s : s + block, None]
        ranks = torch.arange(1, idx.shape[1] + 1)
        first = torch.where(match, ranks, idx.shape[1] + 1).amin(dim=1)
        hits += (first[None, :] <= torch.tensor(list(ks))[:, None]).sum(dim=1)
        rr = relevant[s : s + block]
        rel = match & (ranks[None, :] <= rr[:, None])
        ap += ((rel.cumsum(1).double() / ranks * rel).sum(1) / rr).sum()
    n = len(qn)
    return {**{f"recall@{kk}": float(h) / n for kk, h in zip(ks, hits.tolist())}, "map@r": float(ap) / n}


def retrieval_metrics(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    csls_reference: Tensor | None = None,
    csls_k: int = 10,
) -> dict[str, Any]:
    """Recall@``ks`` and MAP@R (cosine) of ``queries: Tensor[Q, D]`` against ``gallery: Tensor[G, D]``
    (``None``: leave-one-out within the queries), through :func:`fewsight.retrieval.recall_at_k` /
    :func:`~fewsight.retrieval.mean_average_precision_at_r`. With ``csls_reference: Tensor[R, D]`` (a
    sample of the query domain, never the test queries themselves), the same figures under CSLS ranking
    go to ``"csls"``. Labels ``Long[Q]`` / ``Long[G]``; unknown (``< 0``) queries are not evaluated.
    """
    ks = [int(k) for k in ks]
    out: dict[str, Any] = {f"recall@{k}": v for k, v in zip(ks, recall_at_k(queries, query_labels, gallery, gallery_labels, k=ks).values())}
    out["map@r"] = mean_average_precision_at_r(queries, query_labels, gallery, gallery_labels)
    out["num_queries"] = int((query_labels >= 0).sum())
    out["gallery_size"] = int(len(queries) if gallery is None else len(gallery))
    if csls_reference is not None:
        if gallery is None or gallery_labels is None:
            raise InvalidArgumentError("csls_reference: expected a separate gallery (CSLS is cross-domain), got gallery=None")
        check_ndim("csls_reference", csls_reference, 2, "Tensor[R, D]")
        if csls_reference.shape[1] != gallery.shape[1]:
            raise ShapeError(f"csls_reference: expected Tensor[R, {gallery.shape[1]}], got shape {tuple(csls_reference.shape)}")
        out["csls"] = _csls_metrics(
            queries.cpu(), query_labels.cpu(), gallery.cpu(), gallery_labels.cpu(), csls_reference.cpu(), csls_k, ks
        )
    return out


def evaluate_embedder(
    embedder: nn.Module,
    queries: Any,
    gallery: Any = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    csls_reference: Any = None,
    csls_k: int = 10,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Retrieval figures of ``embedder`` (a :class:`~fewsight.fewshot.CropEmbedder`: its TTA and whitening
    apply): ``queries`` / ``gallery`` / ``csls_reference`` are crop datasets (embedded here) or
    ``(Tensor[N, D], Long[N])`` pairs (``csls_reference`` also a bare ``Tensor[R, D]``). See
    :func:`retrieval_metrics` for the keys.

    Example:
        >>> from fewsight.fewshot import CropEmbedder
        >>> from fewsight.data.crops import BoxCrops
        >>> from fewsight.data.digits import DigitsDataset
        >>> crops = BoxCrops(DigitsDataset("test", num_images=4, image_size=96), size=32)
        >>> net = CropEmbedder(dim=8, grid=1, crop_size=32, pretrained=False)
        >>> 0.0 <= evaluate_embedder(net, crops, ks=(1,))["recall@1"] <= 1.0
        True
    """

    def embedded(data: Any) -> tuple[Tensor, Tensor]:
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            return data[0], data[1]
        return embed_dataset(embedder, data, batch_size=batch_size)

    q, ql = embedded(queries)
    g, gl = (None, None) if gallery is None else embedded(gallery)
    ref = csls_reference
    if ref is not None and not isinstance(ref, Tensor):
        ref = embedded(ref)[0]
    return retrieval_metrics(q, ql, g, gl, ks=ks, csls_reference=ref, csls_k=csls_k)


def emoji_retrieval(
    embedder: nn.Module,
    root: str | Path = "data/emoji",
    *,
    classes: str | Sequence[int | str] = "novel",
    styles: Sequence[str] = ("google", "twitter"),
    ks: Sequence[int] = (1, 5, 10),
    csls: bool = True,
    csls_k: int = 10,
    reference_classes: str | Sequence[int | str] = "base",
    reference_epochs: int = 2,
    augment: dict[str, Any] | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """The cross-style emoji protocol: each image of ``classes`` in ``styles[0]`` queries the gallery of
    their ``styles[1]`` images (one per class), at the embedder's crop size on a white background.

    With ``csls``, the CSLS reference is ``reference_epochs`` augmented epochs (``augment``: EmojiCrops
    ``scale`` / ``jitter``, default 0.8–1.0 and 0.2, as training) of the ``reference_classes`` (base: never
    the test classes) in the query style. Returns :func:`retrieval_metrics`'s keys.
    """
    from fewsight.data.emoji import EmojiCrops

    if len(styles) != 2:
        raise InvalidArgumentError(f"styles: expected (query style, gallery style), got {list(styles)!r}")
    size = int(embedder.config["crop_size"])
    q = EmojiCrops(root, classes, styles[0], size=size, fill=1.0)
    g = EmojiCrops(root, classes, styles[1], size=size, fill=1.0)
    ref = None
    if csls:
        aug = {"scale": (0.8, 1.0), "jitter": 0.2, **(augment or {})}
        views = EmojiCrops(root, reference_classes, styles[0], size=size, augment=True, split="train", seed=0, **aug)
        ref = torch.cat([embed_dataset(embedder, views, batch_size=batch_size, epoch=1000 + e)[0] for e in range(reference_epochs)])
    out = evaluate_embedder(embedder, q, g, ks=ks, csls_reference=ref, csls_k=csls_k, batch_size=batch_size)
    out.update(query_style=styles[0], gallery_style=styles[1], num_classes=q.num_classes)
    return out
