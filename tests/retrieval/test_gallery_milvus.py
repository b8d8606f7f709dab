"""Gallery over a Milvus collection (milvus-lite in a temporary .db file): same results as faiss Flat."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fewsight.errors import CheckpointError, InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.retrieval import Gallery, MilvusBackend, SearchResult, make_backend

pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (not built for this platform?)")


@pytest.fixture
def db(tmp_path):
    """A fresh milvus-lite database file; skips (with the reason) where milvus-lite cannot start."""
    uri = str(tmp_path / "gallery.db")
    try:
        MilvusBackend(uri).close()
    except InvalidArgumentError as exc:
        pytest.skip(f"milvus-lite does not start here: {exc}")
    return uri


def items(n=300, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    boxes = torch.rand(n, 4, generator=gen) * 100
    boxes[::7] = math.nan  # "not given"
    return x, {"labels": torch.randint(-1, 5, (n,), generator=gen), "image_ids": torch.arange(n) + 500, "boxes": boxes}


def fill(g, x, meta, chunks=(120, 1, 179)):
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        g.add(x[sl], labels=meta["labels"][sl], image_ids=meta["image_ids"][sl], boxes=meta["boxes"][sl])
        start += size
    return g


def assert_same(a: SearchResult, b: SearchResult, *, atol=0.0):
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    for name in ("labels", "image_ids", "boxes"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), equal_nan=True, atol=0, rtol=0)


def test_search_equals_faiss_flat(db):
    x, meta = items()
    g = fill(Gallery(class_names=list("abcde"), backend=make_backend("milvus", uri=db)), x, meta)
    f = fill(Gallery(class_names=list("abcde")), x, meta)
    assert g.backend.exact and len(g) == 300 and g.dim == 16
    q = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    for k in (1, 10, 300, 400):
        assert_same(g.search(q, k=k), f.search(q, k=k), atol=1e-5)
    torch.testing.assert_close(g.embeddings(), f.embeddings(), atol=1e-6, rtol=0)
    ref = q[:4]
    assert_same(g.search(q, k=5, csls_reference=ref), f.search(q, k=5, csls_reference=ref), atol=1e-5)


def test_ties_at_the_kth_place_follow_the_index_order(db):
    a, b = [1.0, 0.0], [0.0, 1.0]
    g = Gallery(backend=MilvusBackend(db))
    g.add(torch.tensor([b, a] * 20 + [a]), labels=torch.arange(41))
    r = g.search(torch.tensor([a, b]), k=3)
    assert r.indices.tolist() == [[1, 3, 5], [0, 2, 4]]
    assert torch.equal(r.labels, r.indices)


def test_reinserting_the_same_items_does_not_duplicate(db):
    x, meta = items()
    g = fill(Gallery(backend=MilvusBackend(db)), x, meta)
    before = g.search(x[:20], k=5)
    g.add(x[100:200], labels=meta["labels"][100:200], image_ids=meta["image_ids"][100:200],
          boxes=meta["boxes"][100:200], start=100)  # a chunk re-run after a crash
    assert len(g) == 300
    count = g.backend.client.query(g.backend.collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    assert count == 300
    assert_same(before, g.search(x[:20], k=5))
    y = torch.randn(60, 16)
    g.add(y, labels=torch.full((60,), 3), start=270)  # 30 replaced, 30 new
    assert len(g) == 330 and g.labels[268:].tolist() == [meta["labels"][268].item(), meta["labels"][269].item()] + [3] * 60
    assert g.search(y[-1:], k=1).indices.item() == 329
    with pytest.raises(InvalidArgumentError, match=r"start: expected an int in \[0, 330\]"):
        g.add(y, start=331)


def test_persistence_across_reopening_the_same_file(db, tmp_path):
    x, meta = items()
    g = fill(Gallery(class_names=list("abcde"), backend=MilvusBackend(db, collection="objects")), x, meta)
    q = torch.randn(8, 16)
    before = g.search(q, k=7)
    saved = g.save(tmp_path / "gallery.pt")
    assert torch.load(saved, weights_only=True)["backend"]["kind"] == "milvus"
    g.close()
    # A new gallery on the same collection brings the items and their metadata back.
    h = Gallery(backend=MilvusBackend(db, collection="objects"))
    assert len(h) == 300 and h.dim == 16
    assert torch.equal(h.labels, meta["labels"]) and torch.equal(h.image_ids, meta["image_ids"])
    torch.testing.assert_close(h.boxes, meta["boxes"], equal_nan=True, atol=0, rtol=0)
    assert_same(before, h.search(q, k=7))
    h.close()
    # Gallery.load re-opens the collection the file names (with class names from the file).
    k = Gallery.load(saved)
    assert k.class_names == list("abcde") and len(k) == 300
    assert_same(before, k.search(q, k=7))
    with pytest.raises(InvalidArgumentError, match="mmap"):
        Gallery.load(saved, mmap=True)
    k.add(torch.randn(5, 16))
    k.close()
    with pytest.raises(CheckpointError, match=r"gallery\.pt.*expected 300 items.*got 305"):
        Gallery.load(saved)


def test_empty_gallery(db, tmp_path):
    g = Gallery(backend=MilvusBackend(db))
    r = g.search(torch.randn(3, 4), k=2)
    assert len(g) == 0 and g.dim is None and r.indices.tolist() == [[-1, -1]] * 3 and torch.isinf(r.scores).all()
    h = Gallery(dim=4, backend=MilvusBackend(db, collection="four"))
    assert h.search(torch.randn(2, 4), k=3).indices.eq(-1).all() and h.embeddings().shape == (0, 4)
    h.close()
    reopened = Gallery(backend=MilvusBackend(db, collection="four"))
    assert reopened.dim == 4 and len(reopened) == 0
    with pytest.raises(ShapeError, match=r"dim: expected 4 \(the D of collection 'four'\), got 5"):
        Gallery(dim=5, backend=MilvusBackend(db, collection="four"))
    assert len(Gallery.load(g.save(tmp_path / "e.pt"))) == 0


def test_options_and_errors(db, monkeypatch):
    b = make_backend("milvus", uri=db, collection="c1", token="user:secret", search_params={})
    assert "secret" not in repr(b.config()) and b.config()["uri"] == db and b.describe().startswith("milvus:c1@")
    with pytest.raises(InvalidArgumentError, match=r"uri: expected a local file ending in '\.db'"):
        MilvusBackend(db[:-3] + ".sqlite")
    with pytest.raises(InvalidArgumentError, match="collection"):
        MilvusBackend(db, collection="1 bad")
    with pytest.raises(InvalidArgumentError, match=r"nprobe: expected an option of the milvus backend"):
        make_backend("milvus", uri=db, nprobe=4)
    b.client.create_collection("foreign", dimension=4)  # not a fewsight gallery
    with pytest.raises(InvalidArgumentError, match=r"collection: expected a fewsight gallery collection.*'foreign'"):
        MilvusBackend(db, collection="foreign")
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MissingDependencyError, match=r"fewsight\[milvus\]"):
        MilvusBackend(db)
