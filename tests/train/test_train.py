"""End-to-end training on tiny COCO / VOC folders, exact resume, manual means, AMP + clipping."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from fewsight.data import DigitsDataset, export_dataset
from fewsight.errors import CheckpointError, InvalidArgumentError
from fewsight.hub import load_model
from fewsight.train import DetectorModule, train

from tests.train._tiny import digits_split, tiny_config


def _predictions(model, images):
    model.eval()
    with torch.inference_mode():
        return model(images)


def _same_predictions(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(p[key], q[key]), key


def test_train_on_a_coco_folder(tmp_path):
    src = DigitsDataset("train", 8, image_size=64, digit_size=(16, 32), max_digits=2, classes=(0, 1), seed=5)
    ann = export_dataset(src, tmp_path / "coco_train", fmt="coco")
    val_ann = export_dataset(
        DigitsDataset("val", 4, image_size=64, digit_size=(16, 32), max_digits=2, classes=(0, 1)),
        tmp_path / "coco_val",
        fmt="coco",
    )
    cfg = tiny_config(
        tmp_path / "run",
        train={"type": "coco", "ann_file": str(ann)},
        val={"type": "coco", "ann_file": str(val_ann)},
    )
    cfg["trainer"]["gradient_clip_val"] = 1.0
    result = train(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "model.pt", "metrics.json", "detections.png", "pr_curve.png", "logs/metrics.csv"):
        assert (out / name).is_file(), name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "epoch=000.ckpt", "last.ckpt"]
    assert result.best_checkpoint == out / "checkpoints" / "best.ckpt"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"map", "map50", "map75", "per_class", "train_seconds"} <= set(metrics)
    assert set(metrics["per_class"]) == {"0", "1"}
    with open(out / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"val/map50", "val/map", "train/loss_epoch", "train/classification_epoch"} <= set(header)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())

    # The plain model file and the training checkpoint rebuild the same detector.
    images = [src[i][0] for i in range(2)]
    expected = _predictions(result.model, images)
    _same_predictions(_predictions(load_model(out / "model.pt"), images), expected)
    _same_predictions(_predictions(load_model(out / "checkpoints" / "last.ckpt"), images), expected)
    assert load_model(out / "model.pt").classes == ["0", "1"]


def test_bf16_mixed_precision_with_value_clipping(tmp_path):
    cfg = tiny_config(tmp_path / "run", val=digits_split("val", 2))
    cfg["trainer"].update(
        {"precision": "bf16-mixed", "gradient_clip_val": 0.5, "gradient_clip_algorithm": "value", "limit_train_batches": 1}
    )
    cfg["eval"] = {"plot_images": 0, "pr_curves": False}
    result = train(cfg)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in result.model.parameters())
    assert result.metrics is not None and 0.0 <= result.metrics["map50"] <= 1.0


def test_train_dldenet_on_a_voc_folder(tmp_path):
    root = export_dataset(
        DigitsDataset("train", 6, image_size=64, digit_size=(16, 32), max_digits=2, classes=(3, 7)),
        tmp_path / "voc",
        fmt="voc",
    )
    cfg = tiny_config(tmp_path / "run", name="dldenet", train={"type": "voc", "root": str(root)}, embedding_dim=16)
    cfg["data"]["val"] = None
    result = train(cfg)
    assert result.model.classes == ["3", "7"]
    assert result.best_checkpoint is None  # no validation set, no "best"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert result.metrics is None and (tmp_path / "run" / "model.pt").is_file()


class _Crash(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_after_a_mid_epoch_crash_matches_an_uninterrupted_run(tmp_path):
    def config(out):
        cfg = tiny_config(out, name="dldenet", epochs=3, embedding_dim=16)
        cfg["data"]["train"] = digits_split("train", 8)
        return cfg

    full = train(config(tmp_path / "full"))

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "cut"), callbacks=[_Crash(step=5)])  # epoch 2 of 3 (2 steps per epoch), mid-epoch
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_file()
    cfg = config(tmp_path / "cut")
    cfg["checkpoint"] = {"resume": True}
    resumed = train(cfg)

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    assert resumed.val_metrics == full.val_metrics
    drop = {"seconds", "images_per_second", "train_seconds"}
    assert {k: v for k, v in resumed.metrics.items() if k not in drop} == {
        k: v for k, v in full.metrics.items() if k not in drop
    }


def test_manual_means_are_updated_once_per_epoch(tmp_path):
    calls = []

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            original = pl_module.model.update_means

            def counted(*args, **kwargs):
                calls.append(trainer.current_epoch)
                return original(*args, **kwargs)

            pl_module.model.update_means = counted

    cfg = tiny_config(tmp_path / "run", name="dldenet", epochs=2, embedding_dim=16, means_update="manual")
    cfg["data"]["val"] = None
    result = train(cfg, callbacks=[Spy()], evaluate=False)
    assert calls == [0, 1]
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if isinstance(v, torch.Tensor))


def test_resume_from_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg["data"]["val"] = None
    train(cfg, evaluate=False)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    cfg["checkpoint"] = {"resume": True}
    with pytest.raises(CheckpointError, match="last.ckpt: not a readable checkpoint"):
        train(cfg)
    cfg["checkpoint"] = {"resume": str(tmp_path / "missing.ckpt")}
    with pytest.raises(CheckpointError, match="not found"):
        train(cfg)


def test_detector_module_rejects_a_model_without_named_losses():
    class NotADetector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images, targets=None):
            return self.w.sum()

    module = DetectorModule(NotADetector())
    with pytest.raises(InvalidArgumentError, match="dict of loss tensors"):
        module.training_step(([torch.rand(3, 8, 8)], [{}]), 0)
