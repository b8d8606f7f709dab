"""Embedder training (task: embedder): end to end on fake emoji / digit crops, exact resume, config errors,
every loss choice, retrieval figures."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fewsight.errors import ConfigError
from fewsight.eval.embedding import evaluate_embedder, retrieval_metrics
from fewsight.fewshot import CropEmbedder
from fewsight.hub import load_model
from fewsight.retrieval import csls_similarity
from fewsight.train import EmbedderModule, EmbedderTrainConfig, TrainConfig, load_config, train
from fewsight.train.embedder import build_objective
from fewsight.train.embedder_config import EMBEDDER_LOSSES, EmbedderLossConfig
from tests._fake_emoji import write_fake_emoji

TINY_MODEL = {"dim": 8, "grid": 1, "blocks": 4, "pretrained": False}


@pytest.fixture(scope="module")
def emoji_root(tmp_path_factory):
    return write_fake_emoji(tmp_path_factory.mktemp("emoji") / "emoji")


def emoji_config(out_dir, root, *, epochs=2, **extra):
    cfg = {
        "task": "embedder",
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {"type": "emoji", "root": str(root), "size": 32, "classes_per_batch": 2, "items_per_class": 2,
                 "val_classes": 2},
        "model": {**TINY_MODEL, "tta_scales": [1.0, 0.8]},
        "loss": {"name": "circle_arcface"},
        "schedule": {"warmup_steps": 1},
        "trainer": {"max_epochs": epochs, "progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu"},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def test_emoji_end_to_end_writes_a_whitened_embedder_and_metrics(tmp_path, emoji_root):
    result = train(emoji_config(tmp_path / "run", emoji_root))
    out = tmp_path / "run"
    embedder = load_model(out / "embedder.pt")
    assert embedder.has_whitening and embedder.config["crop_size"] == 32 and embedder.config["tta_scales"] == [1.0, 0.8]
    assert result.model_path == out / "embedder.pt" and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "logs" / "metrics.csv").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_classes"] == 4 and metrics["test"]["num_classes"] == 6
    whitened = metrics["test"]["whitened"]
    assert 0 <= whitened["recall@1"] <= 1 and "map@r" in whitened and "recall@1" in whitened["csls"]
    assert metrics["val_last"]["num_queries"] == 2  # the 2 held-out base classes, Google vs Twitter
    assert "val/recall@1" in (out / "logs" / "metrics.csv").read_text()
    # the saved config is an embedder config again
    again = load_config(out / "config.yaml")
    assert isinstance(again, EmbedderTrainConfig) and again.loss.name == "circle_arcface"
    # the file's embeddings are what evaluate_embedder measures (whitening and TTA applied)
    from fewsight.data.emoji import EmojiCrops

    q, g = (EmojiCrops(emoji_root, "novel", s, size=32) for s in ("google", "twitter"))
    figures = evaluate_embedder(embedder, q, g, ks=(1, 5, 10))
    assert figures["recall@1"] == pytest.approx(whitened["recall@1"])


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, emoji_root):
    # A constant learning rate: the cosine schedule's length depends on max_epochs, which differs here.
    extra = {"whitening": {"enabled": False}, "schedule": {"name": "constant", "warmup_steps": 0}}
    train(emoji_config(tmp_path / "full", emoji_root, **extra))
    train(emoji_config(tmp_path / "cut", emoji_root, epochs=1, **extra))
    resumed = emoji_config(tmp_path / "cut", emoji_root, **extra)
    resumed["checkpoint"] = {"resume": True}
    train(resumed)
    a = load_model(tmp_path / "full" / "embedder.pt").state_dict()
    b = load_model(tmp_path / "cut" / "embedder.pt").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_crops_of_a_detection_dataset_train_without_domains(tmp_path):
    cfg = {
        "task": "embedder",
        "out_dir": str(tmp_path / "digits"),
        "data": {"type": "crops", "size": 24, "classes_per_batch": 3, "items_per_class": 2, "val_classes": 2,
                 "passes": 1, "dataset": {"type": "digits", "num_images": 6, "image_size": 96}},
        "model": TINY_MODEL,
        "loss": {"name": "triplet"},
        "trainer": {"max_epochs": 1, "progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu"},
    }
    result = train(cfg)
    assert result.metrics["test"]["cosine"]["protocol"] == "leave-one-out"
    assert load_model(result.model_path).has_whitening


def test_config_types_and_errors(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({"task": "embedder", "data": {"type": "image_folder", "root": "x"}}))
    assert isinstance(load_config(path), EmbedderTrainConfig)
    assert isinstance(load_config(path, ["task=detector", "data={train: {type: digits}}"]), TrainConfig)
    assert isinstance(load_config({"task": "detector", "data": {"train": {"type": "digits"}}}), TrainConfig)
    for data, key in [
        ({"task": "embedder", "loss": {"nme": "circle"}}, "loss.nme"),
        ({"task": "embedder", "loss": {"name": "contrastive"}}, "loss.name"),
        ({"task": "embedder", "data": {"type": "video"}}, "data.type"),
        ({"task": "embedder", "data": {"type": "crops"}}, "data.dataset"),
        ({"task": "embedder", "data": {"type": "crops", "dataset": {"type": "digits", "bogus": 1}}}, "data.dataset.bogus"),
        ({"task": "embedder", "data": {"augment": {"scale": [0.9, 0.1]}}}, "data.augment.scale"),
        ({"task": "embedder", "model": {"tta_scales": [1.5]}}, "model.tta_scales"),
        ({"task": "embedder", "trainer": {"max_epoch": 1}}, "trainer.max_epoch"),
        ({"task": "segmenter"}, "task"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(data)


@pytest.mark.parametrize("name", EMBEDDER_LOSSES)
def test_every_loss_builds_and_steps(name):
    torch.manual_seed(0)
    embedder = CropEmbedder(**TINY_MODEL, crop_size=16)
    objective = build_objective(EmbedderLossConfig(name=name), num_classes=3, dim=8)
    module = EmbedderModule(embedder, objective, param_lr_mult=10.0)
    opt = module.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in module.parameters()]
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    losses = objective(embedder.head_embeddings(images), labels)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    extra = list(objective.parameters())
    if extra:  # loss parameters: own group, lr x 10, no weight decay
        group = opt.param_groups[-1]
        assert group["params"] == extra and group["weight_decay"] == 0.0 and group["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])


def test_csls_figures_match_a_naive_ranking():
    g = torch.Generator().manual_seed(0)
    q, gal, ref = torch.randn(12, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(20, 4, generator=g)
    ql, gl = torch.arange(12) % 6, torch.arange(6)
    out = retrieval_metrics(q, ql, gal, gl, ks=(1, 3), csls_reference=ref, csls_k=5)
    ranks = csls_similarity(q, gal, ref, 5).argsort(dim=1, descending=True)
    first = (gl[ranks] == ql[:, None]).float().argmax(dim=1) + 1
    assert out["csls"]["recall@1"] == pytest.approx(float((first <= 1).float().mean()))
    assert out["csls"]["recall@3"] == pytest.approx(float((first <= 3).float().mean()))
    assert out["csls"]["map@r"] == pytest.approx(out["csls"]["recall@1"])  # R = 1: AP counts rank 1 only
    with pytest.raises(Exception, match="csls_reference"):
        retrieval_metrics(q, ql, ks=(1,), csls_reference=ref)


def test_every_epoch_trains_on_that_epochs_batches_and_augmentations(tmp_path, emoji_root):
    # Lightning sets the epoch of a loader's sampler only, not of a batch sampler: without
    # BatchSamplerEpoch every epoch would repeat epoch 0's batches and augmented images.
    from lightning.pytorch.callbacks import Callback

    from fewsight.data.samplers import ClassBalancedBatchSampler

    seen: list[tuple[int, list[int], float]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            images, labels, _ = batch
            seen.append((trainer.current_epoch, labels.tolist(), float(images.sum())))

    cfg = emoji_config(tmp_path / "run", emoji_root, epochs=3, whitening={"enabled": False})
    train(cfg, callbacks=[Record()])
    epochs = {e: [(y, s) for ep, y, s in seen if ep == e] for e in range(3)}
    assert all(epochs[e] for e in range(3))
    assert epochs[0] != epochs[1] != epochs[2]
    from fewsight.train.embedder_config import embedder_config_from_dict
    from fewsight.train.embedder_data import build_embedder_data

    data = build_embedder_data(embedder_config_from_dict(cfg).data, seed=0)
    sampler = ClassBalancedBatchSampler(data.train.labels, 2, 2, domains=data.train.item_styles, seed=0)
    for e in range(3):
        sampler.set_epoch(e)
        assert [y for y, _ in epochs[e]] == [[int(data.train.labels[i]) for i in b] for b in sampler]
