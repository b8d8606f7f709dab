"""index_files: image files streamed through a DataLoader into resumable chunk files; a run stopped
after some chunks and started again gives the gallery of an uninterrupted run, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("faiss")

from fewsight.data import load_image, save_image  # noqa: E402
from fewsight.errors import DataError, InvalidArgumentError  # noqa: E402
from fewsight.retrieval import Gallery, index_images  # noqa: E402
from fewsight.retrieval import indexing  # noqa: E402
from fewsight.retrieval.indexing import clear_chunks, index_files  # noqa: E402
from fewsight.train import build_model  # noqa: E402
from fewsight.train.config import ModelConfig  # noqa: E402
from tests._helpers import one_thread  # noqa: F401,E402  (autouse)
from tests.train._tiny import TINY_MODEL  # noqa: E402

# Mixed sizes: a batch pads to its largest image, so the batch composition shows in the embeddings.
SIZES = [(64, 64), (48, 64), (64, 40), (56, 56), (64, 64), (40, 48), (64, 52)]
SETTINGS = {"batch_size": 2, "chunk_images": 2, "score_threshold": 0.0, "progress": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = {**TINY_MODEL, "embedding_dim": 8, "score_threshold": 0.0}
    return build_model(ModelConfig("dldenet", None, cfg), ["a", "b"]).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = [root / f"im{i}.png" for i in range(len(SIZES))]
    for p, (h, w) in zip(paths, SIZES):
        save_image(torch.rand(3, h, w, generator=g), p)
    return paths


@pytest.fixture(scope="module")
def reference(model, files, tmp_path_factory):
    """An uninterrupted run: 7 images in chunks of 2 (4 chunks, the last of 1 image)."""
    return index_files(model, files, tmp_path_factory.mktemp("ref") / "chunks", load_image=load_image, **SETTINGS)


def assert_same(a: Gallery, b: Gallery) -> None:
    assert len(a) == len(b) > 0 and a.dim == b.dim and a.class_names == b.class_names
    assert torch.equal(a.labels, b.labels) and torch.equal(a.image_ids, b.image_ids)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.embeddings(), b.embeddings())


class Killed(Exception):
    pass


def _die_at_chunk(monkeypatch, n: int) -> list[str]:
    """Make the n-th chunk write (0-based) raise, as a kill would stop the run there; returns the names written."""
    written: list[str] = []
    real = indexing.atomic_write_bytes

    def write(data, path):
        if path.name.endswith(".pt") and len([w for w in written if w.endswith(".pt")]) == n:
            raise Killed
        written.append(path.name)
        return real(data, path)

    monkeypatch.setattr(indexing, "atomic_write_bytes", write)
    return written


def test_equals_index_images_in_memory(model, files, reference):
    assert reference.chunks == 4 and reference.resumed == 0 and reference.skipped == []
    in_memory = index_images(model, [load_image(f) for f in files], batch_size=2, score_threshold=0.0)
    assert_same(reference.gallery, in_memory)
    assert set(reference.gallery.image_ids.tolist()) == set(range(len(files)))


def test_killed_then_resumed_gives_the_uninterrupted_gallery(model, files, reference, tmp_path, monkeypatch):
    work = tmp_path / "chunks"
    written = _die_at_chunk(monkeypatch, 2)
    with pytest.raises(Killed):
        index_files(model, files, work, load_image=load_image, **SETTINGS)
    assert written == ["manifest.json", "00000.pt", "00001.pt"]
    monkeypatch.undo()
    (work / ".00002.pt.abcd1234.tmp").write_bytes(b"half a chunk")  # a write cut short by a kill
    seen: list[int] = []
    real = indexing.detect_objects
    monkeypatch.setattr(indexing, "detect_objects", lambda m, ims, **kw: seen.append(len(ims)) or real(m, ims, **kw))
    lines: list[str] = []
    run = index_files(model, files, work, load_image=load_image, log=lines.append, **SETTINGS)
    assert lines == ["resuming: 2 of 4 chunks done"] and run.resumed == 2 and run.chunks == 4
    assert seen == [2, 1]  # only the images of chunks 2 and 3 were detected again
    assert_same(run.gallery, reference.gallery)
    assert sorted(p.name for p in work.iterdir()) == ["00000.pt", "00001.pt", "00002.pt", "00003.pt", "manifest.json"]
    # A run over complete chunks only assembles them.
    again = index_files(model, files, work, load_image=load_image, log=lines.append, **SETTINGS)
    assert lines[-1] == "resuming: 4 of 4 chunks done"
    assert_same(again.gallery, reference.gallery)


def test_resume_with_other_inputs_is_refused(model, files, tmp_path, monkeypatch):
    work = tmp_path / "chunks"
    _die_at_chunk(monkeypatch, 1)
    with pytest.raises(Killed):
        index_files(model, files, work, load_image=load_image, **SETTINGS)
    monkeypatch.undo()
    other_model = build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8, "score_threshold": 0.0}),
                              ["a", "b"]).eval()
    cases = [
        ({"files": files[:-1]}, "files (7 then, 6 now)"),
        ({"files": files[::-1]}, "files (#0 was"),
        ({"score_threshold": 0.5}, "score_threshold (0.0 then, 0.5 now)"),
        ({"batch_size": 1}, "batch_size (2 then, 1 now)"),
        ({"model": other_model}, "model (other weights or architecture)"),
    ]
    for change, expected in cases:
        args = {"model": model, "files": files, **SETTINGS, **change}
        with pytest.raises(DataError) as err:
            index_files(args.pop("model"), args.pop("files"), work, load_image=load_image, **args)
        assert err.value.path == work / "manifest.json" and expected in str(err.value) and "restart=True" in str(err.value)
    assert (work / "00000.pt").is_file()  # refused before touching anything
    run = index_files(model, files[:3], work, load_image=load_image, restart=True, **SETTINGS)
    assert run.resumed == 0 and run.chunks == 2 and set(run.gallery.image_ids.tolist()) <= {0, 1, 2}


def test_a_corrupt_chunk_is_named_before_any_work(model, files, reference, tmp_path, monkeypatch):
    work = tmp_path / "chunks"
    index_files(model, files, work, load_image=load_image, **SETTINGS)
    good = (work / "00001.pt").read_bytes()
    monkeypatch.setattr(indexing, "detect_objects", None)  # no detection may run: the check comes first
    for bad in (good[: len(good) // 2], b"not a chunk", (work / "00000.pt").read_bytes()):
        (work / "00001.pt").write_bytes(bad)
        with pytest.raises(DataError) as err:
            index_files(model, files, work, load_image=load_image, **SETTINGS)
        assert err.value.path == work / "00001.pt" and "delete it" in str(err.value)
    (work / "00001.pt").unlink()  # as the message says: the chunk is computed again
    monkeypatch.undo()
    assert_same(index_files(model, files, work, load_image=load_image, **SETTINGS).gallery, reference.gallery)


def test_unreadable_images_stop_the_run_or_are_skipped(model, files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    mixed = [*files[:3], bad, *files[3:]]
    work = tmp_path / "chunks"
    with pytest.raises(DataError) as err:
        index_files(model, mixed, work, load_image=load_image, **SETTINGS)
    assert err.value.path == bad
    assert sorted(p.name for p in work.iterdir()) == ["00000.pt", "manifest.json"]  # the chunk before it is kept
    lines: list[str] = []
    run = index_files(model, mixed, work, load_image=load_image, on_error="skip", log=lines.append, **SETTINGS)
    assert run.resumed == 1 and [f for f, _ in run.skipped] == [bad]
    assert lines[0] == "resuming: 1 of 4 chunks done" and lines[1].startswith(f"skipped {bad}: ")
    ids = set(run.gallery.image_ids.tolist())
    assert 3 not in ids and ids <= set(range(len(mixed)))


def test_workers_give_the_same_gallery(model, files, reference, tmp_path):
    run = index_files(model, files, tmp_path / "chunks", load_image=load_image, num_workers=1, **SETTINGS)
    assert_same(run.gallery, reference.gallery)


def test_empty_file_list_and_arguments(model, files, tmp_path):
    run = index_files(model, [], tmp_path / "chunks", load_image=load_image, progress=False)
    assert len(run.gallery) == 0 and run.gallery.dim == 8 and run.chunks == 0
    with pytest.raises(InvalidArgumentError, match=r"^chunk_images: expected a multiple of batch_size=2"):
        index_files(model, files, tmp_path / "c", load_image=load_image, batch_size=2, chunk_images=3)
    for kw, name in (({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"),
                     ({"on_error": "ignore"}, "on_error")):
        with pytest.raises(InvalidArgumentError, match=f"^{name}: expected"):
            index_files(model, files, tmp_path / "c", load_image=load_image, **kw)
    assert not (tmp_path / "c").exists()


def test_default_chunks_are_whole_batches_and_the_factory_builds_the_gallery(model, files, tmp_path):
    made = []

    def factory(dim, class_names):
        made.append((dim, class_names))
        return Gallery(dim, class_names=class_names)

    run = index_files(model, files[:2], tmp_path / "chunks", load_image=load_image, batch_size=3, progress=False,
                      score_threshold=0.0, gallery_factory=factory)
    assert made == [(8, ["a", "b"])] and run.chunks == 1
    assert indexing.CHUNK_IMAGES == 256 and round(256 / 3) * 3 == 255  # the default chunk: 255 images


def test_no_progress_bar_when_not_a_terminal(model, files, tmp_path, capfd):
    index_files(model, files[:2], tmp_path / "chunks", load_image=load_image, batch_size=2, score_threshold=0.0,
                progress=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_clear_chunks_leaves_other_files(model, files, tmp_path):
    work = tmp_path / "chunks"
    index_files(model, files[:2], work, load_image=load_image, **SETTINGS)
    (work / "notes.txt").write_text("mine")
    (work / ".00007.pt.x1y2z3a4.tmp").write_bytes(b"")
    clear_chunks(work)
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    (work / "notes.txt").unlink()
    clear_chunks(work)
    assert not work.exists()
