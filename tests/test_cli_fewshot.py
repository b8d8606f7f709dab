"""The few-shot commands: ``fewsight enroll``, ``fewsight bench fewshot``, ``fewsight search index|query``
(happy paths on tiny untrained models, and one-line errors with exit status 1)."""

from __future__ import annotations

import json

import pytest
import torch

from fewsight.cli import main
from fewsight.data import DigitsDataset, export_dataset, save_image
from fewsight.hub import load_model, save_model
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests.train._tiny import TINY_MODEL
from tests._helpers import one_thread  # noqa: F401  (autouse)

BASE = [str(d) for d in range(8)]


def _save(tmp_path_factory, name: str, classes, **kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, None, {**TINY_MODEL, **kw}), list(classes))
    return save_model(model, tmp_path_factory.mktemp(name) / "model.pt")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """An untrained tiny DLDENet over the digits base classes 0-7 (only the wiring is tested)."""
    return _save(tmp_path_factory, "dldenet", BASE, embedding_dim=8)


@pytest.fixture(scope="module")
def search_model(tmp_path_factory):
    return _save(tmp_path_factory, "dldenet", ["0", "1"], embedding_dim=8, score_threshold=0.0)


@pytest.fixture(scope="module")
def retinanet_file(tmp_path_factory):
    return _save(tmp_path_factory, "retinanet", ["0", "1"])


def _error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fewsight {prefix}: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def _support(tmp_path, fmt: str, classes=(0, 8), n: int = 3):
    data = DigitsDataset("train", n, image_size=64, digit_size=(16, 32), max_digits=3, classes=classes, seed=2)
    return data, export_dataset(data, tmp_path / fmt, fmt=fmt)


def test_help(capsys):
    for argv in (["enroll"], ["bench", "fewshot"], ["search", "index"], ["search", "query"]):
        assert main([*argv, "--help"]) == 0
        assert f"usage: fewsight {' '.join(argv)}" in capsys.readouterr().out
    assert main(["bench"]) == 2 and main(["search"]) == 2  # a sub-command is required
    assert main(["enroll", "--checkpoint", "m.pt"]) == 2  # --support and --out are required


# --- enroll ---------------------------------------------------------------------------------------------


def test_enroll_from_a_coco_folder(tmp_path, digits_model, capsys):
    data, ann = _support(tmp_path, "coco")
    assert any((data.get_target(i)["labels"] == 1).any() for i in range(len(data)))  # some "8" boxes
    out = tmp_path / "enrolled.pt"
    assert main(["enroll", "--checkpoint", str(digits_model), "--support", str(ann), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "enrolled 8 (every box)" in text and "9 classes" in text and str(out) in text
    model = load_model(out)
    assert model.classes == [*BASE, "8"] and model.num_classes == 9
    base = load_model(digits_model)
    torch.testing.assert_close(model.classifier.means[:8], base.classifier.means)  # base classes untouched
    torch.testing.assert_close(model.classifier.means[8].norm(), torch.tensor(1.0))
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["enrolled"] == ["8"] and meta["base_classes"] == BASE and meta["shots"] is None
    with torch.no_grad():  # the enrolled file detects with the new class list
        assert len(model([data[0][0]])) == 1


def test_enroll_from_a_voc_folder_with_shots_and_named_classes(tmp_path, digits_model, capsys):
    _, voc = _support(tmp_path, "voc", classes=(1, 9, 8), n=4)
    out = tmp_path / "voc.pt"
    argv = ["enroll", "--checkpoint", str(digits_model), "--support", str(voc), "--classes", "9", "--shots", "1",
            "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "enrolled 9 (1 per class)" in capsys.readouterr().out
    assert load_model(out).classes == [*BASE, "9"]


def test_enroll_on_digits_with_shots(tmp_path, digits_model, capsys):
    out = tmp_path / "digits.pt"
    argv = ["enroll", "--checkpoint", str(digits_model), "--support", "digits", "--shots", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "enrolled 8, 9 (2 per class)" in capsys.readouterr().out
    model = load_model(out)
    assert model.classes == [*BASE, "8", "9"]
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["shots"] == 2 and meta["seed"] == 0 and meta["support"] == "digits"
    # the same seed gives the same directions; another seed other ones
    again = tmp_path / "again.pt"
    assert main([*argv[:-1], str(again)]) == 0
    torch.testing.assert_close(load_model(again).classifier.means, model.classifier.means)
    other = tmp_path / "other.pt"
    assert main([*argv[:-2], "--seed", "1", "--out", str(other)]) == 0
    assert not torch.allclose(load_model(other).classifier.means[8:], model.classifier.means[8:])


def test_enroll_with_a_crop_embedder_then_predict(tmp_path, digits_model, capsys):
    from fewsight.fewshot import CropEmbedder, CropRescorer

    torch.manual_seed(0)
    embedder = save_model(CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False), tmp_path / "emb.pt")
    out = tmp_path / "crops.pt"
    argv = ["enroll", "--checkpoint", str(digits_model), "--support", "digits", "--shots", "2",
            "--crop-embedder", str(embedder), "--out", str(out)]
    assert main(argv) == 0
    model = load_model(out)
    assert isinstance(model, CropRescorer) and model.classes == [*BASE, "8", "9"] and model.num_base == len(BASE)
    assert model.prototypes.shape == (2, 8) and not model.training
    assert torch.load(out, weights_only=True)["metadata"]["crop_embedder"] == str(embedder)
    # The file rebuilds the same model: same detections on the same images.
    again = load_model(out)
    images = [DigitsDataset("test", 2, seed=1)[i][0] for i in range(2)]
    with torch.no_grad():
        for a, b in zip(model(images), again(images)):
            torch.testing.assert_close(a["scores"], b["scores"])
            assert bool((a["labels"] >= len(BASE)).any())
    folder = tmp_path / "images"
    folder.mkdir()
    save_image(images[0], folder / "a.png")
    assert main(["predict", "--checkpoint", str(out), str(folder), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["classes"] == [*BASE, "8", "9"]
    # A second embedder is refused.
    capsys.readouterr()
    assert main([*argv[:2], str(out), *argv[3:-1], str(tmp_path / "again.pt")]) == 1
    assert "already has a crop embedder" in capsys.readouterr().err
    # Writing the result over the --checkpoint it was read from is refused before any work.
    assert main([*argv[:2], str(out), *argv[3:]]) == 1
    assert "--out: expected outputs that are none of the command's inputs" in capsys.readouterr().err


def test_enroll_bad_inputs(tmp_path, digits_model, retinanet_file, capsys):
    _, ann = _support(tmp_path, "coco")
    out = tmp_path / "never.pt"
    common = ["--support", str(ann), "--out", str(out)]

    assert main(["enroll", "--checkpoint", str(retinanet_file), *common]) == 1
    assert "expected a DLDENet" in _error_line(capsys, "enroll")

    assert main(["enroll", "--checkpoint", str(tmp_path / "none.pt"), *common]) == 1
    assert "none.pt" in _error_line(capsys, "enroll")

    assert main(["enroll", "--checkpoint", str(digits_model), *common, "--classes", "9"]) == 1
    err = _error_line(capsys, "enroll")
    assert "support dataset" in err and "'9'" in err

    assert main(["enroll", "--checkpoint", str(digits_model), *common, "--classes", "0"]) == 1
    assert "'0'" in _error_line(capsys, "enroll")  # the model already knows it

    assert main(["enroll", "--checkpoint", str(digits_model), *common, "--shots", "50"]) == 1
    assert "k: expected at least 50" in _error_line(capsys, "enroll")

    assert main(["enroll", "--checkpoint", str(digits_model), *common, "--shots", "0"]) == 1
    assert "k: expected an int >= 1" in _error_line(capsys, "enroll")

    assert main(["enroll", "--checkpoint", str(digits_model), "--support", str(tmp_path / "nope.json"),
                 "--out", str(out)]) == 1
    assert "nope.json" in _error_line(capsys, "enroll")
    assert not out.exists()


# --- bench fewshot --------------------------------------------------------------------------------------


def test_bench_fewshot_writes_results_and_plot(tmp_path, digits_model, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "fewshot", "--checkpoint", str(digits_model), "--shots", "1", "--seeds", "1",
            "--num-images", "4", "--batch-size", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "base AP50 before enrollment" in text and "novel AP50" in text and "results.json" in text
    results = json.loads((out / "results.json").read_text())
    assert results["novel"] == ["8", "9"] and results["data"] == "digits"
    assert set(results) >= {"base_before", "summary", "runs", "checkpoint"}
    [row] = results["summary"]
    assert (row["mode"], row["k"], row["seeds"]) == ("enroll", 1, 1)
    [run] = results["runs"]
    assert list(run["per_class_ap50"]) == [*BASE, "8", "9"]
    assert (out / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
    assert load_model(digits_model).classes == BASE  # the checkpoint file is not modified


def test_bench_fewshot_with_a_crop_embedder(tmp_path, digits_model, capsys):
    from fewsight.fewshot import CropEmbedder

    torch.manual_seed(0)
    embedder = save_model(CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False), tmp_path / "emb.pt")
    out = tmp_path / "bench"
    argv = ["bench", "fewshot", "--checkpoint", str(digits_model), "--crop-embedder", str(embedder), "--shots", "1",
            "--seeds", "1", "--num-images", "4", "--batch-size", "4", "--modes", "enroll", "finetune",
            "--finetune-steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["crop_embedder"] == str(embedder)
    assert [(r["mode"], r["k"]) for r in results["summary"]] == [("enroll", 1), ("finetune", 1)]
    assert 0.0 <= results["summary"][0]["novel_ap50"] <= 1.0
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    assert main([*argv[:4], "--crop-embedder", str(tmp_path / "bad.pt"), *argv[6:]]) == 1
    assert "bad.pt: not a fewsight model file" in capsys.readouterr().err


def test_bench_fewshot_bad_inputs(tmp_path, retinanet_file, tmp_path_factory, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "fewshot", "--checkpoint", str(retinanet_file), "--out", str(out), "--quiet"]) == 1
    assert "expected a DLDENet" in _error_line(capsys, "bench")
    cats = _save(tmp_path_factory, "dldenet", ["cat", "dog"], embedding_dim=8)
    assert main(["bench", "fewshot", "--checkpoint", str(cats), "--num-images", "2", "--out", str(out), "--quiet"]) == 1
    assert "novel_classes" in _error_line(capsys, "bench")
    assert main(["bench", "fewshot", "--checkpoint", str(cats), "--modes", "retrain"]) == 2
    assert not (out / "results.json").exists()


# --- search ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, search_model):
    root = tmp_path_factory.mktemp("search")
    data = DigitsDataset("test", 3, image_size=64, digit_size=(16, 32), max_digits=2, classes=(0, 1), seed=4)
    for i in range(len(data)):
        save_image(data[i][0], root / "images" / f"im{i}.png")
    out = root / "gallery"
    assert main(["search", "index", "--checkpoint", str(search_model), str(root / "images"), "--out", str(out),
                 "--score-threshold", "0.0"]) == 0
    return root, out


def test_search_index_writes_a_gallery(indexed, capsys):
    from fewsight.retrieval import Gallery

    root, out = indexed
    gallery = Gallery.load(out / "gallery.pt")
    paths = json.loads((out / "images.json").read_text())["images"]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["im0.png", "im1.png", "im2.png"]
    assert len(gallery) > 0 and gallery.dim == 8 and gallery.class_names == ["0", "1"]
    assert set(gallery.image_ids.tolist()) <= {0, 1, 2}


def test_search_query_round_trip(indexed, search_model, tmp_path, capsys):
    from fewsight.retrieval import Gallery

    root, out = indexed
    gallery = Gallery.load(out / "gallery.pt")
    paths = json.loads((out / "images.json").read_text())["images"]
    item = 0
    image = paths[int(gallery.image_ids[item])]
    box = [repr(float(v)) for v in gallery.boxes[item]]
    res = tmp_path / "q"
    argv = ["search", "query", "--checkpoint", str(search_model), "--gallery", str(out), "--image", image,
            "--box", *box, "--k", "3", "--out", str(res)]
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "results.json" in text
    results = json.loads((res / "results.json").read_text())
    assert results["query"] == image and len(results["box"]) == 4
    rows = results["results"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and 1 <= len(rows) <= 3
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-3)  # the object itself
    assert rows[0]["image"] == image
    assert rows[0]["box"] == [round(float(v), 1) for v in gallery.boxes[item]]
    assert rows[0]["label"] in ("0", "1")
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    assert (res / "results.png").read_bytes()[:4] == b"\x89PNG"
    # the gallery file itself works as --gallery too, and a crop without --box is a query
    crop = tmp_path / "crop.png"
    save_image(torch.rand(3, 24, 20), crop)
    assert main(["search", "query", "--checkpoint", str(search_model), "--gallery", str(out / "gallery.pt"),
                 "--image", str(crop), "--k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_search_bad_inputs(indexed, search_model, digits_model, retinanet_file, tmp_path, capsys):
    root, out = indexed
    image = str(root / "images" / "im0.png")
    query = ["search", "query", "--checkpoint", str(search_model), "--gallery", str(out), "--image", image]
    assert main([*query, "--box", "30", "10", "20", "40"]) == 1  # x2 < x1
    err = _error_line(capsys, "search")
    assert "--box" in err and "im0.png" in err
    assert main([*query, "--box", "10", "10", "40", "10"]) == 1  # zero height
    assert "--box" in _error_line(capsys, "search")
    assert main([*query, "--box", "10", "10", "40"]) == 2  # argparse: four numbers
    assert "expected 4 arguments" in capsys.readouterr().err
    assert main(["search", "query", "--checkpoint", str(search_model), "--gallery", str(tmp_path / "nothing"),
                 "--image", image]) == 1
    assert "gallery" in _error_line(capsys, "search")
    assert main([*query[:-1], str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in _error_line(capsys, "search")
    assert main(["search", "index", "--checkpoint", str(retinanet_file), image, "--out", str(tmp_path / "g")]) == 1
    assert "expected a DLDENet" in _error_line(capsys, "search")
    assert main(["search", "index", "--checkpoint", str(search_model), str(tmp_path / "none"),
                 "--out", str(tmp_path / "g")]) == 1
    assert "none" in _error_line(capsys, "search")


def test_search_query_with_another_model_is_refused(indexed, tmp_path_factory, capsys):
    root, out = indexed
    other = _save(tmp_path_factory, "dldenet", ["0", "1"], embedding_dim=4)
    argv = ["search", "query", "--checkpoint", str(other), "--gallery", str(out), "--image",
            str(root / "images" / "im0.png")]
    assert main(argv) == 1
    assert "8-D" in _error_line(capsys, "search")


def test_search_query_box_outside_the_image_is_an_error(indexed, search_model, capsys):
    root, out = indexed
    argv = ["search", "query", "--checkpoint", str(search_model), "--gallery", str(out), "--image",
            str(root / "images" / "im0.png"), "--box", "500", "500", "600", "600"]
    assert main(argv) == 1
    assert "--box" in _error_line(capsys, "search")


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_bench_fewshot_without_test_images_is_an_error(tmp_path, digits_model, capsys):
    argv = ["bench", "fewshot", "--checkpoint", str(digits_model), "--shots", "1", "--seeds", "1",
            "--num-images", "0", "--out", str(tmp_path / "b"), "--quiet"]
    assert main(argv) == 1
    assert "num-images" in _error_line(capsys, "bench") or "no images" in capsys.readouterr().err


def test_enroll_when_the_model_knows_every_support_class(tmp_path, digits_model, capsys):
    _, ann = _support(tmp_path, "coco", classes=(0, 1))
    assert main(["enroll", "--checkpoint", str(digits_model), "--support", str(ann), "--out",
                 str(tmp_path / "x.pt")]) == 1
    assert "already knows every dataset class" in _error_line(capsys, "enroll")


def test_enroll_a_coco_category_without_boxes_is_a_one_line_error(tmp_path, digits_model, capsys):
    _, ann = _support(tmp_path, "coco", classes=(0, 1))
    coco = json.loads(ann.read_text())
    coco["categories"].append({"id": 99, "name": "9", "supercategory": ""})
    ann.write_text(json.dumps(coco))
    assert main(["enroll", "--checkpoint", str(digits_model), "--support", str(ann), "--out",
                 str(tmp_path / "x.pt")]) == 1
    assert "'9'" in _error_line(capsys, "enroll")


def test_search_index_bad_batch_size_is_a_one_line_error(indexed, search_model, tmp_path, capsys):
    root, _ = indexed
    argv = ["search", "index", "--checkpoint", str(search_model), str(root / "images"), "--out", str(tmp_path / "g"),
            "--batch-size", "0"]
    assert main(argv) == 1
    assert "--batch-size" in _error_line(capsys, "search")


def test_search_with_a_crop_embedder_and_csls(indexed, search_model, tmp_path, capsys):
    from fewsight.fewshot import CropEmbedder
    from fewsight.retrieval import Gallery

    root, _ = indexed
    torch.manual_seed(0)
    net = CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False)
    net.set_whitening(torch.zeros(8), torch.randn(6, 8))
    embedder = save_model(net, tmp_path / "emb.pt")
    out = tmp_path / "gallery"
    assert main(["search", "index", "--checkpoint", str(search_model), str(root / "images"), "--out", str(out),
                 "--score-threshold", "0.0", "--embedder", str(embedder)]) == 0
    gallery = Gallery.load(out / "gallery.pt")
    assert gallery.dim == 6  # the embedder's whitened dimension
    item = 0
    image = json.loads((out / "images.json").read_text())["images"][int(gallery.image_ids[item])]
    box = [repr(float(v)) for v in gallery.boxes[item]]
    query = ["search", "query", "--checkpoint", str(search_model), "--gallery", str(out), "--image", image,
             "--box", *box, "--k", "2"]
    capsys.readouterr()
    assert main([*query, "--embedder", str(embedder)]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(1.0, abs=1e-3)  # the object itself
    assert main([*query, "--embedder", str(embedder), "--csls"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(query) == 1  # built with the embedder, queried without it
    assert "query it the same way (--embedder)" in _error_line(capsys, "search")


def test_bench_fewshot_on_your_own_datasets(tmp_path, tmp_path_factory, capsys):
    model = _save(tmp_path_factory, "dldenet", ["0", "1"], embedding_dim=8)
    test = DigitsDataset("test", 4, image_size=64, digit_size=(16, 32), max_digits=3, classes=(0, 1, 8), seed=5)
    test_file = export_dataset(test, tmp_path / "test", fmt="coco")
    support_dir = export_dataset(DigitsDataset("train", 6, image_size=64, digit_size=(16, 32), max_digits=3,
                                               classes=(8, 0), seed=6), tmp_path / "support", fmt="voc")
    out = tmp_path / "bench"
    argv = ["bench", "fewshot", "--checkpoint", str(model), "--data", str(test_file), "--support", str(support_dir),
            "--shots", "1", "--seeds", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["novel"] == ["8"] and results["calibrate"] is True and results["rivalry"] == 5.0
    assert main([*argv[:4], "--data", str(test_file), "--out", str(out)]) == 1  # no --support
    assert "--support" in _error_line(capsys, "bench")
    known = _save(tmp_path_factory, "dldenet", ["0", "1", "8"], embedding_dim=8)
    assert main(["bench", "fewshot", "--checkpoint", str(known), *argv[4:]]) == 1
    assert "no novel class" in _error_line(capsys, "bench")
