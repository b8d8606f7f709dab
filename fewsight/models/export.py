"""ONNX export of the fewsight detectors' inference graph (RetinaNet, DLDENet, SSD).

The exported graph is everything up to, but excluding, the data-dependent selection:

    images [B, 3, H, W] in [0, 1] -> resize / normalise / pad (as the model's ``preprocess``)
    -> backbone + FPN -> head -> ``scores = model.scores_from_outputs(...)``   [B, A, C]
                              -> ``boxes = clip(decode(deltas, anchors)) / scale`` [B, A, 4]

with the anchors (default boxes) baked in as constants for the export ``image_size``; the batch
dimension is dynamic. ``boxes`` are xyxy pixels in the coordinates of the *input* images and ``scores``
are the class probabilities (no background column, whatever the model). The score threshold, per-level
top-k, class-wise NMS and per-image cap stay outside the graph, in :func:`postprocess_onnx_outputs`,
which runs the models' own post-processing (:func:`fewsight.models.postprocess.postprocess_detections`)
on these outputs. Why outside: NMS has a data-dependent output size and ONNX's ``NonMaxSuppression``
differs from ``torchvision.ops.batched_nms`` (tie order, per-class loop, top-k semantics), so keeping it
in torch guarantees detections equal to ``model(images)``; the graph itself runs anywhere
(onnxruntime, TensorRT) and users with their own NMS take the dense outputs.

The post-processing settings, the per-level anchor counts, the class names and the input size are
stored in the ONNX file's metadata (key ``"fewsight"``, JSON), so :class:`OnnxDetector` needs only the
file. The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it handles the
models' shape arithmetic with a dynamic batch and needs no extra package.

Example:
    >>> import tempfile, os, torch
    >>> from fewsight.models import SSD
    >>> from fewsight.models.export import OnnxDetector, export_onnx
    >>> model = SSD(2, levels=(3, 4), fpn_channels=16, image_size=None).eval()
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "ssd.onnx")
    >>> info = export_onnx(model, path, image_size=(64, 64))
    >>> detector = OnnxDetector(path)
    >>> boxes, scores = detector.run(torch.rand(3, 3, 64, 64))      # dense, before NMS
    >>> boxes.shape, scores.shape
    ((3, 352, 4), (3, 352, 2))
    >>> sorted(detector(torch.rand(1, 3, 64, 64))[0])             # thresholds + NMS as model(images)
    ['boxes', 'labels', 'scores']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewsight.errors import (
    CheckpointError,
    DTypeError,
    InvalidArgumentError,
    MissingDependencyError,
    ShapeError,
)
from fewsight.geometry import BoxCoder
from fewsight.models.postprocess import postprocess_detections

__all__ = [
    "METADATA_KEY",
    "InferenceGraph",
    "OnnxDetector",
    "OnnxExportInfo",
    "export_onnx",
    "postprocess_onnx_outputs",
    "read_onnx_info",
]

#: Key of the JSON :class:`OnnxExportInfo` in the ONNX model's ``metadata_props``.
METADATA_KEY = "fewsight"
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores")


@dataclass(frozen=True)
class OnnxExportInfo:
    """What :func:`postprocess_onnx_outputs` needs besides the graph's outputs (stored in the file).

    ``image_size``: the graph's ``(H, W)`` input; ``level_sizes``: anchors per pyramid level (summing to
    ``A``); ``classes``: the ``C`` class names (score column ``c`` is ``classes[c]``); the inference
    settings of the model; ``model``: its class name; ``opset``.
    """

    image_size: tuple[int, int]
    level_sizes: tuple[int, ...]
    classes: tuple[str, ...]
    score_threshold: float
    topk_per_level: int
    nms_threshold: float
    detections_per_image: int
    model: str = ""
    opset: int = 17
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = field(default=OUTPUT_NAMES)

    @property
    def num_anchors(self) -> int:
        return int(sum(self.level_sizes))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OnnxExportInfo:
        try:
            data = json.loads(text)
            return cls(
                image_size=tuple(int(v) for v in data["image_size"]),  # type: ignore[arg-type]
                level_sizes=tuple(int(v) for v in data["level_sizes"]),
                classes=tuple(str(v) for v in data["classes"]),
                score_threshold=float(data["score_threshold"]),
                topk_per_level=int(data["topk_per_level"]),
                nms_threshold=float(data["nms_threshold"]),
                detections_per_image=int(data["detections_per_image"]),
                model=str(data.get("model", "")),
                opset=int(data.get("opset", 17)),
                input_name=str(data.get("input_name", INPUT_NAME)),
                output_names=tuple(str(v) for v in data.get("output_names", OUTPUT_NAMES)),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"metadata[{METADATA_KEY!r}]: expected fewsight export JSON, got {text[:80]!r} ({err})") from None


def _check_image_size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"image_size: expected (H, W) positive ints, got {image_size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise InvalidArgumentError(f"image_size: expected (H, W) positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


def _check_detector(model: Any) -> None:
    needed = ("forward_head", "backbone", "head", "scores_from_outputs", "coder", "preprocess")
    missing = [name for name in needed if not hasattr(model, name)]
    if not isinstance(model, nn.Module) or missing:
        raise InvalidArgumentError(
            f"model: expected a fewsight detector (RetinaNet, DLDENet, SSD: a DenseDetector), got "
            f"{type(model).__name__}" + (f" lacking {missing}" if missing else "")
        )


def _xyxy(size: Tensor) -> Tensor:
    """``(h, w)`` -> ``(w, h, w, h)`` along the last dimension."""
    return torch.stack((size[..., 1], size[..., 0], size[..., 1], size[..., 0]), dim=-1)


def _drop_non_tensors(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k, v in state.items() if k.startswith(prefix) and not isinstance(v, Tensor)]:
        del state[key]


class InferenceGraph(nn.Module):
    """The exportable part of a detector for a fixed input size: ``images -> (boxes, scores)``.

    Built from the model's own pieces (``preprocess``, ``backbone``, ``head``, ``scores_from_outputs``,
    ``coder``); the anchors, network and original sizes are constants of ``image_size``.

    Shapes:
        forward(``Tensor[B, 3, H, W]`` in ``[0, 1]``) -> (``boxes: Tensor[B, A, 4]`` xyxy in input pixels,
        ``scores: Tensor[B, A, C]``), both float32.

    Example:
        >>> from fewsight.models import RetinaNet
        >>> graph = InferenceGraph(RetinaNet(2, levels=(4, 5), fpn_channels=8).eval(), (40, 50))
        >>> boxes, scores = graph(torch.rand(2, 3, 40, 50))
        >>> boxes.shape, scores.shape, graph.level_sizes
        (torch.Size([2, 144, 4]), torch.Size([2, 144, 2]), (108, 36))
    """

    def __init__(self, model: nn.Module, image_size: Sequence[int]) -> None:
        super().__init__()
        _check_detector(model)
        self.image_size = _check_image_size(image_size)
        self.model = model
        ref = next(iter(model.parameters()), None)
        probe_kwargs: dict[str, Any] = {} if ref is None else {"device": ref.device}
        was_training = model.training
        model.eval()  # the probe must not move BatchNorm statistics
        try:
            with torch.no_grad():
                probe = model.forward_head(torch.zeros(1, 3, *self.image_size, **probe_kwargs))  # type: ignore[operator]
        finally:
            model.train(was_training)
        self.level_sizes = tuple(int(n) for n in probe.level_sizes)
        self.num_classes = int(getattr(model, "num_classes"))
        batch = probe.batch
        self.register_buffer("anchors", probe.anchors.float(), persistent=False)
        self.register_buffer("network_size", batch.sizes_tensor()[0].float(), persistent=False)
        self.register_buffer("scale", batch.scales[0].float(), persistent=False)
        self.register_buffer("original_size", batch.original_sizes_tensor()[0].float(), persistent=False)
        # The detectors keep their class names as extra state (a dict); the tracer takes tensors only.
        self.register_state_dict_post_hook(_drop_non_tensors)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        x = model.preprocess(images).tensor  # type: ignore[operator]
        outputs = model.head(model.backbone(x))  # type: ignore[operator]
        scores = model.scores_from_outputs(outputs).float()  # type: ignore[operator]
        deltas = outputs["bbox_regression"].float()
        boxes = model.coder.decode(deltas, self.anchors.unsqueeze(0))  # type: ignore[union-attr]
        # Same order as the models' post-processing: clip in network pixels, rescale, clip to the input.
        boxes = torch.minimum(boxes.clamp(min=0), _xyxy(self.network_size))
        boxes = boxes / _xyxy(self.scale)
        boxes = torch.minimum(boxes.clamp(min=0), _xyxy(self.original_size))
        return boxes, scores


def _info(model: nn.Module, graph: InferenceGraph, opset: int) -> OnnxExportInfo:
    return OnnxExportInfo(
        image_size=graph.image_size,
        level_sizes=graph.level_sizes,
        classes=tuple(str(c) for c in getattr(model, "classes", [str(i) for i in range(graph.num_classes)])),
        score_threshold=float(getattr(model, "score_threshold")),
        topk_per_level=int(getattr(model, "topk_per_level")),
        nms_threshold=float(getattr(model, "nms_threshold")),
        detections_per_image=int(getattr(model, "detections_per_image")),
        model=type(model).__name__,
        opset=opset,
    )


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module}: expected the package {module!r} for ONNX export / inference (pip install {module}), got {err}"
        ) from None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int],
    opset: int | None = 17,
    dynamic_batch: bool = True,
    check: bool = True,
) -> OnnxExportInfo:
    """Export ``model``'s inference graph (see :class:`InferenceGraph`) to an ONNX file.

    The graph takes ``images: Tensor[B, 3, H, W]`` float32 in ``[0, 1]`` with ``(H, W) = image_size``
    (``B`` dynamic when ``dynamic_batch``) and returns ``boxes: [B, A, 4]`` (input-image pixels) and
    ``scores: [B, A, C]``. The model (float32) is exported in eval mode (its mode is restored
    afterwards), on its current device. :class:`OnnxExportInfo` (also stored in the file's metadata) carries
    what :func:`postprocess_onnx_outputs` needs.

    Args:
        model: a fewsight detector (``RetinaNet``, ``DLDENet``, ``SSD``).
        path: output ``.onnx`` file (written atomically).
        image_size: ``(H, W)`` of the graph's input (an int for a square).
        opset: ONNX opset (``None``: 17).
        dynamic_batch: make the batch dimension dynamic.
        check: run ``onnx.checker`` on the result.

    Raises:
        InvalidArgumentError: not a detector, not float32, bad ``image_size`` / ``opset``.
        MissingDependencyError: the ``onnx`` package is missing.

    Example:
        >>> import tempfile, os
        >>> from fewsight.models import RetinaNet
        >>> net = RetinaNet(3, levels=(4, 5), fpn_channels=8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     info = export_onnx(net, os.path.join(tmp, "r.onnx"), image_size=(48, 64))
        >>> info.num_anchors, info.classes, info.model
        (144, ('0', '1', '2'), 'RetinaNet')
    """
    onnx = _require("onnx")
    _check_detector(model)
    opset = 17 if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not 11 <= opset:
        raise InvalidArgumentError(f"opset: expected None or an int >= 11, got {opset!r}")
    size = _check_image_size(image_size)
    wrong = sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dtype != torch.float32})
    if wrong:
        raise InvalidArgumentError(f"model: expected float32 parameters and buffers for export (call .float()), got {wrong}")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        graph = InferenceGraph(model, size).eval()
        info = _info(model, graph, opset)
        ref = graph.anchors
        example = torch.rand(2 if dynamic_batch else 1, 3, *size, device=ref.device)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            # Tracer / deprecation chatter: the graph is checked against PyTorch in the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    if check:
        onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, path)
    return info


def read_onnx_info(path: str | os.PathLike) -> OnnxExportInfo:
    """The :class:`OnnxExportInfo` stored by :func:`export_onnx` in an ONNX file's metadata.

    Raises:
        CheckpointError: missing / unreadable file, or a file not exported by fewsight.
    """
    onnx = _require("onnx")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"path: expected an ONNX file, got {str(path)!r} (no such file)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        raise CheckpointError(f"{path}: expected an ONNX model, could not read it ({type(err).__name__}: {err})") from None
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return OnnxExportInfo.from_json(entry.value)
    raise CheckpointError(f"{path}: expected metadata {METADATA_KEY!r} written by fewsight's export_onnx, found none")


class _PassThroughCoder(BoxCoder):
    """A coder whose ``decode`` returns the already decoded boxes (the graph decoded them)."""

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        return deltas


def _as_tensor(name: str, value: Any, last: int | None) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise DTypeError(f"{name}: expected a numpy array or Tensor, got {type(value).__name__}")
    if value.ndim != 3 or (last is not None and value.shape[-1] != last):
        raise ShapeError(f"{name}: expected Tensor[B, A, {last if last is not None else 'C'}], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise DTypeError(f"{name}: expected a floating array, got dtype {value.dtype}")
    return value.float()


def postprocess_onnx_outputs(
    boxes: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    info: OnnxExportInfo,
    *,
    score_threshold: float | None = None,
    topk_per_level: int | None = None,
    nms_threshold: float | None = None,
    detections_per_image: int | None = None,
) -> list[dict[str, Tensor]]:
    """The exported graph's dense outputs -> per-image ``{"boxes", "scores", "labels"}``, as ``model(images)``.

    Runs :func:`fewsight.models.postprocess.postprocess_detections` (score threshold, per-level top-k, one
    class-wise ``batched_nms`` for the batch, per-image cap) with the model's settings from ``info``
    (each overridable). IoU is invariant under the per-axis rescaling to input pixels, so NMS on these
    boxes selects what the model selects.

    Args:
        boxes: ``[B, A, 4]`` xyxy input pixels; scores: ``[B, A, C]`` (numpy arrays or tensors).
        info: from :func:`export_onnx` or :func:`read_onnx_info`.

    Returns:
        ``B`` dicts of tensors (on ``boxes``' device for tensors, CPU for numpy): ``boxes: Tensor[K, 4]``,
        ``scores: Tensor[K]`` (decreasing), ``labels: Long[K]`` in ``0 .. C-1`` (``info.classes[label]``).

    Example:
        >>> info = OnnxExportInfo((10, 10), (2,), ("a",), 0.05, 1000, 0.5, 100)
        >>> b = torch.tensor([[[0., 0., 5., 5.], [0., 0., 5., 6.]]])
        >>> out = postprocess_onnx_outputs(b, torch.tensor([[[0.9], [0.8]]]), info)
        >>> out[0]["scores"], out[0]["labels"]
        (tensor([0.9000]), tensor([0]))
    """
    boxes_t = _as_tensor("boxes", boxes, 4)
    scores_t = _as_tensor("scores", scores, None).to(boxes_t.device)
    if scores_t.shape[:2] != boxes_t.shape[:2] or scores_t.shape[1] != info.num_anchors:
        raise ShapeError(
            f"scores: expected Tensor[{boxes_t.shape[0]}, {info.num_anchors}, C] matching boxes "
            f"{tuple(boxes_t.shape)} and info.level_sizes, got shape {tuple(scores_t.shape)}"
        )
    if scores_t.shape[-1] != len(info.classes):
        raise ShapeError(f"scores: expected {len(info.classes)} classes (info.classes), got shape {tuple(scores_t.shape)}")
    batch = boxes_t.shape[0]
    size = torch.tensor(info.image_size, dtype=torch.float32, device=boxes_t.device).expand(batch, 2)
    return postprocess_detections(
        scores_t,
        boxes_t,
        boxes_t.new_zeros(()).expand(boxes_t.shape[1], 4),  # unused by the pass-through coder
        info.level_sizes,
        coder=_PassThroughCoder(),
        image_sizes=size,
        score_threshold=info.score_threshold if score_threshold is None else float(score_threshold),
        topk_per_level=info.topk_per_level if topk_per_level is None else int(topk_per_level),
        nms_threshold=info.nms_threshold if nms_threshold is None else float(nms_threshold),
        detections_per_image=info.detections_per_image if detections_per_image is None else int(detections_per_image),
    )


class OnnxDetector:
    """An exported detector run by onnxruntime: ``detector(images)`` -> per-image detections.

    Args:
        path: a file written by :func:`export_onnx`.
        providers: onnxruntime execution providers (default: CPU).
        **overrides: ``score_threshold``, ``topk_per_level``, ``nms_threshold``, ``detections_per_image``.

    ``run(images)`` returns the graph's raw ``(boxes [B, A, 4], scores [B, A, C])`` numpy arrays;
    ``detector(images)`` also post-processes (:func:`postprocess_onnx_outputs`). ``images``: a float
    ``Tensor`` / array ``[B, 3, H, W]`` in ``[0, 1]`` of the export size; ``classes`` names the labels.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None, **overrides: Any) -> None:
        ort = _require("onnxruntime")
        self.info = read_onnx_info(path)
        allowed = {"score_threshold", "topk_per_level", "nms_threshold", "detections_per_image"}
        unknown = set(overrides) - allowed
        if unknown:
            raise InvalidArgumentError(f"overrides: expected keys among {sorted(allowed)}, got {sorted(unknown)}")
        self.overrides = overrides
        self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    def run(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(images, Tensor):
            if not images.is_floating_point():
                raise DTypeError(f"images: expected a float tensor in [0, 1], got dtype {images.dtype}")
            images = images.detach().float().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise DTypeError(f"images: expected a Tensor or numpy array [B, 3, H, W], got {type(images).__name__}")
        h, w = self.info.image_size
        if images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise ShapeError(f"images: expected [B, 3, {h}, {w}] (the export size), got shape {tuple(images.shape)}")
        boxes, scores = self.session.run(list(self.info.output_names), {self.info.input_name: images.astype(np.float32)})
        return boxes, scores

    def __call__(self, images: Tensor | np.ndarray) -> list[dict[str, Tensor]]:
        boxes, scores = self.run(images)
        return postprocess_onnx_outputs(boxes, scores, self.info, **self.overrides)
