"""``model.anchor_generator: auto``: anchors fitted to the training boxes as the network sees them."""

from __future__ import annotations

import pytest
import torch
import yaml

from fewsight.data import DigitsDataset, RelabeledDataset, TiledDataset, dataset_boxes
from fewsight.errors import ConfigError
from fewsight.geometry import AnchorGenerator, propose_anchors
from fewsight.models import RetinaNet
from fewsight.train import load_config, train
from fewsight.train.anchors import fit_anchors, network_boxes
from fewsight.train.builders import build_dataset, build_model, resolve_anchors
from fewsight.train.config import ModelConfig

from tests.train._tiny import digits_split, tiny_config


def _model(**kw):
    return RetinaNet(3, backbone="mobilenet_v2", levels=(3, 4, 5), fpn_channels=8, **kw)


def _naive(model, dataset, tile=None):
    """Every box scaled by its own image's (or tile's) resize factor, one image at a time."""
    boxes, sizes = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        h, w = image.shape[-2:]
        fh, fw = (min(h, tile), min(w, tile)) if tile else (h, w)
        rh, rw = model.transform.resized_size(fh, fw)
        sy, sx = rh / fh, rw / fw
        for b in target["boxes"].tolist():
            boxes.append([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy])
            sizes.append([round(h * sy), round(w * sx)])
    return torch.tensor(boxes, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)


@pytest.mark.parametrize("resize", [{}, {"max_size": 48}, {"min_size": 100, "max_size": 400}])
def test_network_boxes_equal_a_loop_over_images(resize):
    data = DigitsDataset("val", num_images=4, image_size=(96, 64), classes=[0, 1, 2])
    model = _model(**resize)
    boxes, sizes = network_boxes(model, data)
    want_boxes, want_sizes = _naive(model, data)
    torch.testing.assert_close(boxes, want_boxes)
    torch.testing.assert_close(sizes, want_sizes)


def test_network_boxes_of_tiles_scale_by_the_tile_not_the_image():
    data = DigitsDataset("val", num_images=3, image_size=128, classes=[0, 1, 2])
    model = _model(max_size=128)  # a 64 px tile is upscaled twice; the 128 px image would not be
    boxes, sizes = network_boxes(model, TiledDataset(data, 64, mode="random"))
    want_boxes, want_sizes = _naive(model, data, tile=64)
    torch.testing.assert_close(boxes, want_boxes)
    torch.testing.assert_close(sizes, want_sizes)
    assert sizes[0].tolist() == [256.0, 256.0]


def test_dataset_boxes_samples_evenly_and_reads_relabelled_targets_without_images(monkeypatch):
    data = DigitsDataset("val", num_images=10, image_size=64, classes=[0, 1])
    merged = RelabeledDataset(data, torch.tensor([0, -1]), ["zero"])
    want = [data.get_target(i) for i in (0, 3, 6, 9)]
    boxes, sizes = dataset_boxes(merged, max_images=4)
    torch.testing.assert_close(boxes, torch.cat([t["boxes"][t["labels"] == 0] for t in want]).double())
    assert sizes.shape == (len(boxes), 2)


def test_fit_anchors_is_propose_anchors_at_the_matchers_threshold():
    data = DigitsDataset("train", num_images=6, image_size=128, classes=[0, 1, 2])
    model = _model(object_threshold=0.6, background_threshold=0.4)
    p = fit_anchors(model, data)
    boxes, sizes = network_boxes(model, data)
    want = propose_anchors(boxes, sizes, model.anchor_generator, threshold=0.6)
    assert p.config() == want.config() and p.recall == want.recall and p.recall >= p.current_recall


def test_resolve_anchors_gives_a_concrete_generator_and_build_model_refuses_auto():
    data = build_dataset(load_config(tiny_config("unused")).data.train, training=True)
    cfg = ModelConfig("retinanet", None, {"backbone": "mobilenet_v2", "levels": [3, 4, 5], "fpn_channels": 8,
                                          "anchor_generator": "auto"})
    with pytest.raises(ConfigError, match="model.anchor_generator: 'auto' needs the training set"):
        build_model(cfg, data.classes)
    resolved, proposal = resolve_anchors(cfg, data)
    assert resolved.kwargs["anchor_generator"] == proposal.config()
    model = build_model(resolved, data.classes, pretrained=False)
    assert isinstance(model.anchor_generator, AnchorGenerator)
    assert list(model.anchor_generator.sizes) == proposal.config()["sizes"]
    same, again = resolve_anchors(cfg, data)
    assert same == resolved  # deterministic: a resumed run rebuilds the same model
    untouched, none = resolve_anchors(resolved, data)
    assert untouched is resolved and none is None


def test_auto_refuses_a_detector_without_an_anchor_generator():
    data = build_dataset(load_config(tiny_config("unused")).data.train, training=True)
    cfg = ModelConfig("ssd", None, {"backbone": "mobilenet_v2", "anchor_generator": "auto"})
    with pytest.raises(ConfigError, match="model.anchor_generator: 'auto' fits an AnchorGenerator"):
        resolve_anchors(cfg, data)


def test_training_with_auto_saves_the_fitted_anchors_and_resumes(tmp_path, capsys):
    from fewsight.cli import main
    from fewsight.hub import load_model

    cfg = tiny_config(tmp_path / "run", anchor_generator="auto")
    del cfg["data"]["val"]
    result = train(cfg, evaluate=False)
    fitted = result.model.anchor_generator
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["anchor_generator"] == "auto"  # the config as written; the model file is concrete
    loaded = load_model(tmp_path / "run" / "model.pt")
    assert list(loaded.anchor_generator.sizes) == list(fitted.sizes)
    # Resuming rebuilds the same model (the resume check compares the model specs).
    cfg["trainer"]["max_epochs"] = 2
    cfg["checkpoint"] = {"resume": True}
    train(cfg, evaluate=False)
    # `fewsight anchors --config` prints what training resolved.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["anchors", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    snippet = yaml.safe_load(out[out.index("model:"):])["model"]["anchor_generator"]
    assert snippet["sizes"] == [round(s, 2) for s in fitted.sizes]
    assert snippet["aspect_ratios"] == [round(r, 3) for r in fitted.aspect_ratios]


@pytest.mark.parametrize("flags,match", [
    ([], "--data / --config: expected exactly one of them, got neither"),
    (["--data", "digits", "--config", "x.yaml"], "got both"),
    (["--config", "x.yaml", "--levels", "3"], "--levels: expected nothing with --config"),
    (["--data", "digits", "--set", "seed=1"], "--set: only with --config"),
])
def test_cli_anchors_sources(capsys, flags, match):
    from fewsight.cli import main

    assert main(["anchors", *flags]) == 1
    assert match in capsys.readouterr().err
