"""``fewsight search index`` in chunks: a run killed with SIGKILL and started again gives the gallery of an
uninterrupted run; other inputs, a corrupt chunk or image, and bad chunk settings are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("faiss")

from fewsight.cli import main  # noqa: E402
from fewsight.data import save_image  # noqa: E402
from fewsight.hub import save_model  # noqa: E402
from fewsight.retrieval import Gallery  # noqa: E402
from fewsight.train import build_model  # noqa: E402
from fewsight.train.config import ModelConfig  # noqa: E402
from tests._helpers import one_thread  # noqa: F401,E402  (autouse)
from tests.train._tiny import TINY_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (48, 64), (64, 40), (56, 56), (64, 64), (40, 48)]

# Runs `fewsight search index` and SIGKILLs itself in the middle of writing the third chunk: its
# temporary file is written, the rename that would complete it never happens.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
real = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("00002.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from fewsight.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_index")
    torch.manual_seed(0)
    model = build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8, "score_threshold": 0.0}),
                        ["0", "1"])
    paths = {"root": root, "model": save_model(model, root / "model.pt"), "images": root / "images"}
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        save_image(torch.rand(3, h, w, generator=g), root / "images" / f"im{i}.png")
    return paths


def _argv(env, out, *extra):
    return ["search", "index", "--checkpoint", str(env["model"]), str(env["images"]), "--out", str(out),
            "--score-threshold", "0", "--batch-size", "2", "--chunk-images", "2", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewsight search: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run (3 chunks of 2 images; no --quiet: the bar is off anyway, not a terminal)."""
    out = tmp_path_factory.mktemp("reference") / "gallery"
    assert main(_argv(env, out)) == 0
    names = sorted(p.name for p in out.iterdir())  # chunks removed when done; the faiss index in its own file
    assert names[:2] == ["gallery.pt", "images.json"] and len(names) == 3 and names[2].endswith(".faiss")
    return out


@pytest.fixture(scope="module")
def killed(env, tmp_path_factory):
    """The output folder of a run SIGKILLed while writing its third chunk."""
    out = tmp_path_factory.mktemp("killed") / "gallery"
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, *_argv(env, out)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in (out / "chunks").iterdir())
    assert names[1:] == ["00000.pt", "00001.pt", "manifest.json"]
    assert names[0].startswith(".00002.pt.") and names[0].endswith(".tmp")  # the cut write
    assert not (out / "gallery.pt").exists()
    return out


def _copy(killed, tmp_path) -> Path:
    out = tmp_path / "gallery"
    shutil.copytree(killed, out)
    return out


def test_killed_run_resumed_gives_the_uninterrupted_gallery(env, reference, killed, tmp_path, capsys):
    out = _copy(killed, tmp_path)
    capsys.readouterr()
    assert main(_argv(env, out, "--quiet")) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("resuming: 2 of 3 chunks done\n") and "indexed" in printed
    a, b = Gallery.load(reference / "gallery.pt"), Gallery.load(out / "gallery.pt")
    assert len(a) == len(b) > 0 and a.class_names == b.class_names == ["0", "1"]
    assert torch.equal(a.labels, b.labels) and torch.equal(a.image_ids, b.image_ids)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.embeddings(), b.embeddings())
    assert set(b.image_ids.tolist()) == set(range(len(SIZES)))
    assert json.loads((out / "images.json").read_text()) == json.loads((reference / "images.json").read_text())
    assert not (out / "chunks").exists()


def test_resume_with_other_inputs_is_refused_and_restart_discards(env, killed, tmp_path, capsys):
    out = _copy(killed, tmp_path)
    assert main([*_argv(env, out), "--score-threshold", "0.5"]) == 1
    err = _error_line(capsys)
    assert str(out / "chunks" / "manifest.json") in err and "score_threshold" in err and "--restart" in err
    assert main([*_argv(env, out), "--batch-size", "1"]) == 1
    assert "batch_size (2 then, 1 now)" in _error_line(capsys)
    assert (out / "chunks" / "00000.pt").is_file()
    assert main([*_argv(env, out), "--score-threshold", "0.5", "--restart", "--quiet"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert not (out / "chunks").exists()


def test_a_corrupt_chunk_is_named(env, killed, tmp_path, capsys):
    out = _copy(killed, tmp_path)
    (out / "chunks" / "00001.pt").write_bytes(b"garbage")
    assert main(_argv(env, out, "--quiet")) == 1
    err = _error_line(capsys)
    assert str(out / "chunks" / "00001.pt") in err and "delete it" in err


def test_corrupt_image_stops_the_run_or_is_skipped(env, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(env["images"], images)
    (images / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    argv = ["search", "index", "--checkpoint", str(env["model"]), str(images), "--out", str(tmp_path / "g"),
            "--score-threshold", "0", "--batch-size", "2", "--chunk-images", "2", "--quiet"]
    assert main(argv) == 1
    assert str(images / "im2.png") in _error_line(capsys)
    assert main([*argv, "--skip-corrupt"]) == 0
    printed = capsys.readouterr().out
    assert "resuming: 1 of 3 chunks done" in printed and "(1 unreadable image(s) skipped)" in printed
    assert json.loads((tmp_path / "g" / "images.json").read_text())["skipped"] == [str(images / "im2.png")]
    assert 2 not in Gallery.load(tmp_path / "g" / "gallery.pt").image_ids.tolist()


def test_bad_settings_and_an_empty_folder(env, tmp_path, capsys):
    for extra, flag in ((["--chunk-images", "3"], "--chunk-images"), (["--chunk-images", "0"], "--chunk-images"),
                        (["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers")):
        assert main([*_argv(env, tmp_path / "g"), *extra]) == 1
        assert _error_line(capsys).startswith(f"fewsight search: {flag}: expected")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["search", "index", "--checkpoint", str(env["model"]), str(empty), "--out", str(tmp_path / "g")]) == 1
    assert "no image files" in _error_line(capsys)
    assert not (tmp_path / "g" / "gallery.pt").exists()


def test_chunks_never_go_beside_the_checkpoint(env, tmp_path, capsys):
    # --out X where X/chunks holds the model file: clearing the chunks would delete *.pt files there.
    out = tmp_path / "g"
    (out / "chunks").mkdir(parents=True)
    model = out / "chunks" / "00000.pt"
    model.write_bytes(env["model"].read_bytes())
    argv = ["search", "index", "--checkpoint", str(model), str(env["images"]), "--out", str(out)]
    assert main(argv) == 1
    assert "--out: expected a folder other than the input folder" in _error_line(capsys)
    assert model.read_bytes() == env["model"].read_bytes()


def test_workers_and_progress_off_when_not_a_terminal(env, reference, tmp_path, capfd):
    out = tmp_path / "g"
    assert main(_argv(env, out, "--workers", "1")) == 0
    printed, err = capfd.readouterr()
    # gRPC, loaded in this process by the Milvus tests, notes on stderr that a worker was forked.
    err = "\n".join(line for line in err.splitlines() if "fork_posix.cc" not in line)
    assert err == "" and printed.startswith("indexed ")
    a, b = Gallery.load(reference / "gallery.pt"), Gallery.load(out / "gallery.pt")
    assert torch.equal(a.embeddings(), b.embeddings()) and torch.equal(a.image_ids, b.image_ids)


def test_index_backends_one_option(env, tmp_path, capsys):
    """--index HNSW32 keeps its index beside gallery.pt (memory-mapped by query); --backend milvus stores
    the vectors in OUT/gallery.db; both give the exact default's results on this small gallery."""
    results = {}
    for name, extra in (("flat", []), ("hnsw", ["--index", "HNSW32"]), ("milvus", ["--backend", "milvus"])):
        if name == "milvus":
            pytest.importorskip("pymilvus")
            pytest.importorskip("milvus_lite")
        out = tmp_path / name
        assert main(_argv(env, out, "--quiet", *extra)) == 0
        assert (out / "gallery.db").exists() == (name == "milvus")
        assert bool(list(out.glob("index-*.faiss"))) == (name != "milvus")
        capsys.readouterr()
        example = sorted(env["images"].iterdir())[0]
        assert main(["search", "query", "--checkpoint", str(env["model"]), "--gallery", str(out), "--image",
                     str(example), "--k", "3", "--out", str(tmp_path / f"q_{name}")]) == 0
        rows = json.loads((tmp_path / f"q_{name}" / "results.json").read_text())["results"]
        results[name] = [(r["image"], r["box"]) for r in rows]
    assert results["hnsw"] == results["flat"]
    if "milvus" in results:
        assert results["milvus"] == results["flat"]
