"""fewsight.geometry.anchor_fit: closed-form best anchor IoU against every anchor, IoU k-means, proposals."""

from __future__ import annotations

import pytest
import torch

from fewsight.errors import InvalidArgumentError, NonFiniteError, ShapeError
from fewsight.geometry import (
    AnchorGenerator,
    best_anchor_iou,
    best_possible_recall,
    box_iou,
    kmeans_anchors,
    match,
    propose_anchors,
    wh_iou,
)


def random_boxes(n, h, w, *, seed=0, min_size=2.0, max_size=300.0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    # log-uniform sizes with varied aspect ratios, some reaching past the border
    wh = torch.exp(torch.rand(n, 2, generator=g, dtype=torch.float64) * (torch.tensor(max_size).log() - torch.tensor(min_size).log())
                   + torch.tensor(min_size).log())
    return torch.cat((centre - wh / 2, centre + wh / 2), 1)


def naive_best_iou(boxes, sizes, generator):
    """Every anchor of each box's image, explicitly: one box at a time against generator((H, W))."""
    out = []
    for box, (h, w) in zip(boxes, sizes.tolist()):
        anchors = generator((int(h), int(w)), dtype=torch.float64)
        out.append(box_iou(box[None], anchors).amax())
    return torch.stack(out)


GENERATORS = [
    AnchorGenerator(),
    AnchorGenerator(levels=(3, 4, 5), sizes=(16, 32, 64), scales=(1.0,), aspect_ratios=(1.0, 2.0)),
    AnchorGenerator(levels=(2, 5), sizes=(10, 77), scales=(1.0, 1.5), aspect_ratios=(0.3, 1.0, 3.3)),
]


@pytest.mark.parametrize("gen", GENERATORS, ids=["default", "tiny", "odd"])
@pytest.mark.parametrize("size", [(600, 600), (513, 377), (37, 1000)])
def test_best_anchor_iou_equals_every_anchor(gen, size):
    boxes = random_boxes(150, *size, seed=sum(size))
    got = best_anchor_iou(boxes, size, gen)
    ref = naive_best_iou(boxes, torch.tensor([size] * len(boxes)), gen)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for thr in (0.3, 0.5, 0.7):
        naive_bpr = float((ref >= thr).double().mean())
        assert best_possible_recall(boxes, size, gen, thr) == naive_bpr


def test_best_anchor_iou_per_image_sizes_and_grid_points():
    gen = GENERATORS[1]
    sizes = torch.tensor([[64, 64], [100, 30], [200, 333]] * 20)
    boxes = random_boxes(60, 100, 100, seed=4, max_size=80.0)
    # boxes centred exactly between two anchor centres, and on them (ties the closed form must not miss)
    boxes[:6] = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 20.0, 20.0], [8.0, 0.0, 24.0, 16.0],
                              [-30.0, -30.0, -2.0, -2.0], [50.0, 10.0, 51.0, 11.0], [0.0, 0.0, 64.0, 64.0]],
                             dtype=torch.float64)
    torch.testing.assert_close(best_anchor_iou(boxes, sizes, gen), naive_best_iou(boxes, sizes, gen),
                               rtol=1e-12, atol=1e-12)


def test_best_possible_recall_is_what_the_matcher_finds():
    gen = AnchorGenerator(levels=(3, 4, 5))
    boxes = random_boxes(80, 320, 320, seed=9, min_size=8.0, max_size=200.0)
    anchors = gen((320, 320), dtype=torch.float64)
    m = match(anchors, boxes[None], object_threshold=0.5, background_threshold=0.4)
    matched = torch.zeros(len(boxes), dtype=torch.bool)
    matched[m.indices[0][m.indices[0] >= 0]] = True
    assert best_possible_recall(boxes, (320, 320), gen) == float(matched.double().mean())


def test_best_anchor_iou_blocks(monkeypatch):
    import fewsight.geometry.anchor_fit as anchor_fit

    boxes = random_boxes(50, 300, 300, seed=2)
    whole = best_anchor_iou(boxes, (300, 300), GENERATORS[0])
    monkeypatch.setattr(anchor_fit, "_BLOCK", 7)
    assert torch.equal(best_anchor_iou(boxes, (300, 300), GENERATORS[0]), whole)


def test_best_anchor_iou_inputs():
    gen = AnchorGenerator()
    assert best_anchor_iou(torch.zeros(0, 4), (64, 64), gen).shape == (0,)
    assert best_anchor_iou([[0, 0, 32, 32]], (64, 64), gen).dtype == torch.float64  # lists and integers
    assert best_anchor_iou(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), (64, 64), gen).tolist() == [0.0]  # no area
    with pytest.raises(InvalidArgumentError, match="at least one box"):
        best_possible_recall(torch.zeros(0, 4), (64, 64), gen)
    with pytest.raises(ShapeError, match="boxes"):
        best_anchor_iou(torch.zeros(3, 5), (64, 64), gen)
    with pytest.raises(ShapeError, match="image_sizes"):
        best_anchor_iou(torch.zeros(3, 4), torch.ones(2, 2) * 64, gen)
    with pytest.raises(InvalidArgumentError, match="image_sizes"):
        best_anchor_iou(torch.zeros(1, 4), (0, 64), gen)
    with pytest.raises(NonFiniteError, match="boxes"):
        best_anchor_iou(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), (64, 64), gen)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        best_possible_recall(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (64, 64), gen, 0.0)


# -------------------------------------------------------------------------------------------- k-means


def test_wh_iou_equals_box_iou_of_centred_boxes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 2, generator=g) * 50 + 1, torch.rand(5, 2, generator=g) * 50 + 1
    centred = lambda wh: torch.cat((-wh / 2, wh / 2), 1)  # noqa: E731
    torch.testing.assert_close(wh_iou(a, b), box_iou(centred(a), centred(b)))


def _clusters(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[8.0, 8.0], [20.0, 40.0], [60.0, 30.0], [120.0, 120.0]])
    wh = centres.repeat_interleave(50, 0) * torch.exp(torch.randn(200, 2, generator=g) * 0.05)
    return wh, centres


def test_kmeans_is_deterministic_for_a_seed():
    wh, _ = _clusters()
    a, ca = kmeans_anchors(wh, 6, seed=3)
    b, cb = kmeans_anchors(wh, 6, seed=3)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert int(ca.sum()) == len(wh)
    assert (a.prod(1)[1:] >= a.prod(1)[:-1]).all()  # sorted by area


def test_kmeans_finds_the_clusters():
    wh, centres = _clusters(1)
    for seed in range(4):
        got, counts = kmeans_anchors(wh, 4, seed=seed)
        torch.testing.assert_close(got, centres, rtol=0.06, atol=0.0)
        assert counts.tolist() == [50, 50, 50, 50]


def test_kmeans_inputs():
    wh, _ = _clusters()
    assert kmeans_anchors(wh.double(), 2)[0].dtype == torch.float64
    same = torch.tensor([[5.0, 5.0]] * 4)
    got, counts = kmeans_anchors(same, 3)  # fewer distinct sizes than k
    assert got.tolist() == [[5.0, 5.0]] * 3 and int(counts.sum()) == 4
    with pytest.raises(InvalidArgumentError, match="at least k=5"):
        kmeans_anchors(wh[:4], 5)
    with pytest.raises(InvalidArgumentError, match="positive"):
        kmeans_anchors(torch.tensor([[0.0, 3.0], [2.0, 2.0]]), 1)
    with pytest.raises(ShapeError, match="wh"):
        kmeans_anchors(torch.zeros(4, 3), 2)
    with pytest.raises(InvalidArgumentError, match="k"):
        kmeans_anchors(wh, 0)


# ------------------------------------------------------------------------------------------ proposals


def test_proposal_for_small_objects_beats_the_default():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 480
    wh = torch.tensor([[10.0, 10.0], [14.0, 7.0], [9.0, 18.0]]).repeat(100, 1) * (1 + 0.1 * torch.rand(300, 1, generator=g))
    boxes = torch.cat((xy, xy + wh), 1)
    p = propose_anchors(boxes, (512, 512), AnchorGenerator(levels=(3, 4, 5, 6, 7)))
    assert p.current_recall < 0.05 and p.recall > 0.5
    assert p.recall == best_possible_recall(boxes, (512, 512), p.generator)
    assert p.multiplier is not None and p.config()["levels"] == [3, 4, 5, 6, 7]
    rebuilt = AnchorGenerator(**p.config())
    assert best_possible_recall(boxes, (512, 512), rebuilt) == p.recall  # the printed config is the evaluated one


def test_proposal_never_worse_than_current():
    boxes = random_boxes(200, 600, 600, seed=5, min_size=30.0, max_size=400.0).float()
    current = AnchorGenerator()
    p = propose_anchors(boxes, (600, 600), current, multipliers=[1.0])  # a poor grid: the current set stays
    assert p.generator is current and p.multiplier is None
    assert p.recall == p.current_recall == best_possible_recall(boxes, (600, 600), current)
    q = propose_anchors(boxes, (600, 600), current, seed=0)
    assert (q.recall, q.mean_iou) >= (q.current_recall, q.current_mean_iou)
    assert propose_anchors(boxes, (600, 600), current, seed=0).config() == q.config()  # deterministic


def test_proposal_detector_accepts_the_config():
    from fewsight.models import RetinaNet

    boxes = random_boxes(50, 128, 128, seed=1, min_size=6.0, max_size=40.0)
    p = propose_anchors(boxes, (128, 128), AnchorGenerator(levels=(3, 4, 5)))
    model = RetinaNet(2, backbone="mobilenet_v2", levels=(3, 4, 5), fpn_channels=8, anchor_generator=p.config())
    assert model.anchor_generator.sizes == tuple(p.generator.sizes)


def test_proposal_inputs():
    with pytest.raises(InvalidArgumentError, match="at least one box"):
        propose_anchors(torch.zeros(0, 4), (64, 64))
    with pytest.raises(InvalidArgumentError, match="positive width"):
        propose_anchors(torch.tensor([[1.0, 1.0, 1.0, 5.0]]), (64, 64))
    with pytest.raises(InvalidArgumentError, match="num_ratios"):
        propose_anchors(torch.tensor([[1.0, 1.0, 9.0, 5.0]]), (64, 64), num_ratios=0)


# ------------------------------------------------------------------------------------- fewsight anchors


def test_cli_anchors_on_digits_prints_the_snippet(capsys):
    import yaml

    from fewsight.cli import main

    assert main(["anchors", "--data", "digits", "--num-images", "40", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best-possible recall (IoU >= 0.5" in out and "default anchors" in out and "ratio h/w" in out
    snippet = yaml.safe_load(out[out.index("model:"):])
    config = snippet["model"]["anchor_generator"]
    assert config["levels"] == [3, 4, 5, 6, 7] and len(config["sizes"]) == 5
    AnchorGenerator(**config)  # a valid generator


def test_cli_anchors_on_a_file_dataset_reads_headers_only(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import fewsight.data.dataset as dataset
    from fewsight.cli import main
    from fewsight.data import write_csv

    files, targets = [], []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", (400, 200)).save(path)
        files.append(path)
        targets.append({"boxes": torch.tensor([[10.0, 10.0, 30.0, 50.0], [100.0, 20.0, 112.0, 26.0]]) + 5 * i,
                        "labels": torch.tensor([0, 1])})
    csv = tmp_path / "ann.csv"
    write_csv(csv, files, targets, ["a", "b"])

    def no_decode(*args, **kwargs):
        raise AssertionError("anchors decoded an image")

    monkeypatch.setattr(dataset, "load_image", no_decode)
    assert main(["anchors", "--data", str(csv), "--levels", "3", "4", "5", "--image-size", "800", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "6 boxes" in out and "levels: [3, 4, 5]" in out
    assert "image sizes 400-400 x 800-800 px" in out  # scaled as the detector's max_size would


@pytest.mark.parametrize("flags,match", [(["--levels", "-1"], "--levels"), (["--iou-threshold", "0"], "--iou-threshold"),
                                         (["--clusters", "0"], "--clusters"), (["--image-size", "0"], "--image-size")])
def test_cli_anchors_refuses_bad_options(capsys, flags, match):
    from fewsight.cli import main

    assert main(["anchors", "--data", "digits", "--num-images", "2", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewsight anchors: ") and match in err
