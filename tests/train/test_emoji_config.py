"""emoji-logos in training configs: ``type: emoji`` builds EmojiLogosDataset, the two benchmark recipes
(configs/emoji_base.yaml, configs/emoji_supervised.yaml) validate and differ only where they should, the
supervised recipe's classes are the benchmark's novel subset, and a tiny DLDENet trains on fake emoji."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fewsight.data import EmojiLogosDataset, emoji_classes
from fewsight.errors import ConfigError
from fewsight.fewshot.emoji import emoji_base_subset, emoji_novel_subset
from fewsight.train import train
from fewsight.data import FORMATS
from fewsight.train.builders import build_datasets, dataset_class
from fewsight.train.config import load_config
from tests._helpers import one_thread  # noqa: F401  (autouse)
from tests._fake_emoji import write_fake_emoji
from tests.train._tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]
REAL_ROOT = REPO / "data" / "emoji"
BASE_YAML, SUPERVISED_YAML = REPO / "configs" / "emoji_base.yaml", REPO / "configs" / "emoji_supervised.yaml"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_fake_emoji(tmp_path_factory.mktemp("emoji"))


def _emoji_split(root: Path, split: str, n: int, classes="base") -> dict:
    return {"type": "emoji", "root": str(root), "split": split, "num_images": n, "image_size": 64,
            "emoji_size": [16, 32], "min_objects": 1, "max_objects": 3, "classes": classes, "background": "plain"}


def test_emoji_is_a_dataset_type():
    assert "emoji" in FORMATS and dataset_class("emoji") is EmojiLogosDataset


def test_both_recipes_validate_and_differ_only_in_classes_and_out_dir():
    base, sup = (yaml.safe_load(p.read_text()) for p in (BASE_YAML, SUPERVISED_YAML))
    cfg = load_config(BASE_YAML)  # validates every key against EmojiLogosDataset / DLDENet
    assert cfg.data.train.type == "emoji" and len(cfg.data.train.args["classes"]) == 100
    assert cfg.data.train.args["style"] == "both" and cfg.data.train.args["emoji_size"] == [24, 64]
    assert cfg.model.kwargs["anchor_generator"]["sizes"] == [24, 48, 96] and cfg.model.kwargs["embedding_dim"] == 128
    assert load_config(SUPERVISED_YAML).out_dir == "runs/emoji_supervised"
    names = sup["data"]["train"]["classes"]
    assert isinstance(names, list) and len(names) == 50
    for split in ("train", "val", "test"):
        assert sup["data"][split]["classes"] == names
        assert base["data"][split]["classes"] == base["data"]["train"]["classes"]
    stripped = copy.deepcopy(sup)
    for split in ("train", "val", "test"):
        stripped["data"][split]["classes"] = base["data"]["train"]["classes"]
    stripped["out_dir"] = base["out_dir"]
    assert stripped == base


@pytest.mark.skipif(not (REAL_ROOT / "google" / "emoji.json").is_file(), reason="needs `make emoji-data`")
def test_supervised_classes_are_the_benchmark_novel_subset():
    catalog = emoji_classes(REAL_ROOT)
    names = yaml.safe_load(SUPERVISED_YAML.read_text())["data"]["train"]["classes"]
    assert names == [catalog.names[i] for i in emoji_novel_subset(REAL_ROOT, 50, seed=0)]


@pytest.mark.skipif(not (REAL_ROOT / "google" / "emoji.json").is_file(), reason="needs `make emoji-data`")
def test_base_recipe_classes_are_the_base_subset():
    catalog = emoji_classes(REAL_ROOT)
    names = yaml.safe_load(BASE_YAML.read_text())["data"]["train"]["classes"]
    assert names == [catalog.names[i] for i in emoji_base_subset(REAL_ROOT, 100, seed=0)]


def test_build_datasets_with_named_and_split_classes(root):
    catalog = emoji_classes(root)
    cfg = load_config({"data": {"train": _emoji_split(root, "train", 4), "val": _emoji_split(root, "val", 2)}})
    train_ds, val_ds, _ = build_datasets(cfg.data)
    assert isinstance(train_ds, EmojiLogosDataset) and train_ds.classes == [catalog.names[i] for i in catalog.base]
    assert val_ds.classes == train_ds.classes and val_ds.split == "val"  # val defaults to the training classes
    names = [catalog.names[i] for i in catalog.novel[:2]]
    cfg = load_config({"data": {"train": _emoji_split(root, "train", 2, classes=names)}})
    assert build_datasets(cfg.data)[0].classes == names
    with pytest.raises(ConfigError, match="data.train.colour: unknown argument"):
        load_config({"data": {"train": {**_emoji_split(root, "train", 2), "colour": "red"}}})


def test_a_tiny_dldenet_trains_on_emoji(tmp_path, root):
    cfg = tiny_config(tmp_path, name="dldenet", train=_emoji_split(root, "train", 4), val=_emoji_split(root, "val", 2),
                      embedding_dim=8, directions="learned")
    result = train(cfg)
    assert result.model.classes == [emoji_classes(root).names[i] for i in emoji_classes(root).base]
    assert (tmp_path / "model.pt").is_file()
