"""Faiss vector store: any index factory string, inner product on unit vectors, on the CPU or a GPU.

``FaissBackend("Flat")`` (the default) is exact search, the gallery's behaviour before backends.
Any other factory string gives an approximate index, e.g. ``"HNSW32"`` (graph, no training),
``"IVF4096,PQ32"`` (inverted lists of product-quantised codes: small, needs training) or
``"IVF1024,PQ32x8,RFlat"`` (the same, re-ranked with exact vectors kept beside the codes).

Training (IVF, PQ, ...): vectors added before the index is trained wait in a buffer; when it holds
``train_size`` vectors the index trains on the first ``train_size`` of them and then stores the
whole buffer. A search, a save or :meth:`FaissBackend.train` before that trains on everything
buffered. Too few vectors for the index (``"IVF4096"`` with 100) raise
:class:`~fewsight.errors.InvalidArgumentError` naming the index, the count needed and the count given.

PQ codes are trained without faiss's polysemous step (a Hamming-filter ordering that plain search
does not use and that costs most of the training time).

Search knobs: ``nprobe`` (IVF lists visited), ``ef_search`` (HNSW ``efSearch``), ``k_factor``
(candidates re-ranked by ``RFlat``, as a multiple of ``depth``); build knob: ``ef_construction``.
:meth:`FaissBackend.set_search_params` changes them at any time; :attr:`FaissBackend.timings`
holds the seconds spent training and adding.

Device: ``"auto"`` (default) puts the index on GPU 0 when faiss is a GPU build and sees a GPU, and
keeps it on the CPU otherwise (also for indexes faiss cannot move, such as HNSW); ``"cpu"``;
``"cuda"`` / ``"cuda:N"`` insist on a GPU.

Files: :meth:`FaissBackend.save_files` writes ``index-<random>.faiss`` with ``faiss.write_index``
(temporary name, then rename); :meth:`FaissBackend.open` reads it, memory-mapped with ``mmap=True``
(``IO_FLAG_MMAP_IFC``: codes stay on disk, pages load on demand). A mapped index is read-only:
the first :meth:`~FaissBackend.add` copies it into memory.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> b = FaissBackend("IVF4,Flat", nprobe=4, train_size=200)
    >>> b.add(x[:100], start=0)            # buffered: the index is not trained yet
    >>> b.add(x[100:], start=100)          # 300 >= train_size: trains on the first 200, adds all
    >>> len(b), b.search(x[:1], 1)[1].tolist()
    (300, [[0]])
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fewsight.errors import CheckpointError, InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.retrieval.backends.base import VectorBackend

__all__ = ["DEFAULT_TRAIN_SIZE", "FaissBackend", "faiss_gpu_available", "training_minimum"]

#: Vectors an index that needs training trains on, unless ``train_size`` says otherwise.
DEFAULT_TRAIN_SIZE = 100_000
_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that the centroids are poorly fitted
_OPTIONS = ("index", "device", "train_size", "nprobe", "ef_search", "ef_construction", "k_factor")
_INDEX_FILE = re.compile(r"^index-[0-9a-f]{16}\.faiss$")
_TOO_FEW = re.compile(r"Number of training points \((\d+)\) should be at least as large as number of clusters \((\d+)\)")


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            'Gallery needs faiss: install the retrieval extra, pip install "fewsight[retrieval]" '
            f"(or pip install faiss-cpu); import failed with: {exc}"
        ) from exc
    return faiss


def _first_line(exc: BaseException) -> str:
    # faiss errors carry the C++ location first; the reason is at the end of the first line.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rsplit("failed: ", 1)[-1].rsplit(": Error: ", 1)[-1][:200]


def faiss_gpu_available(faiss: Any | None = None) -> bool:
    """Whether faiss is a GPU build that sees at least one GPU (never raises on CPU-only machines)."""
    faiss = faiss or _import_faiss()
    if not all(hasattr(faiss, n) for n in ("StandardGpuResources", "index_cpu_to_gpu", "index_gpu_to_cpu")):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # a GPU build on a machine without a driver
        return False


def training_minimum(index: str) -> int:
    """Fewest training vectors the factory string ``index`` needs: one per IVF list, ``2**bits`` per
    PQ code book (1 where it sees nothing to train; faiss itself reports what this misses).

    >>> training_minimum("IVF4096,PQ32"), training_minimum("IVF64,PQ16x4,RFlat"), training_minimum("HNSW32")
    (4096, 64, 1)
    """
    need = 1
    for part in index.replace(" ", "").split(","):
        for m in re.finditer(r"IVF(\d+)", part):
            need = max(need, int(m.group(1)))
        for m in re.finditer(r"IMI2x(\d+)", part):
            need = max(need, 2 ** int(m.group(1)))
        for m in re.finditer(r"(?<![A-Z])(?:PQ|RQ|LSQ)(\d+)(?:x(\d+))?", part):
            need = max(need, 2 ** int(m.group(2) or 8))
    return need


def _check_optional_int(name: str, value: Any, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}: expected None or an int >= {low}, got {value!r}")
    return int(value)


def _gpu_id(device: Any, faiss: Any) -> int | None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise InvalidArgumentError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return None
    if not faiss_gpu_available(faiss):
        if device == "auto":
            return None
        build = "a GPU build" if hasattr(faiss, "StandardGpuResources") else "a CPU-only build"
        raise MissingDependencyError(
            f"device: expected a GPU faiss build that sees a GPU for {device!r}, got {build} seeing "
            f"{faiss.get_num_gpus()} GPU(s); install faiss-gpu, or use device='auto' or 'cpu'"
        )
    gpu = int(device.split(":")[1]) if ":" in device else 0
    if gpu >= faiss.get_num_gpus():
        raise InvalidArgumentError(f"device: expected a GPU index below {faiss.get_num_gpus()}, got {device!r}")
    return gpu


class FaissBackend(VectorBackend):
    """Vectors in a faiss index built from a factory string, inner-product metric.

    Args:
        index: a faiss index factory string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``, ...).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` (see the module docstring).
        train_size: vectors to train on (default: :data:`DEFAULT_TRAIN_SIZE`, or 39 per IVF list /
            code-book centroid when that is more).
        nprobe / ef_search / k_factor: search knobs (IVF lists visited, HNSW ``efSearch``, ``RFlat``
            re-ranking factor); a knob the index lacks raises :class:`InvalidArgumentError`.
        ef_construction: HNSW ``efConstruction`` (graph quality while adding).

    Attributes:
        timings: ``{"train_s", "add_s", "train_vectors"}`` accumulated by training and adding.
    """

    kind = "faiss"

    def __init__(
        self,
        index: str = "Flat",
        *,
        device: str = "auto",
        train_size: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        ef_construction: int | None = None,
        k_factor: float | None = None,
    ) -> None:
        self._faiss = _import_faiss()
        if not isinstance(index, str) or not index.strip():
            raise InvalidArgumentError(f"index: expected a faiss index factory string such as 'Flat' or 'HNSW32', got {index!r}")
        self._spec = index.strip()
        self._device = device
        self._gpu = _gpu_id(device, self._faiss)
        self._train_size = _check_optional_int("train_size", train_size, 1)
        self._knobs: dict[str, Any] = {
            "nprobe": _check_optional_int("nprobe", nprobe, 1),
            "ef_search": _check_optional_int("ef_search", ef_search, 1),
            "k_factor": None,
        }
        self._ef_construction = _check_optional_int("ef_construction", ef_construction, 1)
        self._set_k_factor(k_factor)
        self._index: Any = None
        self._dim: int | None = None
        self._on_gpu = False
        self._resources: Any = None
        self._mapped = False
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.timings: dict[str, float] = {"train_s": 0.0, "add_s": 0.0, "train_vectors": 0}

    def _set_k_factor(self, k_factor: Any) -> None:
        if k_factor is not None and (isinstance(k_factor, bool) or not isinstance(k_factor, (int, float))
                                     or not k_factor >= 1 or k_factor == float("inf")):
            raise InvalidArgumentError(f"k_factor: expected None or a finite number >= 1, got {k_factor!r}")
        self._knobs["k_factor"] = None if k_factor is None else float(k_factor)

    # ------------------------------------------------------------------ facts

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def exact(self) -> bool:
        return self._spec == "Flat"

    @property
    def index_string(self) -> str:
        """The factory string this index was built from."""
        return self._spec

    @property
    def on_gpu(self) -> bool:
        """Whether the index lives on a GPU."""
        return self._on_gpu

    @property
    def memory_mapped(self) -> bool:
        """Whether the index's data is read from its file on demand (``open(..., mmap=True)``)."""
        return self._mapped

    @property
    def train_size(self) -> int:
        """Vectors the index trains on (see the constructor)."""
        if self._train_size is not None:
            return self._train_size
        return max(DEFAULT_TRAIN_SIZE, _POINTS_PER_CENTROID * training_minimum(self._spec))

    @property
    def is_trained(self) -> bool:
        """Whether the index is trained (always true for ``Flat`` and ``HNSW``)."""
        return self._index is not None and bool(self._index.is_trained)

    @property
    def index(self) -> Any:
        """The faiss index itself (training finished first), for knobs this class does not name."""
        self.train()
        return self._index

    @property
    def search_params(self) -> dict[str, Any]:
        """The search knobs set here (``None``: faiss's default)."""
        return dict(self._knobs)

    def __len__(self) -> int:
        return (0 if self._index is None else int(self._index.ntotal)) + self._pending_n

    def describe(self) -> str:
        return f"faiss:{self._spec}" + (f"@cuda:{self._gpu}" if self._on_gpu else "")

    def config(self) -> dict[str, Any]:
        # The device is a fact of the machine, not of the gallery: a file opens with device='auto'.
        return {"kind": self.kind, "index": self._spec, "train_size": self._train_size,
                "ef_construction": self._ef_construction, **self._knobs}

    # ------------------------------------------------------------------ building

    def create(self, dim: int) -> None:
        if self._index is not None:
            if dim != self._dim:
                raise ShapeError(f"dim: expected {self._dim} (the D of the faiss index), got {dim}")
            return
        try:
            index = self._faiss.index_factory(dim, self._spec, self._faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InvalidArgumentError(
                f"index: expected a faiss index factory string valid for D={dim}, got {self._spec!r} ({_first_line(exc)})"
            ) from None
        needed = training_minimum(self._spec)
        if not index.is_trained and self._train_size is not None and self._train_size < needed:
            raise InvalidArgumentError(
                f"train_size: expected at least {needed} for index {self._spec!r} (its lists / centroids), got {self._train_size}"
            )
        self._adopt(index, mapped=False)

    def _adopt(self, index: Any, *, mapped: bool) -> None:
        faiss = self._faiss
        self._dim = int(index.d)
        if not index.is_trained:
            _skip_polysemous_training(faiss, index)
        if self._ef_construction is not None:
            hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
            if hnsw is None:
                raise InvalidArgumentError(f"ef_construction: expected an HNSW index, got {self._spec!r}")
            hnsw.efConstruction = self._ef_construction
        self._index, self._mapped, self._on_gpu = index, mapped, False
        if self._gpu is not None:
            try:
                self._resources = self._resources or faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._resources, self._gpu, index)
                self._on_gpu, self._mapped = True, False  # the GPU holds its own copy
            except (RuntimeError, AttributeError) as exc:
                if self._device != "auto":
                    raise InvalidArgumentError(
                        f"device: expected an index faiss can move to {self._device}, got {self._spec!r} ({_first_line(exc)})"
                    ) from None
                # "auto": indexes without a GPU version (HNSW, RFlat, ...) stay on the CPU.
        self._apply_knobs()

    def _apply_knobs(self) -> None:
        faiss = self._faiss
        space = faiss.GpuParameterSpace() if self._on_gpu else faiss.ParameterSpace()
        for arg, name in (("nprobe", "nprobe"), ("ef_search", "efSearch"), ("k_factor", "k_factor_rf")):
            value = self._knobs[arg]
            if value is None:
                continue
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError:
                raise InvalidArgumentError(
                    f"{arg}: expected an index with the search parameter {name}, got {self._spec!r}"
                ) from None

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None,
                          k_factor: float | None = None) -> None:
        """Change search knobs (those passed; ``None`` leaves one as it is) without rebuilding."""
        if nprobe is not None:
            self._knobs["nprobe"] = _check_optional_int("nprobe", nprobe, 1)
        if ef_search is not None:
            self._knobs["ef_search"] = _check_optional_int("ef_search", ef_search, 1)
        if k_factor is not None:
            self._set_k_factor(k_factor)
        if self._index is not None:
            self._apply_knobs()

    def _own(self) -> None:
        # A mapped index views its file read-only; faiss aborts the process on an add to it.
        if self._mapped:
            faiss = self._faiss
            self._index = faiss.deserialize_index(faiss.serialize_index(self._index))
            self._mapped = False
            self._apply_knobs()

    def add(self, vectors: np.ndarray, start: int, metadata: Mapping[str, np.ndarray] | None = None) -> None:
        if start != len(self):
            raise InvalidArgumentError(
                f"start: expected {len(self)} (the faiss backend appends; it cannot overwrite items), got {start}"
            )
        if vectors.ndim != 2:
            raise ShapeError(f"vectors: expected float32[N, D], got shape {vectors.shape}")
        self.create(int(vectors.shape[1]))
        if not len(vectors):
            return
        self._own()
        if self._index.is_trained:
            self._add_now(vectors)
            return
        self._pending.append(np.array(vectors, dtype=np.float32, order="C"))  # a copy: the caller may reuse it
        self._pending_n += len(vectors)
        if self._pending_n >= self.train_size:
            try:
                self.train()
            except InvalidArgumentError:
                # All or nothing: the gallery has not recorded these items' metadata.
                self._pending_n -= len(self._pending.pop())
                raise

    def _add_now(self, vectors: np.ndarray) -> None:
        begin = time.perf_counter()
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.timings["add_s"] += time.perf_counter() - begin

    def train(self) -> None:
        """Train on the first ``train_size`` buffered vectors (all of them if fewer) and store the buffer.

        Raises :class:`~fewsight.errors.InvalidArgumentError` naming the index string, the count it
        needs and the count given when the buffer is too small; the buffer is kept (add more, retry).
        """
        if not self._pending_n:
            return
        self._own()
        data = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        sample = data[: self.train_size]
        needed = training_minimum(self._spec)
        if len(sample) < needed:
            raise self._too_few(needed, len(sample))
        begin = time.perf_counter()
        try:
            self._index.train(sample)
        except RuntimeError as exc:
            m = _TOO_FEW.search(str(exc))
            if m:
                raise self._too_few(int(m.group(2)), len(sample)) from None
            raise InvalidArgumentError(
                f"index {self._spec!r}: training on {len(sample)} vectors failed ({_first_line(exc)})"
            ) from None
        self.timings["train_s"] += time.perf_counter() - begin
        self.timings["train_vectors"] += len(sample)
        self._pending, self._pending_n = [], 0
        self._add_now(data)

    def _too_few(self, needed: int, given: int) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"index {self._spec!r}: expected at least {needed} vectors to train on, got {given}; "
            "add more embeddings or choose an index with fewer lists / centroids"
        )

    # ------------------------------------------------------------------ reading

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        self.train()
        q = len(queries)
        if self._index is None or not self._index.ntotal or not q:
            return np.full((q, depth), -np.inf, dtype=np.float32), np.full((q, depth), -1, dtype=np.int64)
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
        scores, ids = _numpy(scores).astype(np.float32, copy=False), _numpy(ids).astype(np.int64, copy=False)
        # Approximate indexes pad rows they could not fill with -1 and -FLT_MAX.
        return np.where(ids < 0, np.float32(-np.inf), scores), ids

    def reconstruct(self, start: int, stop: int) -> np.ndarray:
        self.train()
        if self._index is None or stop <= start:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        try:
            out = self._index.reconstruct_n(start, stop - start)
        except RuntimeError:
            # GPU indexes may not reconstruct, and IVF ones only with a map from ids to lists.
            index = self._cpu_index()
            try:
                self._faiss.extract_index_ivf(index).make_direct_map()
            except RuntimeError:
                pass
            out = index.reconstruct_n(start, stop - start)
        return _numpy(out).astype(np.float32, copy=False)

    def _cpu_index(self) -> Any:
        return self._faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index

    # ------------------------------------------------------------------ files

    def to_bytes(self) -> np.ndarray | None:
        """``uint8[B]``: ``faiss.serialize_index`` of the (trained) index; empty when it has no ``D`` yet."""
        self.train()
        if self._index is None:
            return np.zeros(0, dtype=np.uint8)
        return self._faiss.serialize_index(self._cpu_index())

    def save_files(self, folder: Path) -> dict[str, Any]:
        self.train()
        if self._index is None:
            return {}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"index-{secrets.token_hex(8)}.faiss"
        tmp = folder / f".{name}.tmp"
        index = self._cpu_index()
        try:
            self._faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {"index_file": name, "ntotal": int(index.ntotal), "dim": int(index.d)}

    @staticmethod
    def stale_files(folder: Path, files: Mapping[str, Any]) -> list[Path]:
        keep = files.get("index_file")
        return [p for p in Path(folder).iterdir() if _INDEX_FILE.match(p.name) and p.name != keep]

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
    ) -> FaissBackend:
        options = {k: v for k, v in config.items() if k in _OPTIONS}
        for key, value in overrides.items():
            if key not in _OPTIONS:
                raise InvalidArgumentError(f"{key}: expected an option of the faiss backend {_OPTIONS}, got {key}={value!r}")
            options[key] = value
        backend = cls(**options)
        faiss = backend._faiss
        if blob is not None:
            if not len(blob):
                return backend
            try:
                index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
            except Exception as exc:  # faiss raises RuntimeError for bad bytes
                raise CheckpointError(f"corrupt faiss index ({type(exc).__name__})") from exc
        elif files.get("index_file"):
            path = Path(folder) / str(files["index_file"])
            if not path.is_file():
                raise CheckpointError(f"{path}: faiss index file not found")
            flags = 0
            if mmap:
                flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
            try:
                index = faiss.read_index(str(path), flags)
            except Exception as exc:
                raise CheckpointError(f"{path}: corrupt faiss index ({type(exc).__name__}: {_first_line(exc)})") from exc
            if files.get("ntotal") is not None and int(index.ntotal) != files["ntotal"]:
                raise CheckpointError(f"{path}: expected {files['ntotal']} vectors in the faiss index, got {index.ntotal}")
        else:
            return backend
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CheckpointError(f"expected an inner-product faiss index, got metric {index.metric_type}")
        backend._adopt(index, mapped=mmap and blob is None)
        return backend


def _skip_polysemous_training(faiss: Any, index: Any) -> None:
    # faiss's factory trains PQ codes for polysemous (Hamming-filtered) search: minutes of annealing
    # on a large sample, for a filter plain search never uses. Off in every nested PQ.
    index = faiss.downcast_index(index)
    for attr in ("index", "base_index"):  # IndexPreTransform / IndexIDMap, IndexRefine
        inner = getattr(index, attr, None)
        if inner is not None:
            _skip_polysemous_training(faiss, inner)
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False


def _numpy(x: Any) -> np.ndarray:
    # faiss.contrib.torch_utils (imported by some libraries) makes faiss return tensors.
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)
