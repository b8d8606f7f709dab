"""Vector stores behind a :class:`~fewsight.retrieval.Gallery`: one interface, switched by one option.

* :class:`VectorBackend` — the interface (create / add / train / search / reconstruct / files).
* :class:`FaissBackend` — embedded faiss, any index factory string (``"Flat"``: exact, the default).
* :class:`MilvusBackend` — a Milvus collection: milvus-lite in a local ``.db`` file, or a server.
* :func:`make_backend` — ``kind`` + ``index`` + ``uri`` + options, e.g. from command-line flags.

Example:
    >>> import torch
    >>> from fewsight.retrieval import Gallery, make_backend
    >>> g = Gallery(backend=make_backend("faiss", index="HNSW32", ef_search=64))
    >>> g.add(torch.eye(4), labels=torch.arange(4))
    >>> g.search(torch.tensor([[0., 0., 1., 0.]]), k=1).labels
    tensor([[2]])
"""

from __future__ import annotations

import inspect
from typing import Any

from fewsight.errors import InvalidArgumentError
from fewsight.retrieval.backends.base import VectorBackend
from fewsight.retrieval.backends.faiss_backend import DEFAULT_TRAIN_SIZE, FaissBackend, faiss_gpu_available, training_minimum
from fewsight.retrieval.backends.milvus_backend import DEFAULT_MILVUS_URI, MilvusBackend

__all__ = [
    "BACKENDS",
    "DEFAULT_MILVUS_URI",
    "DEFAULT_TRAIN_SIZE",
    "FaissBackend",
    "MilvusBackend",
    "VectorBackend",
    "faiss_gpu_available",
    "make_backend",
    "training_minimum",
]

#: Backend classes by :attr:`VectorBackend.kind` (how gallery files name them).
BACKENDS: dict[str, type[VectorBackend]] = {FaissBackend.kind: FaissBackend, MilvusBackend.kind: MilvusBackend}


def make_backend(kind: str = "faiss", index: str | None = None, uri: str | None = None, **options: Any) -> VectorBackend:
    """A backend from plain values (what command-line flags give).

    Args:
        kind: ``"faiss"`` (embedded, default) or ``"milvus"``.
        index: faiss factory string (default ``"Flat"``) or Milvus index type (default ``"FLAT"``).
        uri: Milvus only: a local ``.db`` file (default :data:`DEFAULT_MILVUS_URI`) or ``http://host:19530``.
        options: the backend's keyword options (``nprobe``, ``ef_search``, ``train_size``, ``device``
            for faiss; ``collection``, ``token``, ``search_params`` for Milvus).

    >>> make_backend("faiss", index="IVF256,PQ16", nprobe=8).describe()
    'faiss:IVF256,PQ16'
    """
    if not isinstance(kind, str) or kind not in BACKENDS:
        raise InvalidArgumentError(f"kind: expected one of {tuple(BACKENDS)}, got {kind!r}")
    allowed = [p for p in inspect.signature(BACKENDS[kind]).parameters if p not in ("index", "uri", "index_type")]
    for name, value in options.items():
        if name not in allowed:
            raise InvalidArgumentError(f"{name}: expected an option of the {kind} backend ({', '.join(allowed)}), got {name}={value!r}")
    if kind == "faiss":
        if uri is not None:
            raise InvalidArgumentError(f"uri: expected None for the faiss backend (it is embedded), got {uri!r}")
        return FaissBackend("Flat" if index is None else index, **options)
    if index is not None:
        options["index_type"] = index
    return MilvusBackend(DEFAULT_MILVUS_URI if uri is None else uri, **options)
