"""fewsight.retrieval: search object embeddings and measure retrieval / open-set rejection.

* :func:`recall_at_k`, :func:`mean_average_precision_at_r` — Recall@k and MAP@R (cosine, blocked).
* :func:`learn_whitening` / :class:`Whitening` — learned whitening of embeddings (Radenović et al.
  2018), fitted on training classes, applied to queries and gallery before the cosine.
* :func:`csls_similarity`, :func:`csls_penalty` — hubness-corrected cross-domain scores (CSLS,
  Conneau et al. 2018).
* :func:`auroc`, :func:`fpr_at_tpr` — how well unknown objects are rejected (higher score = known).
* :class:`Gallery` / :class:`SearchResult` — embeddings with labels, image ids and boxes over a
  vector backend (needs the ``retrieval`` extra: ``pip install "fewsight[retrieval]"``).
* :func:`make_backend`, :class:`FaissBackend` (any faiss index string; ``"Flat"`` = exact, the
  default), :class:`MilvusBackend` (milvus-lite ``.db`` file or a server; the ``milvus`` extra),
  :class:`VectorBackend` (the interface) — where a gallery's vectors live.
* :func:`index_images`, :func:`embed_crop`, :func:`embed_objects`, :func:`known_scores` — object
  embeddings from a DLDENet (galleries of detections, example-crop queries, open-set scores);
  :func:`index_files` streams a folder of images into a gallery in resumable chunks.

Example:
    >>> import torch
    >>> from fewsight.retrieval import Gallery, recall_at_k, auroc
    >>> emb = torch.tensor([[1., 0.], [0.9, 0.2], [0., 1.], [0.1, 0.8]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> recall_at_k(emb, labels, k=1)
    {1: 1.0}
    >>> g = Gallery()
    >>> g.add(emb, labels=labels)
    >>> g.search(torch.tensor([[0.2, 1.]]), k=2).labels
    tensor([[1, 1]])
    >>> auroc(known_scores=torch.tensor([0.9, 0.8]), unknown_scores=torch.tensor([0.3, 0.85]))
    0.75
"""

from fewsight.retrieval.backends import FaissBackend, MilvusBackend, VectorBackend, make_backend
from fewsight.retrieval.hubness import csls_penalty, csls_similarity
from fewsight.retrieval.gallery import Gallery, SearchResult
from fewsight.retrieval.metrics import mean_average_precision_at_r, ordered_topk, recall_at_k
from fewsight.retrieval.indexing import IndexRun, clear_chunks, index_files
from fewsight.retrieval.objects import detect_objects, embed_crop, embed_objects, index_images, known_scores
from fewsight.retrieval.openset import auroc, fpr_at_tpr
from fewsight.retrieval.whitening import Whitening, learn_whitening

__all__ = [
    "ordered_topk",
    "FaissBackend",
    "Gallery",
    "MilvusBackend",
    "SearchResult",
    "Whitening",
    "auroc",
    "csls_penalty",
    "csls_similarity",
    "embed_crop",
    "embed_objects",
    "fpr_at_tpr",
    "IndexRun",
    "clear_chunks",
    "detect_objects",
    "index_files",
    "index_images",
    "known_scores",
    "learn_whitening",
    "make_backend",
    "mean_average_precision_at_r",
    "recall_at_k",
    "VectorBackend",
]
