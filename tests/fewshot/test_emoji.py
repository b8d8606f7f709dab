"""The emoji few-shot detection benchmark: novel subset, support / test datasets and their labels, classes
without ground truth left out of AP50, and ``fewsight bench fewshot --data emoji`` end to end on a fake
emoji install with tiny untrained detectors (only the wiring is tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewsight.cli import main
from fewsight.data import EmojiLogosDataset, emoji_classes
from fewsight.errors import DataError, InvalidArgumentError
from fewsight.eval import evaluate_detections
from fewsight.fewshot.protocol import _ap50
from fewsight.fewshot.emoji import (
    _mean_ap50,
    base_support_size,
    emoji_base_subset,
    emoji_fewshot_datasets,
    emoji_novel_subset,
    evaluate_reference,
    run_emoji_fewshot,
)
from fewsight.hub import load_model, save_model
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests._helpers import one_thread  # noqa: F401  (autouse)
from tests._fake_emoji import write_fake_emoji
from tests.train._tiny import TINY_MODEL


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_fake_emoji(tmp_path_factory.mktemp("emoji"))


@pytest.fixture(scope="module")
def catalog(root):
    return emoji_classes(root)


def _data(root, novel, **kw):
    kw = {"num_support": 12, "num_test": 16, "image_size": 96, "emoji_size": (16, 32), "background": "plain", **kw}
    return emoji_fewshot_datasets(root, novel, **kw)


# -- novel subset ------------------------------------------------------------------------------------------
def test_novel_subset_is_a_seeded_sorted_subset_of_the_novel_classes(root, catalog):
    sub = emoji_novel_subset(root, 3, seed=0)
    assert len(sub) == 3 and list(sub) == sorted(sub) and set(sub) <= set(catalog.novel)
    assert emoji_novel_subset(root, 3, seed=0) == sub  # deterministic
    assert len({emoji_novel_subset(root, 3, seed=s) for s in range(6)}) > 1  # the seed matters
    assert emoji_novel_subset(root, len(catalog.novel), seed=5) == catalog.novel
    for bad in (0, len(catalog.novel) + 1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="n: expected an int"):
            emoji_novel_subset(root, bad)


def test_absent_data_is_a_data_error_with_the_hint(tmp_path):
    for call in (lambda: emoji_novel_subset(tmp_path / "none"), lambda: emoji_fewshot_datasets(tmp_path / "none")):
        with pytest.raises(DataError, match="make emoji-data"):
            call()


# -- datasets ----------------------------------------------------------------------------------------------
def test_label_list_is_the_base_model_order_then_the_novel_subset(root, catalog):
    novel = emoji_novel_subset(root, 3, seed=1)
    data = _data(root, novel)
    base = EmojiLogosDataset(root, num_images=1, classes="base", background="plain").classes
    assert data.classes == base + [catalog.names[i] for i in novel]
    assert data.base_names == base and data.novel_names == [catalog.names[i] for i in novel]
    assert data.novel == tuple(range(len(base), len(base) + 3)) and data.novel_subset == novel
    assert len(data.test_base) == 3 and set(data.base_subset) <= set(catalog.base)
    assert [data.classes[c] for c in data.test_base] == [catalog.names[i] for i in data.base_subset]
    for ds in (data.support, data.test_same, data.test_cross):
        assert ds.classes == data.classes
    assert data.test_styles == ("google", "twitter") and list(data.tests) == ["google", "twitter"]
    assert data.test_same.dataset.styles == ("google",) and data.test_cross.dataset.styles == ("twitter",)
    assert data.support.dataset.styles == ("google",) and data.support.dataset.split == "train"
    assert data.test_same.dataset.split == "test" and len(data.test_same) == len(data.test_cross) == 16
    other = _data(root, novel, support_style="twitter")
    assert other.test_styles == ("twitter", "google") and other.support.dataset.styles == ("twitter",)


def _relabeled_names(view, i):
    """(names through the view, names in the underlying dataset) of item ``i``'s objects."""
    inner = view.dataset[i][1]
    outer = view[i][1]
    torch.testing.assert_close(outer["boxes"], inner["boxes"])
    return [view.classes[c] for c in outer["labels"].tolist()], [view.dataset.classes[c] for c in inner["labels"].tolist()]


def test_support_draws_only_novel_classes_and_test_sets_both(root):
    data = _data(root, emoji_novel_subset(root, 3, seed=0))
    novel, base = set(data.novel), set(data.test_base)
    for i in range(len(data.support)):
        labels = data.support[i][1]["labels"]
        assert len(labels) > 0 and set(labels.tolist()) <= novel
        outer, inner = _relabeled_names(data.support, i)
        assert outer == inner  # relabeling keeps each object's class
    for test in (data.test_same, data.test_cross):
        seen = []
        for i in range(len(test)):
            outer, inner = _relabeled_names(test, i)
            assert outer == inner
            seen += test[i][1]["labels"].tolist()
        assert set(seen) <= novel | base and set(seen) & novel and set(seen) & base
        assert 0.2 < sum(c in novel for c in seen) / len(seen) < 0.8  # about half the objects are novel


def test_base_support_for_fine_tuning(root, catalog):
    data = _data(root, emoji_novel_subset(root, 2, seed=0), num_base_support=6)
    assert len(data.support) == 12 + 6 and data.support.classes == data.classes
    novel = set(data.novel)
    tail = [set(data.support[i][1]["labels"].tolist()) for i in range(12, 18)]
    assert all(labels and not labels & novel for labels in tail)  # base classes, both styles
    assert set().union(*tail) <= set(range(len(catalog.base)))
    with pytest.raises(IndexError):
        data.support[18]
    assert base_support_size(956, 10) == 9560 and base_support_size(4, 1) == 13


def test_bad_dataset_arguments(root, catalog):
    with pytest.raises(InvalidArgumentError, match="not novel"):
        _data(root, [catalog.base[0]])
    with pytest.raises(InvalidArgumentError, match="novel: expected distinct"):
        _data(root, [catalog.novel[0]] * 2)
    with pytest.raises(InvalidArgumentError, match="num_test"):
        _data(root, catalog.novel[:1], num_test=0)
    with pytest.raises(InvalidArgumentError, match="support_style"):
        _data(root, catalog.novel[:1], support_style="apple")


# -- AP50 over classes with ground truth only --------------------------------------------------------------
def test_classes_without_ground_truth_are_left_out_of_ap50():
    """A class with detections but no ground truth, and one with neither, have no AP (nan): AP50 means skip them."""
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    preds = [{"boxes": torch.cat([box, box + 20]), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}]
    gts = [{"boxes": box, "labels": torch.tensor([0])}]
    m = evaluate_detections(preds, gts, class_names=["a", "b", "c"])
    assert m["per_class"]["a"]["ap50"] == pytest.approx(1.0)
    assert m["per_class"]["b"]["ap50"] != m["per_class"]["b"]["ap50"]  # nan, not 0
    assert m["per_class"]["c"]["ap50"] != m["per_class"]["c"]["ap50"]
    assert m["map50"] == pytest.approx(1.0)
    assert _ap50(m, ["a", "b", "c"]) == pytest.approx(1.0) == _mean_ap50(m, ["a", "b", "c"])
    assert _ap50(m, ["b", "c"]) != _ap50(m, ["b", "c"])  # nothing to average: nan


# -- the benchmark and its command ---------------------------------------------------------------------------
def _save(tmp_path_factory, name: str, classes) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8}), list(classes))
    return save_model(model, tmp_path_factory.mktemp(name) / "model.pt")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, catalog):
    return _save(tmp_path_factory, "base", [catalog.names[i] for i in catalog.base])


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory, root, catalog):
    return _save(tmp_path_factory, "reference", [catalog.names[i] for i in emoji_novel_subset(root, 2, seed=0)])


def test_library_checks_the_model_and_reference_classes(root, base_model, reference_model):
    data = _data(root, emoji_novel_subset(root, 3, seed=0))
    with pytest.raises(InvalidArgumentError, match="reference: expected a detector over the 3 novel classes"):
        evaluate_reference(load_model(reference_model), data)  # trained on 2 of them
    with pytest.raises(InvalidArgumentError, match="emoji base classes"):
        run_emoji_fewshot(load_model(reference_model), data)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewsight bench: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bench_fewshot_emoji_end_to_end(tmp_path, root, catalog, base_model, reference_model, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "fewshot", "--data", "emoji", "--emoji-root", str(root), "--checkpoint", str(base_model),
            "--reference", str(reference_model), "--novel-classes", "2", "--image-size", "64", "--shots", "1",
            "--seeds", "1", "--num-images", "3", "--batch-size", "4", "--modes", "enroll", "finetune",
            "--finetune-steps", "1", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "google (same-style): base AP50 before enrollment" in text and "twitter (cross-style)" in text
    assert "reference (full supervision on the novel classes): novel AP50 google" in text
    assert "google   enroll   k=1" in text and "twitter  finetune k=1" in text and "x reference)" in text
    results = json.loads((out / "results.json").read_text())
    novel = [catalog.names[i] for i in emoji_novel_subset(root, 2, seed=0)]
    assert results["data"] == "emoji" and results["novel"] == novel and results["support_style"] == "google"
    assert results["novel_class_indices"] == list(emoji_novel_subset(root, 2, seed=0))
    assert results["num_support_images"] == 300 + base_support_size(len(catalog.base), 1, 4.0)
    assert list(results["styles"]) == ["google", "twitter"]
    assert [results["styles"][s]["role"] for s in ("google", "twitter")] == ["same-style", "cross-style"]
    ref = results["reference"]
    assert ref["checkpoint"] == str(reference_model) and set(ref) >= {"google", "twitter"}
    for style, part in results["styles"].items():
        assert set(part) == {"role", "base_before", "summary", "runs"}
        assert [(r["mode"], r["k"], r["seeds"]) for r in part["summary"]] == [("enroll", 1, 1), ("finetune", 1, 1)]
        for row in part["summary"]:
            r = ref[style]["novel_ap50"]
            expected = round(row["novel_ap50"] / r, 4) if r and r > 0 else None  # nan is written as null
            assert row["novel_ap50_vs_reference"] == expected
        for run in part["runs"]:  # per-class AP50 of classes with ground truth only
            assert set(run["per_class_ap50"]) <= {*novel, *results["test_base"]}
        assert (out / f"fewshot_{style}.png").read_bytes()[:4] == b"\x89PNG"
    assert load_model(base_model).classes == [catalog.names[i] for i in catalog.base]  # file untouched


def test_bench_fewshot_emoji_without_reference(tmp_path, root, base_model, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "fewshot", "--data", "emoji", "--emoji-root", str(root), "--checkpoint", str(base_model),
            "--novel-classes", "1", "--image-size", "64", "--shots", "1", "--seeds", "1", "--num-images", "2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "reference" not in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["reference"] is None and results["num_support_images"] == 300
    assert "novel_ap50_vs_reference" not in results["styles"]["twitter"]["summary"][0]


def test_bench_fewshot_emoji_bad_inputs(tmp_path, root, base_model, reference_model, capsys):
    out = tmp_path / "bench"
    common = ["bench", "fewshot", "--data", "emoji", "--emoji-root", str(root), "--image-size", "64",
              "--num-images", "2", "--out", str(out), "--quiet"]
    assert main(["bench", "fewshot", "--data", "coco", "--checkpoint", str(base_model)]) == 1  # a dataset path
    assert "--support: expected a support dataset" in _error_line(capsys)

    assert main([*common, "--checkpoint", str(base_model), "--reference", str(reference_model),
                 "--novel-classes", "3"]) == 1  # reference trained on 2 novel classes
    err = _error_line(capsys)
    assert "--reference: expected a detector over the 3 novel classes" in err

    assert main([*common, "--checkpoint", str(reference_model), "--novel-classes", "2"]) == 1
    assert "--checkpoint: expected a DLDENet over emoji base classes" in _error_line(capsys)

    assert main([*common, "--checkpoint", str(base_model), "--novel-classes", "7"]) == 1
    assert "--novel-classes: expected an int in [1, 6], got 7" in _error_line(capsys)

    assert main([*common, "--checkpoint", str(base_model), "--novel-classes", "2", "--image-size", "48"]) == 1
    assert "--image-size: expected >= 64" in _error_line(capsys)

    assert main([*common, "--checkpoint", str(base_model), "--novel-classes", "2", "--device", "nonsense"]) == 1
    assert "--device" in _error_line(capsys)

    assert main([*common[:5], str(tmp_path / "none"), *common[6:], "--checkpoint", str(base_model)]) == 1
    assert "make emoji-data" in _error_line(capsys)

    assert main(["bench", "fewshot", "--checkpoint", str(base_model), "--reference", str(reference_model),
                 "--out", str(out)]) == 1  # digits
    assert "--reference: expected only with --data emoji" in _error_line(capsys)
    assert not (out / "results.json").exists()


def test_a_base_subset_model_gets_its_own_label_list(root):
    catalog = emoji_classes(root)
    base = list(emoji_base_subset(root, 3, seed=0))
    assert len(base) == 3 and set(base) <= set(catalog.base)
    novel = emoji_novel_subset(root, 2, seed=0)
    data = emoji_fewshot_datasets(root, novel, base=base[::-1], num_support=4, num_test=4, image_size=64,
                                  emoji_size=(16, 32), background="plain", num_base_support=3)
    assert data.classes == [catalog.names[i] for i in base[::-1]] + [catalog.names[i] for i in novel]
    assert data.novel == (3, 4) and set(data.test_base) <= {0, 1, 2}
    for ds in (data.support, data.test_same, data.test_cross):
        for i in range(len(ds)):
            assert (ds[i][1]["labels"] < 5).all()
    with pytest.raises(InvalidArgumentError, match="base: expected distinct base-class indices"):
        emoji_fewshot_datasets(root, novel, base=[novel[0]])
