"""fewsight.data.TiledDataset: grid tiles equal tile_targets of the source, random crops seeded, ignore
regions reach the loss as ignore, tiles cut lazily."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from fewsight.data import DigitsDataset, TiledDataset, apply_class_map, export_dataset, open_dataset, train_transforms
from fewsight.data.tiled import crops_per_image, grid_tile_count
from fewsight.errors import DataError, InvalidArgumentError
from fewsight.geometry import BACKGROUND, IGNORE, tile_grid, tile_targets
from fewsight.losses.functional import focal_loss_detection
from fewsight.models.assignment import assign_anchors, prepare_targets
from fewsight.train.data import DetectionDataModule, SeededDataset

KEYS = ("boxes", "labels", "ignore_boxes")


def _digits(n=3, size=(100, 150), **kw):
    return DigitsDataset("val", num_images=n, image_size=size, classes=[0, 1, 2], max_digits=6, seed=2, **kw)


def _same(a, b):
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("size,overlap,min_vis", [(64, 0.25, 0.5), ((48, 80), 0.1, 0.3), (200, 0.2, 0.5), (40, 0.0, 0.0)])
def test_grid_items_equal_tile_targets_of_the_source(size, overlap, min_vis):
    src = _digits()
    tiles = TiledDataset(src, size, overlap, min_vis)
    k = 0
    for i in range(len(src)):
        image, target = src[i]
        windows = tile_grid(100, 150, size, overlap)
        assert torch.equal(tiles.windows(i), windows)
        expected = tile_targets(target["boxes"], target["labels"], windows, min_vis).per_tile()
        assert tiles.tile_count(i) == len(windows) == grid_tile_count(100, 150, size, overlap)
        for t, window in enumerate(windows):
            assert tiles.locate(k) == (i, t)
            tile, got = tiles[k]
            x0, y0, x1, y1 = window.int().tolist()
            assert torch.equal(tile, image[:, y0:y1, x0:x1])
            assert tiles.image_size(k) == (y1 - y0, x1 - x0)
            _same(got, expected[t])
            _same(tiles.get_target(k), expected[t])  # the cheap path agrees
            k += 1
    assert k == len(tiles)


def test_grid_holds_every_visible_box_once_per_holding_tile():
    src = _digits(n=4, size=(130, 170))
    min_vis = 0.5
    tiles = TiledDataset(src, 64, 0.2, min_vis)
    k = 0
    for i in range(len(src)):
        target = src[i][1]
        for w in tiles.windows(i).double():
            got = tiles[k][1]
            k += 1
            expected_targets = expected_ignored = 0
            for box, label in zip(target["boxes"].double(), target["labels"]):  # naive: one box, one tile
                lo, hi = torch.maximum(box[:2], w[:2]), torch.minimum(box[2:], w[2:])
                inter = (hi - lo).clamp(min=0).prod()
                vis = float(inter / (box[2:] - box[:2]).prod())
                clipped = torch.cat((lo, hi)) - w[:2].repeat(2)
                as_target = int(((got["boxes"].double() - clipped).abs().amax(dim=1) < 1e-4)[got["labels"] == label].sum())
                as_ignore = int(((got["ignore_boxes"].double() - clipped).abs().amax(dim=1) < 1e-4).sum())
                if abs(vis - min_vis) < 1e-5:
                    continue  # float32 vs float64 at the threshold
                if inter > 0 and vis >= min_vis:
                    assert (as_target, as_ignore) == (1, 0)
                    expected_targets += 1
                elif inter > 0:
                    assert (as_target, as_ignore) == (0, 1)
                    expected_ignored += 1
                else:
                    assert as_target == 0
            assert (len(got["boxes"]), len(got["ignore_boxes"])) == (expected_targets, expected_ignored)
    assert k == len(tiles)


def test_an_image_without_boxes_and_an_image_smaller_than_a_tile():
    class Blank(torch.utils.data.Dataset):
        classes = ["a"]

        def __len__(self):
            return 2

        def __getitem__(self, i):  # no image_size: measured by decoding once
            return torch.rand(3, 40, 50), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}

    tiles = TiledDataset(Blank(), 64)
    assert len(tiles) == 2 and tiles.windows(0).tolist() == [[0.0, 0.0, 50.0, 40.0]]
    image, target = tiles[0]
    assert image.shape == (3, 40, 50)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["ignore_boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------------------------- random


def test_random_crops_default_cover_the_area_once_and_stay_inside():
    src = _digits(n=3, size=(100, 150))
    tiles = TiledDataset(src, 64, mode="random")
    per = crops_per_image(100, 150, 64)
    assert per == math.ceil(100 * 150 / 64**2) == 4 and len(tiles) == 3 * per
    assert len(TiledDataset(src, 64, mode="random", crops_per_image=7)) == 21
    torch.manual_seed(0)
    seen = set()
    for k in range(len(tiles)):
        w = tiles.window(k)
        assert w[0] >= 0 and w[1] >= 0 and w[2] <= 150 and w[3] <= 100
        assert (w[2] - w[0], w[3] - w[1]) == (64, 64)
        seen.add(tuple(w.tolist()))
    assert len(seen) > 1


def test_random_crop_targets_equal_tile_targets_of_the_drawn_window():
    src = _digits()
    tiles = TiledDataset(src, 64, 0.2, 0.5, mode="random")
    for k in range(len(tiles)):
        torch.manual_seed(100 + k)
        window = tiles.window(k)
        torch.manual_seed(100 + k)
        tile, got = tiles[k]
        image, target = src[tiles.locate(k)[0]]
        x0, y0, x1, y1 = window.int().tolist()
        assert torch.equal(tile, image[:, y0:y1, x0:x1])
        _same(got, tile_targets(target["boxes"], target["labels"], window[None], 0.5).per_tile()[0])


def _items(dataset, keys):
    return [dataset[k] for k in keys]


def test_random_crops_are_seeded_by_seed_epoch_index_and_resumable():
    tiles = TiledDataset(_digits(), 64, mode="random", transforms=train_transforms(photometric=False, rot90=True))
    n = len(tiles)
    seeded = SeededDataset(tiles, seed=3)
    epoch2 = [2 * n + i for i in range(n)]
    first = _items(seeded, epoch2)
    torch.manual_seed(12345)  # the caller's RNG state does not matter
    again = _items(SeededDataset(TiledDataset(_digits(), 64, mode="random",
                                              transforms=train_transforms(photometric=False, rot90=True)), seed=3), epoch2)
    for (a, ta), (b, tb) in zip(first, again):
        assert torch.equal(a, b)
        _same(ta, tb)
    epoch1 = _items(seeded, [n + i for i in range(n)])
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, epoch1))
    other_seed = _items(SeededDataset(tiles, seed=4), epoch2)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other_seed))


def test_training_loader_batches_of_an_epoch_are_the_same_in_a_fresh_run():
    def batches(epoch):
        dm = DetectionDataModule(TiledDataset(_digits(), 64, mode="random"), batch_size=4, seed=7)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader)

    a, b = batches(1), batches(1)  # a resumed run builds its loader afresh, directly at epoch 1
    assert len(a) == len(b) == 3
    for (ia, ta), (ib, tb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        for x, y in zip(ta, tb):
            _same(x, y)
    c = batches(2)
    assert any(not torch.equal(x, y) for (ia, _), (ic, _) in zip(a, c) for x, y in zip(ia, ic))


# ------------------------------------------------------------------------------------------- ignore


def test_ignore_regions_reach_the_matching_as_ignore():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.5]]), "labels": torch.tensor([2]),
              "ignore_boxes": torch.tensor([[20.0, 20.0, 30.0, 31.0]])}
    padded = prepare_targets([target], 1, num_classes=3)
    labels = assign_anchors(anchors, padded).labels[0].tolist()
    assert labels == [2, IGNORE, BACKGROUND]  # the anchor on the ignore region: neither positive nor negative
    plain = prepare_targets([{k: target[k] for k in ("boxes", "labels")}], 1, num_classes=3)
    assert assign_anchors(anchors, plain).labels[0].tolist() == [2, BACKGROUND, BACKGROUND]
    # The focal loss then has no term for that anchor: changing its logits changes nothing.
    asg = assign_anchors(anchors, padded)
    logits = torch.zeros(1, 3, 3)
    moved = logits.clone()
    moved[0, 1] = 5.0
    assert focal_loss_detection(logits, asg.labels) == focal_loss_detection(moved, asg.labels)
    # Empty ignore boxes and boxes-only targets are unchanged.
    same = prepare_targets([{**target, "ignore_boxes": torch.zeros(0, 4)}], 1)
    assert torch.equal(same.boxes, plain.boxes) and torch.equal(same.labels, plain.labels)


def test_tile_ignore_regions_reach_a_detector_loss():
    from fewsight.models import RetinaNet

    from tests.train._tiny import TINY_MODEL

    tiles = TiledDataset(_digits(n=2, size=(128, 128)), 64, 0.25, 0.6)
    cut = [k for k in range(len(tiles)) if len(tiles.get_target(k)["ignore_boxes"])]
    assert cut, "the fixture should cut some digits"
    model = RetinaNet(3, **TINY_MODEL, weights=None)
    images, targets = zip(*(tiles[k] for k in cut[:2]))
    out = model.forward_head(list(images))
    padded = model.prepare_targets(list(targets), out.batch)
    labels = model.assign(out.anchors, padded).labels
    bare = model.prepare_targets([{k: t[k] for k in ("boxes", "labels")} for t in targets], out.batch)
    bare_labels = model.assign(out.anchors, bare).labels
    assert (labels == IGNORE).sum() > (bare_labels == IGNORE).sum()
    assert torch.equal(labels >= 0, bare_labels >= 0)  # the real objects keep their positives
    model.train()
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values())


def test_ignore_regions_follow_the_tile_augmentation():
    src = _digits(n=1, size=(128, 128))
    plain = TiledDataset(src, 64, 0.25, 0.6)
    flipped = TiledDataset(src, 64, 0.25, 0.6, transforms=train_transforms(scale_range=None, photometric=False, hflip=True,
                                                                           hflip_prob=1.0, min_box_size=1.0))
    for k in range(len(plain)):
        (_, a), (_, b) = plain[k], flipped[k]
        mirror = lambda x: torch.stack((64 - x[:, 2], x[:, 1], 64 - x[:, 0], x[:, 3]), dim=1)  # noqa: E731
        keep = lambda x: x[((x[:, 2:] - x[:, :2]) >= 1).all(dim=1)]  # noqa: E731 (sanitised below 1 px)
        assert torch.equal(b["boxes"], mirror(keep(a["boxes"]))) and torch.equal(b["labels"], a["labels"][
            ((a["boxes"][:, 2:] - a["boxes"][:, :2]) >= 1).all(dim=1)])
        assert torch.equal(b["ignore_boxes"], mirror(keep(a["ignore_boxes"])))


# --------------------------------------------------------------------------------------------- lazy


class _Watched(torch.utils.data.Dataset):
    """A source that counts decodes and keeps weak references to the images it hands out."""

    def __init__(self, src):
        self.src, self.classes, self.image_size = src, src.classes, src.image_size
        self.decodes, self.refs = 0, []

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        self.decodes += 1
        image, target = self.src[i]
        self.refs.append(weakref.ref(image))
        return image, target


def test_tiles_are_cut_lazily_and_no_image_is_retained():
    src = _Watched(_digits(n=2, size=(200, 300)))
    tiles = TiledDataset(src, 64, 0.2)
    assert src.decodes == 0  # sizes known without decoding
    image, _ = tiles[3]
    gc.collect()
    assert src.decodes == 1 and all(r() is None for r in src.refs)  # the decoded image is gone
    assert image.untyped_storage().nbytes() == image.numel() * image.element_size()  # a tile, not a view
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 64 for v in vars(tiles).values())
    tiles[3]
    assert src.decodes == 2  # nothing cached


def test_a_file_dataset_is_measured_from_its_headers(tmp_path, monkeypatch):
    ann = export_dataset(_digits(n=3, size=(90, 130)), tmp_path / "coco", fmt="coco")
    ds = open_dataset(ann)
    calls = []
    original = type(ds).load
    monkeypatch.setattr(type(ds), "load", lambda self, i: calls.append(i) or original(self, i))
    tiles = TiledDataset(ds, 64, 0.2)
    assert calls == [] and len(tiles) == 3 * grid_tile_count(90, 130, 64, 0.2)
    k = len(tiles) - 1
    _same(tiles.get_target(k), tiles[k][1])
    assert calls == [2]  # one decode, by the item; get_target read no image


def test_a_class_mapped_source_keeps_its_sizes(tmp_path):
    relabeled = apply_class_map(_digits(), {"0": "a", "1": "a", "2": None})
    tiles = TiledDataset(relabeled, 64)
    assert tiles.classes == ["a"] and len(tiles) == 3 * grid_tile_count(100, 150, 64, 0.2)
    assert all(set(tiles[k][1]["labels"].tolist()) <= {0} for k in range(len(tiles)))


def test_errors():
    src = _digits(n=1)
    with pytest.raises(InvalidArgumentError, match="transforms"):
        TiledDataset(DigitsDataset("val", 1, transforms=train_transforms()), 64)
    with pytest.raises(InvalidArgumentError, match="crops_per_image"):
        TiledDataset(src, 64, crops_per_image=2)
    with pytest.raises(InvalidArgumentError, match="crops_per_image"):
        TiledDataset(src, 64, mode="random", crops_per_image=0)
    with pytest.raises(InvalidArgumentError, match="mode"):
        TiledDataset(src, 64, mode="sliding")
    with pytest.raises(InvalidArgumentError, match="size"):
        TiledDataset(src, 0)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        TiledDataset(src, 64, overlap=1.0)
    with pytest.raises(InvalidArgumentError, match="min_visibility"):
        TiledDataset(src, 64, min_visibility=1.5)
    with pytest.raises(IndexError):
        TiledDataset(src, 64)[99]


def test_an_image_of_another_size_than_measured_is_a_data_error():
    src = _digits(n=1)
    tiles = TiledDataset(src, 64)
    src.image_size = (90, 150)  # the source now draws other images than it said
    tiles.dataset = DigitsDataset("val", num_images=1, image_size=(90, 150), classes=[0, 1, 2])
    with pytest.raises(DataError, match="expected an image of 100x150"):
        tiles[0]
