import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fewsight.errors import CheckpointError, InvalidArgumentError, LabelError, ShapeError
from fewsight.fewshot import CropEmbedder, CropRescorer, finetune
from fewsight.hub import load_model, save_model
from fewsight.models import DLDENet, crop_boxes
from fewsight.fewshot.rescorer import _first_per_image
from fewsight.retrieval import Whitening
from tests._helpers import one_thread  # noqa: F401  (autouse)


def tiny_detector(num_classes: int = 2) -> DLDENet:
    torch.manual_seed(0)
    return DLDENet(num_classes, backbone="resnet18", levels=(3, 4, 5), fpn_channels=16, embedding_dim=8,
                   head_convs=1).eval()


def tiny_embedder(**kw) -> CropEmbedder:
    torch.manual_seed(1)
    return CropEmbedder(**{"dim": 8, "grid": 2, "crop_size": 16, "pretrained": False, **kw}).eval()


def _images(seed=0, n=2, size=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


BOXES = [torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 62.0, 60.0]]), torch.tensor([[8.0, 8.0, 56.0, 50.0]])]


# ---- CropEmbedder -------------------------------------------------------------------------------


def test_embedder_is_crop_then_network_and_chunks_agree():
    net, images = tiny_embedder(), _images()
    with torch.no_grad():
        out = net(images, BOXES)
        assert out.shape == (3, 8)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(out, net.embed_crops(crop_boxes(images, BOXES, 16)))
        torch.testing.assert_close(net(images, BOXES, chunk=1), out)
        assert net(images, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 8)


def test_embedder_whitening_is_the_retrieval_whitening_map():
    net, images = tiny_embedder(), _images(n=2)
    with torch.no_grad():
        crops = crop_boxes(images, BOXES, 16)
        raw = net.head(net.pool(net.features((crops - net.mean) / net.std)).flatten(1))
    g = torch.Generator().manual_seed(0)
    w = Whitening(mean=0.1 * torch.randn(8, generator=g, dtype=torch.float64),
                  projection=torch.randn(6, 8, generator=g, dtype=torch.float64))
    net.set_whitening(w.mean, w.projection)
    assert net.dim == 6
    with torch.no_grad():
        torch.testing.assert_close(net(images, BOXES), w(raw.double()).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError):
        net.set_whitening(w.mean[:3], w.projection)


def test_embedder_load_names_the_file_for_bad_files(tmp_path):
    good = save_model(tiny_embedder(), tmp_path / "emb.pt")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a torch file")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "state.pt")  # a bare state dict
    for name in ("cut.pt", "text.pt", "state.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match=name):
            load_model(tmp_path / name, expect=CropEmbedder)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic save leaves no temporary file


def test_embedder_tta_is_saved_and_averages_scales(tmp_path):
    net = tiny_embedder(tta_scales=(1.0, 0.5))
    back = load_model(save_model(net, tmp_path / "tta.pt"))
    assert back.config["tta_scales"] == [1.0, 0.5]
    crops = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.embed_crops(crops), net.embed_crops(crops))
        plain = tiny_embedder()
        plain.load_state_dict(net.state_dict())
        assert not torch.allclose(plain.embed_crops(crops), net.embed_crops(crops))


def test_embedder_arguments():
    with pytest.raises(InvalidArgumentError, match="grid"):
        CropEmbedder(grid=0, pretrained=False)
    with pytest.raises(InvalidArgumentError, match="blocks"):
        CropEmbedder(blocks=40, pretrained=False)


# ---- CropRescorer -------------------------------------------------------------------------------


def test_first_per_image_against_naive():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 4, (50,), generator=g)
    score = torch.rand(50, generator=g)
    got = set(_first_per_image(image, score, 3).tolist())
    want = set()
    for i in range(4):
        idx = [j for j in range(50) if image[j] == i]
        want |= set(sorted(idx, key=lambda j: -float(score[j]))[:3])
    assert got == want
    assert _first_per_image(image[:0], score[:0], 3).numel() == 0


def _support():
    images = _images(seed=5)
    targets = [{"boxes": BOXES[0], "labels": torch.tensor([0, -1])}, {"boxes": BOXES[1], "labels": torch.tensor([1])}]
    return images, targets


def test_enroll_prototypes_are_mean_support_embeddings():
    model = CropRescorer(tiny_detector(), tiny_embedder())
    images, targets = _support()
    new = model.enroll(images, targets, ["a", "b"])
    assert new == [2, 3] and model.classes == ["0", "1", "a", "b"]
    with torch.no_grad():
        e_a = model.embedder([images[0]], [BOXES[0][:1]])
        e_b = model.embedder([images[1]], [BOXES[1]])
    protos = F.normalize(torch.cat([e_a, e_b]), dim=1)
    torch.testing.assert_close(model.prototypes, protos)
    # Calibration: halfway between the support boxes' cosine and the other candidates' (naive loops).
    model.eval()
    with torch.no_grad():
        det = model.detector
        det.score_threshold, det.detections_per_image = 0.001, 100
        raw = det(images)
        det.score_threshold, det.detections_per_image = 0.05, 100
    own_boxes = [[BOXES[0][0]], [BOXES[1][0]]]  # class a lives in image 0, class b in image 1
    for c in range(2):
        pos = float(torch.cat([e_a, e_b])[c] @ protos[c])
        negs = []
        for i, r in enumerate(raw):
            base = r["labels"] < 2
            keep = torchvision.ops.nms(r["boxes"][base], r["scores"][base], 0.5)[:5]
            for b in r["boxes"][base][keep]:
                if c == i and float(torchvision.ops.box_iou(b[None], own_boxes[c][0][None])) >= 0.5:
                    continue
                with torch.no_grad():
                    negs.append(float(model.embedder([images[i]], [b[None]])[0] @ protos[c]))
        neg = sum(negs) / len(negs) if negs else 0.0
        assert model.thresholds[c].item() == pytest.approx((pos + neg) / 2, abs=1e-5)
        assert model.scales[c].item() == pytest.approx(4 / max(pos - neg, 0.1), rel=1e-4)
    with pytest.raises(LabelError):
        model.enroll(images, [{"boxes": BOXES[0], "labels": torch.tensor([0, 2])}, targets[1]], ["c", "d"])


def test_without_enrolled_classes_base_detections_are_the_detectors():
    det = tiny_detector()
    det.score_threshold = 0.3
    model = CropRescorer(det, tiny_embedder()).eval()
    images = _images(seed=2)
    with torch.no_grad():
        plain, ours = det(images), model(images)
    assert det.score_threshold == 0.3 and det.detections_per_image == 100 or det.detections_per_image > 0
    for p, o in zip(plain, ours):
        assert len(p["scores"]) > 0
        order_p, order_o = p["scores"].argsort(descending=True), o["scores"].argsort(descending=True)
        torch.testing.assert_close(o["boxes"][order_o], p["boxes"][order_p])
        torch.testing.assert_close(o["scores"][order_o], p["scores"][order_p])


def test_enrolled_classes_scored_by_crop_similarity_against_naive():
    det = tiny_detector()
    model = CropRescorer(det, tiny_embedder(), candidates_per_image=5, top_classes=2).eval()
    images, targets = _support()
    model.enroll(images, targets, ["a", "b", "c"][:2])
    test = _images(seed=3)
    with torch.no_grad():
        out = model(test)
        # Naive: proposals of the detector at the low threshold, NMS per image, crop each box alone.
        det.score_threshold, det.detections_per_image = 0.001, 100
        raw = det(test)
        det.score_threshold, det.detections_per_image = 0.05, 100
    for img, r, o in zip(test, raw, out):
        base = r["labels"] < 2
        keep = torchvision.ops.nms(r["boxes"][base], r["scores"][base], 0.5)[:5]
        novel = o["labels"] >= 2
        assert int(novel.sum()) == 2 * len(keep)
        for b in r["boxes"][base][keep]:
            e = model.embedder([img], [b[None]])[0]
            cos = model.prototypes @ e
            val, idx = cos.topk(2)
            for v, i in zip(val, idx):
                hit = (o["boxes"][novel] == b).all(1) & (o["labels"][novel] == 2 + i)
                assert int(hit.sum()) == 1
                expected = torch.sigmoid(model.scales[i] * (v - model.thresholds[i]))
                torch.testing.assert_close(o["scores"][novel][hit], expected[None], atol=1e-5, rtol=1e-5)
        assert bool((o["labels"][~novel] < 2).all())


def test_training_goes_to_the_detector_and_finetune_leaves_the_embedder():
    model = CropRescorer(tiny_detector(), tiny_embedder()).eval()
    images, targets = _support()
    model.enroll(images, targets, ["a", "b"])
    before = copy.deepcopy(model.embedder.state_dict())
    head_before = model.detector.head.state_dict()
    head_before = {k: v.clone() for k, v in head_before.items()}
    losses = finetune(model, images, [{"boxes": t["boxes"], "labels": torch.where(t["labels"] >= 0, t["labels"] + 2,
                                                                                 t["labels"])} for t in targets],
                      steps=2, lr=1e-2)
    assert len(losses) == 2 and not model.training and not model.embedder.training
    for k, v in model.embedder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in model.detector.head.state_dict().items())


def test_rescorer_arguments():
    with pytest.raises(InvalidArgumentError, match="detector"):
        CropRescorer(torch.nn.Linear(2, 2), tiny_embedder())
    with pytest.raises(InvalidArgumentError, match="top_classes"):
        CropRescorer(tiny_detector(), tiny_embedder(), top_classes=0)


def test_enroll_leaves_the_detector_unchanged_and_refuses_known_names():
    det = tiny_detector()
    model = CropRescorer(det, tiny_embedder()).eval()
    test = _images(seed=4)
    with torch.no_grad():
        before = det(test)
    images, targets = _support()
    assert model.enroll(images, targets, ["a", "b"]) == [2, 3]
    assert det.classes == ["0", "1"] and model.enrolled == ["a", "b"]
    with torch.no_grad():
        for a, b in zip(before, det(test)):
            torch.testing.assert_close(a["scores"], b["scores"])
    with pytest.raises(InvalidArgumentError, match="names"):
        model.enroll(images, targets, ["a", "c"])
    with pytest.raises(InvalidArgumentError, match="names"):
        model.enroll(images, targets, ["0", "c"])
