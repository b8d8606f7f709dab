"""Tests for fewsight.models.export: the inference graph in ONNX / onnxruntime equals PyTorch."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fewsight.errors import CheckpointError, InvalidArgumentError, ShapeError
from fewsight.models.export import (
    InferenceGraph,
    OnnxDetector,
    OnnxExportInfo,
    export_onnx,
    postprocess_onnx_outputs,
    read_onnx_info,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

MODELS = ["SSD", "RetinaNet", "DLDENet"]
COMMON = dict(levels=(3, 4, 5), fpn_channels=16, score_threshold=0.0, topk_per_level=60, detections_per_image=40)
EXTRA = {"SSD": dict(image_size=None), "RetinaNet": dict(head_convs=2), "DLDENet": dict(head_convs=2, embedding_dim=8)}


def _model_class(name: str):
    return getattr(importlib.import_module("fewsight.models"), name)


def _build(name: str, **kwargs):
    torch.manual_seed(0)
    model = _model_class(name)(3, **{**COMMON, **EXTRA[name], **kwargs}, class_names=["a", "b", "c"])
    with torch.no_grad():  # spread the scores: no near-ties that float noise could reorder
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _close_boxes(actual, expected) -> None:
    # Pixels: relative 1e-4, and 1e-3 px absolute for coordinates near 0 (ORT's resize / conv rounding).
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=1e-4, atol=1e-3)


def _same_detections(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a["boxes"].shape == e["boxes"].shape
        assert torch.equal(a["labels"], e["labels"])
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        if e["boxes"].numel():
            _close_boxes(a["boxes"], e["boxes"])


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_equals_pytorch(name, tmp_path):
    model = _build(name)
    size = (70, 90)  # not multiples of the strides
    path = tmp_path / f"{name}.onnx"
    info = export_onnx(model, path, image_size=size)
    assert info.model == name and info.classes == ("a", "b", "c") and info.image_size == size
    assert read_onnx_info(path) == info
    onnx.checker.check_model(onnx.load(str(path)))

    images = torch.rand(3, 3, *size)  # batch 3: the export example had 2, so the batch is dynamic
    detector = OnnxDetector(path)
    boxes, scores = detector.run(images)
    with torch.no_grad():
        ref_boxes, ref_scores = InferenceGraph(model, size)(images)
        head = model.forward_head(images)
        model_scores = model.scores_from_outputs(head.outputs)
    assert boxes.shape == (3, info.num_anchors, 4) and scores.shape == (3, info.num_anchors, 3)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert list(info.level_sizes) == head.level_sizes
    _close_boxes(boxes, ref_boxes)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref_scores, model_scores)
    # Boxes are in input pixels, inside the image.
    assert (boxes >= 0).all() and (boxes[..., 0::2] <= size[1]).all() and (boxes[..., 1::2] <= size[0]).all()

    # Post-processing the ONNX outputs gives the model's detections.
    with torch.no_grad():
        expected = model(images)
    got = detector(images)
    assert sum(d["boxes"].shape[0] for d in expected) > 0
    _same_detections(got, expected)
    _same_detections(postprocess_onnx_outputs(ref_boxes, ref_scores, info), expected)


@pytest.mark.parametrize(
    "name, kwargs",
    [("SSD", dict(image_size=(64, 64))), ("RetinaNet", dict(min_size=96, max_size=160, size_divisible=32))],
)
def test_resizing_inside_the_graph(name, kwargs, tmp_path):
    # The model resizes / pads internally: the graph does the same and returns input-pixel boxes.
    model = _build(name, **kwargs)
    size = (50, 75)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, path, image_size=size)
    images = torch.rand(2, 3, *size)
    detector = OnnxDetector(path)
    with torch.no_grad():
        expected = model(images)
        ref_boxes, ref_scores = InferenceGraph(model, size)(images)
    boxes, scores = detector.run(images)
    _close_boxes(boxes, ref_boxes)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-5)
    _same_detections(detector(images), expected)
    assert info.num_anchors == boxes.shape[1]


def test_static_batch_mode_and_training_mode_restored(tmp_path):
    model = _build("SSD").train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    path = tmp_path / "static.onnx"
    export_onnx(model, path, image_size=(40, 40), dynamic_batch=False, opset=None)
    assert model.training
    InferenceGraph(model, (40, 40))
    assert model.training
    for key, value in stats.items():  # probing the size did not move BatchNorm statistics
        assert torch.equal(model.state_dict()[key], value)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape == [1, 3, 40, 40]
    with pytest.raises(Exception):
        session.run(None, {"images": np.zeros((2, 3, 40, 40), np.float32)})


def test_overrides_and_input_validation(tmp_path):
    model = _build("SSD")
    path = tmp_path / "ssd.onnx"
    export_onnx(model, path, image_size=(48, 48))
    images = torch.rand(2, 3, 48, 48)
    capped = OnnxDetector(path, detections_per_image=3)(images)
    assert all(d["boxes"].shape[0] <= 3 for d in capped)
    high = OnnxDetector(path, score_threshold=0.99)(images)
    assert all((d["scores"] > 0.99).all() for d in high)
    detector = OnnxDetector(path)
    assert detector.classes == ["a", "b", "c"]
    out = detector(images.numpy())  # numpy in, tensors out
    assert isinstance(out[0]["boxes"], torch.Tensor)
    with pytest.raises(ShapeError, match="export size"):
        detector.run(torch.rand(1, 3, 40, 48))
    with pytest.raises(InvalidArgumentError, match="overrides"):
        OnnxDetector(path, nms=0.3)
    boxes, scores = detector.run(images)
    with pytest.raises(ShapeError):
        postprocess_onnx_outputs(boxes[:, :-1], scores, detector.info)
    with pytest.raises(ShapeError):
        postprocess_onnx_outputs(boxes, scores[..., :2], detector.info)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", image_size=(32, 32))
    model = _build("SSD")
    with pytest.raises(InvalidArgumentError, match="image_size"):
        export_onnx(model, tmp_path / "x.onnx", image_size=(32, 0))
    with pytest.raises(InvalidArgumentError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", image_size=(32, 32), opset=7)
    with pytest.raises(InvalidArgumentError, match="float32"):
        export_onnx(_build("SSD").double(), tmp_path / "x.onnx", image_size=(32, 32))
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(CheckpointError, match="no such file"):
        read_onnx_info(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError):
        read_onnx_info(tmp_path / "junk.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.rand(1, 2),), str(plain), dynamo=False)
    with pytest.raises(CheckpointError, match="fewsight"):
        read_onnx_info(plain)
    with pytest.raises(CheckpointError):
        OnnxExportInfo.from_json("{}")


def test_info_json_round_trip():
    info = OnnxExportInfo((10, 20), (4, 2), ("x", "y"), 0.05, 100, 0.5, 10, model="SSD")
    assert OnnxExportInfo.from_json(info.to_json()) == info
    assert info.num_anchors == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_from_cuda_model(tmp_path):
    model = _build("SSD").cuda()
    path = tmp_path / "cuda.onnx"
    info = export_onnx(model, path, image_size=(48, 64))
    images = torch.rand(2, 3, 48, 64, device="cuda")
    boxes, scores = OnnxDetector(path).run(images)
    with torch.no_grad():
        ref_boxes, ref_scores = InferenceGraph(model, info.image_size)(images)
    _close_boxes(torch.from_numpy(boxes), ref_boxes.cpu())
    np.testing.assert_allclose(scores, ref_scores.cpu().numpy(), rtol=1e-3, atol=1e-4)
