"""Milvus vector store through ``pymilvus``: embedded milvus-lite (a local ``.db`` file) or a server.

``uri`` picks where the collection lives: a local file path ending in ``.db`` (the default,
``fewsight_gallery.db``) runs milvus-lite inside this process, nothing to install beyond the
``milvus`` extra (``pip install "fewsight[milvus]"``; not on Windows); ``http://host:19530``
(with ``token="user:password"`` or an API key) is a Milvus server or cluster that you run. The same
code serves both.

One collection holds one gallery, one row per item: ``id`` (INT64 primary key = the item's gallery
index), ``vector`` (FLOAT_VECTOR ``D``, inner-product metric on unit vectors = cosine), ``label``
and ``image_id`` (INT64, ``-1`` = unknown / not given) and ``box`` (4 floats xyxy, NaN = not given).
Rows are *upserted* by id, so adding the same items again (a chunk re-run after a crash) replaces
them instead of duplicating them. ``index_type="FLAT"`` (default) is exact search; any other Milvus
index type (``"HNSW"``, ``"IVF_FLAT"``, ...) with ``index_params`` / ``search_params`` is
approximate. A search returns at most :attr:`MilvusBackend.max_depth` (16384) items per query.

Example:
    >>> import numpy as np, tempfile, os
    >>> b = MilvusBackend(os.path.join(tempfile.mkdtemp(), "g.db"))   # doctest: +SKIP
    >>> b.add(np.eye(3, dtype=np.float32), start=0)                     # doctest: +SKIP
    >>> b.add(np.eye(3, dtype=np.float32), start=0)  # the same ids again: replaced, not duplicated  # doctest: +SKIP
    >>> len(b), b.search(np.eye(3, dtype=np.float32)[1:2], 1)[1].tolist()   # doctest: +SKIP
    (3, [[1]])
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fewsight.errors import CheckpointError, InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.retrieval.backends.base import VectorBackend

__all__ = ["DEFAULT_MILVUS_URI", "MilvusBackend"]

#: Where :class:`MilvusBackend` keeps its collection unless told otherwise (milvus-lite, current folder).
DEFAULT_MILVUS_URI = "fewsight_gallery.db"
_FIELDS = ("id", "vector", "label", "image_id", "box")
_OPTIONS = ("uri", "collection", "token", "index_type", "index_params", "search_params", "timeout")
_QUERY_BLOCK = 1024  # queries per search request
_ROWS_PER_QUERY = 16384  # Milvus's limit on rows returned by one query (offset + limit)
_REQUEST_BYTES = 8 << 20  # upsert requests stay well below gRPC's 64 MiB message limit
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_INSTALL = 'install the milvus extra: pip install "fewsight[milvus]" (pymilvus and milvus-lite)'


def _import_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise MissingDependencyError(f"the milvus backend needs pymilvus: {_INSTALL}; import failed with: {exc}") from exc
    return pymilvus


class MilvusBackend(VectorBackend):
    """Vectors and metadata in a Milvus collection (milvus-lite file or server), inner-product metric.

    Args:
        uri: a local ``.db`` file (milvus-lite; default :data:`DEFAULT_MILVUS_URI`) or a server URI
            such as ``"http://localhost:19530"``.
        collection: the collection's name (letters, digits, ``_``); created on the first add with the
            gallery's ``D``, re-opened when it exists.
        token: server credentials (``"user:password"`` or an API key); never written to a file.
        index_type / index_params / search_params: the Milvus vector index (``"FLAT"``: exact).
        timeout: seconds per request (``None``: pymilvus's default).
    """

    kind = "milvus"
    can_overwrite = True
    max_depth = 16384

    def __init__(
        self,
        uri: str = DEFAULT_MILVUS_URI,
        *,
        collection: str = "fewsight_gallery",
        token: str | None = None,
        index_type: str = "FLAT",
        index_params: Mapping[str, Any] | None = None,
        search_params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        pymilvus = _import_pymilvus()
        if not isinstance(uri, str) or not uri:
            raise InvalidArgumentError(f"uri: expected a local .db file or a server URI such as 'http://host:19530', got {uri!r}")
        if not _SCHEME.match(uri):
            if not uri.endswith(".db"):
                raise InvalidArgumentError(f"uri: expected a local file ending in '.db' (milvus-lite) or a server URI, got {uri!r}")
            if importlib.util.find_spec("milvus_lite") is None:
                raise MissingDependencyError(f"uri {uri!r}: a local .db file needs milvus-lite: {_INSTALL}")
            path = Path(uri).expanduser().resolve()  # files are re-opened from other folders
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(path)
        if not isinstance(collection, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
            raise InvalidArgumentError(f"collection: expected a name of letters, digits and '_' (not starting with a digit), got {collection!r}")
        if not isinstance(index_type, str) or not index_type:
            raise InvalidArgumentError(f"index_type: expected a Milvus index type such as 'FLAT' or 'HNSW', got {index_type!r}")
        for name, value in (("index_params", index_params), ("search_params", search_params)):
            if value is not None and not isinstance(value, Mapping):
                raise InvalidArgumentError(f"{name}: expected None or a dict of Milvus parameters, got {value!r}")
        self._uri, self._name, self._index_type = uri, collection, index_type.upper()
        self._index_params = dict(index_params or {})
        self._search_params = dict(search_params or {})
        self._timeout = timeout
        self._pymilvus = pymilvus
        try:
            self._client = pymilvus.MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except Exception as exc:  # pymilvus raises MilvusException, ConnectionError, ... when it cannot connect
            raise InvalidArgumentError(
                f"uri: expected a reachable Milvus (a local .db file or http://host:19530), got {uri!r} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from None
        self._dim: int | None = None
        self._count = 0
        self._unindexed = False  # rows added since the collection was last loaded
        if self._client.has_collection(collection):
            self._open_existing()

    def _open_existing(self) -> None:
        fields = {f["name"]: f for f in self._client.describe_collection(self._name)["fields"]}
        if set(fields) != set(_FIELDS):
            raise InvalidArgumentError(
                f"collection: expected a fewsight gallery collection (fields {', '.join(_FIELDS)}), got "
                f"{self._name!r} at {self._uri} with fields {sorted(fields)}"
            )
        self._dim = int(fields["vector"]["params"]["dim"])
        self._client.load_collection(self._name)
        rows = self._client.query(self._name, filter="", output_fields=["count(*)"])
        self._count = int(rows[0]["count(*)"])

    # ------------------------------------------------------------------ facts

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def exact(self) -> bool:
        return self._index_type == "FLAT"

    @property
    def uri(self) -> str:
        """Where the collection lives (a local file is made absolute)."""
        return self._uri

    @property
    def collection(self) -> str:
        """The collection's name."""
        return self._name

    @property
    def client(self) -> Any:
        """The ``pymilvus.MilvusClient`` (for what this class does not wrap)."""
        return self._client

    def __len__(self) -> int:
        return self._count

    def describe(self) -> str:
        return f"milvus:{self._name}@{self._uri}"

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self._uri, "collection": self._name, "index_type": self._index_type,
                "index_params": dict(self._index_params), "search_params": dict(self._search_params),
                "timeout": self._timeout}

    # ------------------------------------------------------------------ building

    def create(self, dim: int) -> None:
        if self._dim is not None:
            if dim != self._dim:
                raise ShapeError(f"dim: expected {self._dim} (the D of collection {self._name!r}), got {dim}")
            return
        client, DataType = self._client, self._pymilvus.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("label", DataType.INT64)
        schema.add_field("image_id", DataType.INT64)
        schema.add_field("box", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
        index = client.prepare_index_params()
        index.add_index("vector", index_type=self._index_type, metric_type="IP", params=self._index_params)
        # Strong consistency: a search right after an add sees it (also on a server).
        client.create_collection(self._name, schema=schema, index_params=index, consistency_level="Strong")
        self._dim = dim

    def add(self, vectors: np.ndarray, start: int, metadata: Mapping[str, np.ndarray] | None = None) -> None:
        if start > self._count:
            raise InvalidArgumentError(f"start: expected at most {self._count} (items have no gaps), got {start}")
        if vectors.ndim != 2:
            raise ShapeError(f"vectors: expected float32[N, D], got shape {vectors.shape}")
        n = len(vectors)
        self.create(int(vectors.shape[1]))
        if not n:
            return
        meta = dict(metadata or {})
        labels = np.asarray(meta.get("labels", np.full(n, -1)), dtype=np.int64).tolist()
        image_ids = np.asarray(meta.get("image_ids", np.full(n, -1)), dtype=np.int64).tolist()
        boxes = np.asarray(meta.get("boxes", np.full((n, 4), math.nan)), dtype=np.float32).tolist()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        step = max(1, _REQUEST_BYTES // (4 * vectors.shape[1] + 64))
        for i in range(0, n, step):
            rows = [{"id": start + j, "vector": vectors[j], "label": labels[j], "image_id": image_ids[j], "box": boxes[j]}
                    for j in range(i, min(n, i + step))]
            self._client.upsert(self._name, rows, timeout=self._timeout)
        self._count = max(self._count, start + n)
        self._unindexed = True

    def train(self) -> None:
        """Build the approximate index over what was added (milvus-lite builds it when the collection
        is loaded; until then a search scans every row). No-op for ``FLAT``."""
        if self._unindexed and self._index_type != "FLAT" and self._dim is not None:
            self._client.flush(self._name, timeout=self._timeout)
            self._client.release_collection(self._name, timeout=self._timeout)
            self._client.load_collection(self._name, timeout=self._timeout)
        self._unindexed = False

    def set_search_params(self, **params: Any) -> None:
        """Replace search-time parameters (e.g. ``ef=64`` for HNSW, ``nprobe=16`` for IVF) in place."""
        self._search_params = dict(params)

    # ------------------------------------------------------------------ reading

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        if depth > self.max_depth:
            raise InvalidArgumentError(f"k: expected at most {self.max_depth} with the milvus backend (its top-k limit), got {depth}")
        q = len(queries)
        scores = np.full((q, depth), -np.inf, dtype=np.float32)
        ids = np.full((q, depth), -1, dtype=np.int64)
        if not self._count or not q:
            return scores, ids
        self.train()
        params = {"metric_type": "IP", "params": dict(self._search_params)}
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        for i in range(0, q, _QUERY_BLOCK):
            block = queries[i : i + _QUERY_BLOCK]
            found = self._client.search(self._name, data=list(block), limit=depth, output_fields=["id"],
                                        search_params=params, anns_field="vector", timeout=self._timeout)
            for r, hits in enumerate(found):
                m = min(len(hits), depth)
                ids[i + r, :m] = [h["id"] for h in hits[:m]]
                scores[i + r, :m] = [h["distance"] for h in hits[:m]]
        return scores, ids

    def _rows(self, start: int, stop: int, fields: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for a in range(start, stop, _ROWS_PER_QUERY):
            b = min(stop, a + _ROWS_PER_QUERY)
            rows = self._client.query(self._name, filter=f"id >= {a} and id < {b}", output_fields=["id", *fields],
                                      limit=b - a, timeout=self._timeout)
            if len(rows) != b - a:
                raise CheckpointError(
                    f"milvus collection {self._name!r} at {self._uri}: expected the items {a} .. {b - 1}, "
                    f"got {len(rows)} of them (was an add cut short? add the missing items again)"
                )
            out.extend(sorted(rows, key=lambda row: row["id"]))
        return out

    def reconstruct(self, start: int, stop: int) -> np.ndarray:
        if stop <= start or self._dim is None:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        rows = self._rows(start, stop, ["vector"])
        return np.asarray([row["vector"] for row in rows], dtype=np.float32).reshape(stop - start, self._dim)

    def stored_metadata(self) -> dict[str, np.ndarray]:
        rows = self._rows(0, self._count, ["label", "image_id", "box"])
        return {
            "labels": np.asarray([row["label"] for row in rows], dtype=np.int64),
            "image_ids": np.asarray([row["image_id"] for row in rows], dtype=np.int64),
            "boxes": np.asarray([list(row["box"]) for row in rows], dtype=np.float32).reshape(-1, 4),
        }

    # ------------------------------------------------------------------ files

    def save_files(self, folder: Path) -> dict[str, Any]:
        # The vectors stay in the collection; a flush makes a server persist what was upserted.
        if self._dim is not None:
            self._client.flush(self._name, timeout=self._timeout)
            self.train()
        return {"count": self._count}

    @classmethod
    def open(
        cls,
        config: Mapping[str, Any],
        *,
        folder: Path,
        files: Mapping[str, Any],
        blob: Any = None,
        mmap: bool = False,
        **overrides: Any,
    ) -> MilvusBackend:
        if mmap:
            raise InvalidArgumentError("mmap: expected False for a milvus gallery (Milvus manages its own memory), got True")
        options = {k: v for k, v in config.items() if k in _OPTIONS}
        for key, value in overrides.items():
            if key not in _OPTIONS:
                raise InvalidArgumentError(f"{key}: expected an option of the milvus backend {_OPTIONS}, got {key}={value!r}")
            options[key] = value
        backend = cls(**options)
        count = files.get("count")
        if count is not None and len(backend) != count:
            raise CheckpointError(
                f"expected {count} items in milvus collection {backend.collection!r} at {backend.uri}, got {len(backend)}"
            )
        return backend

    def close(self) -> None:
        """Close the connection (milvus-lite also stops when the last one closes)."""
        self._client.close()
