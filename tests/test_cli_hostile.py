"""Hostile command lines: existing, unwritable and overlapping output paths, non-finite options, a huge
``--k``, broken gallery files, unlabelled data, bugs. Each is one line ``fewsight <cmd>: ...`` (exit 1),
never a traceback, and no input is ever written over."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import yaml

from fewsight.cli import clean_message, main
from fewsight.data import DigitsDataset, export_dataset, save_image
from fewsight.errors import DataError
from fewsight.hub import save_model
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests._helpers import one_thread  # noqa: F401  (autouse)
from tests.train._tiny import TINY_MODEL, tiny_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny DLDENet file, an image folder, a labelled COCO file, a gallery and a training config."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8}), ["0", "1"])
    paths = {"model": save_model(model, root / "model.pt")}
    data = DigitsDataset("test", 2, image_size=64, digit_size=(16, 32), max_digits=2, classes=(0, 1), seed=4)
    for i in range(len(data)):
        save_image(data[i][0], root / "images" / f"im{i}.png")
    paths["images"] = root / "images"
    paths["image"] = root / "images" / "im0.png"
    paths["coco"] = export_dataset(data, root / "coco", fmt="coco")
    paths["gallery"] = root / "gallery"
    assert main(["search", "index", "--checkpoint", str(paths["model"]), str(paths["images"]), "--out",
                 str(paths["gallery"]), "--score-threshold", "0"]) == 0
    cfg = tiny_config(root / "unused")
    cfg["data"]["val"] = None
    paths["config"] = root / "config.yaml"
    paths["config"].write_text(yaml.safe_dump(cfg))
    return paths


# Every command that writes, with its output path as {out}: (argv, what --out is).
COMMANDS = {
    "predict": (["predict", "--checkpoint", "{model}", "{images}", "--out", "{out}", "--quiet"], "folder"),
    "eval": (["eval", "--checkpoint", "{model}", "--data", "{coco}", "--out", "{out}", "--quiet"], "folder"),
    "search index": (["search", "index", "--checkpoint", "{model}", "{images}", "--out", "{out}"], "folder"),
    "search query": (["search", "query", "--checkpoint", "{model}", "--gallery", "{gallery}", "--image", "{image}",
                      "--out", "{out}"], "folder"),
    "bench fewshot": (["bench", "fewshot", "--checkpoint", "{model}", "--out", "{out}", "--quiet"], "folder"),
    "bench retrieval": (["bench", "retrieval", "--checkpoint", "{model}", "--out", "{out}"], "folder"),
    "demo": (["demo", "--out", "{out}", "--quiet"], "folder"),
    "train": (["train", "--config", "{config}", "--out", "{out}", "--quiet"], "folder"),
    "export": (["export", "--checkpoint", "{model}", "--out", "{out}"], "file"),
    "enroll": (["enroll", "--checkpoint", "{model}", "--support", "{coco}", "--out", "{out}"], "file"),
}


def _argv(name, env, out):
    return [a.format(**{k: str(v) for k, v in env.items()}, out=str(out)) for a in COMMANDS[name][0]]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fewsight {command.split()[0]}: "), err
    assert "\n" not in err and "Traceback" not in err and "\x1b" not in err and ".tmp" not in err, err
    return err


def _snapshot(env):
    files = [p for key in ("model", "coco", "config") for p in [env[key]]]
    files += sorted(env["images"].iterdir()) + sorted(env["gallery"].iterdir())
    return {p: p.read_bytes() for p in files}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_existing_path_of_the_wrong_kind_as_out(env, tmp_path, capsys, name):
    before = _snapshot(env)
    if COMMANDS[name][1] == "folder":
        out = tmp_path / "a_file"
        out.write_text("keep me")
        expected = "existing file"
    else:
        out = tmp_path / "a_folder"
        out.mkdir()
        expected = "existing folder"
    assert main(_argv(name, env, out)) == 1
    err = _error_line(capsys, name)
    assert "--out: " in err and expected in err and str(out) in err
    if out.is_file():
        assert out.read_text() == "keep me"
    assert _snapshot(env) == before


@pytest.mark.parametrize("name", list(COMMANDS))
def test_out_under_a_regular_file_is_refused_before_any_work(env, tmp_path, capsys, name):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("x")
    out = blocker / "sub" / ("out.pt" if COMMANDS[name][1] == "file" else "out")
    assert main(_argv(name, env, out)) == 1
    err = _error_line(capsys, name)
    assert "--out: " in err and f"under the file {blocker}" in err


@pytest.mark.parametrize(
    ("name", "out_key"),
    [("predict", "images"), ("search index", "images"), ("search query", "gallery"), ("export", "model"),
     ("enroll", "model")],
)
def test_out_overlapping_an_input_is_refused(env, capsys, name, out_key):
    before = _snapshot(env)
    assert main(_argv(name, env, env[out_key])) == 1
    err = _error_line(capsys, name)
    assert "--out: expected" in err and str(env[out_key]) in err
    assert _snapshot(env) == before


def test_outputs_that_would_replace_input_files_are_refused(env, tmp_path, capsys):
    # predict a.png --out DIR where DIR/a.png is the input: its visualisation would replace it.
    image = tmp_path / "a.png"
    image.write_bytes(env["image"].read_bytes())
    argv = ["predict", "--checkpoint", str(env["model"]), str(image), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    assert "an input that would be overwritten" in _error_line(capsys, "predict")
    assert image.read_bytes() == env["image"].read_bytes()
    # train --config OUT/config.yaml --out OUT: the run writes OUT/config.yaml.
    run = tmp_path / "run"
    run.mkdir()
    config = run / "config.yaml"
    config.write_bytes(env["config"].read_bytes())
    assert main(["train", "--config", str(config), "--out", str(run), "--quiet"]) == 1
    assert "config.yaml" in _error_line(capsys, "train") and config.read_bytes() == env["config"].read_bytes()
    # eval --out DIR where DIR holds the dataset file named metrics.json.
    data = tmp_path / "ev" / "metrics.json"
    data.parent.mkdir()
    data.write_bytes(env["coco"].read_bytes())
    assert main(["eval", "--checkpoint", str(env["model"]), "--data", str(data), "--out", str(data.parent)]) == 1
    assert "an input that would be overwritten" in _error_line(capsys, "eval")


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # a write to a full disk names no file
        "EROFS",  # os.replace(tmp, dst) on a read-only file system names both
        "EACCES",
    ],
)
def test_system_errors_while_writing_are_one_line_naming_the_path(env, tmp_path, capsys, monkeypatch, failure):
    out = tmp_path / "pred"

    def fail(src, dst, *a, **k):
        if isinstance(failure, OSError):
            raise failure
        code = getattr(errno, failure)
        raise OSError(code, os.strerror(code), src, dst)

    monkeypatch.setattr(os, "replace", fail)
    assert main(_argv("predict", env, out)) == 1
    err = _error_line(capsys, "predict")
    assert str(out) in err
    expected = os.strerror(errno.ENOSPC if isinstance(failure, OSError) else getattr(errno, failure))
    assert expected in err
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("extra", "name", "flag"),
    [
        (["--score-threshold", "nan"], "predict", "--score-threshold"),
        (["--score-threshold", "inf"], "predict", "--score-threshold"),
        (["--score-threshold", "-0.1"], "predict", "--score-threshold"),
        (["--score-threshold", "1.5"], "predict", "--score-threshold"),
        (["--score-threshold", "nan"], "search index", "--score-threshold"),
        (["--rivalry", "nan"], "enroll", "--rivalry"),
        (["--finetune-lr", "nan"], "bench fewshot", "--finetune-lr"),
        (["--finetune-lr", "0"], "bench fewshot", "--finetune-lr"),
        (["--box", "nan", "0", "10", "10"], "search query", "--box"),
        (["--k", "0"], "search query", "--k"),
    ],
)
def test_non_finite_or_out_of_range_options(env, tmp_path, capsys, extra, name, flag):
    out = tmp_path / ("o.pt" if COMMANDS[name][1] == "file" else "o")
    assert main(_argv(name, env, out) + extra) == 1
    assert _error_line(capsys, name).split(": ", 1)[1].startswith(f"{flag}: expected")
    assert not out.exists()


def test_search_query_with_a_huge_k_returns_the_gallery(env, tmp_path, capsys):
    argv = ["search", "query", "--checkpoint", str(env["model"]), "--gallery", str(env["gallery"]), "--image",
            str(env["image"]), "--k", str(10**15)]
    assert main(argv) == 0
    assert 0 < len(capsys.readouterr().out.strip().splitlines())


def test_gallery_search_clamps_a_huge_k():
    from fewsight.retrieval import Gallery
    from fewsight.retrieval.gallery import MAX_PADDED_K

    g = Gallery()
    g.add(torch.randn(5, 4))
    for csls in (None, torch.randn(3, 4)):
        r = g.search(torch.randn(2, 4), k=10**15, csls_reference=csls)
        assert r.indices.shape == (2, MAX_PADDED_K) and sorted(r.indices[0, :5].tolist()) == list(range(5))
        assert (r.indices[:, 5:] == -1).all()


@pytest.mark.parametrize("text", ['{"images": ["a.png", ', "[1, 2]", '{"images": [1, 2]}', "\xff\xfe"])
def test_a_broken_images_json_is_one_line_naming_it(env, tmp_path, capsys, text):
    import shutil

    gallery = tmp_path / "gallery"
    shutil.copytree(env["gallery"], gallery)  # gallery.pt and its faiss index file
    (gallery / "images.json").write_bytes(text.encode("latin-1"))
    argv = ["search", "query", "--checkpoint", str(env["model"]), "--gallery", str(gallery), "--image", str(env["image"])]
    assert main(argv) == 1
    assert str(gallery / "images.json") in _error_line(capsys, "search")


def test_eval_without_any_ground_truth_exits_1(env, tmp_path, capsys):
    ann = json.loads(env["coco"].read_text())
    ann["annotations"] = []
    unlabelled = env["coco"].parent / "unlabelled.json"
    unlabelled.write_text(json.dumps(ann))
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(env["model"]), "--data", str(unlabelled), "--out", str(out), "--quiet"]) == 1
    err = _error_line(capsys, "eval")
    assert "unlabelled.json" in err and "no ground-truth boxes" in err
    assert not (out / "metrics.json").exists()


def test_lightning_misconfiguration_from_the_command_line(env, tmp_path, capsys):
    for setting, key in (("trainer.strategy=carrier_pigeon", "trainer.strategy"), ("trainer.devices=-1", "trainer.devices")):
        argv = ["train", "--config", str(env["config"]), "--out", str(tmp_path / "run"), "--quiet", "--set", setting]
        assert main(argv) == 1
        assert f": {key}: " in _error_line(capsys, "train")


def test_a_bug_is_one_line_and_debug_shows_the_traceback(env, tmp_path, capsys, monkeypatch):
    from fewsight.cli import predict

    def buggy(args):
        return 1 // 0

    monkeypatch.setattr(predict, "run", buggy)
    argv = _argv("predict", env, tmp_path / "o")
    assert main(argv) == 3
    err = _error_line(capsys, "predict")
    assert "internal error (ZeroDivisionError: integer division or modulo by zero)" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", *argv])


def test_messages_are_plain_text_naming_destinations(env, tmp_path, capsys, monkeypatch):
    from fewsight.cli import predict

    tmp = tmp_path / ".predictions.json.k2_x9abc.tmp"

    def colourful(args):
        raise DataError(tmp, "\x1b[1mbold\x1b[0m claim\nover two lines")

    monkeypatch.setattr(predict, "run", colourful)
    assert main(_argv("predict", env, tmp_path / "o")) == 1
    assert _error_line(capsys, "predict") == f"fewsight predict: {tmp_path / 'predictions.json'}: bold claim over two lines"
    assert clean_message("\x1b]0;title\x07a\x1b[31mb") == "ab"


def test_eval_class_map_renames_and_drops_classes_to_match_the_model(env, tmp_path, capsys):
    ann = json.loads(env["coco"].read_text())
    for c in ann["categories"]:  # the data names its classes differently from the model ("0", "1")
        c["name"] = {"0": "zero", "1": "one"}[c["name"]]
    ann["categories"].append({"id": 99, "name": "noise"})
    renamed = env["coco"].parent / "renamed.json"
    renamed.write_text(json.dumps(ann))
    argv = ["eval", "--checkpoint", str(env["model"]), "--data", str(renamed), "--quiet"]
    assert main(argv) == 1  # unknown classes without a map
    err = _error_line(capsys, "eval")
    assert "zero" in err or "one" in err
    cmap = tmp_path / "map.yaml"
    cmap.write_text("zero: '0'\none: '1'\nnoise: null\n")
    assert main([*argv, "--class-map", str(cmap), "--out", str(tmp_path / "out")]) == 0
    with_map = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert main(["eval", "--checkpoint", str(env["model"]), "--data", str(env["coco"]), "--quiet",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert with_map["map50"] == plain["map50"]
    (tmp_path / "bad.yaml").write_text("[1, 2]")
    assert main([*argv, "--class-map", str(tmp_path / "bad.yaml")]) == 1
    assert _error_line(capsys, "eval").startswith("fewsight eval: --class-map")
