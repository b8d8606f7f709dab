"""Detector files and checkpoints: round trip, weights_only loading, corrupt files -> CheckpointError, atomic writes."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from fewsight.errors import CheckpointError, InvalidArgumentError
from fewsight.train import AtomicCheckpointIO, build_model, load_checkpoint_file, load_detector, model_spec, save_detector
from fewsight.train.config import ModelConfig
from tests.train._tiny import TINY_MODEL


class _Foreign:
    """A pickled object of a class weights_only=True must refuse to load."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8, "weights": "IMAGENET1K_V1"}), ["cat", "dog"])


def test_save_and_load_round_trip(detector, tmp_path):
    path = save_detector(detector, tmp_path / "m.pt", metadata={"note": "x"})
    loaded = load_detector(path)
    assert loaded.classes == ["cat", "dog"] and not loaded.training
    a, b = detector.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    raw = load_checkpoint_file(path)
    assert raw["format"] == "fewsight.detector" and raw["metadata"] == {"note": "x"}
    assert raw["model"]["name"] == "dldenet" and raw["model"]["kwargs"]["embedding_dim"] == 8
    # Rebuilding never reads the backbone weights again: they come from the file.
    assert raw["model"]["kwargs"]["weights"] == "IMAGENET1K_V1"
    images = torch.rand(2, 3, 64, 64)
    detector.eval()
    with torch.inference_mode():
        for p, q in zip(detector(images), loaded(images)):
            assert torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["scores"], q["scores"])
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_enrolled_classes_travel_in_the_file(detector, tmp_path):
    import copy

    model = copy.deepcopy(detector)
    images = torch.rand(1, 3, 64, 64)
    model.enroll(images, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([0])}], ["bird"])
    assert model_spec(model)["classes"] == ["cat", "dog", "bird"]
    loaded = load_detector(save_detector(model, tmp_path / "e.pt"))
    assert loaded.classes == ["cat", "dog", "bird"]


def _truncated(src: bytes) -> bytes:
    return src[: len(src) // 2]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "checkpoint file is empty"),
        (b"definitely not a checkpoint", "not a readable checkpoint"),
        ("truncate", "not a readable checkpoint"),
        ("foreign", "not a readable checkpoint"),
        ("list", "expected a checkpoint mapping, got list"),
        ("state_dict", "not a fewsight detector or training checkpoint"),
        ("no_spec", "does not say which model"),
        ("wrong_shapes", "do not fit the dldenet model"),
    ],
)
def test_bad_files_raise_checkpoint_error_naming_the_file(detector, tmp_path, content, match):
    path = tmp_path / "bad.pt"
    good = io.BytesIO()
    torch.save({"format": "fewsight.detector", "model": model_spec(detector), "state_dict": detector.state_dict()}, good)
    if content == "truncate":
        path.write_bytes(_truncated(good.getvalue()))
    elif content == "foreign":
        torch.save({"state_dict": {}, "obj": _Foreign()}, path)
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "state_dict":
        torch.save(detector.state_dict(), path)
    elif content == "no_spec":
        torch.save({"format": "fewsight.detector", "state_dict": {"a": torch.zeros(1)}}, path)
    elif content == "wrong_shapes":
        spec = model_spec(detector)
        spec["kwargs"] = {**spec["kwargs"], "embedding_dim": 4}
        torch.save({"format": "fewsight.detector", "model": spec, "state_dict": detector.state_dict()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_detector(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_non_detector_model(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_detector(tmp_path / "none.pt")
    with pytest.raises(InvalidArgumentError, match="fewsight detector"):
        save_detector(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io_plugin.load_checkpoint(path)["step"].item() == 1
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        io_plugin.save_checkpoint({"bad": lambda: 0}, path)  # lambdas cannot be pickled
    assert io_plugin.load_checkpoint(path)["step"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        io_plugin.load_checkpoint(path)
