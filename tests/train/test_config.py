"""YAML training configs: parsing, unknown keys / bad values -> ConfigError, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewsight.errors import ConfigError
from fewsight.train import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from fewsight.train.module import lr_factor
from fewsight.train.config import ScheduleConfig
from fewsight.train.demo import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"train": {"type": "digits", "num_images": 4}}}


def _with(**sections):
    data = {"data": {"train": {"type": "digits", "num_images": 4}}}
    data.update(sections)
    return data


def test_defaults_and_sections():
    cfg = config_from_dict(MINIMAL)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "dldenet" and cfg.optimizer.name == "sgd" and cfg.trainer.precision == "32"
    assert cfg.data.train.args == {"num_images": 4} and cfg.data.val is None
    cfg = config_from_dict(_with(model={"name": "retinanet", "backbone": "mobilenet_v2", "fpn_channels": 32}))
    assert cfg.model.kwargs == {"backbone": "mobilenet_v2", "fpn_channels": 32}


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_with(trainer={"max_epoch": 3}), "trainer.max_epoch: unknown key"),
        (_with(optimiser={"lr": 0.1}), "optimiser: unknown key"),
        (_with(data={"train": {"type": "digits"}, "batchsize": 3}), "data.batchsize: unknown key"),
        (_with(schedule={"name": "cosine", "warmup": 5}), "schedule.warmup: unknown key"),
        (_with(checkpoint={"every": 1}), "checkpoint.every: unknown key"),
    ],
)
def test_unknown_keys_name_the_dotted_key(data, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_with(trainer={"max_epochs": "many"}), r"trainer\.max_epochs: expected int"),
        (_with(trainer={"max_epochs": 0}), r"trainer\.max_epochs: expected >= 1"),
        (_with(trainer={"precision": "8-mixed"}), r"trainer\.precision: expected one of"),
        (_with(optimizer={"name": "lion"}), r"optimizer\.name: expected one of"),
        (_with(optimizer={"lr": -1}), r"optimizer\.lr: expected > 0"),
        (_with(schedule={"name": "poly"}), r"schedule\.name"),
        (_with(schedule={"milestones": [5, 2]}), r"schedule\.milestones"),
        (_with(model={"name": "yolo"}), r"model\.name: expected one of"),
        (_with(model={"name": "retinanet", "backbon": "resnet18"}), r"model\.backbon: unknown argument"),
        ({"data": {"train": {"type": "imagenet"}}}, r"data\.train\.type: expected one of"),
        ({"data": {"train": {"type": "coco", "annotations": "x.json"}}}, r"data\.train\.annotations: unknown argument"),
        ({"data": {"train": {"num_images": 3}}}, r"data\.train: missing 'type'"),
        (_with(data={"train": {"type": "digits"}, "augment": {"flip": True}}), r"data\.augment\.flip"),
        (_with(trainer={"loggers": ["wandb"]}), r"trainer\.loggers"),
        ({"data": []}, r"data: expected a mapping"),
    ],
)
def test_bad_values_raise_config_error(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_numbers_from_yaml_strings_and_ints():
    cfg = config_from_dict(_with(optimizer={"lr": "1e-3", "weight_decay": 0}))
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.weight_decay, float)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(model={"name": "retinanet", "fpn_channels": 32})))
    cfg = load_config(path, ["trainer.max_epochs=2", "optimizer.lr=0.5", "model.head_convs=1", "data.val={type: digits}"])
    assert cfg.trainer.max_epochs == 2 and cfg.optimizer.lr == 0.5
    assert cfg.model.kwargs == {"fpn_channels": 32, "head_convs": 1} and cfg.data.val.type == "digits"
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["trainer.max_epochs"])
    saved = save_config(cfg, tmp_path / "out.yaml")
    assert load_config(saved) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_load_and_demo_yaml_matches_the_code():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths, "configs/*.yaml missing"
    for path in paths:
        load_config(path)
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert demo == DEMO_CONFIG


def test_digits_large_configs_differ_only_in_how_the_canvases_reach_the_network():
    """Tiles against downscaled canvases: the same data, model, optimiser and budget otherwise."""
    tiles = yaml.safe_load((REPO / "configs" / "digits_large_tiles.yaml").read_text())
    small = yaml.safe_load((REPO / "configs" / "digits_large_downscaled.yaml").read_text())
    assert tiles["data"]["train"].pop("tiling") == {"size": 512, "overlap": 0.2, "min_visibility": 0.5}
    assert (tiles["data"].pop("batch_size"), small["data"].pop("batch_size")) == (8, 2)  # the same pixels per step
    assert small["model"].pop("max_size") == 1024
    assert (tiles["model"].pop("detections_per_image"), small["model"].pop("detections_per_image")) == (300, 1000)
    assert (tiles.pop("out_dir"), small.pop("out_dir")) == ("runs/digits_large_tiles", "runs/digits_large_downscaled")
    assert tiles == small
    assert tiles["model"]["anchor_generator"] == "auto" and tiles["trainer"]["max_time"] == "00:00:15:00"


def test_digits_fewshot_yaml_is_the_demo_upscaled():
    """The few-shot base recipe differs from the demo only where its header says (resolution, anchors, out_dir)."""
    fewshot = yaml.safe_load((REPO / "configs" / "digits_fewshot.yaml").read_text())
    assert fewshot["model"].pop("min_size") == 192
    assert fewshot["model"]["anchor_generator"].pop("sizes") == [24, 48, 96]
    assert fewshot.pop("out_dir") == "runs/digits_fewshot"
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert demo["model"]["anchor_generator"].pop("sizes") == [16, 32, 64]
    demo.pop("out_dir")
    assert fewshot == demo


def test_lr_factor_warmup_cosine_multistep():
    s = ScheduleConfig(name="cosine", warmup_steps=10, warmup_factor=0.1, min_lr_ratio=0.0)
    assert lr_factor(0, s, 110, 11) == pytest.approx(0.1)
    assert lr_factor(5, s, 110, 11) == pytest.approx(0.55)
    assert lr_factor(10, s, 110, 11) == pytest.approx(1.0)
    assert lr_factor(60, s, 110, 11) == pytest.approx(0.5)
    assert lr_factor(110, s, 110, 11) == pytest.approx(0.0, abs=1e-12)
    m = ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(e * 10, m, 60, 10) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    c = ScheduleConfig(name="constant", warmup_steps=4, warmup_factor=0.5)
    assert [lr_factor(i, c, 100, 10) for i in (0, 2, 4, 50)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
