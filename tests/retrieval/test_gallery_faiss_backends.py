"""Gallery over faiss backends: Flat = brute force, approximate recall, buffered training, files, GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import CheckpointError, InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.retrieval import FaissBackend, Gallery, SearchResult, make_backend
from fewsight.retrieval.backends import faiss_gpu_available, training_minimum

faiss = pytest.importorskip("faiss")

D = 32


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # k-means in faiss spins its OpenMP threads: on a shared 2-core machine one thread is several times faster.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(n: int, seed: int = 0, clusters: int = 40) -> torch.Tensor:
    """Unit vectors around ``clusters`` random centres (the centres are the same for every seed)."""
    centres = F.normalize(torch.randn(clusters, D, generator=torch.Generator().manual_seed(123)), dim=1)
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(0, clusters, (n,), generator=gen)
    return F.normalize(centres[which] + 1.4 * torch.randn(n, D, generator=gen) / D**0.5, dim=1)


@pytest.fixture(scope="module")
def data():
    x = clustered(3000)
    q = clustered(100, seed=1)
    meta = {"labels": torch.arange(3000) % 7, "image_ids": torch.arange(3000) + 10_000,
            "boxes": torch.rand(3000, 4, generator=torch.Generator().manual_seed(2)) * 50}
    exact = F.normalize(q.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    return x, q, meta, exact


def filled(backend, x, meta, chunks=(1000, 1, 1999)):
    g = Gallery(class_names=[f"c{i}" for i in range(7)], backend=backend)
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        g.add(x[sl], labels=meta["labels"][sl], image_ids=meta["image_ids"][sl], boxes=meta["boxes"][sl])
        start += size
    return g


def assert_same(a: SearchResult, b: SearchResult):
    for name in SearchResult._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def assert_ordered_and_aligned(r: SearchResult, meta):
    valid = r.indices >= 0
    # Score descending, then index ascending among equal scores.
    s, i = r.scores, r.indices
    later = (s[:, 1:] < s[:, :-1]) | ((s[:, 1:] == s[:, :-1]) & (i[:, 1:] > i[:, :-1])) | ~valid[:, 1:]
    assert bool(later.all())
    idx = i[valid]
    assert torch.equal(r.labels[valid], meta["labels"][idx])
    assert torch.equal(r.image_ids[valid], meta["image_ids"][idx])
    assert torch.equal(r.boxes[valid], meta["boxes"][idx])


# ----------------------------------------------------------------------------- search


def test_flat_is_the_default_and_equals_brute_force(data):
    x, q, meta, exact = data
    assert Gallery().backend.describe() == "faiss:Flat" and Gallery().backend.exact
    g = filled(make_backend("faiss"), x, meta)
    r = g.search(q, k=10)
    ref = exact.topk(10, dim=1)
    assert torch.equal(r.indices, ref.indices)
    torch.testing.assert_close(r.scores, ref.values.float(), atol=1e-5, rtol=0)
    assert_ordered_and_aligned(r, meta)


@pytest.mark.parametrize(
    "index, options, threshold",
    [
        ("HNSW32", {"ef_search": 64}, 0.95),
        ("IVF32,Flat", {"nprobe": 16}, 0.9),
        ("IVF32,PQ16x4", {"nprobe": 16}, 0.5),
        ("IVF32,PQ8x8,RFlat", {"nprobe": 16, "k_factor": 8}, 0.9),
    ],
)
def test_approximate_recall_at_10(data, index, options, threshold):
    x, q, meta, exact = data
    g = filled(make_backend("faiss", index=index, **options), x, meta)
    assert len(g) == 3000 and not g.backend.exact
    r = g.search(q, k=10)
    assert g.backend.is_trained
    ref = exact.topk(10, dim=1).indices
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(r.indices, ref)) / ref.numel()
    assert recall >= threshold, f"{index}: recall@10 {recall:.3f} < {threshold}"
    assert_ordered_and_aligned(r, meta)
    if "PQ" not in index or "RFlat" in index:  # exact inner products for the items returned
        valid = r.indices >= 0
        true = exact.gather(1, r.indices.clamp_min(0)).float()
        torch.testing.assert_close(r.scores[valid], true[valid], atol=1e-5, rtol=0)


def test_search_knobs_can_change_without_rebuilding(data):
    x, q, meta, exact = data
    g = filled(FaissBackend("IVF32,Flat", nprobe=1), x, meta)
    low = g.search(q, k=10).indices
    g.backend.set_search_params(nprobe=32)  # every list: exact
    assert g.backend.search_params["nprobe"] == 32
    assert torch.equal(g.search(q, k=10).indices, exact.topk(10, dim=1).indices)
    assert not torch.equal(low, exact.topk(10, dim=1).indices)
    h = Gallery(backend=FaissBackend("HNSW16", ef_search=16, ef_construction=80))
    h.add(x[:200])
    assert h.backend.index.hnsw.efSearch == 16 and h.backend.index.hnsw.efConstruction == 80
    assert repr(h) == "Gallery(size=200, dim=32, backend=faiss:HNSW16)"
    assert h.backend.timings["add_s"] > 0 and h.backend.timings["train_s"] == 0


# ----------------------------------------------------------------------------- training


def test_training_is_buffered_then_everything_added(data):
    x, q, meta, _ = data
    b = FaissBackend("IVF16,Flat", train_size=500, nprobe=16)
    g = Gallery(backend=b)
    g.add(x[:200], labels=meta["labels"][:200])
    g.add(x[200:400], labels=meta["labels"][200:400])
    assert len(g) == 400 and not b.is_trained and g.labels.shape == (400,)
    g.add(x[400:700], labels=meta["labels"][400:700])  # 700 >= 500: trains on the first 500, adds all
    assert b.is_trained and len(g) == 700 and b.index.ntotal == 700
    assert b.timings["train_vectors"] == 500 and b.timings["train_s"] > 0
    g.add(x[700:800])  # trained: straight in
    assert len(g) == 800 and b.index.ntotal == 800
    assert torch.equal(g.search(x[:800], k=1).indices[:, 0], torch.arange(800))  # nprobe = all lists


def test_search_or_save_trains_on_what_is_buffered(data, tmp_path):
    x, *_ = data
    g = Gallery(backend=FaissBackend("IVF16,Flat", nprobe=16))  # default train_size: 100 000
    assert g.backend.train_size == 100_000
    g.add(x[:300])
    assert not g.backend.is_trained and len(g) == 300
    assert torch.equal(g.search(x[:300], k=1).indices[:, 0], torch.arange(300))
    assert g.backend.timings["train_vectors"] == 300
    h = Gallery(backend=FaissBackend("IVF16,Flat", nprobe=16))
    h.add(x[:300])
    loaded = Gallery.load(h.save(tmp_path / "g.pt"))
    assert loaded.backend.is_trained and len(loaded) == 300
    assert torch.equal(loaded.embeddings(), F.normalize(x[:300], dim=1))  # IVF-Flat keeps the vectors


def test_too_few_vectors_name_index_needed_and_given(data):
    x, *_ = data
    g = Gallery(backend=make_backend("faiss", index="IVF4096,PQ8"))
    g.add(x[:100])
    with pytest.raises(InvalidArgumentError, match=r"'IVF4096,PQ8'.*at least 4096.*got 100"):
        g.search(x[:2], k=1)
    assert len(g) == 100  # the buffer is kept: add more and retry
    g = Gallery(backend=FaissBackend("PQ8"))
    g.add(x[:100])
    with pytest.raises(InvalidArgumentError, match=r"'PQ8'.*at least 256.*got 100"):
        g.embeddings()
    g.add(x[100:400])
    assert g.search(x[:1], k=1).indices.shape == (1, 1)
    with pytest.raises(InvalidArgumentError, match=r"train_size.*at least 64.*'IVF64,Flat'.*got 10"):
        Gallery(dim=D, backend=FaissBackend("IVF64,Flat", train_size=10))
    assert training_minimum("IVF1024,PQ32x8,RFlat") == 1024 and training_minimum("Flat") == 1


# ----------------------------------------------------------------------------- files

KINDS = [("Flat", {}), ("HNSW16", {"ef_search": 32}), ("IVF16,Flat", {"nprobe": 4}),
         ("IVF16,PQ8x4", {"nprobe": 4}), ("IVF16,PQ8x4,RFlat", {"nprobe": 4, "k_factor": 4})]


@pytest.mark.parametrize("layout, mmap", [("file", False), ("folder", False), ("folder", True)])
@pytest.mark.parametrize("index, options", KINDS, ids=[k for k, _ in KINDS])
def test_save_load_round_trip_every_kind(data, tmp_path, index, options, layout, mmap):
    x, q, meta, _ = data
    g = filled(FaissBackend(index, **options), x[:1000], meta, chunks=(600, 400))
    before = g.search(q, k=10)
    path = g.save(tmp_path / ("g.pt" if layout == "file" else "gallery"), layout=layout)
    names = sorted(p.name for p in path.parent.iterdir())
    if layout == "file":
        assert names == ["g.pt"] and torch.load(path, weights_only=True)["version"] == 1
    else:
        assert path.name == "gallery.pt" and len(names) == 2 and names[1].endswith(".faiss")
        assert torch.load(path, weights_only=True)["version"] == 2
    h = Gallery.load(path.parent if layout == "folder" else path, mmap=mmap)
    assert h.backend.memory_mapped == mmap and h.backend.index_string == index
    assert h.backend.search_params == g.backend.search_params
    assert len(h) == 1000 and h.dim == D and h.class_names == g.class_names
    assert torch.equal(h.labels, g.labels) and torch.equal(h.boxes, g.boxes) and torch.equal(h.image_ids, g.image_ids)
    assert_same(before, h.search(q, k=10))
    h.add(x[1000:1010])  # a mapped index is copied into memory first
    assert len(h) == 1010 and not h.backend.memory_mapped
    if "IVF" in index:  # saved knobs can be replaced when loading
        assert Gallery.load(path, mmap=mmap, nprobe=16).backend.search_params["nprobe"] == 16


def test_mmap_auto_maps_a_folder_gallery_and_reads_a_one_file_gallery(data, tmp_path):
    x, q, meta, _ = data
    g = filled(FaissBackend("Flat"), x[:100], meta, chunks=(100,))
    one, folder = g.save(tmp_path / "g.pt"), g.save(tmp_path / "gallery", layout="folder")
    a, b = Gallery.load(one, mmap="auto"), Gallery.load(folder.parent, mmap="auto")
    assert not a.backend.memory_mapped and b.backend.memory_mapped
    assert_same(a.search(q, k=5), b.search(q, k=5))
    with pytest.raises(InvalidArgumentError, match="mmap: expected True, False or 'auto'"):
        Gallery.load(one, mmap="yes")


def test_folder_save_replaces_its_index_file_atomically(data, tmp_path):
    x, q, meta, _ = data
    g = filled(FaissBackend("Flat"), x[:100], meta, chunks=(100,))
    folder = tmp_path / "gallery"
    g.save(folder, layout="folder")
    mapped = Gallery.load(folder, mmap=True)
    g.add(x[100:150])
    g.save(folder, layout="folder")
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0] == "gallery.pt"  # the old index file is gone, no temporary left
    assert len(Gallery.load(folder)) == 150
    assert len(mapped) == 100 and mapped.search(x[:1], k=1).indices.item() == 0  # still readable
    g.save(folder)  # the one-file layout into that folder: its index file is stale now
    assert [p.name for p in folder.iterdir()] == ["gallery.pt"] and len(Gallery.load(folder)) == 150
    with pytest.raises(InvalidArgumentError, match="layout"):
        g.save(folder, layout="zip")
    with pytest.raises(InvalidArgumentError, match="folder"):
        g.save(g.save(tmp_path / "one.pt"), layout="folder")


def test_version_1_file_still_loads(tmp_path, data):
    x, q, meta, _ = data
    index = faiss.IndexFlatIP(D)
    index.add(x[:50].numpy())
    old = {  # exactly what the gallery wrote before backends existed
        "format": "fewsight.gallery", "version": 1, "dim": D,
        "index": torch.from_numpy(faiss.serialize_index(index).copy()),
        "labels": meta["labels"][:50], "image_ids": meta["image_ids"][:50], "boxes": meta["boxes"][:50],
        "class_names": None,
    }
    torch.save(old, tmp_path / "old.pt")
    g = Gallery.load(tmp_path / "old.pt")
    assert g.backend.describe() == "faiss:Flat" and len(g) == 50
    assert torch.equal(g.search(x[:5], k=1).indices[:, 0], torch.arange(5))
    with pytest.raises(InvalidArgumentError, match=r"mmap.*layout='folder'"):
        Gallery.load(tmp_path / "old.pt", mmap=True)


def test_bad_folder_files_raise_checkpoint_error(data, tmp_path):
    x, q, meta, _ = data
    g = filled(FaissBackend("HNSW16"), x[:100], meta, chunks=(100,))
    folder = tmp_path / "g"
    path = g.save(folder, layout="folder")
    index_file = next(p for p in folder.iterdir() if p.suffix == ".faiss")
    index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"gallery\.pt.*corrupt faiss index"):
        Gallery.load(folder, mmap=True)
    index_file.unlink()
    with pytest.raises(CheckpointError, match=r"\.faiss: faiss index file not found"):
        Gallery.load(path)
    state = torch.load(g.save(tmp_path / "v1.pt"), weights_only=True)
    state["backend"]["kind"] = "annoy"
    torch.save(state, tmp_path / "kind.pt")
    with pytest.raises(CheckpointError, match=r"kind.pt.*backend kind.*'annoy'"):
        Gallery.load(tmp_path / "kind.pt")


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_empty_galleries_round_trip(tmp_path, index):
    for dim in (None, 8):
        g = Gallery(dim=dim, backend=FaissBackend(index))
        for layout in ("file", "folder"):
            h = Gallery.load(g.save(tmp_path / f"{layout}{dim}", layout=layout))
            assert len(h) == 0 and h.dim == dim and h.search(torch.randn(2, 8), k=3).indices.eq(-1).all()


# ----------------------------------------------------------------------------- options, devices


def test_option_errors_name_the_argument():
    with pytest.raises(InvalidArgumentError, match=r"index: .*D=6.*'PQ4'"):
        Gallery(dim=6, backend=FaissBackend("PQ4"))  # 6 is not a multiple of 4
    with pytest.raises(InvalidArgumentError, match=r"nprobe: .*search parameter nprobe.*'Flat'"):
        Gallery(dim=4, backend=FaissBackend("Flat", nprobe=3))
    with pytest.raises(InvalidArgumentError, match=r"ef_construction: .*HNSW.*'IVF4,Flat'"):
        Gallery(dim=4, backend=FaissBackend("IVF4,Flat", ef_construction=40))
    with pytest.raises(InvalidArgumentError, match="nprobe"):
        FaissBackend("IVF4,Flat", nprobe=0)
    with pytest.raises(InvalidArgumentError, match="index"):
        FaissBackend("")
    with pytest.raises(InvalidArgumentError, match=r"nlist: expected an option of the faiss backend"):
        make_backend("faiss", nlist=4)
    with pytest.raises(InvalidArgumentError, match="uri: expected None"):
        make_backend("faiss", uri="x.db")
    with pytest.raises(InvalidArgumentError, match="kind: expected one of"):
        make_backend("annoy")
    with pytest.raises(InvalidArgumentError, match="backend: expected a VectorBackend"):
        Gallery(backend="HNSW32")
    with pytest.raises(ShapeError, match=r"Tensor\[N, 4\]"):
        Gallery(dim=4, backend=FaissBackend("HNSW8")).add(torch.randn(2, 5))


def test_faiss_cannot_replace_items():
    g = Gallery()
    g.add(torch.randn(5, 4))
    with pytest.raises(InvalidArgumentError, match=r"start: expected 5 \(the faiss backend cannot replace"):
        g.add(torch.randn(2, 4), start=0)
    with pytest.raises(InvalidArgumentError, match=r"start: expected an int in \[0, 5\]"):
        g.add(torch.randn(2, 4), start=6)
    g.add(torch.randn(2, 4), start=5)
    assert len(g) == 7


def test_device_auto_stays_on_cpu_without_gpu(monkeypatch):
    if faiss_gpu_available():
        pytest.skip("a GPU faiss build sees a GPU here")
    b = FaissBackend("Flat", device="auto")
    g = Gallery(backend=b)
    g.add(torch.eye(3))
    assert not b.on_gpu and g.search(torch.eye(3), k=1).indices[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(MissingDependencyError, match=r"device: .*'cuda'"):
        FaissBackend("Flat", device="cuda")
    with pytest.raises(InvalidArgumentError, match="device"):
        FaissBackend("Flat", device="gpu")
    # A CPU build that reports a GPU (or a GPU build without a driver) is still "auto" = CPU.
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    assert not FaissBackend("Flat").on_gpu


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs a GPU faiss build and a GPU")
def test_gpu_index_matches_cpu(data, tmp_path):
    x, q, meta, _ = data
    cpu = filled(FaissBackend("Flat", device="cpu"), x, meta)
    gpu = filled(FaissBackend("Flat", device="cuda"), x, meta)
    assert gpu.backend.on_gpu
    assert torch.equal(cpu.search(q, k=10).indices, gpu.search(q, k=10).indices)
    assert torch.equal(Gallery.load(gpu.save(tmp_path / "g.pt"), device="cpu").search(q, k=10).indices,
                       cpu.search(q, k=10).indices)
    hnsw = Gallery(dim=D, backend=FaissBackend("HNSW16"))  # no GPU version: "auto" keeps it on the CPU
    assert not hnsw.backend.on_gpu


def test_exact_ties_at_the_kth_place_with_duplicates():
    a, b = [1.0, 0.0], [0.0, 1.0]
    g = Gallery()
    g.add(torch.tensor([b, a] * 20 + [a]), labels=torch.arange(41))
    r = g.search(torch.tensor([a]), k=3)
    assert r.indices.tolist() == [[1, 3, 5]] and not math.isnan(r.scores.sum().item())
