"""``fewsight enroll --tile``: support boxes of large images embedded from the tiles that hold them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewsight.cli import main
from fewsight.data import write_csv
from fewsight.fewshot import SupportSet, tile_support
from fewsight.hub import load_model, save_model
from fewsight.train import build_model
from fewsight.train.config import ModelConfig
from tests._helpers import one_thread  # noqa: F401  (autouse)
from tests.train._tiny import TINY_MODEL

BASE = [str(d) for d in range(8)]
TILE = 128

# A 384 x 512 image cut by 128 px tiles without overlap (x at 0, 128, 256, 384; y at 0, 128, 256).
# (box, class): four boxes inside one tile each, and one across four tiles, most of it in tile (0, 0).
BOXES = [
    ([10, 20, 50, 70], "8"),
    ([140, 30, 180, 90], "9"),
    ([300, 150, 350, 200], "8"),
    ([400, 260, 440, 300], "9"),
    ([100, 100, 150, 140], "8"),
]
# What the tiles chosen for them hold, in tile coordinates: the crossing box counts in tile (0, 0), the one
# that shows most of it; its part in tile (128, 0) is ignored there, written as class "0" (known to the
# model, so never enrolled: label -1 in the support set).
CROPS = {
    (0, 0): [([10, 20, 50, 70], "8"), ([100, 100, 128, 128], "8")],
    (128, 0): [([12, 30, 52, 90], "9"), ([0, 100, 22, 128], "0")],
    (256, 128): [([44, 22, 94, 72], "8")],
    (384, 256): [([16, 4, 56, 44], "9")],
}


@pytest.fixture(scope="module")
def dldenet_file(tmp_path_factory):
    """An untrained tiny DLDENet over 0-7 whose input is at most 128 px: a 512 px image is shrunk 4x."""
    torch.manual_seed(0)
    model = build_model(ModelConfig("dldenet", None, {**TINY_MODEL, "embedding_dim": 8, "max_size": TILE}), BASE)
    return save_model(model, tmp_path_factory.mktemp("dldenet") / "model.pt")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    g = np.random.default_rng(0)
    pixels = g.integers(0, 90, (384, 512, 3), dtype=np.uint8)
    for (x1, y1, x2, y2), _ in BOXES:
        pixels[y1:y2, x1:x2] = g.integers(150, 256, (y2 - y1, x2 - x1, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "big.png")
    big = write_csv(root / "big.csv", ["big.png"], [_target([b for b, _ in BOXES], [c for _, c in BOXES], ["8", "9"])],
                    ["8", "9"])
    names, targets = [], []
    for (x, y), items in CROPS.items():
        Image.fromarray(pixels[y : y + TILE, x : x + TILE]).save(root / f"tile_{x}_{y}.png")
        names.append(f"tile_{x}_{y}.png")
        targets.append(_target([b for b, _ in items], [c for _, c in items], ["8", "9", "0"]))
    tiles = write_csv(root / "tiles.csv", names, targets, ["8", "9", "0"])
    return big, tiles


def _target(boxes, names, classes):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([classes.index(n) for n in names])}


def _enroll(model, support, out, *flags):
    return main(["enroll", "--checkpoint", str(model), "--support", str(support), "--classes", "8", "9",
                 "--out", str(out), *flags])


def _state(path):
    return load_model(path).state_dict()


def test_enroll_with_tiles_equals_enrolling_the_tiles(dldenet_file, scene, tmp_path, capsys):
    big, tiles = scene
    assert _enroll(dldenet_file, big, tmp_path / "tiled.pt", "--tile", str(TILE), "--overlap", "0") == 0
    assert "enrolled 8, 9" in capsys.readouterr().out
    assert _enroll(dldenet_file, tiles, tmp_path / "crops.pt") == 0
    tiled, crops = _state(tmp_path / "tiled.pt"), _state(tmp_path / "crops.pt")
    assert tiled.keys() == crops.keys()
    for key in tiled:
        if isinstance(tiled[key], torch.Tensor):
            torch.testing.assert_close(tiled[key], crops[key], atol=1e-5, rtol=1e-5, msg=key)
        else:  # extra state: the class names
            assert tiled[key] == crops[key], key
    assert load_model(tmp_path / "tiled.pt").classes == [*BASE, "8", "9"]

    # Whole, the image is shrunk to the model's 128 px input: other embeddings, another direction.
    assert _enroll(dldenet_file, big, tmp_path / "whole.pt") == 0
    whole = _state(tmp_path / "whole.pt")
    assert any(not torch.allclose(whole[k], tiled[k], atol=1e-4) for k in tiled
               if isinstance(whole[k], torch.Tensor) and whole[k].is_floating_point())


def test_tile_support_takes_each_box_from_its_best_tile(scene):
    from fewsight.data import open_dataset
    from fewsight.fewshot.support import all_boxes_support

    big, _ = scene
    ds = open_dataset(big)
    images, support = tile_support(ds, all_boxes_support(ds, [0, 1]), TILE, overlap=0.0)
    assert support.indices == [0, 0, 0, 0] and [im.shape for im in images] == [(3, TILE, TILE)] * 4
    for target, (corner, items) in zip(support.targets, CROPS.items()):
        assert target["boxes"].tolist() == [b for b, _ in items]
        assert target["labels"].tolist() == [{"8": 0, "9": 1, "0": -1}[c] for _, c in items]


def test_a_box_seen_whole_by_overlapping_tiles_comes_from_the_one_centred_on_it():
    image = torch.rand(3, 64, 200)
    box = torch.tensor([[72.0, 10.0, 92.0, 30.0]])  # whole in the tiles at x 32-96 and 64-128 (overlap 0.5)
    support = SupportSet([0], [{"boxes": box, "labels": torch.tensor([0])}], [0], 1)

    class One:
        classes = ["a"]

        def __getitem__(self, i):
            return image, support.targets[0]

    images, tiled = tile_support(One(), support, 64, overlap=0.5)
    assert len(images) == 1 and torch.equal(images[0], image[:, :, 64:128])  # centre 96 is nearer 82 than 64
    assert tiled.targets[0]["boxes"].tolist() == [[8.0, 10.0, 28.0, 30.0]]


@pytest.mark.parametrize("flags,match", [
    (["--overlap", "0.5"], "--overlap: expected --tile"), (["--tile", "0"], "--tile: expected an int >= 1"),
    (["--tile", "64", "--overlap", "1.5"], "--overlap"), (["--max-pixels", "100"], "expected at most 100 pixels"),
])
def test_enroll_tile_options_refused(dldenet_file, scene, tmp_path, capsys, flags, match):
    big, _ = scene
    assert _enroll(dldenet_file, big, tmp_path / "x.pt", *flags) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewsight enroll: ") and "\n" not in err and match in err, err
    assert not (tmp_path / "x.pt").exists()
