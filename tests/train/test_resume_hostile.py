"""Hostile resumes and trainer settings: a changed model, a model file, a damaged or NaN last.ckpt, bad
Lightning settings — each a one-line fewsight error before anything is written, never a Lightning crash."""

from __future__ import annotations

import copy

import pytest
import torch

from fewsight.errors import CheckpointError, ConfigError
from fewsight.train import train

from ._tiny import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch tiny DLDENet run (epoch=000.ckpt, epoch=001.ckpt, last.ckpt) and its config."""
    out = tmp_path_factory.mktemp("resume") / "run"
    cfg = tiny_config(out, name="dldenet", epochs=2, embedding_dim=16)
    cfg["data"]["val"] = None
    cfg["trainer"]["limit_train_batches"] = 1
    train(copy.deepcopy(cfg), evaluate=False)
    return out, cfg


def _resume(cfg, resume=True, **model):
    cfg = copy.deepcopy(cfg)
    cfg["checkpoint"] = {"resume": resume}
    cfg["model"].update(model)
    return cfg


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "weights_only" not in text.replace("weights_only=True", "")
    return text


@pytest.mark.parametrize(
    ("change", "key", "old", "new"),
    [
        ({"embedding_dim": 8}, "model.embedding_dim", "16", "8"),
        ({"fpn_channels": 32}, "model.fpn_channels", "16", "32"),
        ({"name": "retinanet", "embedding_dim": None}, "model.name", "'dldenet'", "'retinanet'"),
    ],
)
def test_resume_with_another_model_names_the_first_differing_key(trained, change, key, old, new):
    out, cfg = trained
    before = (out / "config.yaml").read_bytes()
    resumed = _resume(cfg, **change)
    resumed["model"] = {k: v for k, v in resumed["model"].items() if v is not None}
    with pytest.raises(ConfigError) as exc:
        train(resumed, evaluate=False)
    text = _one_line(exc)
    assert text.startswith(f"{key}: the checkpoint ") and f"trained with {old}, the config says {new}" in text
    assert (out / "config.yaml").read_bytes() == before  # refused before anything was written


def test_resume_from_a_model_file_is_a_config_error(trained, tmp_path):
    out, cfg = trained
    from fewsight.hub import save_model
    from fewsight.train import build_model
    from fewsight.train.config import ModelConfig

    model = build_model(ModelConfig("dldenet", None, {k: v for k, v in cfg["model"].items() if k != "name"}), ["0", "1"])
    for path in (save_model(model, tmp_path / "model.pt"), tmp_path / "plain.pt"):
        if path.name == "plain.pt":
            torch.save({"weights": torch.zeros(2)}, path)
        with pytest.raises(ConfigError, match=r"checkpoint\.resume: expected a Lightning training checkpoint") as exc:
            train(_resume(cfg, str(path)), evaluate=False)
        assert str(path) in _one_line(exc)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "model-file"])
def test_damaged_last_ckpt_points_to_the_newest_intact_epoch_checkpoint(trained, tmp_path, damage):
    out, cfg = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("epoch=000.ckpt", "epoch=001.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes((out / "checkpoints" / name).read_bytes())
    last = run / "checkpoints" / "last.ckpt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[:2000])
    elif damage == "garbage":
        last.write_bytes(b"\x00" * 64)
    elif damage == "nan":
        ckpt = torch.load(last, weights_only=True)
        ckpt["state_dict"] = {k: torch.full_like(v, float("nan")) if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in ckpt["state_dict"].items()}
        torch.save(ckpt, last)
    else:  # the newest epoch checkpoint is damaged too: the older one is named
        last.write_bytes(b"PK")
        (run / "checkpoints" / "epoch=001.ckpt").write_bytes(b"not a checkpoint")
    resumed = _resume(cfg)
    resumed["out_dir"] = str(run)
    with pytest.raises(CheckpointError) as exc:
        train(resumed, evaluate=False)
    text = _one_line(exc)
    newest = "epoch=000.ckpt" if damage == "model-file" else "epoch=001.ckpt"
    assert text.startswith(str(last)) and f"--set checkpoint.resume={run / 'checkpoints' / newest}" in text
    if damage == "nan":
        assert "NaN or inf" in text


def test_damaged_last_ckpt_without_an_intact_one_says_start_afresh(trained, tmp_path):
    _, cfg = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\x80\x02garbage")
    resumed = _resume(cfg)
    resumed["out_dir"] = str(run)
    with pytest.raises(CheckpointError, match="no intact epoch=NNN.ckpt"):
        train(resumed, evaluate=False)


@pytest.mark.parametrize(
    ("trainer", "key"),
    [
        ({"accelerator": "gpu"}, "trainer.accelerator"),
        ({"accelerator": "abacus"}, "trainer.accelerator"),
        ({"strategy": "carrier_pigeon"}, "trainer.strategy"),
        ({"devices": -2}, "trainer.devices"),
        ({"devices": 0}, "trainer.devices"),
    ],
)
def test_lightning_misconfiguration_is_a_config_error(tmp_path, trainer, key):
    if trainer.get("accelerator") == "gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    cfg = tiny_config(tmp_path / "run")
    cfg["data"]["val"] = None
    cfg["trainer"].update(trainer)
    with pytest.raises(ConfigError) as exc:
        train(cfg, evaluate=False)
    text = _one_line(exc)
    assert text.startswith(f"{key}: "), text
