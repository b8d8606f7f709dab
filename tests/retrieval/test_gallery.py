"""Gallery: exact agreement with brute-force top-k, metadata alignment, ties, files, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from fewsight.errors import CheckpointError, InvalidArgumentError, LabelError, MissingDependencyError, ShapeError
from fewsight.retrieval import Gallery, SearchResult

pytest.importorskip("faiss")


def brute_force(gallery: torch.Tensor, queries: torch.Tensor, k: int):
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    return sims.topk(min(k, gallery.shape[0]), dim=1)


def filled(n=500, d=16, seed=0, chunks=(200, 1, 299)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    labels = torch.randint(-1, 7, (n,), generator=gen)
    image_ids = torch.randperm(n, generator=gen) + 1000
    boxes = torch.rand(n, 4, generator=gen) * 100
    g = Gallery(class_names=[f"c{i}" for i in range(7)])
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        g.add(x[sl], labels=labels[sl], image_ids=image_ids[sl], boxes=boxes[sl])
        start += size
    assert start == n
    return g, x, labels, image_ids, boxes


def assert_aligned(r: SearchResult, labels, image_ids, boxes):
    valid = r.indices >= 0
    idx = r.indices[valid]
    assert torch.equal(r.labels[valid], labels[idx])
    assert torch.equal(r.image_ids[valid], image_ids[idx])
    assert torch.equal(r.boxes[valid], boxes[idx])


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("num_queries", [5, 40])  # faiss switches to BLAS from 20 queries
def test_search_equals_brute_force(num_queries):
    g, x, labels, image_ids, boxes = filled()
    q = torch.randn(num_queries, 16, generator=torch.Generator().manual_seed(1)) * 3
    r = g.search(q, k=10)
    ref = brute_force(x, q, 10)
    assert torch.equal(r.indices, ref.indices)
    torch.testing.assert_close(r.scores, ref.values.float(), atol=1e-5, rtol=0)
    assert r.scores.dtype == torch.float32 and r.indices.dtype == torch.long
    assert_aligned(r, labels, image_ids, boxes)


def test_metadata_alignment_after_several_adds():
    g, x, labels, image_ids, boxes = filled(n=60, chunks=(10, 0, 25, 1, 24))
    assert len(g) == 60 and g.dim == 16
    assert torch.equal(g.labels, labels) and torch.equal(g.image_ids, image_ids) and torch.equal(g.boxes, boxes)
    r = g.search(x, k=1)  # each item finds itself
    assert torch.equal(r.indices[:, 0], torch.arange(60))
    assert torch.equal(r.labels[:, 0], labels) and torch.equal(r.image_ids[:, 0], image_ids)
    assert torch.equal(r.boxes[:, 0], boxes)


def test_defaults_for_missing_metadata():
    g = Gallery()
    g.add(torch.eye(3)[:2])
    g.add(torch.eye(3)[2:], labels=torch.tensor([4]), image_ids=torch.tensor([9]), boxes=torch.tensor([[1.0, 2, 3, 4]]))
    assert g.labels.tolist() == [-1, -1, 4]
    assert g.image_ids.tolist() == [-1, -1, 9]
    assert torch.isnan(g.boxes[:2]).all() and g.boxes[2].tolist() == [1, 2, 3, 4]


def test_fewer_items_than_k_are_padded():
    g, x, labels, image_ids, boxes = filled(n=3, chunks=(3,))
    r = g.search(torch.randn(2, 16), k=5)
    assert r.indices.shape == (2, 5)
    assert (r.indices[:, 3:] == -1).all() and (r.labels[:, 3:] == -1).all() and (r.image_ids[:, 3:] == -1).all()
    assert torch.isinf(r.scores[:, 3:]).all() and (r.scores[:, 3:] < 0).all()
    assert torch.isnan(r.boxes[:, 3:]).all()
    assert sorted(r.indices[0, :3].tolist()) == [0, 1, 2]
    assert_aligned(r, labels, image_ids, boxes)


@pytest.mark.parametrize("dim", [None, 4])
def test_empty_gallery_search_returns_minus_one(dim):
    g = Gallery(dim=dim)
    assert len(g) == 0
    r = g.search(torch.randn(3, 4), k=2)
    assert r.indices.tolist() == [[-1, -1]] * 3
    assert r.labels.tolist() == [[-1, -1]] * 3 and r.image_ids.tolist() == [[-1, -1]] * 3
    assert torch.isinf(r.scores).all() and r.boxes.shape == (3, 2, 4) and torch.isnan(r.boxes).all()
    assert g.search(torch.randn(0, 4), k=2).indices.shape == (0, 2)


def test_ties_broken_by_gallery_index_including_the_kth_place():
    a, b = [1.0, 0.0], [0.0, 1.0]
    # Item order chosen so faiss's heap would otherwise return later duplicates first.
    g = Gallery()
    g.add(torch.tensor([b, a, b, a, a, b, a]), labels=torch.arange(7))
    q = torch.tensor([a, b, [1.0, 1.0]])
    r = g.search(q, k=2)
    assert r.indices.tolist() == [[1, 3], [0, 2], [0, 1]]
    r = g.search(q, k=3)
    assert r.indices.tolist() == [[1, 3, 4], [0, 2, 5], [0, 1, 2]]
    r = g.search(q.repeat(10, 1), k=6)  # BLAS path
    assert r.indices[:3].tolist() == [[1, 3, 4, 6, 0, 2], [0, 2, 5, 1, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(r.labels, r.indices)


def test_inputs_any_dtype_and_results_follow_queries():
    g, x, *_ = filled(n=50, chunks=(50,))
    q = x[:4]
    ref = g.search(q, k=3)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        r = g.search(q.to(dtype), k=3)
        assert r.indices[:, 0].tolist() == [0, 1, 2, 3]
        assert r.scores.dtype == torch.float32
    g2 = Gallery()
    g2.add(x.double())
    assert torch.equal(g2.search(q, k=3).indices, ref.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs():
    g, x, labels, *_ = filled(n=50, chunks=(50,))
    g2 = Gallery()
    g2.add(x.cuda(), labels=labels.cuda(), image_ids=torch.arange(50).cuda(), boxes=torch.zeros(50, 4).cuda())
    r = g2.search(x[:5].cuda().half(), k=4)
    assert all(t.is_cuda for t in r)
    assert torch.equal(r.indices.cpu(), g.search(x[:5], k=4).indices)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("as_folder", [False, True])
def test_save_load_round_trip(tmp_path, as_folder):
    g, x, labels, image_ids, boxes = filled(n=80, chunks=(30, 50))
    target = tmp_path if as_folder else tmp_path / "sub" / "g.pt"
    path = g.save(target)
    assert path.is_file() and (path.name == "gallery.pt") == as_folder
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
    state = torch.load(path, weights_only=True)
    assert state["format"] == "fewsight.gallery"
    h = Gallery.load(target)
    assert len(h) == 80 and h.dim == 16 and h.class_names == g.class_names
    assert torch.equal(h.labels, labels) and torch.equal(h.image_ids, image_ids) and torch.equal(h.boxes, boxes)
    q = torch.randn(7, 16)
    a, b = g.search(q, 5), h.search(q, 5)
    for name in SearchResult._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    h.add(torch.randn(2, 16), labels=torch.tensor([0, 1]))  # still usable
    assert len(h) == 82 and h.labels[-2:].tolist() == [0, 1]


def test_save_load_empty(tmp_path):
    for g in (Gallery(), Gallery(dim=5)):
        h = Gallery.load(g.save(tmp_path / "e.pt"))
        assert len(h) == 0 and h.dim == g.dim


def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path):
    g, *_ = filled(n=10, chunks=(10,))
    good = g.save(tmp_path / "good.pt")
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt"):
        Gallery.load(missing)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a gallery")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path in (truncated, garbage, foreign):
        with pytest.raises(CheckpointError, match=path.name):
            Gallery.load(path)
    state = torch.load(good, weights_only=True)
    state["index"] = state["index"][:40]
    torch.save(state, tmp_path / "bad_index.pt")
    with pytest.raises(CheckpointError, match="bad_index.pt.*faiss"):
        Gallery.load(tmp_path / "bad_index.pt")
    state = torch.load(good, weights_only=True)
    state["labels"] = state["labels"][:3]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="short.pt.*labels"):
        Gallery.load(tmp_path / "short.pt")


# ----------------------------------------------------------------------------- errors


def test_wrong_dim_names_expected_and_actual():
    g = Gallery()
    g.add(torch.randn(4, 8))
    with pytest.raises(ShapeError, match=r"queries: expected Tensor\[N, 8\].*\(2, 5\)"):
        g.search(torch.randn(2, 5), k=1)
    with pytest.raises(ShapeError, match=r"embeddings: expected Tensor\[N, 8\].*\(2, 5\)"):
        g.add(torch.randn(2, 5))
    with pytest.raises(ShapeError, match=r"queries"):
        Gallery(dim=3).search(torch.randn(2, 5), k=1)


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda g: g.add(torch.randn(3, 4), labels=torch.tensor([0, 1])), ShapeError, "labels"),
        (lambda g: g.add(torch.randn(3, 4), labels=torch.tensor([0, 1, 2])), LabelError, "labels"),
        (lambda g: g.add(torch.randn(3, 4), image_ids=torch.zeros(3)), TypeError, "image_ids"),
        (lambda g: g.add(torch.randn(3, 4), boxes=torch.zeros(3, 5)), ShapeError, "boxes"),
        (lambda g: g.add(torch.randn(3, 4) * math.inf), InvalidArgumentError, "embeddings"),
        (lambda g: g.add(torch.ones(3, 4, dtype=torch.long)), TypeError, "embeddings"),
        (lambda g: g.add(torch.randn(4)), ShapeError, "embeddings"),
        (lambda g: g.search(torch.randn(2, 4), k=0), InvalidArgumentError, "k"),
        (lambda g: Gallery(dim=0), InvalidArgumentError, "dim"),
        (lambda g: Gallery(class_names="ab"), InvalidArgumentError, "class_names"),
    ],
)
def test_errors(call, exc, text):
    g = Gallery(class_names=["a", "b"])
    with pytest.raises(exc, match=text):
        call(g)


def test_missing_faiss_raises_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(MissingDependencyError, match=r"fewsight\[retrieval\]"):
        Gallery()
    assert isinstance(MissingDependencyError("x"), ImportError)


def test_repr():
    g = Gallery(dim=2, class_names=["a"])
    g.add(torch.randn(3, 2))
    assert repr(g) == "Gallery(size=3, dim=2, classes=1)"


# ----------------------------------------------------------------------------- CSLS


def naive_csls(gallery, queries, reference, k):
    g, q, ref = (F.normalize(t.double(), dim=1) for t in (gallery, queries, reference))
    r = torch.stack([torch.tensor(sorted((gi @ ref.T).tolist(), reverse=True)[: min(k, ref.shape[0])]).mean()
                     for gi in g])
    return 2 * q @ g.T - r[None, :]


@pytest.mark.parametrize("csls_k", [1, 10, 1000])
def test_csls_search_equals_naive_csls(csls_k):
    g, x, labels, image_ids, boxes = filled(n=120, chunks=(100, 20))
    gen = torch.Generator().manual_seed(3)
    q, ref = torch.randn(30, 16, generator=gen), torch.randn(50, 16, generator=gen)
    r = g.search(q, k=7, csls_reference=ref, csls_k=csls_k)
    sims = naive_csls(x, q, ref, csls_k)
    top = sims.topk(7, dim=1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.scores, top.values.float(), atol=1e-5, rtol=0)
    assert_aligned(r, labels, image_ids, boxes)


def test_csls_demotes_a_hub():
    g = Gallery()
    g.add(torch.tensor([[0.8, 0.6], [0.0, 1.0]]))  # the first item is near every query: a hub
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert g.search(q, k=1).indices[:, 0].tolist() == [0, 0]
    assert g.search(q, k=1, csls_reference=q, csls_k=2).indices[:, 0].tolist() == [0, 1]


def test_csls_pads_small_gallery_and_checks_reference():
    g = Gallery()
    g.add(torch.randn(3, 4))
    r = g.search(torch.randn(2, 4), k=5, csls_reference=torch.randn(6, 4))
    assert r.indices[:, 3:].eq(-1).all() and torch.isinf(r.scores[:, 3:]).all()
    with pytest.raises(ShapeError, match="csls_reference"):
        g.search(torch.randn(2, 4), k=1, csls_reference=torch.randn(6, 5))
    with pytest.raises(InvalidArgumentError, match="csls_reference"):
        g.search(torch.randn(2, 4), k=1, csls_reference=torch.full((2, 4), math.nan))
