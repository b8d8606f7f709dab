"""The interface of a vector store behind a :class:`~fewsight.retrieval.Gallery`.

A backend holds ``N`` unit vectors of size ``D`` under the item indices ``0 .. N-1`` and answers
inner-product top-k searches; the gallery keeps the metadata, the CSLS option and the tie rules.
Everything crossing this interface is numpy on the CPU: ``float32`` C-contiguous vectors, already
L2-normalised by the gallery, and ``int64`` indices.

Example (a backend is normally driven through a gallery):
    >>> import numpy as np
    >>> from fewsight.retrieval.backends import FaissBackend
    >>> b = FaissBackend("Flat")
    >>> b.add(np.eye(3, dtype=np.float32), start=0)
    >>> len(b), b.dim
    (3, 3)
    >>> scores, ids = b.search(np.eye(3, dtype=np.float32)[2:], 2)
    >>> ids[0, 0].item(), scores[0, 0].item()
    (2, 1.0)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["VectorBackend"]


class VectorBackend(abc.ABC):
    """A store of unit vectors answering inner-product top-k searches (abstract).

    Subclasses say whether their search is exact (:attr:`exact`: the gallery then also resolves ties
    at the k-th place), whether :meth:`add` may overwrite items (:attr:`can_overwrite`) and the
    deepest search they answer (:attr:`max_depth`).
    """

    #: Name written in gallery files and given to :func:`~fewsight.retrieval.make_backend`.
    kind: ClassVar[str] = ""
    #: ``add(start < len(self))`` replaces items instead of being refused.
    can_overwrite: ClassVar[bool] = False
    #: The largest ``depth`` :meth:`search` answers (``None``: no limit).
    max_depth: ClassVar[int | None] = None

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """Vector size ``D`` (``None`` until :meth:`create` or the first :meth:`add`)."""

    @property
    @abc.abstractmethod
    def exact(self) -> bool:
        """Whether :meth:`search` returns the exact top-``depth`` (up to the order of equal scores)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of vectors held (those waiting for training included)."""

    @abc.abstractmethod
    def create(self, dim: int) -> None:
        """Make the (empty) store for vectors of size ``dim``; no-op when it already has that size.

        Raises :class:`~fewsight.errors.ShapeError` when the store holds another size.
        """

    @abc.abstractmethod
    def add(self, vectors: np.ndarray, start: int, metadata: Mapping[str, np.ndarray] | None = None) -> None:
        """Store ``vectors: float32[N, D]`` (unit rows) as the items ``start .. start + N - 1``.

        ``start`` is at most ``len(self)``; below it only where :attr:`can_overwrite`. ``metadata``
        (``labels: int64[N]``, ``image_ids: int64[N]``, ``boxes: float32[N, 4]``) is kept by backends
        that store it (see :meth:`stored_metadata`) and ignored by the others.
        """

    def train(self) -> None:
        """Finish any pending training now (indexes that learn from data); others: no-op."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``depth`` items per row of ``queries: float32[Q, D]``, best first.

        Returns ``(scores: float32[Q, depth], ids: int64[Q, depth])``; missing results are ``-1`` with
        score ``-inf``. ``1 <= depth <= len(self)``.
        """

    @abc.abstractmethod
    def reconstruct(self, start: int, stop: int) -> np.ndarray:
        """``float32[stop - start, D]``: the stored vectors of items ``start .. stop - 1``
        (approximate for compressed indexes such as PQ)."""

    def stored_metadata(self) -> dict[str, np.ndarray] | None:
        """Metadata the store keeps itself (``labels``, ``image_ids``, ``boxes`` for items ``0 .. N-1``),
        read when a gallery is built on a non-empty store; ``None`` where it keeps none."""
        return None

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Plain settings (str / int / float / None / dict) that re-open this store: ``kind`` and the
        constructor's options, never a secret."""

    def to_bytes(self) -> np.ndarray | None:
        """``uint8[B]``: the whole store for a one-file gallery (empty before :meth:`create`), or
        ``None`` where the vectors live elsewhere."""
        return None

    @abc.abstractmethod
    def save_files(self, folder: Path) -> dict[str, Any]:
        """Write the vectors into ``folder`` (atomically, each file under a new name) and return what
        :meth:`open` needs to find them; a store that lives elsewhere writes nothing and returns ``{}``.

        Files of this kind in ``folder`` that the result does not name are stale once the gallery's
        metadata refers to the new ones: :meth:`stale_files` lists them.
        """

    @staticmethod
    def stale_files(folder: Path, files: Mapping[str, Any]) -> list[Path]:
        """Files in ``folder`` an earlier :meth:`save_files` wrote that ``files`` no longer names."""
        return []

    @classmethod
    @abc.abstractmethod
    def open(
        cls,
        config: Mapping[str, Any],
        *,
        folder: Path,
        files: Mapping[str, Any],
        blob: np.ndarray | None = None,
        mmap: bool = False,
        **overrides: Any,
    ) -> VectorBackend:
        """Re-open a store saved by :meth:`save_files` (into ``folder``) or :meth:`to_bytes` (``blob``).

        ``overrides`` replace options of ``config`` (e.g. a search knob, a token, another device).
        Raises :class:`~fewsight.errors.CheckpointError` for missing or corrupt files.
        """

    def close(self) -> None:
        """Release connections or files (the store stays usable only where the backend says so)."""

    def describe(self) -> str:
        """A short name for messages and ``repr`` (e.g. ``"faiss:HNSW32"``)."""
        return self.kind
