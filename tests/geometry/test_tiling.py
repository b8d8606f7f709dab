"""fewsight.geometry.tiling: tile windows and per-tile targets against naive explicit loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from fewsight.errors import DTypeError, InvalidArgumentError, NonFiniteError, ShapeError
from fewsight.geometry import TileTargets, tile_grid, tile_starts, tile_targets


# ------------------------------------------------------------------------------------------ tile_grid


def naive_starts(length: int, size: int, overlap: float) -> list[int]:
    t = min(size, length)
    step = size - int(overlap * size)
    starts, s = [], 0
    while True:
        if s + t >= length:
            starts.append(length - t)
            break
        starts.append(s)
        s += step
    return sorted(set(starts))


@pytest.mark.parametrize("length,size,overlap", [
    (100, 40, 0.25), (100, 40, 0.0), (40, 40, 0.2), (39, 40, 0.2), (41, 40, 0.2), (1, 1, 0.0), (7, 1, 0.0),
    (1000, 333, 0.5), (10_000, 1024, 0.2), (17, 5, 0.99),
])
def test_tile_starts_match_naive(length, size, overlap):
    assert tile_starts(length, size, overlap) == naive_starts(length, size, overlap)


@pytest.mark.parametrize("h,w,size,overlap", [(100, 150, 64, 0.25), (30, 20, 64, 0.2), (64, 64, 64, 0.2),
                                              (65, 300, (32, 100), 0.1), (513, 377, 128, 0.0)])
def test_tile_grid_covers_the_image_and_stays_inside(h, w, size, overlap):
    windows = tile_grid(h, w, size, overlap)
    th, tw = (size, size) if isinstance(size, int) else size
    assert windows.dtype == torch.float32 and windows.shape[1] == 4
    assert (windows[:, 0] >= 0).all() and (windows[:, 1] >= 0).all()
    assert (windows[:, 2] <= w).all() and (windows[:, 3] <= h).all()
    assert ((windows[:, 2] - windows[:, 0]) == min(tw, w)).all()
    assert ((windows[:, 3] - windows[:, 1]) == min(th, h)).all()
    assert windows[:, 2].max() == w and windows[:, 3].max() == h  # last column / row flush with the border
    covered = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in windows.long().tolist():
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    # row-major: y outer, x inner, each distinct
    expected = [(x, y) for y in naive_starts(h, th, overlap) for x in naive_starts(w, tw, overlap)]
    assert [tuple(r) for r in windows[:, :2].long().tolist()] == expected


def test_tile_grid_single_tile_when_image_smaller():
    assert tile_grid(30, 20, 64).tolist() == [[0.0, 0.0, 20.0, 30.0]]


def test_tile_grid_dtype_device_follow_arguments():
    w = tile_grid(100, 100, 50, dtype=torch.float64)
    assert w.dtype == torch.float64 and w.device.type == "cpu"


@pytest.mark.parametrize("kwargs,error", [
    ({"size": 0}, InvalidArgumentError), ({"size": (3, 0)}, InvalidArgumentError), ({"size": (3,)}, InvalidArgumentError),
    ({"size": True}, InvalidArgumentError), ({"size": 10, "overlap": 1.0}, InvalidArgumentError),
    ({"size": 10, "overlap": -0.1}, InvalidArgumentError), ({"size": 10, "overlap": float("nan")}, NonFiniteError),
    ({"size": 10.5}, InvalidArgumentError),
])
def test_tile_grid_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error, match="size|overlap"):
        tile_grid(100, 100, **kwargs)


def test_tile_grid_refuses_empty_image():
    with pytest.raises(InvalidArgumentError, match="length"):
        tile_grid(0, 100, 10)


# --------------------------------------------------------------------------------------- tile_targets


def naive_tile_targets(boxes, labels, windows, min_visibility):
    """Explicit loop over tiles x boxes with scalar ops in the boxes' dtype."""
    rows = []
    for t, w in enumerate(windows.to(boxes.dtype)):
        for n, b in enumerate(boxes):
            ix1, iy1 = torch.maximum(b[0], w[0]), torch.maximum(b[1], w[1])
            ix2, iy2 = torch.minimum(b[2], w[2]), torch.minimum(b[3], w[3])
            inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
            area = (b[2] - b[0]).clamp(min=0) * (b[3] - b[1]).clamp(min=0)
            if inter <= 0:
                continue
            vis = inter / area
            clipped = torch.stack((ix1 - w[0], iy1 - w[1], ix2 - w[0], iy2 - w[1]))
            rows.append((t, n, clipped, int(labels[n]), float(vis), bool(vis < min_visibility)))
    return rows


def random_boxes(n, h, w, *, seed=0, dtype=torch.float64, max_size=60.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * max_size + 0.5
    return torch.cat((xy - wh / 2, xy + wh / 2), 1).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _check_against_naive(boxes, labels, windows, min_visibility):
    got = tile_targets(boxes, labels, windows, min_visibility)
    ref = naive_tile_targets(boxes, labels, windows, min_visibility)
    assert isinstance(got, TileTargets) and got.num_tiles == len(windows)
    assert list(zip(got.tile.tolist(), got.box.tolist())) == [(t, n) for t, n, *_ in ref]
    if ref:
        assert torch.equal(got.boxes, torch.stack([r[2] for r in ref]))  # clipping exact
        assert got.labels.tolist() == [r[3] for r in ref]
        assert got.ignore.tolist() == [r[5] for r in ref]
        torch.testing.assert_close(got.visibility.double(), torch.tensor([r[4] for r in ref], dtype=torch.float64))
    assert got.boxes.dtype == boxes.dtype
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("min_visibility", [0.0, 0.3, 0.5, 1.0])
def test_tile_targets_equal_naive_loop(dtype, min_visibility):
    h, w = 230, 310
    boxes, labels = random_boxes(60, h, w, seed=1, dtype=dtype)
    windows = tile_grid(h, w, 96, overlap=0.25, dtype=dtype)
    got = _check_against_naive(boxes, labels, windows, min_visibility)
    # every box appears in exactly the tiles that hold >= min_visibility of it (and is visible there)
    for n in range(len(boxes)):
        kept = set(got.tile[(got.box == n) & ~got.ignore].tolist())
        expected = {r[0] for r in naive_tile_targets(boxes[n : n + 1], labels[n : n + 1], windows, min_visibility)
                    if not r[5]}
        assert kept == expected


def test_tile_targets_box_inside_the_overlap_is_whole_in_both_tiles():
    windows = tile_grid(100, 150, 64, overlap=0.5)  # x starts 0, 32, 64, 86
    t = tile_targets(torch.tensor([[40.0, 5.0, 60.0, 25.0]]), torch.tensor([2]), windows, 0.99)
    kept = t.tile[~t.ignore].tolist()
    assert kept == [0, 1]  # x 40-60 lies in [0, 64] and [32, 96]
    assert t.boxes[~t.ignore].tolist() == [[40.0, 5.0, 60.0, 25.0], [8.0, 5.0, 28.0, 25.0]]


def test_tile_targets_per_tile_split():
    windows = tile_grid(100, 150, 64, overlap=0.25)
    boxes, labels = random_boxes(40, 100, 150, seed=3, dtype=torch.float32)
    t = tile_targets(boxes, labels, windows, 0.5)
    per = t.per_tile()
    assert len(per) == len(windows)
    for k, d in enumerate(per):
        sel = t.tile == k
        assert torch.equal(d["boxes"], t.boxes[sel & ~t.ignore])
        assert torch.equal(d["labels"], t.labels[sel & ~t.ignore])
        assert torch.equal(d["ignore_boxes"], t.boxes[sel & t.ignore])
        assert d["boxes"].shape[1] == 4 and d["ignore_boxes"].shape[1] == 4


def test_tile_targets_degenerate_boxes_are_in_no_tile():
    windows = tile_grid(50, 50, 20, overlap=0.0)
    boxes = torch.tensor([[5.0, 5.0, 5.0, 15.0], [10.0, 10.0, 4.0, 30.0], [30.0, 30.0, 30.0, 30.0],
                          [-20.0, -20.0, -5.0, -5.0], [1.0, 1.0, 3.0, 3.0]])
    t = _check_against_naive(boxes, torch.arange(5), windows, 0.5)
    assert t.box.tolist() == [4]


def test_tile_targets_box_on_a_border_line_only():
    # touching a tile along an edge (zero-area intersection) is not visible in it
    windows = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    t = tile_targets(torch.tensor([[2.0, 2.0, 10.0, 8.0]]), torch.tensor([0]), windows, 0.5)
    assert t.tile.tolist() == [0] and t.visibility.tolist() == [1.0]


def test_tile_targets_empty_inputs():
    windows = tile_grid(50, 50, 20)
    t = tile_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), windows, 0.5)
    assert t.tile.shape == (0,) and t.boxes.shape == (0, 4) and t.labels.shape == (0,)
    per = t.per_tile()
    assert len(per) == len(windows) and all(d["boxes"].shape == (0, 4) for d in per)
    t = tile_targets(torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]), torch.zeros(0, 4), 0.5)
    assert t.num_tiles == 0 and t.tile.numel() == 0 and t.per_tile() == []


def test_tile_targets_blocks_equal_one_block(monkeypatch):
    import fewsight.geometry.tiling as tiling

    boxes, labels = random_boxes(50, 300, 300, seed=5)
    windows = tile_grid(300, 300, 64, overlap=0.3)
    whole = tile_targets(boxes, labels, windows, 0.4)
    monkeypatch.setattr(tiling, "_BLOCK", 7)  # one tile per block
    split = tile_targets(boxes, labels, windows, 0.4)
    for a, b in zip(whole[:-1], split[:-1]):
        assert torch.equal(a, b)


def test_tile_targets_half_and_integer_boxes():
    windows = tile_grid(64, 64, 32, overlap=0.0)
    half = tile_targets(torch.tensor([[24.0, 24.0, 40.0, 40.0]], dtype=torch.float16), torch.tensor([0]), windows, 0.25)
    assert half.boxes.dtype == torch.float16 and half.visibility.dtype == torch.float32
    assert half.tile.tolist() == [0, 1, 2, 3] and half.visibility.tolist() == [0.25] * 4
    ints = tile_targets(torch.tensor([[24, 24, 40, 40]]), torch.tensor([0]), windows, 0.3)
    assert ints.boxes.is_floating_point() and ints.ignore.all()


def test_tile_targets_refuses_bad_input():
    w = tile_grid(50, 50, 20)
    ok_boxes, ok_labels = torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0])
    with pytest.raises(ShapeError, match="boxes"):
        tile_targets(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), w)
    with pytest.raises(ShapeError, match="boxes"):
        tile_targets(torch.zeros(1, 2, 4), ok_labels, w)
    with pytest.raises(ShapeError, match="labels"):
        tile_targets(ok_boxes, torch.tensor([0, 1]), w)
    with pytest.raises(DTypeError, match="labels"):
        tile_targets(ok_boxes, torch.tensor([0.0]), w)
    with pytest.raises(ShapeError, match="windows"):
        tile_targets(ok_boxes, ok_labels, torch.zeros(4))
    with pytest.raises(NonFiniteError, match="boxes"):
        tile_targets(torch.tensor([[1.0, float("nan"), 5.0, 5.0]]), ok_labels, w)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidArgumentError, match="min_visibility"):
            tile_targets(ok_boxes, ok_labels, w, bad)


def test_tile_targets_visibility_partition():
    """Over non-overlapping tiles covering the image, a box's visibilities sum to its fraction inside the image."""
    h, w = 200, 250  # multiples of the tile: the tiles partition the image
    windows = tile_grid(h, w, 50, overlap=0.0)
    boxes, labels = random_boxes(30, h, w, seed=7, max_size=120.0)
    t = tile_targets(boxes, labels, windows, 0.5)
    total = torch.zeros(len(boxes), dtype=torch.float64).index_add_(0, t.box, t.visibility)
    inside = boxes.clone()
    inside[:, 0::2] = inside[:, 0::2].clamp(0, w)
    inside[:, 1::2] = inside[:, 1::2].clamp(0, h)
    frac = ((inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1])) / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    torch.testing.assert_close(total, frac)


@pytest.mark.parametrize("seed", range(3))
def test_tile_targets_random_grids(seed):
    g = torch.Generator().manual_seed(seed)
    for h, w, size, ov in itertools.islice(
        ((int(torch.randint(20, 300, (1,), generator=g)), int(torch.randint(20, 300, (1,), generator=g)),
          int(torch.randint(8, 120, (1,), generator=g)), float(torch.rand(1, generator=g)) * 0.6) for _ in range(99)), 4):
        boxes, labels = random_boxes(15, h, w, seed=seed, max_size=80.0)
        _check_against_naive(boxes, labels, tile_grid(h, w, size, ov, dtype=torch.float64), 0.5)
