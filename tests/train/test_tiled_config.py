"""Config options for large images: ``data.*.tiling``, ``trainer.max_time``, ``data.*.class_map``
(and flips / quarter turns in ``data.augment``)."""

from __future__ import annotations

import copy
import math
import json
from datetime import timedelta

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from fewsight.data import COCODataset, apply_class_map, DigitsDataset, RelabeledDataset, TiledDataset, export_dataset, open_dataset
from fewsight.errors import ConfigError, DataError
from fewsight.data.tiled import grid_tile_count
from fewsight.models.sliced import SlicedDetector
from fewsight.train import config_from_dict, config_to_dict, train
from fewsight.train.builders import build_datasets, evaluation_view
from fewsight.train.config import max_time

from tests.train._tiny import digits_split, tiny_config

MERGE = {0: "a", 1: "a", 2: None}


def _canvases(split: str, n: int, **extra) -> dict:
    d = digits_split(split, n, classes=(0, 1, 2))
    d.update(image_size=128, max_digits=6, **extra)
    return d


# ------------------------------------------------------------------------------------------- training


def test_a_tiled_training_run_of_one_epoch_finishes(tmp_path):
    train_split = _canvases("train", 4, tiling={"size": 64, "crops_per_image": 2}, class_map=MERGE)
    val_split = _canvases("val", 2, tiling={"size": 64, "overlap": 0.25}, class_map=MERGE)
    cfg = tiny_config(tmp_path / "run", train=train_split, val=val_split)
    cfg["data"]["augment"] = {"photometric": False, "vflip": True, "rot90": True}
    result = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Per-tile validation during training; sliced inference on the whole images for metrics.json.
    assert result.val_metrics is not None and result.val_metrics["num_images"] == 2 * grid_tile_count(128, 128, 64, 0.25) == 18
    assert metrics["sliced"] == {"tile": 64, "overlap": 0.25} and metrics["num_images"] == 2
    assert metrics["epochs"] == 1 and set(metrics["per_class"]) == {"a"}
    assert result.model.classes == ["a"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"]["tiling"]["crops_per_image"] == 2
    assert saved["data"]["train"]["class_map"] == MERGE  # as written


class _LastEpoch(Callback):
    def on_train_end(self, trainer, pl_module):
        self.epoch, self.stopped = trainer.current_epoch, trainer.should_stop


def test_max_time_stops_a_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1000)
    del cfg["data"]["val"]
    cfg["trainer"]["max_time"] = {"seconds": 1}
    seen = _LastEpoch()
    result = train(cfg, callbacks=[seen], evaluate=False)
    assert seen.stopped and seen.epoch < 100
    assert result.last_checkpoint is not None and result.last_checkpoint.is_file()


class _Rates(Callback):
    """The learning rate and the fraction of the time budget spent at each batch start."""

    def __init__(self):
        self.rates, self.spent = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lightning.pytorch.callbacks import Timer

        timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
        self.spent.append(timer.time_elapsed() / (timer.time_elapsed() + timer.time_remaining()))
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_cosine_schedule_follows_the_wall_clock_budget(tmp_path):
    # 1000 epochs cannot finish in 3 s: the step-based cosine would stay at ~lr (0.9999 after 20 of
    # 2000 steps). Each batch's rate was set between the previous batch's start and its own, so it
    # lies between the cosine of the budget spent at those two moments, however slow the machine.
    cfg = tiny_config(tmp_path / "run", epochs=1000)
    del cfg["data"]["val"]
    cfg["trainer"]["max_time"] = {"seconds": 3}
    cfg["schedule"] = {"name": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0}
    rates = _Rates()
    train(cfg, callbacks=[rates], evaluate=False)
    lr = cfg["optimizer"]["lr"]

    def cosine(t):
        return lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    assert len(rates.rates) >= 3 and rates.rates[0] > 0.9 * lr
    for k in range(1, len(rates.rates)):
        assert cosine(rates.spent[k]) - 1e-9 <= rates.rates[k] <= cosine(rates.spent[k - 1]) + 1e-9


class _FakeTimer:
    def __init__(self, elapsed, remaining):
        self.elapsed, self.remaining = elapsed, remaining

    def time_elapsed(self):
        return self.elapsed

    def time_remaining(self):
        return self.remaining


def test_budget_spent_is_the_fraction_of_max_time_used():
    from fewsight.train.module import ScheduleConfig, _budget_spent, lr_factor

    assert _budget_spent(None) is None and _budget_spent(_FakeTimer(5.0, None)) is None
    assert _budget_spent(_FakeTimer(30.0, 90.0)) == 0.25
    assert _budget_spent(_FakeTimer(130.0, -10.0)) == 1.0  # past the budget: the cosine's end
    s = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    # the later of the steps' and the clock's progress
    assert lr_factor(10, s, 1000, 10, budget_spent=0.5) == pytest.approx(0.5)
    assert lr_factor(900, s, 1000, 10, budget_spent=0.5) == pytest.approx(lr_factor(900, s, 1000, 10))
    assert lr_factor(10, s, 1000, 10, budget_spent=1.0) == pytest.approx(0.0, abs=1e-12)


# -------------------------------------------------------------------------------------------- configs


def _cfg(**train_extra):
    return {"data": {"train": {"type": "digits", "num_images": 4, **train_extra}}, "trainer": {"max_epochs": 1}}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["data"]["train"].update(tiling={"size": 0}), "data.train.tiling.size: expected"),
    (lambda d: d["data"]["train"].update(tiling={"size": [3, 4, 5]}), "data.train.tiling.size: expected"),
    (lambda d: d["data"]["train"].update(tiling={"sise": 64}), "data.train.tiling.sise: unknown key"),
    (lambda d: d["data"]["train"].update(tiling={"overlap": 1}), r"data.train.tiling.overlap: expected a value in \[0, 1\)"),
    (lambda d: d["data"]["train"].update(tiling={"min_visibility": -0.1}), "data.train.tiling.min_visibility"),
    (lambda d: d["data"]["train"].update(tiling={"crops_per_image": 0}), "data.train.tiling.crops_per_image: expected >= 1"),
    (lambda d: d["data"]["train"].update(tiling={"mode": "grid", "crops_per_image": 2}), "only with random crops"),
    (lambda d: d["data"]["train"].update(tiling=None), "data.train.tiling: expected a mapping"),
    (lambda d: d["data"].update(val={"type": "digits", "tiling": {"mode": "random"}}), "data.val.tiling.mode: expected one of \\['grid'\\]"),
    (lambda d: d["data"]["train"].update(class_map=["a"]), "data.train.class_map: expected a mapping"),
    (lambda d: d["data"]["train"].update(class_map={"a": {"b": 1}}), r"data.train.class_map\['a'\]: expected a new class name"),
    (lambda d: d["trainer"].update(max_time="10:00"), "trainer.max_time: expected 'DD:HH:MM:SS'"),
    (lambda d: d["trainer"].update(max_time=0), "trainer.max_time: expected a positive duration"),
    (lambda d: d["trainer"].update(max_time={"hour": 1}), "trainer.max_time.hour: unknown key"),
    (lambda d: d["trainer"].update(max_time={"hours": "one"}), "trainer.max_time.hours: expected a number"),
])
def test_config_errors_name_the_key(mutate, message):
    data = _cfg()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_config_round_trip_and_values():
    data = _cfg(tiling={"size": [64, 96], "min_visibility": 0.3}, class_map=MERGE)
    data["data"]["augment"] = {"vflip": True, "rot90": True}
    data["trainer"]["max_time"] = "00:01:30:00"
    cfg = config_from_dict(data)
    assert cfg.data.train.tiling.size == [64, 96] and cfg.data.train.tiling.min_visibility == 0.3
    assert cfg.data.train.class_map == {"0": "a", "1": "a", "2": None}
    assert cfg.data.train.dataset_args == {"num_images": 4}
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg
    assert max_time("00:01:30:00") == max_time(5400) == max_time({"hours": 1.5}) == timedelta(hours=1.5)
    assert max_time(None) is None


def test_embedder_configs_refuse_the_detector_split_keys():
    from fewsight.train import load_config

    with pytest.raises(ConfigError, match="data.dataset.tiling: unknown argument"):
        load_config({"task": "embedder", "data": {"type": "crops", "dataset": {"type": "digits", "tiling": {"size": 64}}}})


def test_build_datasets_tiles_train_randomly_and_val_on_a_grid():
    cfg = config_from_dict({"data": {
        "train": _canvases("train", 3, tiling={"size": 64}),
        "val": _canvases("val", 2, tiling={"size": 64, "overlap": 0.0}),
        "augment": {"photometric": False, "rot90": True}}})
    train_set, val_set, _ = build_datasets(cfg.data)
    assert isinstance(train_set, TiledDataset) and train_set.mode == "random" and len(train_set) == 3 * 4
    assert train_set.transforms is not None and train_set.dataset.transforms is None  # augmentation per tile
    assert isinstance(val_set, TiledDataset) and val_set.mode == "grid" and len(val_set) == 2 * 4
    model, whole, settings = evaluation_view(torch.nn.Identity(), val_set)
    assert isinstance(model, SlicedDetector) and whole is val_set.dataset and settings == {"tile": 64, "overlap": 0.0}
    assert evaluation_view(torch.nn.Identity(), train_set.dataset)[2] is None


# ------------------------------------------------------------------------------------------ class map


@pytest.fixture
def coco_files(tmp_path):
    kw = dict(image_size=64, digit_size=(16, 24), max_digits=3, classes=(0, 1, 2))
    train = export_dataset(DigitsDataset("train", 12, seed=3, **kw), tmp_path / "train", fmt="coco")
    val = export_dataset(DigitsDataset("val", 6, seed=4, **kw), tmp_path / "val", fmt="coco")
    return train, val


def test_class_map_merges_and_drops_as_a_file_split_is_read(coco_files):
    train_ann, val_ann = coco_files
    source = COCODataset(train_ann)
    cfg = config_from_dict({"data": {
        "train": {"type": "coco", "ann_file": str(train_ann), "class_map": {"0": "low", "1": "low", "2": None}},
        "val": {"type": "coco", "ann_file": str(val_ann), "class_map": {"0": "low", "1": "low", "2": None}}}})
    train_set, val_set, _ = build_datasets(cfg.data)
    assert isinstance(train_set, COCODataset) and train_set.classes == ["low"] and val_set.classes == ["low"]
    assert len(train_set) == len(source)  # images whose only objects were dropped stay, as background
    for i in range(len(source)):
        before, after = source.get_target(i), train_set.get_target(i)
        kept = before["labels"] != 2
        assert torch.equal(after["boxes"], before["boxes"][kept]) and (after["labels"] == 0).all()
    assert train_set[0][1]["labels"].tolist() == train_set.get_target(0)["labels"].tolist()
    only_twos = apply_class_map(COCODataset(train_ann), {"0": None, "1": None})
    emptied = [i for i in range(len(source)) if len(only_twos.get_target(i)["boxes"]) == 0]
    assert only_twos.classes == ["2"] and len(only_twos) == len(source) and emptied  # background images stay
    assert only_twos[emptied[0]][1]["boxes"].shape == (0, 4)


def test_class_map_renames_onto_the_training_classes(coco_files):
    train_ann, val_ann = coco_files
    cfg = config_from_dict({"data": {
        "train": {"type": "coco", "ann_file": str(train_ann), "class_map": {"2": None}},
        "val": {"type": "coco", "ann_file": str(val_ann), "class_map": {"0": "1", "2": None}}}})
    train_set, val_set, _ = build_datasets(cfg.data)
    assert train_set.classes == ["0", "1"] and val_set.classes == ["0", "1"]
    source = COCODataset(val_ann)
    for i in range(len(source)):  # val's 0s and 1s are all "1" now: label 1 of the training classes
        n = int((source.get_target(i)["labels"] != 2).sum())
        assert val_set.get_target(i)["labels"].tolist() == [1] * n
    bad = config_from_dict({"data": {
        "train": {"type": "coco", "ann_file": str(train_ann), "class_map": {"2": None}},
        "val": {"type": "coco", "ann_file": str(val_ann), "class_map": {"0": "zero"}}}})
    with pytest.raises(ConfigError, match=r"data.val.class_map: classes \['zero', '2'\] after the map are not training"):
        build_datasets(bad.data)


def test_class_map_on_generated_data_and_open_dataset(coco_files):
    cfg = config_from_dict({"data": {
        "train": {"type": "digits", "num_images": 3, "classes": [0, 1, 2], "class_map": MERGE},
        "val": {"type": "digits", "num_images": 2, "classes": [1, 2], "class_map": MERGE}}})
    train_set, val_set, _ = build_datasets(cfg.data)
    assert isinstance(train_set, RelabeledDataset) and train_set.classes == ["a"] and val_set.classes == ["a"]
    assert all(set(ds[i][1]["labels"].tolist()) <= {0} for ds in (train_set, val_set) for i in range(len(ds)))
    # open_dataset: read with the file's classes, map, then express against the given classes.
    ds = open_dataset(coco_files[0], class_map={"0": "b", "1": None}, classes=["a", "b", "2"])
    assert ds.classes == ["a", "b", "2"] and set(ds.get_target(0)["labels"].tolist()) <= {1, 2}
    with pytest.raises(DataError, match="after class_map"):
        open_dataset(coco_files[0], class_map={"1": None}, classes=["0"])
    assert copy.deepcopy(MERGE) == MERGE  # the map given is not changed
