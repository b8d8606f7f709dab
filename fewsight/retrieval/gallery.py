"""A searchable gallery of object embeddings (faiss exact inner-product index) with metadata.

:class:`Gallery` stores L2-normalised float32 embeddings in a ``faiss.IndexFlatIP`` (exact search:
inner product of unit vectors = cosine similarity) together with one row of metadata per item:
``labels`` (``-1`` = unknown), ``image_ids`` (``-1`` = not given) and ``boxes`` (``NaN`` rows = not
given), plus optional ``class_names``. :meth:`Gallery.search` returns a :class:`SearchResult`.

Ordering: by cosine similarity, ties broken by gallery index (lower first), also at the k-th place
(where faiss's own order is arbitrary), the convention of :mod:`fewsight.retrieval.metrics`.
Embeddings on any device / dtype are copied to CPU float32 for faiss; results come back on the
queries' device. faiss is the optional ``retrieval`` extra (``pip install "fewsight[retrieval]"``).

Files: :meth:`Gallery.save` writes one ``torch.save`` file (written next to the destination, then
renamed: atomic) holding the ``faiss.serialize_index`` bytes as a uint8 tensor and the metadata
tensors; it loads with ``torch.load(weights_only=True)``. A missing or corrupt file raises
:class:`~fewsight.errors.CheckpointError` naming it.

Example:
    >>> import torch
    >>> g = Gallery(class_names=["cat", "dog"])
    >>> g.add(torch.tensor([[1., 0.], [0., 2.], [1., 1.]]), labels=torch.tensor([0, 1, 1]),
    ...       image_ids=torch.tensor([10, 11, 12]))
    >>> r = g.search(torch.tensor([[0., 1.]]), k=4)
    >>> r.indices
    tensor([[ 1,  2,  0, -1]])
    >>> r.labels, r.image_ids
    (tensor([[ 1,  1,  0, -1]]), tensor([[11, 12, 10, -1]]))
    >>> [g.class_names[i] for i in r.labels[0, :2].tolist()]
    ['dog', 'dog']
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import (
    CheckpointError,
    InvalidArgumentError,
    MissingDependencyError,
    ShapeError,
    check_floating,
    check_labels,
    check_ndim,
)
from fewsight._io import atomic_write_bytes
from fewsight.retrieval.hubness import csls_penalty
from fewsight.retrieval.metrics import ordered_topk

__all__ = ["GALLERY_FORMAT", "Gallery", "SearchResult"]

GALLERY_FORMAT = "fewsight.gallery"
#: :meth:`Gallery.search` pads its rows to ``k`` columns up to this ``k`` (or the gallery's size, if larger).
MAX_PADDED_K = 1024
_VERSION = 1
_FILE_NAME = "gallery.pt"  # used when save/load is given a folder
_BLOCK_ELEMENTS = 1 << 22  # CSLS scores: at most this many query x gallery floats at once


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            'Gallery needs faiss: install the retrieval extra, pip install "fewsight[retrieval]" '
            f"(or pip install faiss-cpu); import failed with: {exc}"
        ) from exc
    return faiss


class SearchResult(NamedTuple):
    """Nearest gallery items per query, best first; rows padded where the gallery has fewer than k.

    Attributes:
        scores: ``Tensor[Q, k]`` float32 cosine similarity; ``-inf`` in padding.
        indices: ``Long[Q, k]`` gallery index; ``-1`` in padding (the authority on what is padding).
        labels: ``Long[Q, k]``; ``-1`` in padding or for unknown-label items.
        image_ids: ``Long[Q, k]``; ``-1`` in padding or where not given.
        boxes: ``Tensor[Q, k, 4]`` float32 xyxy; ``NaN`` in padding or where not given.
    """

    scores: Tensor
    indices: Tensor
    labels: Tensor
    image_ids: Tensor
    boxes: Tensor


def _to_host(storage: Any, _location: str) -> Any:
    return storage


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / _FILE_NAME if path.is_dir() else path


def _metadata(name: str, t: Tensor | None, n: int, default: float | int, *, width: int | None = None) -> Tensor:
    expected = f"Tensor[N, {width}]" if width else "Tensor[N]"
    if t is None:
        shape = (n, width) if width else (n,)
        dtype = torch.float32 if isinstance(default, float) else torch.long
        return torch.full(shape, default, dtype=dtype)
    check_ndim(name, t, 2 if width else 1, expected)
    if t.shape[0] != n or (width and t.shape[1] != width):
        raise ShapeError(f"{name}: expected {expected} with N={n} (one per embedding), got shape {tuple(t.shape)}")
    return t.detach().cpu()


class Gallery:
    """Exact cosine-similarity search over object embeddings with aligned metadata.

    Args:
        dim: embedding size ``D``; ``None`` = taken from the first :meth:`add`.
        class_names: names of the classes; when given, labels must be ``< len(class_names)``
            (``< 0`` = unknown is always allowed).

    Attributes:
        labels / image_ids: ``Long[N]``; boxes: ``Tensor[N, 4]`` (CPU; ``NaN`` rows where not given).

    Example:
        >>> g = Gallery(dim=3)
        >>> g.add(torch.eye(3), labels=torch.tensor([0, 1, 2]))
        >>> len(g), g.dim
        (3, 3)
        >>> g.search(torch.tensor([[0., 0., 5.]]), k=1).labels
        tensor([[2]])
    """

    def __init__(self, dim: int | None = None, *, class_names: Sequence[str] | None = None) -> None:
        self._faiss = _import_faiss()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise InvalidArgumentError(f"dim: expected None or an int >= 1, got {dim!r}")
        if class_names is not None and (
            isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)
        ):
            raise InvalidArgumentError(f"class_names: expected a sequence of str, got {class_names!r}")
        self.class_names: list[str] | None = None if class_names is None else list(class_names)
        self._index: Any = None
        self._dim: int | None = None
        # Metadata is appended as chunks and concatenated on first read (no O(N) copy per add).
        self._chunks: dict[str, list[Tensor]] = {"labels": [], "image_ids": [], "boxes": []}
        if dim is not None:
            self._init_index(dim)

    def _init_index(self, dim: int) -> None:
        self._dim = dim
        self._index = self._faiss.IndexFlatIP(dim)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int | None:
        """Embedding size ``D`` (``None`` until known)."""
        return self._dim

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _column(self, name: str) -> Tensor:
        chunks = self._chunks[name]
        if len(chunks) != 1:
            empty = torch.empty((0, 4), dtype=torch.float32) if name == "boxes" else torch.empty(0, dtype=torch.long)
            chunks[:] = [torch.cat(chunks) if chunks else empty]
        return chunks[0]

    @property
    def labels(self) -> Tensor:
        """``Long[N]`` class label per item (``-1`` = unknown)."""
        return self._column("labels")

    @property
    def image_ids(self) -> Tensor:
        """``Long[N]`` image id per item (``-1`` = not given)."""
        return self._column("image_ids")

    @property
    def boxes(self) -> Tensor:
        """``Tensor[N, 4]`` xyxy box per item (``NaN`` rows = not given)."""
        return self._column("boxes")

    def embeddings(self) -> Tensor:
        """``Tensor[N, D]``: the stored unit embeddings (float32, CPU), in gallery order."""
        if not len(self):
            return torch.zeros(0, self._dim or 0)
        stored = self._index.reconstruct_n(0, len(self))
        # faiss.contrib.torch_utils (imported by some libraries) makes reconstruct_n return a tensor.
        return stored.cpu().float() if isinstance(stored, Tensor) else torch.from_numpy(stored)

    def __repr__(self) -> str:
        classes = "" if self.class_names is None else f", classes={len(self.class_names)}"
        return f"Gallery(size={len(self)}, dim={self._dim}{classes})"

    # ------------------------------------------------------------------ building

    def _as_faiss_input(self, name: str, x: Tensor) -> Any:
        check_ndim(name, x, 2, "Tensor[N, D]" if self._dim is None else f"Tensor[N, {self._dim}]")
        check_floating(name, x)
        if self._dim is not None and x.shape[1] != self._dim:
            raise ShapeError(f"{name}: expected Tensor[N, {self._dim}] (the gallery's D), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ShapeError(f"{name}: expected Tensor[N, D] with D >= 1, got shape {tuple(x.shape)}")
        x = x.detach().cpu().float()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InvalidArgumentError(f"{name}: expected finite embeddings, got NaN or inf values")
        return F.normalize(x, dim=1).contiguous().numpy()

    def add(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        image_ids: Tensor | None = None,
        boxes: Tensor | None = None,
    ) -> None:
        """Append ``embeddings: Tensor[N, D]`` (normalised here) with their metadata.

        ``labels`` / ``image_ids``: ``Long[N]`` (default ``-1``); ``boxes``: ``Tensor[N, 4]`` xyxy
        (default ``NaN``). New items get the indices ``len(self) .. len(self) + N - 1``.
        """
        x = self._as_faiss_input("embeddings", embeddings)
        n = x.shape[0]
        if labels is not None:
            check_labels("labels", labels, None if self.class_names is None else len(self.class_names))
        if image_ids is not None:
            check_labels("image_ids", image_ids)
        if boxes is not None:
            check_floating("boxes", boxes)
        meta = {
            "labels": _metadata("labels", labels, n, -1).long(),
            "image_ids": _metadata("image_ids", image_ids, n, -1).long(),
            "boxes": _metadata("boxes", boxes, n, math.nan, width=4).float(),
        }
        if self._index is None:
            self._init_index(x.shape[1])
        if n == 0:
            return
        self._index.add(x)
        for key, value in meta.items():
            self._chunks[key].append(value)

    # ------------------------------------------------------------------ searching

    def search(self, queries: Tensor, k: int, *, csls_reference: Tensor | None = None, csls_k: int = 10) -> SearchResult:
        """The ``k`` most similar items for each of ``queries: Tensor[Q, D]`` (normalised here).

        Returns a :class:`SearchResult` on the queries' device, rows padded with ``-1`` indices when
        the gallery holds fewer than ``k`` items. Exact: equal to a brute-force cosine top-k. A ``k``
        beyond both the gallery's size and :data:`MAX_PADDED_K` is clamped to the larger of the two:
        columns past the gallery's size only hold padding, and a huge ``k`` must not allocate
        ``Q × k`` of it.

        ``csls_reference: Tensor[R, D]``, a sample of the query domain (e.g. training-class objects
        seen the way queries are), ranks by CSLS instead of the cosine:
        ``2 cos(q, g) − r(g)`` with ``r(g)`` the mean cosine of ``g`` to its ``csls_k`` nearest
        reference rows (:func:`~fewsight.retrieval.csls_similarity`), which demotes gallery hubs
        that are near every query. Scores are then CSLS values, computed in blocks of queries.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k: expected an int >= 1, got {k!r}")
        x = self._as_faiss_input("queries", queries)
        q, n = x.shape[0], len(self)
        k = min(k, max(n, MAX_PADDED_K))
        if csls_reference is not None:
            return self._csls_search(x, k, csls_reference, csls_k, queries.device)
        scores = torch.full((q, k), -math.inf, dtype=torch.float32)
        indices = torch.full((q, k), -1, dtype=torch.long)
        if q and n:
            # One extra neighbour shows whether an unreturned item ties with the k-th score.
            depth = min(k + 1, n)
            dist, idx = self._index.search(x, depth)
            dist, idx = torch.from_numpy(dist), torch.from_numpy(idx).long()
            found = min(k, n)
            scores[:, :found], indices[:, :found] = self._order_ties(dist[:, :found], idx[:, :found])
            if depth > k:
                boundary = (dist[:, k] == dist[:, k - 1]).nonzero().squeeze(1)
                if boundary.numel():
                    scores[boundary], indices[boundary] = self._exact_rows(x[boundary.numpy()], k)
        return self._result(scores, indices, queries.device)

    def _csls_search(self, x: Any, k: int, reference: Tensor, csls_k: int, device: torch.device) -> SearchResult:
        reference = torch.from_numpy(self._as_faiss_input("csls_reference", reference))
        q, n = x.shape[0], len(self)
        scores = torch.full((q, k), -math.inf, dtype=torch.float32)
        indices = torch.full((q, k), -1, dtype=torch.long)
        if q and n:
            stored = self.embeddings()
            penalty = csls_penalty(stored, reference, csls_k)
            found = min(k, n)
            block = max(1, _BLOCK_ELEMENTS // n)
            for i in range(0, q, block):
                sim = 2 * torch.from_numpy(x[i : i + block]) @ stored.T - penalty[None, :]
                scores[i : i + block, :found], indices[i : i + block, :found] = ordered_topk(sim, found)
        return self._result(scores, indices, device)

    @staticmethod
    def _order_ties(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        # faiss returns equal scores in arbitrary order: sort by index, then stably by score.
        by_index = indices.argsort(dim=1)
        scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
        by_score = scores.argsort(dim=1, descending=True, stable=True)
        return scores.gather(1, by_score), indices.gather(1, by_score)

    def _exact_rows(self, x: Any, k: int) -> tuple[Tensor, Tensor]:
        # Rare path (a tie at the k-th place): brute force over the stored vectors for these rows.
        stored = self.embeddings()
        return ordered_topk(torch.from_numpy(x) @ stored.T, k)

    def _result(self, scores: Tensor, indices: Tensor, device: torch.device) -> SearchResult:
        valid = indices >= 0
        safe = indices.clamp_min(0)
        if len(self):
            labels = torch.where(valid, self.labels[safe], -1)
            image_ids = torch.where(valid, self.image_ids[safe], -1)
            boxes = torch.where(valid[..., None], self.boxes[safe], math.nan)
        else:
            labels = torch.full_like(indices, -1)
            image_ids = torch.full_like(indices, -1)
            boxes = torch.full((*indices.shape, 4), math.nan)
        return SearchResult(
            scores=scores.to(device),
            indices=indices.to(device),
            labels=labels.to(device),
            image_ids=image_ids.to(device),
            boxes=boxes.to(device),
        )

    # ------------------------------------------------------------------ files

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / ints / strings only (loadable with ``torch.load(weights_only=True)``)."""
        index = (
            torch.empty(0, dtype=torch.uint8)
            if self._index is None
            else torch.from_numpy(self._faiss.serialize_index(self._index).copy())
        )
        return {
            "format": GALLERY_FORMAT,
            "version": _VERSION,
            "dim": self._dim,
            "index": index,
            "labels": self.labels,
            "image_ids": self.image_ids,
            "boxes": self.boxes,
            "class_names": self.class_names,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the gallery to ``path`` (a file, or ``path/gallery.pt`` if ``path`` is a folder),
        atomically; returns the file's path."""
        path = _resolve_path(path)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(buffer.getvalue(), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Gallery:
        """Read a file written by :meth:`save` (``weights_only=True``).

        Raises :class:`~fewsight.errors.CheckpointError` naming the file when it is missing,
        unreadable, not a fewsight gallery, or inconsistent.
        """
        path = _resolve_path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: gallery file not found")
        try:
            state = torch.load(path, map_location=_to_host, weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            text = " ".join(str(exc).split())
            # torch's weights-only refusal is a page of advice (including to turn the check off): not relayed.
            reason = ("it holds objects other than tensors and plain containers, or is damaged"
                      if "Weights only load failed" in text else text.split(". ", 1)[0][:160])
            raise CheckpointError(
                f"{path}: not a readable gallery file ({type(exc).__name__}{': ' + reason if reason else ''})"
            ) from exc
        if not isinstance(state, dict) or state.get("format") != GALLERY_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: expected a {GALLERY_FORMAT!r} file, got {got!r}")
        if state.get("version") != _VERSION:
            raise CheckpointError(f"{path}: expected gallery format version {_VERSION}, got {state.get('version')!r}")
        try:
            return cls._from_state(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Gallery:
        gallery = cls(class_names=state.get("class_names"))
        dim, blob = state.get("dim"), state.get("index")
        if dim is not None:
            if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.numel() == 0:
                raise CheckpointError("missing faiss index bytes")
            try:
                index = gallery._faiss.deserialize_index(blob.numpy())
            except Exception as exc:  # faiss raises RuntimeError for bad bytes
                raise CheckpointError(f"corrupt faiss index ({type(exc).__name__})") from exc
            if index.d != dim:
                raise CheckpointError(f"faiss index has dimension {index.d}, metadata says {dim}")
            gallery._dim, gallery._index = dim, index
        n = len(gallery)
        for key, shape in (("labels", (n,)), ("image_ids", (n,)), ("boxes", (n, 4))):
            value = state.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise CheckpointError(f"{key}: expected shape {shape} (one row per item), got {got}")
            gallery._chunks[key] = [value]
        return gallery
