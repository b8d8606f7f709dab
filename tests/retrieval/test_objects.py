"""Object embeddings from a DLDENet: galleries of detected objects (index_images), example-crop queries
(embed_crop), embed_objects and open-set known_scores."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

pytest.importorskip("faiss")

from fewsight.errors import InvalidArgumentError, ShapeError  # noqa: E402
from fewsight.models import DLDENet, RetinaNet  # noqa: E402
from fewsight.retrieval import Gallery, embed_crop, embed_objects, index_images, known_scores  # noqa: E402
from tests._helpers import one_thread  # noqa: F401  (autouse)

D = 8


def tiny(num_classes: int = 2, **kw) -> DLDENet:
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "levels": (3, 4, 5), "fpn_channels": 16, "embedding_dim": D, "head_convs": 1,
          "score_threshold": 0.0, "detections_per_image": 30, **kw}
    return DLDENet(num_classes, class_names=[f"c{i}" for i in range(num_classes)], **kw)


@pytest.fixture(scope="module")
def model():
    return tiny(3).eval()


def _images(seed=0, sizes=((64, 64), (64, 64), (64, 64))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _stored(gallery: Gallery) -> torch.Tensor:
    """The gallery's stored (unit) vectors."""
    return gallery.embeddings() if len(gallery) else torch.zeros(0, gallery.dim)


def _reference_items(model, images, score_threshold, nms_threshold):
    """Per image: the detections above the threshold after class-agnostic NMS (by score)."""
    with torch.no_grad():
        dets = model(images)
    boxes, labels, ids = [], [], []
    for i, d in enumerate(dets):
        keep = (d["scores"] >= score_threshold).nonzero().flatten()
        keep = keep[nms(d["boxes"][keep], d["scores"][keep], nms_threshold)]
        keep = keep.sort().values  # the detector's own order (by decreasing score)
        boxes.append(d["boxes"][keep])
        labels.append(d["labels"][keep])
        ids.append(torch.full((len(keep),), i))
    return boxes, torch.cat(labels), torch.cat(ids)


@pytest.mark.parametrize("score_threshold", [0.0, 0.5])
def test_index_images_matches_detections_after_class_agnostic_nms(model, score_threshold):
    images = _images()
    gallery = index_images(model, images, score_threshold=score_threshold, nms_threshold=0.5)
    boxes, labels, ids = _reference_items(model, images, score_threshold, 0.5)
    assert isinstance(gallery, Gallery) and gallery.dim == D and gallery.class_names == model.classes
    assert len(gallery) == sum(len(b) for b in boxes) > 0
    torch.testing.assert_close(gallery.boxes, torch.cat(boxes))
    assert torch.equal(gallery.labels, labels) and torch.equal(gallery.image_ids, ids)
    # one item per object: no two items of an image overlap above the NMS threshold
    from torchvision.ops import box_iou

    for b in boxes:
        iou = box_iou(b, b) - torch.eye(len(b))
        assert (iou <= 0.5 + 1e-6).all()
    # embeddings: embed_boxes of the kept boxes
    want = torch.cat(model.embed_boxes(images, boxes))
    torch.testing.assert_close(_stored(gallery), torch.nn.functional.normalize(want, dim=1), rtol=1e-5, atol=1e-5)


def test_index_images_batching_ids_and_mode(model):
    images = _images(1)
    model.train()
    try:
        whole = index_images(model, images, score_threshold=0.1)
        assert model.training  # mode restored
    finally:
        model.eval()
    chunked = index_images(model, images, score_threshold=0.1, batch_size=1, image_ids=[10, 20, 30])
    assert len(whole) == len(chunked)
    torch.testing.assert_close(whole.boxes, chunked.boxes)
    assert torch.equal(whole.labels, chunked.labels)
    assert torch.equal(chunked.image_ids, torch.tensor([10, 20, 30])[whole.image_ids])
    torch.testing.assert_close(_stored(whole), _stored(chunked), rtol=1e-5, atol=1e-5)
    # an item's own embedding finds it with cosine 1
    found = whole.search(_stored(whole)[:1], k=1)
    assert found.scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_index_images_nothing_detected_and_errors(model):
    images = _images(2)
    g = index_images(model, images, score_threshold=1.5)  # no score reaches it
    assert len(g) == 0 and g.dim == D
    g = index_images(model, [], score_threshold=0.0)
    assert len(g) == 0
    with pytest.raises(ShapeError, match="image_ids"):
        index_images(model, images, image_ids=[0, 1])
    with pytest.raises(InvalidArgumentError, match="DLDENet"):
        index_images(RetinaNet(2, backbone="resnet18", levels=(3, 4, 5), fpn_channels=16, head_convs=1), images)


def test_index_images_rejects_a_bad_batch_size(model):
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        index_images(model, _images(2), batch_size=0)


def test_index_images_differently_sized_images(model):
    images = _images(3, ((64, 80), (72, 64)))
    gallery = index_images(model, images, score_threshold=0.2)
    boxes, labels, ids = _reference_items(model, images, 0.2, 0.5)
    torch.testing.assert_close(gallery.boxes, torch.cat(boxes))
    assert torch.equal(gallery.image_ids, ids)
    h_w = torch.tensor([[64, 80], [72, 64]], dtype=torch.float32)[gallery.image_ids]
    assert (gallery.boxes[:, 2] <= h_w[:, 1] + 1e-4).all() and (gallery.boxes[:, 3] <= h_w[:, 0] + 1e-4).all()


# --- embed_objects / embed_crop ---------------------------------------------------------------------


def test_embed_objects_concatenates_embed_boxes(model):
    images = _images(4, ((64, 64), (64, 64)))
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 44.0], [20.0, 20.0, 60.0, 60.0]]), torch.tensor([[8.0, 8.0, 50.0, 50.0]])]
    got = embed_objects(model, images, boxes)
    assert got.shape == (3, D)
    torch.testing.assert_close(got, torch.cat(model.embed_boxes(images, boxes)))
    assert embed_objects(model, [], []).shape == (0, D)
    with pytest.raises(InvalidArgumentError, match="DLDENet"):
        embed_objects(torch.nn.Linear(2, 2), images, boxes)


def test_embed_crop_with_a_box_equals_embed_boxes(model):
    image = _images(5, ((64, 80),))[0]
    box = torch.tensor([10.0, 12.0, 50.0, 56.0])
    got = embed_crop(model, image, box=box)
    assert got.shape == (D,)
    torch.testing.assert_close(got, model.embed_boxes([image], [box[None]])[0][0])
    torch.testing.assert_close(got.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("context", [0.0, 0.5, 1.0])
def test_embed_crop_without_a_box_pastes_the_crop_on_a_grey_canvas(model, context):
    crop = _images(6, ((30, 40),))[0]
    got = embed_crop(model, crop, context=context)
    pad_y, pad_x = round(30 * context), round(40 * context)
    canvas = torch.full((3, 30 + 2 * pad_y, 40 + 2 * pad_x), 0.5)
    canvas[:, pad_y : pad_y + 30, pad_x : pad_x + 40] = crop
    box = torch.tensor([[pad_x, pad_y, pad_x + 40, pad_y + 30]], dtype=torch.float32)
    torch.testing.assert_close(got, model.embed_boxes([canvas], [box])[0][0])
    assert got.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_embed_crop_errors_and_unmatched_box(model):
    image = _images(7, ((64, 64),))[0]
    with pytest.raises(ShapeError, match="crop"):
        embed_crop(model, image[:1])
    with pytest.raises(ShapeError, match="crop"):
        embed_crop(model, image[None])
    with pytest.raises(ShapeError, match="box"):
        embed_crop(model, image, box=torch.tensor([[1.0, 2.0, 30.0, 40.0]]))
    with pytest.raises(InvalidArgumentError, match="context"):
        embed_crop(model, image, context=-0.5)
    out = embed_crop(model, image, box=torch.tensor([500.0, 500.0, 600.0, 600.0]))  # outside: no anchor
    assert torch.equal(out, torch.zeros(D))


# --- known_scores -----------------------------------------------------------------------------------


def test_known_scores(model):
    g = torch.Generator().manual_seed(8)
    emb = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=1)
    emb[2] = 0.0
    scores = known_scores(model, emb)
    assert scores.shape == (6,)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[2] == 0.0
    want = model.classifier.probabilities(emb).max(dim=1).values
    keep = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(scores[keep], want[keep])
    # scale does not matter; a class direction itself is fully known (p = 1)
    torch.testing.assert_close(known_scores(model, emb * 3.0), scores)
    torch.testing.assert_close(known_scores(model, model.classifier.means), torch.ones(3), rtol=0, atol=1e-5)


def test_known_scores_edge_cases():
    assert known_scores(tiny(0), torch.randn(4, D)).tolist() == [0.0] * 4  # no class at all
    model = tiny(2)
    assert known_scores(model, torch.zeros(0, D)).shape == (0,)
    assert known_scores(model, torch.zeros(3, D)).tolist() == [0.0] * 3
    with pytest.raises(ShapeError, match="embeddings"):
        known_scores(model, torch.zeros(D))
