"""The detectors' injected components: transform, assigner, post-processor; options declared once in the base."""

from __future__ import annotations

import inspect

import pytest
import torch

from fewsight.errors import InvalidArgumentError
from fewsight.models import (
    SSD,
    AnchorAssigner,
    DenseDetector,
    DetectionPostprocess,
    DetectionTransform,
    DLDENet,
    RetinaNet,
)
from tests._helpers import one_thread  # noqa: F401  (autouse: one torch thread for tiny models)

TINY = {"backbone": "mobilenet_v2", "levels": (3, 4, 5), "fpn_channels": 16}


def _detect(model, images):
    return model.eval()(images)


def test_components_equal_their_plain_options():
    images = torch.rand(2, 3, 64, 80)
    torch.manual_seed(0)
    plain = RetinaNet(2, **TINY, min_size=96, object_threshold=0.6, score_threshold=0.001, detections_per_image=7)
    torch.manual_seed(0)
    injected = RetinaNet(
        2, **TINY, transform=DetectionTransform(min_size=96), assigner=AnchorAssigner(object_threshold=0.6),
        postprocessor=DetectionPostprocess(score_threshold=0.001, detections_per_image=7),
    )
    for a, b in zip(_detect(plain, images), _detect(injected, images)):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
    assert plain.min_size == 96 and plain.object_threshold == 0.6 and plain.detections_per_image == 7
    assert plain.state_dict().keys() == injected.state_dict().keys()
    assert not any(k.startswith("transform.") for k in plain.state_dict())  # normalisation is configuration


def test_a_component_and_its_options_conflict_and_unknown_options_are_type_errors():
    with pytest.raises(InvalidArgumentError, match="transform"):
        RetinaNet(2, **TINY, transform=DetectionTransform(), min_size=64)
    with pytest.raises(InvalidArgumentError, match="postprocessor"):
        DLDENet(2, **TINY, postprocessor=object())
    with pytest.raises(TypeError, match="min_sise"):
        RetinaNet(2, **TINY, min_sise=64)
    with pytest.raises(InvalidArgumentError, match="background_threshold"):
        AnchorAssigner(object_threshold=0.4, background_threshold=0.5)
    with pytest.raises(InvalidArgumentError, match="detections_per_image"):
        DetectionPostprocess(detections_per_image=0)
    with pytest.raises(InvalidArgumentError, match="image_size"):
        DetectionTransform(min_size=10, image_size=20)


def test_subclasses_do_not_redeclare_the_base_keywords():
    base = set(inspect.signature(DenseDetector).parameters) - {"num_classes", "options"}
    for cls in (RetinaNet, DLDENet, SSD):
        own = set(inspect.signature(cls).parameters) - {"num_classes", "kwargs"}
        assert not own & base, (cls.__name__, own & base)


def test_ssd_defaults_and_settable_inference_settings():
    model = SSD(2, **TINY)
    assert model.image_size == (300, 300) and model.score_threshold == 0.01 and model.detections_per_image == 200
    assert model.object_threshold == model.background_threshold == 0.5 and not model.low_quality
    assert SSD(2, **TINY, image_size=None).image_size is None
    model.score_threshold, model.detections_per_image = 0.3, 5
    assert model.postprocessor.score_threshold == 0.3 and model.postprocessor.detections_per_image == 5
    assert all(len(d["boxes"]) <= 5 for d in _detect(model, torch.rand(1, 3, 64, 64)))


def test_config_keywords_still_build_every_model():
    # The keys the YAML configs and the trainer pass (configs/*.yaml).
    kw = dict(
        backbone="mobilenet_v2", weights=None, levels=[3, 4, 5], fpn_channels=16, head_convs=1, embedding_dim=8,
        directions="learned", loss_weights={"ccs": 0.0}, min_size=64, max_size=96, detections_per_image=20,
        head_norm="group", means_update="manual", trainable_layers=None, class_names=["a", "b"],
    )
    model = DLDENet(2, **kw)
    assert model.classes == ["a", "b"] and model.max_size == 96 and model.loss_weights["ccs"] == 0.0
    RetinaNet(2, backbone="mobilenet_v2", weights=None, levels=[3, 4, 5], fpn_channels=16, min_size=64,
              max_size=96, head_norm="group", score_threshold=0.1, coder=None, anchor_generator=None)
