"""Retrieval and open-set benchmark of a DLDENet's object embeddings.

Every annotated object of a query set and of a gallery set is embedded (``embed_boxes`` of its box);
Recall@k and MAP@R are measured separately for queries of classes the model was trained on and of
classes it never saw. Open set: how well the model's known-ness score (highest calibrated class
probability) separates objects of its classes from objects of the others (AUROC, FPR at 95% TPR).

Example:
    >>> import torch
    >>> from fewsight.models import DLDENet
    >>> from fewsight.data import DigitsDataset
    >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=16, embedding_dim=8, class_names=["0", "1"])
    >>> data = DigitsDataset("test", 4, image_size=96, classes=[0, 1, 8], seed=0)
    >>> sorted(run_retrieval(model, query_dataset=data, gallery_dataset=data)["open_set"])
    ['auroc', 'fpr_at_95tpr', 'num_known', 'num_unknown']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError
from fewsight.retrieval import auroc, embed_objects, fpr_at_tpr, known_scores, mean_average_precision_at_r, recall_at_k

__all__ = ["dataset_embeddings", "run_retrieval"]


def dataset_embeddings(model: nn.Module, dataset: Any, *, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """``(Tensor[N, D], Long[N])``: the embedding and label of every annotated object of ``dataset``."""
    embeddings, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        embeddings.append(embed_objects(model, [im for im, _ in items], [t["boxes"].float() for _, t in items],
                                        batch_size=batch_size).cpu())
        labels.extend(t["labels"] for _, t in items)
    dim = model.classifier.embedding_dim
    emb = torch.cat(embeddings) if embeddings else torch.zeros(0, dim)
    return emb, torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)


def _rows(q: Tensor, ql: Tensor, g: Tensor, gl: Tensor, classes: Sequence[int], ks: Sequence[int]) -> dict[str, Any]:
    keep = torch.isin(ql, torch.tensor(list(classes), dtype=torch.long)) & torch.isin(ql, gl[gl >= 0])
    out: dict[str, Any] = {"num_queries": int(keep.sum())}
    if keep.any():
        rec = recall_at_k(q[keep], ql[keep], g, gl, k=list(ks))
        out.update({f"recall@{k}": round(v, 4) for k, v in rec.items()})
        out["map@r"] = round(mean_average_precision_at_r(q[keep], ql[keep], g, gl), 4)
    return out


def run_retrieval(
    model: nn.Module,
    *,
    query_dataset: Any,
    gallery_dataset: Any,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 16,
) -> dict[str, Any]:
    """Retrieval and open-set figures of ``model`` (see the module docstring).

    Both datasets share a class list (``dataset.classes``); a class is *known* when the model has a class
    of that name. Returns ``{"known": {...}, "unknown": {...}, "open_set": {...}}``: Recall@k and MAP@R of
    query objects of known / unknown classes against every gallery object, and AUROC / FPR@95%TPR of the
    known-ness score on the gallery objects (positives: objects of known classes).
    """
    names = list(query_dataset.classes)
    if list(gallery_dataset.classes) != names:
        raise InvalidArgumentError(
            f"gallery_dataset: expected the query dataset's classes {names}, got {list(gallery_dataset.classes)}"
        )
    model_classes = set(getattr(model, "classes", []))
    known = [c for c, n in enumerate(names) if n in model_classes]
    unknown = [c for c, n in enumerate(names) if n not in model_classes]
    q, ql = dataset_embeddings(model, query_dataset, batch_size=batch_size)
    g, gl = dataset_embeddings(model, gallery_dataset, batch_size=batch_size)
    scores = known_scores(model, g.to(next(model.parameters()).device)).cpu()
    is_known = torch.isin(gl, torch.tensor(known, dtype=torch.long))
    return {
        "known_classes": [names[c] for c in known],
        "unknown_classes": [names[c] for c in unknown],
        "gallery_size": int(g.shape[0]),
        "known": _rows(q, ql, g, gl, known, ks),
        "unknown": _rows(q, ql, g, gl, unknown, ks),
        "open_set": {
            "auroc": round(auroc(scores[is_known], scores[~is_known]), 4),
            "fpr_at_95tpr": round(fpr_at_tpr(scores[is_known], scores[~is_known], 0.95), 4),
            "num_known": int(is_known.sum()),
            "num_unknown": int((~is_known).sum()),
        },
    }
