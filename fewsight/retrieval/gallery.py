"""A searchable gallery of object embeddings with metadata, over a pluggable vector backend.

:class:`Gallery` stores L2-normalised float32 embeddings in a vector backend (inner product of
unit vectors = cosine similarity) together with one row of metadata per item: ``labels`` (``-1`` =
unknown), ``image_ids`` (``-1`` = not given) and ``boxes`` (``NaN`` rows = not given), plus optional
``class_names``. :meth:`Gallery.search` returns a :class:`SearchResult`.

Backends (:mod:`fewsight.retrieval.backends`, chosen with ``backend=`` or
:func:`~fewsight.retrieval.make_backend`): faiss with any index factory string (default ``"Flat"``:
exact search, as before backends existed; ``"HNSW32"``, ``"IVF4096,PQ32"``, ... approximate), or a
Milvus collection (milvus-lite in a local ``.db`` file, or a server). faiss is the optional
``retrieval`` extra (``pip install "fewsight[retrieval]"``), Milvus the ``milvus`` extra.

Ordering: by score, ties broken by gallery index (lower first). With an exact backend (faiss
``Flat``, Milvus ``FLAT``) this also holds at the k-th place (where the index's own order is
arbitrary), the convention of :mod:`fewsight.retrieval.metrics`; results equal a brute-force cosine
top-k. With an approximate index the results are the index's: items it misses are missing, and
scores are its scores (exact inner products for HNSW / IVF-Flat / ``RFlat`` re-ranked indexes,
quantised estimates for PQ without ``RFlat``); only the returned items are put in that order.
Embeddings on any device / dtype are copied to CPU float32; results come back on the queries' device.

Files (:meth:`Gallery.save`; writes are atomic):

* ``layout="file"`` (default): one ``torch.save`` file (``path``, or ``path/gallery.pt`` for a
  folder) holding the metadata and, for faiss, ``faiss.serialize_index`` bytes (format version 1).
* ``layout="folder"``: a folder holding ``gallery.pt`` (the metadata, format version 2) and, for
  faiss, ``index-<random>.faiss`` written by ``faiss.write_index``, which
  ``Gallery.load(folder, mmap=True)`` memory-maps instead of reading (for indexes larger than RAM).
  The metadata file, renamed into place last, names the index file: a reader or a crash sees the
  old gallery or the new one, never a mix.

For Milvus both layouts write only the metadata file; the vectors stay in the collection, which
:meth:`Gallery.load` re-opens. Files load with ``torch.load(weights_only=True)``; a missing or corrupt
file raises :class:`~fewsight.errors.CheckpointError` naming it.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewsight.errors import (
    CheckpointError,
    InvalidArgumentError,
    ShapeError,
    check_floating,
    check_labels,
    check_ndim,
)
from fewsight._io import atomic_write_bytes
from fewsight.retrieval.backends import BACKENDS, FaissBackend, VectorBackend
from fewsight.retrieval.hubness import csls_penalty
from fewsight.retrieval.metrics import ordered_topk

__all__ = ["GALLERY_FORMAT", "Gallery", "SearchResult"]

GALLERY_FORMAT = "fewsight.gallery"
#: :meth:`Gallery.search` pads its rows to ``k`` columns up to this ``k`` (or the gallery's size, if larger).
MAX_PADDED_K = 1024
_ONE_FILE, _WITH_FILES = 1, 2  # format versions: index bytes inside / vectors beside or elsewhere
_FILE_NAME = "gallery.pt"  # used when save/load is given a folder
_BLOCK_ELEMENTS = 1 << 22  # CSLS scores: at most this many query x gallery floats at once


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


def _class_names(class_names: Any) -> list[str] | None:
    if class_names is not None and (
        isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)
    ):
        raise InvalidArgumentError(f"class_names: expected a sequence of str, got {class_names!r}")
    return None if class_names is None else list(class_names)


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
    """Cosine-similarity search over object embeddings with aligned metadata.

    Args:
        dim: embedding size ``D``; ``None`` = taken from the first :meth:`add`.
        class_names: names of the classes; when given, labels must be ``< len(class_names)``
            (``< 0`` = unknown is always allowed).
        backend: where the vectors live (a :class:`~fewsight.retrieval.backends.VectorBackend`);
            default ``FaissBackend("Flat")``, exact. A backend that already holds items (a Milvus
            collection re-opened) brings them with their metadata. One backend serves one gallery.

    Attributes:
        labels / image_ids: ``Long[N]``; boxes: ``Tensor[N, 4]`` (CPU; ``NaN`` rows where not given).

    Example:
        >>> g = Gallery(dim=3)
        >>> g.add(torch.eye(3), labels=torch.tensor([0, 1, 2]))
        >>> len(g), g.dim
        (3, 3)
        >>> g.search(torch.tensor([[0., 0., 5.]]), k=1).labels
        tensor([[2]])
        >>> from fewsight.retrieval import make_backend
        >>> h = Gallery(backend=make_backend("faiss", index="HNSW32"))
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        class_names: Sequence[str] | None = None,
        backend: VectorBackend | None = None,
    ) -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise InvalidArgumentError(f"dim: expected None or an int >= 1, got {dim!r}")
        class_names = _class_names(class_names)
        if backend is None:
            backend = FaissBackend()
        elif not isinstance(backend, VectorBackend):
            raise InvalidArgumentError(
                f"backend: expected a VectorBackend (e.g. make_backend('faiss', index='HNSW32')), got {type(backend).__name__}"
            )
        self._attach(class_names, backend)
        if dim is not None:
            backend.create(dim)
        if len(backend):
            self._set_metadata(backend.stored_metadata() or {}, f"backend {backend.describe()}")

    def _attach(self, class_names: list[str] | None, backend: VectorBackend) -> None:
        self.class_names = class_names
        self._backend = backend
        # Metadata is appended as chunks and concatenated on first read (no O(N) copy per add).
        self._chunks: dict[str, list[Tensor]] = {"labels": [], "image_ids": [], "boxes": []}

    def _set_metadata(self, meta: Mapping[str, Any], source: str) -> None:
        n = len(self._backend)
        defaults = {"labels": torch.full((n,), -1), "image_ids": torch.full((n,), -1),
                    "boxes": torch.full((n, 4), math.nan)}
        for key, shape in (("labels", (n,)), ("image_ids", (n,)), ("boxes", (n, 4))):
            value = meta.get(key, defaults[key])
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise CheckpointError(f"{key}: expected shape {shape} (one row per item of the {source}), got {got}")
            self._chunks[key] = [value.float() if key == "boxes" else value.long()]

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int | None:
        """Embedding size ``D`` (``None`` until known)."""
        return self._backend.dim

    @property
    def backend(self) -> VectorBackend:
        """The vector store (its knobs and timings, e.g. ``gallery.backend.set_search_params(nprobe=32)``)."""
        return self._backend

    def __len__(self) -> int:
        return len(self._backend)

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
        """``Tensor[N, D]``: the stored unit embeddings (float32, CPU), in gallery order (for a
        PQ-compressed faiss index, their reconstructions)."""
        if not len(self):
            return torch.zeros(0, self.dim or 0)
        return torch.from_numpy(self._backend.reconstruct(0, len(self)))

    def __repr__(self) -> str:
        classes = "" if self.class_names is None else f", classes={len(self.class_names)}"
        kind = self._backend.describe()
        backend = "" if kind == "faiss:Flat" else f", backend={kind}"
        return f"Gallery(size={len(self)}, dim={self.dim}{classes}{backend})"

    def close(self) -> None:
        """Release the backend's connection (Milvus); the gallery is not used afterwards."""
        self._backend.close()

    # ------------------------------------------------------------------ building

    def _as_vectors(self, name: str, x: Tensor) -> np.ndarray:
        dim = self.dim
        check_ndim(name, x, 2, "Tensor[N, D]" if dim is None else f"Tensor[N, {dim}]")
        check_floating(name, x)
        if dim is not None and x.shape[1] != dim:
            raise ShapeError(f"{name}: expected Tensor[N, {dim}] (the gallery's D), got shape {tuple(x.shape)}")
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
        *,
        start: int | None = None,
    ) -> None:
        """Append ``embeddings: Tensor[N, D]`` (normalised here) with their metadata.

        ``labels`` / ``image_ids``: ``Long[N]`` (default ``-1``); ``boxes``: ``Tensor[N, 4]`` xyxy
        (default ``NaN``). New items get the indices ``start .. start + N - 1``, ``start`` defaulting
        to ``len(self)``. A smaller ``start`` replaces the items from there on (backends that can,
        i.e. Milvus: re-adding a chunk after a crash does not duplicate it); faiss only appends.
        """
        x = self._as_vectors("embeddings", embeddings)
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
        size = len(self)
        if start is None:
            start = size
        elif isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= size:
            raise InvalidArgumentError(f"start: expected an int in [0, {size}] (items have no gaps), got {start!r}")
        elif start < size and not self._backend.can_overwrite:
            raise InvalidArgumentError(
                f"start: expected {size} (the {self._backend.kind} backend cannot replace items), got {start}"
            )
        if self.dim is None:
            self._backend.create(x.shape[1])
        if n == 0:
            return
        self._backend.add(x, start, {key: value.numpy() for key, value in meta.items()})
        for key, value in meta.items():
            if start == size:
                self._chunks[key].append(value)
            else:  # replaced items, then perhaps new ones
                column = self._column(key)
                self._chunks[key] = [torch.cat([column[:start], value, column[start + n :]])]

    # ------------------------------------------------------------------ searching

    def search(self, queries: Tensor, k: int, *, csls_reference: Tensor | None = None, csls_k: int = 10) -> SearchResult:
        """The ``k`` most similar items for each of ``queries: Tensor[Q, D]`` (normalised here).

        Returns a :class:`SearchResult` on the queries' device, rows padded with ``-1`` indices when
        the gallery holds fewer than ``k`` items. With an exact backend, equal to a brute-force cosine
        top-k (see the module docstring for approximate ones). A ``k`` beyond both the gallery's size
        and :data:`MAX_PADDED_K` is clamped to the larger of the two: columns past the gallery's size
        only hold padding, and a huge ``k`` must not allocate ``Q × k`` of it.

        ``csls_reference: Tensor[R, D]``, a sample of the query domain (e.g. training-class objects
        seen the way queries are), ranks by CSLS instead of the cosine:
        ``2 cos(q, g) − r(g)`` with ``r(g)`` the mean cosine of ``g`` to its ``csls_k`` nearest
        reference rows (:func:`~fewsight.retrieval.csls_similarity`), which demotes gallery hubs
        that are near every query. Scores are then CSLS values, computed in blocks of queries over
        :meth:`embeddings` (brute force, whatever the backend).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k: expected an int >= 1, got {k!r}")
        x = self._as_vectors("queries", queries)
        q, n = x.shape[0], len(self)
        k = min(k, max(n, MAX_PADDED_K))
        if csls_reference is not None:
            return self._csls_search(x, k, csls_reference, csls_k, queries.device)
        scores = torch.full((q, k), -math.inf, dtype=torch.float32)
        indices = torch.full((q, k), -1, dtype=torch.long)
        if q and n:
            found = min(k, n)
            limit = min(n, self._backend.max_depth or n)
            if found > limit:
                raise InvalidArgumentError(f"k: expected at most {limit} with the {self._backend.kind} backend, got {k}")
            # Exact backends: one extra neighbour shows whether an unreturned item ties with the k-th score.
            depth = min(found + 1, limit) if self._backend.exact else found
            dist, idx = (torch.from_numpy(a) for a in self._backend.search(x, depth))
            scores[:, :found], indices[:, :found] = self._order_ties(dist[:, :found], idx[:, :found])
            if depth > found:
                tied = (dist[:, found] == dist[:, found - 1]) & (idx[:, found] >= 0)
                rows = tied.nonzero().squeeze(1).numpy()
                if rows.size:
                    self._complete_ties(x, rows, found, depth, dist, idx, scores, indices)
        return self._result(scores, indices, queries.device)

    def _complete_ties(self, x: np.ndarray, rows: np.ndarray, k: int, depth: int, dist: Tensor, idx: Tensor,
                       scores: Tensor, indices: Tensor) -> None:
        # Rare path (a tie at the k-th place): search these rows deeper until the whole group of items
        # tied with the k-th score is in, then keep its lowest indices.
        limit = min(len(self), self._backend.max_depth or len(self))
        dist, idx = dist[rows], idx[rows]
        while True:
            done = (dist[:, -1] < dist[:, k - 1]) | (depth >= limit)
            if bool(done.any()):
                s, i = self._order_ties(dist[done], idx[done])
                target = torch.from_numpy(rows[done.numpy()])
                scores[target], indices[target] = s[:, :k], i[:, :k]
            rows = rows[~done.numpy()]
            if not rows.size:
                return
            depth = min(2 * depth, limit)
            dist, idx = (torch.from_numpy(a) for a in self._backend.search(x[rows], depth))

    def _csls_search(self, x: np.ndarray, k: int, reference: Tensor, csls_k: int, device: torch.device) -> SearchResult:
        reference = torch.from_numpy(self._as_vectors("csls_reference", reference))
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
        # Indexes return equal scores in arbitrary order: sort by index, then stably by score.
        by_index = indices.argsort(dim=1)
        scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
        by_score = scores.argsort(dim=1, descending=True, stable=True)
        return scores.gather(1, by_score), indices.gather(1, by_score)

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

    def _state(self, *, blob: np.ndarray | None = None, files: Mapping[str, Any] | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": GALLERY_FORMAT,
            "version": _ONE_FILE if blob is not None else _WITH_FILES,
            "dim": self.dim,
            "labels": self.labels,
            "image_ids": self.image_ids,
            "boxes": self.boxes,
            "class_names": self.class_names,
            "backend": self._backend.config(),
        }
        if blob is not None:
            state["index"] = torch.from_numpy(np.array(blob, dtype=np.uint8))  # a copy torch owns
        else:
            state["files"] = dict(files or {})
        return state

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / ints / strings only (loadable with ``torch.load(weights_only=True)``): the
        one-file form (version 1) where the backend can give its bytes (faiss), else the metadata
        with the backend's settings (version 2)."""
        return self._state(blob=self._backend.to_bytes())

    def save(self, path: str | os.PathLike[str], *, layout: str = "file") -> Path:
        """Write the gallery, atomically; returns the metadata file's path.

        ``layout="file"``: one file at ``path`` (``path/gallery.pt`` if ``path`` is a folder).
        ``layout="folder"``: ``path`` is a folder (created) holding ``gallery.pt`` and the faiss
        index file, loadable with ``mmap=True``; index files of an earlier save there are removed.
        """
        if layout not in ("file", "folder"):
            raise InvalidArgumentError(f"layout: expected 'file' or 'folder', got {layout!r}")
        if layout == "file":
            file = _resolve_path(path)
            blob = self._backend.to_bytes()
            state = self._state(blob=blob) if blob is not None else self._state(files=self._backend.save_files(file.parent))
            self._write(state, file)
            if file.name == _FILE_NAME:  # it replaced a folder gallery's metadata: its index files are stale
                self._remove_stale(file.parent, state.get("files", {}))
            return file
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InvalidArgumentError(f"path: expected a folder for layout='folder', got the file {folder}")
        files = self._backend.save_files(folder)
        file = self._write(self._state(files=files), folder / _FILE_NAME)
        self._remove_stale(folder, files)
        return file

    def _remove_stale(self, folder: Path, files: Mapping[str, Any]) -> None:
        for stale in self._backend.stale_files(folder, files):
            try:
                stale.unlink()
            except OSError:  # e.g. still mapped by a reader on a system that forbids removing it
                pass

    @staticmethod
    def _write(state: dict[str, Any], file: Path) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return atomic_write_bytes(buffer.getvalue(), file)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool | str = False, **backend_options: Any) -> Gallery:
        """Read a gallery written by :meth:`save` (``weights_only=True``): a file, or a folder holding
        ``gallery.pt``.

        ``mmap=True`` memory-maps the faiss index of a ``layout="folder"`` gallery (read-only until
        the first :meth:`add`, which copies it into memory); ``mmap="auto"`` memory-maps when the
        gallery has such an index file and reads it otherwise. ``backend_options`` replace saved
        backend settings, e.g. ``nprobe=64`` or ``device="cpu"`` (faiss), ``token=...`` or ``uri=...``
        (Milvus).

        Raises :class:`~fewsight.errors.CheckpointError` naming the file when it is missing,
        unreadable, not a fewsight gallery, or inconsistent.
        """
        if mmap not in (True, False, "auto"):
            raise InvalidArgumentError(f"mmap: expected True, False or 'auto', got {mmap!r}")
        file = _resolve_path(path)
        state = _read_state(file)
        try:
            config = state.get("backend") or {"kind": FaissBackend.kind}  # version-1 files before backends
            kind = config.get("kind") if isinstance(config, dict) else None
            if kind not in BACKENDS:
                raise CheckpointError(f"expected a backend kind in {tuple(BACKENDS)}, got {kind!r}")
            if state["version"] == _ONE_FILE:
                if mmap is True:
                    raise InvalidArgumentError(
                        f"mmap: expected a gallery saved with layout='folder' (its index in a file of its own), "
                        f"got the one-file gallery {file}"
                    )
                blob = state.get("index")
                if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or (state.get("dim") is not None and not blob.numel()):
                    raise CheckpointError("missing faiss index bytes")
                backend = BACKENDS[kind].open(config, folder=file.parent, files={}, blob=blob.numpy(), **backend_options)
            else:
                files = state.get("files")
                if not isinstance(files, dict):
                    raise CheckpointError(f"expected a dict of the backend's files, got {type(files).__name__}")
                mapped = bool(files.get("index_file")) if mmap == "auto" else mmap
                backend = BACKENDS[kind].open(config, folder=file.parent, files=files, mmap=mapped, **backend_options)
            if backend.dim != state.get("dim"):
                raise CheckpointError(f"the {kind} index has dimension {backend.dim}, metadata says {state.get('dim')}")
            # Built here rather than by __init__: the metadata comes from the file, not from the store
            # (for Milvus that would be one more full read).
            gallery = cls.__new__(cls)
            try:
                gallery._attach(_class_names(state.get("class_names")), backend)
            except InvalidArgumentError as exc:
                raise CheckpointError(str(exc)) from None
            gallery._set_metadata(state, "gallery file")
        except CheckpointError as exc:
            raise CheckpointError(f"{file}: {exc}") from exc
        return gallery


def _read_state(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file}: gallery file not found")
    try:
        state = torch.load(file, map_location=_to_host, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        text = " ".join(str(exc).split())
        # torch's weights-only refusal is a page of advice (including to turn the check off): not relayed.
        reason = ("it holds objects other than tensors and plain containers, or is damaged"
                  if "Weights only load failed" in text else text.split(". ", 1)[0][:160])
        raise CheckpointError(
            f"{file}: not a readable gallery file ({type(exc).__name__}{': ' + reason if reason else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != GALLERY_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: expected a {GALLERY_FORMAT!r} file, got {got!r}")
    if state.get("version") not in (_ONE_FILE, _WITH_FILES):
        raise CheckpointError(
            f"{file}: expected gallery format version {_ONE_FILE} or {_WITH_FILES}, got {state.get('version')!r}"
        )
    return state
