"""The model registry and file format: every model describes itself and round-trips through one pair of functions."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

from fewsight.errors import CheckpointError, InvalidArgumentError
from fewsight.fewshot import CropEmbedder, CropRescorer
from fewsight.hub import MODEL_FORMAT, MODELS, load_checkpoint_file, load_model, model_from_spec, read_model_file, save_model
from fewsight.models import SSD, DLDENet, RetinaNet
from tests.train._tiny import TINY_MODEL


class _Foreign:
    """A pickled object of a class weights_only=True must refuse to load."""

    def __init__(self) -> None:
        self.x = 1


def _dldenet(**extra) -> DLDENet:
    torch.manual_seed(0)
    return DLDENet(2, **{**TINY_MODEL, "embedding_dim": 8, "weights": "IMAGENET1K_V1", **extra}, class_names=["cat", "dog"])


@pytest.fixture(scope="module")
def detector():
    return _dldenet()


def _embedder() -> CropEmbedder:
    torch.manual_seed(1)
    return CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


def _detections_equal(a, b, images) -> None:
    with torch.inference_mode():
        for p, q in zip(a.eval()(images), b.eval()(images)):
            assert torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["scores"], q["scores"])
            assert torch.equal(p["labels"], q["labels"])


@pytest.mark.parametrize("cls", [RetinaNet, DLDENet, SSD])
def test_every_detector_round_trips_built_in_python(cls, tmp_path):
    torch.manual_seed(0)
    kwargs = {"backbone": "mobilenet_v2", "weights": None, "class_names": ["a", "b", "c"]}
    if cls is not SSD:
        kwargs.update(levels=(3, 4, 5), fpn_channels=16, head_convs=1,
                      anchor_generator=__import__("fewsight").geometry.AnchorGenerator(levels=(3, 4, 5), sizes=(16, 32, 64)))
    model = cls(3, **kwargs)
    spec = model.to_spec()
    json.dumps(spec)  # plain data
    assert spec["name"] in MODELS and MODELS[spec["name"]] is cls
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert type(loaded) is cls and loaded.classes == ["a", "b", "c"] and not loaded.training
    _same_state(model, loaded)
    _detections_equal(model, loaded, torch.rand(2, 3, 96, 96))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_file_layout_and_metadata(detector, tmp_path):
    path = save_model(detector, tmp_path / "m.pt", metadata={"note": "x"})
    raw = load_checkpoint_file(path)
    assert raw["format"] == MODEL_FORMAT and raw["version"] == 2 and raw["metadata"] == {"note": "x"}
    assert raw["spec"]["name"] == "dldenet" and raw["spec"]["kwargs"]["embedding_dim"] == 8
    # The file says where the backbone weights came from; rebuilding never reads them again.
    assert raw["spec"]["kwargs"]["weights"] == "IMAGENET1K_V1"
    assert read_model_file(path).metadata == {"note": "x"}
    assert model_from_spec(raw["spec"]).classes == ["cat", "dog"]


def test_enrolled_classes_travel_in_the_file(detector, tmp_path):
    model = copy.deepcopy(detector)
    images = torch.rand(1, 3, 64, 64)
    model.enroll(images, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([0])}], ["bird"])
    assert model.to_spec()["classes"] == ["cat", "dog", "bird"]
    loaded = load_model(save_model(model, tmp_path / "e.pt"))
    assert loaded.classes == ["cat", "dog", "bird"]
    _detections_equal(model, loaded, images)


def test_crop_embedder_round_trips_with_its_whitening(tmp_path):
    net = _embedder()
    net.set_whitening(torch.randn(8) * 0.1, torch.randn(6, 8))
    loaded = load_model(save_model(net, tmp_path / "emb.pt"))
    assert type(loaded) is CropEmbedder and loaded.dim == 6
    _same_state(net, loaded)
    crops = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(net.eval().embed_crops(crops), loaded.embed_crops(crops))


def test_crop_rescorer_round_trips_with_both_networks_and_enrolled_classes(detector, tmp_path):
    model = CropRescorer(copy.deepcopy(detector).eval(), _embedder(), candidates_per_image=7).eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4))]
    model.enroll(images, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([0])}], ["new"])
    spec = model.to_spec()
    assert spec["children"]["detector"]["name"] == "dldenet" and spec["children"]["embedder"]["name"] == "crop_embedder"
    loaded = load_model(save_model(model, tmp_path / "r.pt"))
    assert type(loaded) is CropRescorer and loaded.classes == ["cat", "dog", "new"]
    assert loaded.candidates_per_image == 7
    _same_state(model, loaded)
    _detections_equal(model, loaded, images)


def test_expect_refuses_another_kind(tmp_path):
    path = save_model(_embedder(), tmp_path / "emb.pt")
    with pytest.raises(CheckpointError, match=r"emb.pt: expected a DLDENet or CropRescorer file, got a CropEmbedder"):
        load_model(path, expect=(DLDENet, CropRescorer))


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
        ("state_dict", "not a fewsight model file or training checkpoint"),
        ("no_spec", "does not say which model"),
        ("unknown_name", "cannot rebuild the yolo model"),
        ("wrong_shapes", "do not fit the dldenet model"),
        ("nan_weights", "NaN or inf"),
        ("nan_lightning", "NaN or inf"),
        (b"\x00" * 64, "not a torch checkpoint, or a damaged one"),
    ],
)
def test_bad_files_raise_checkpoint_error_naming_the_file(detector, tmp_path, content, match):
    path = tmp_path / "bad.pt"
    good = io.BytesIO()
    spec = detector.to_spec()
    torch.save({"format": MODEL_FORMAT, "spec": spec, "state_dict": detector.state_dict()}, good)
    if content == "truncate":
        path.write_bytes(_truncated(good.getvalue()))
    elif content == "foreign":
        torch.save({"state_dict": {}, "obj": _Foreign()}, path)
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "state_dict":
        torch.save(detector.state_dict(), path)
    elif content == "no_spec":
        torch.save({"format": MODEL_FORMAT, "state_dict": {"a": torch.zeros(1)}}, path)
    elif content == "unknown_name":
        torch.save({"format": MODEL_FORMAT, "spec": {**spec, "name": "yolo"}, "state_dict": detector.state_dict()}, path)
    elif content == "wrong_shapes":
        bad = {**spec, "kwargs": {**spec["kwargs"], "embedding_dim": 4}}
        torch.save({"format": MODEL_FORMAT, "spec": bad, "state_dict": detector.state_dict()}, path)
    elif content == "nan_weights":
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in detector.state_dict().items()}
        first = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        state[first].fill_(math.nan)
        torch.save({"format": MODEL_FORMAT, "spec": spec, "state_dict": state}, path)
    elif content == "nan_lightning":  # a training checkpoint: weights under "model."
        state = {f"model.{k}": torch.full_like(v, math.nan) if v.is_floating_point() else v
                 for k, v in detector.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"state_dict": state, "hyper_parameters": {"model_spec": spec}, "epoch": 0}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "\x1b" not in text
    # torch's advice to turn weights_only off is never relayed.
    assert "weights_only" not in text and "trusted source" not in text


def test_missing_file_and_non_fewsight_model(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "none.pt")
    with pytest.raises(InvalidArgumentError, match="expected a fewsight model"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_a_model_with_an_injected_module_cannot_be_described():
    torch.manual_seed(0)
    from fewsight.models import build_backbone

    backbone = build_backbone("mobilenet_v2", weights=None, levels=(3, 4, 5), out_channels=16)
    model = RetinaNet(2, backbone=backbone, levels=(3, 4, 5), fpn_channels=16, head_convs=1)
    with pytest.raises(InvalidArgumentError, match="backbone: expected plain values"):
        model.to_spec()


def test_version_1_detector_files_still_load(detector, tmp_path):
    spec = detector.to_spec()
    v1 = {"name": spec["name"], "num_classes": 2, "kwargs": spec["kwargs"], "classes": spec["classes"]}
    path = tmp_path / "v1.pt"
    torch.save({"format": "fewsight.detector", "version": 1, "model": v1, "classes": v1["classes"],
                "state_dict": detector.state_dict(), "metadata": {"a": 1}}, path)
    loaded = load_model(path)
    assert loaded.classes == ["cat", "dog"] and read_model_file(path).metadata == {"a": 1}
    _same_state(detector, loaded)
