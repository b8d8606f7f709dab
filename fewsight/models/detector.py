"""The base of the dense one-stage detectors (RetinaNet, DLDENet, SSD): :class:`DenseDetector`.

Backbone + FPN, anchors, ``forward`` that returns named losses in training and per-image detections in
eval, class names in the ``state_dict``. The stages around the network are components the detector
receives, as torchvision and detectron2 inject them: the image transform
(:class:`~fewsight.models.transform.DetectionTransform`), the anchor assignment
(:class:`~fewsight.models.assignment.AnchorAssigner`) and the post-processing
(:class:`~fewsight.models.postprocess.DetectionPostprocess`). A subclass adds its head and loss and
passes every other keyword through, so the options are declared once, where they are used.

Coordinates: targets are given, and detections returned, in the coordinates of the images passed to
the model; resizing (``min_size`` / ``max_size`` / ``image_size``) is internal.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fewsight.errors import CheckpointError, InvalidArgumentError, ShapeError
from fewsight.geometry import AnchorGenerator, BoxCoder, PaddedTargets
from fewsight.losses.box import BOX_LOSSES
from fewsight.models.assignment import AnchorAssigner, AnchorAssignment, detection_box_loss, prepare_targets
from fewsight.models.backbones import build_backbone
from fewsight.models.postprocess import DetectionPostprocess, _check_count
from fewsight.models.spec import Described
from fewsight.models.transform import DetectionTransform, ImageBatch

__all__ = ["DenseDetector", "HeadOutput"]


class HeadOutput(NamedTuple):
    """What :meth:`DenseDetector.forward_head` returns.

    ``outputs``: the head's dict (``Tensor[B, A, ...]`` values); ``anchors``: ``Tensor[A, 4]`` float32
    in network coordinates; ``level_sizes``: anchors per level; ``batch``: the :class:`ImageBatch`.
    """

    outputs: dict[str, Tensor]
    anchors: Tensor
    level_sizes: list[int]
    batch: ImageBatch


_DEFAULT_LEVELS = (3, 4, 5, 6, 7)
#: The plain options each component is built from when it is not given.
_COMPONENT_OPTIONS = {
    "transform": (DetectionTransform, ("min_size", "max_size", "image_size", "size_divisible", "image_mean", "image_std")),
    "assigner": (AnchorAssigner, ("object_threshold", "background_threshold", "low_quality")),
    "postprocessor": (
        DetectionPostprocess, ("score_threshold", "topk_per_level", "nms_threshold", "detections_per_image")
    ),
}


def _build_components(owner: str, given: dict[str, Any], options: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Each component as given, or built from its plain ``options`` over the class ``defaults``."""
    known = {key for _, keys in _COMPONENT_OPTIONS.values() for key in keys}
    unknown = sorted(set(options) - known)
    if unknown:  # a TypeError, as Python's own for an unexpected keyword
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {unknown[0]!r}")
    out = {}
    for name, (cls, keys) in _COMPONENT_OPTIONS.items():
        chosen = {k: options[k] for k in keys if k in options}
        component = given[name]
        if component is None:
            component = cls(**{**{k: defaults[k] for k in keys if k in defaults}, **chosen})
        elif not isinstance(component, cls):
            raise InvalidArgumentError(f"{name}: expected a {cls.__name__} or None, got {type(component).__name__}")
        elif chosen:
            raise InvalidArgumentError(
                f"{name}: expected either a {cls.__name__} or its options, got both ({', '.join(sorted(chosen))})"
            )
        out[name] = component
    return out


def _geometry(name: str, cls: type, value: Any) -> Any:
    """A geometry object given as itself or as a mapping of its arguments (as YAML gives it)."""
    if not isinstance(value, Mapping):
        return value
    try:
        return cls(**value)
    except TypeError as exc:
        raise InvalidArgumentError(f"{name}: expected arguments of {cls.__name__}, got {dict(value)} ({exc})") from None


class DenseDetector(Described, nn.Module):
    """Base of the one-stage detectors: backbone + FPN, anchors, batching, dispatch, class names.

    Subclasses build ``self.head`` (a module mapping the list of level features to a dict of
    ``Tensor[B, A, ...]``) and implement :meth:`compute_loss` and :meth:`scores_from_outputs`.

    ``forward(images, targets=None)``: in training mode returns the dict of named (weighted) losses
    (``sum(losses.values())`` is the total); in eval mode a list of per-image
    ``{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Long[K]}`` in the input images'
    coordinates. :meth:`losses` and :meth:`detect` do either one in any mode.

    Components (keyword-only, each built from its plain options when not given, as torchvision and
    detectron2 inject them): ``transform`` (:class:`~fewsight.models.transform.DetectionTransform`:
    ``min_size``, ``max_size``, ``image_size``, ``size_divisible``, ``image_mean``, ``image_std``),
    ``assigner`` (:class:`~fewsight.models.assignment.AnchorAssigner`: ``object_threshold``,
    ``background_threshold``, ``low_quality``), ``postprocessor``
    (:class:`~fewsight.models.postprocess.DetectionPostprocess`: ``score_threshold``, ``topk_per_level``,
    ``nms_threshold``, ``detections_per_image``). Giving a component and its options is an error; an
    unknown option is a ``TypeError``. A subclass changes the defaults of these options through
    :attr:`default_options`, and passes the rest of its keywords through.

    The class names travel in the ``state_dict`` (``get_extra_state``).
    """

    default_loss_weights: dict[str, float] = {}

    @classmethod
    def argument_names(cls) -> tuple[str, ...]:
        """Every keyword the constructor takes: each class's own along the chain of constructors that
        pass ``**kwargs`` on, then the components' plain options (what a config may set)."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(inspect.unwrap(init)).parameters.items()
            names += [n for n, p in params if n not in ("self", "num_classes")
                      and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
            if klass is DenseDetector:
                break
        names += [key for _, keys in _COMPONENT_OPTIONS.values() for key in keys]
        return tuple(dict.fromkeys(names))
    #: Defaults of the components' plain options that differ from the components' own.
    default_options: dict[str, Any] = {}

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str | nn.Module = "resnet18",
        weights: Any = None,
        levels: Sequence[int] = _DEFAULT_LEVELS,
        fpn_channels: int = 256,
        frozen_bn: bool = False,
        trainable_layers: int | None = None,
        p6_from: str = "p5",
        anchor_generator: AnchorGenerator | Mapping[str, Any] | None = None,
        coder: BoxCoder | Mapping[str, Any] | None = None,
        transform: DetectionTransform | None = None,
        assigner: AnchorAssigner | None = None,
        postprocessor: DetectionPostprocess | None = None,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        loss_weights: Mapping[str, float] | None = None,
        class_names: Sequence[str] | None = None,
        min_classes: int = 1,
        **options: Any,
    ) -> None:
        super().__init__()
        num_classes = _check_count("num_classes", num_classes, min_classes)
        if class_names is None:
            self.classes: list[str] = [str(i) for i in range(num_classes)]
        else:
            if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
                raise InvalidArgumentError(f"class_names: expected a sequence of str, got {class_names!r}")
            if len(class_names) != num_classes:
                raise InvalidArgumentError(
                    f"class_names: expected {num_classes} names (num_classes), got {len(class_names)}"
                )
            if len(set(class_names)) != len(class_names):
                raise InvalidArgumentError(f"class_names: expected unique names, got {list(class_names)}")
            self.classes = list(class_names)

        # Backbone: a name (built here) or an injected module exposing .levels and .out_channels.
        levels = tuple(int(v) for v in levels)
        if isinstance(backbone, str):
            self.backbone = build_backbone(
                backbone, weights=weights, levels=levels, out_channels=fpn_channels, frozen_bn=frozen_bn,
                trainable_layers=trainable_layers, p6_from=p6_from,
            )
        elif isinstance(backbone, nn.Module):
            if weights is not None:
                raise InvalidArgumentError(
                    f"weights: expected None with an injected backbone module, got {weights!r}"
                )
            own = getattr(backbone, "levels", None)
            if own is None or not hasattr(backbone, "out_channels"):
                raise InvalidArgumentError(
                    f"backbone: expected a module with .levels and .out_channels (e.g. build_backbone(...)), "
                    f"got {type(backbone).__name__}"
                )
            own = tuple(int(v) for v in own)
            if levels != own and levels != _DEFAULT_LEVELS:
                raise InvalidArgumentError(f"levels: expected the injected backbone's levels {own}, got {levels}")
            levels = own
            self.backbone = backbone
        else:
            raise InvalidArgumentError(f"backbone: expected a backbone name or an nn.Module, got {backbone!r}")
        self.levels = levels
        self.in_channels = int(self.backbone.out_channels)

        anchor_generator = _geometry("anchor_generator", AnchorGenerator, anchor_generator)
        coder = _geometry("coder", BoxCoder, coder)
        if anchor_generator is None:
            anchor_generator = AnchorGenerator(levels=levels)
        elif tuple(anchor_generator.levels) != levels:
            raise InvalidArgumentError(
                f"anchor_generator: expected levels {levels} (the backbone's), got {tuple(anchor_generator.levels)}"
            )
        self.anchor_generator = anchor_generator
        self.coder = coder if coder is not None else BoxCoder((1.0, 1.0, 1.0, 1.0))
        parts = _build_components(
            type(self).__name__,
            {"transform": transform, "assigner": assigner, "postprocessor": postprocessor},
            options,
            type(self).default_options,
        )
        self.transform: DetectionTransform = parts["transform"]
        self.assigner: AnchorAssigner = parts["assigner"]
        self.postprocessor: DetectionPostprocess = parts["postprocessor"]
        if box_loss not in BOX_LOSSES:
            raise InvalidArgumentError(f"box_loss: expected one of {BOX_LOSSES}, got {box_loss!r}")
        self.box_loss = box_loss
        if isinstance(smooth_l1_beta, bool) or not isinstance(smooth_l1_beta, (int, float)) or smooth_l1_beta < 0:
            raise InvalidArgumentError(f"smooth_l1_beta: expected a float >= 0, got {smooth_l1_beta!r}")
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_weights = self._check_loss_weights(loss_weights)

    # --- configuration helpers ---

    def _check_loss_weights(self, loss_weights: Mapping[str, float] | None) -> dict[str, float]:
        out = dict(self.default_loss_weights)
        if loss_weights is None:
            return out
        if not isinstance(loss_weights, Mapping):
            raise InvalidArgumentError(f"loss_weights: expected a mapping of loss name -> weight, got {loss_weights!r}")
        for key, value in loss_weights.items():
            if key not in out:
                raise InvalidArgumentError(f"loss_weights: expected keys among {tuple(out)}, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(f"loss_weights[{key!r}]: expected a float >= 0, got {value!r}")
            out[key] = float(value)
        return out

    def _check_head(self, expected_anchors: int) -> None:
        k = getattr(self.head, "num_anchors", None)
        if k is not None and k != expected_anchors:
            raise InvalidArgumentError(
                f"head: expected {expected_anchors} anchors per location (the anchor generator's), got {k}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # --- the components' settings, read where they live ---

    min_size = property(lambda self: self.transform.min_size)
    max_size = property(lambda self: self.transform.max_size)
    image_size = property(lambda self: self.transform.image_size)
    size_divisible = property(lambda self: self.transform.size_divisible)
    image_mean = property(lambda self: self.transform.image_mean)
    image_std = property(lambda self: self.transform.image_std)
    object_threshold = property(lambda self: self.assigner.object_threshold)
    background_threshold = property(lambda self: self.assigner.background_threshold)
    low_quality = property(lambda self: self.assigner.low_quality)

    # --- pipeline ---

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> ImageBatch:
        """Images -> :class:`~fewsight.models.transform.ImageBatch` with this model's resizing and normalisation."""
        return self.transform(images)

    def anchors_for(self, feature_sizes: Sequence[tuple[int, int]], device: torch.device | None = None) -> Tensor:
        """``Tensor[A, 4]`` float32 anchors for the given per-level feature sizes (cached)."""
        return self.anchor_generator.grid_anchors(feature_sizes, torch.float32, device)

    def forward_head(self, images: Tensor | Sequence[Tensor]) -> HeadOutput:
        """Preprocess, backbone, head, anchors -> :class:`HeadOutput` (no loss, no post-processing)."""
        batch = self.preprocess(images)
        try:
            features = self.backbone(batch.tensor)
        except ValueError as e:
            # torch's BatchNorm refuses one value per channel in training (a single tiny image reaches
            # the deepest levels as 1x1): say what to change instead of torch's internal message.
            if "more than 1 value per channel" not in str(e):
                raise
            b, _, h, w = batch.tensor.shape
            raise InvalidArgumentError(
                f"images: expected a training batch whose deepest feature maps hold more than one value per channel, "
                f"got {b} image(s) of {h}x{w} px (after resizing); train with at least 2 images per batch, images "
                f"of at least 64 px, or frozen_bn=True"
            ) from e
        if len(features) != len(self.levels):
            raise ShapeError(f"backbone: expected {len(self.levels)} feature maps (levels {self.levels}), got {len(features)}")
        outputs = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        anchors, level_sizes = self._anchors_and_level_sizes(sizes, batch)
        self._check_head_outputs(outputs, batch.tensor.shape[0], anchors.shape[0])
        return HeadOutput(outputs, anchors, level_sizes, batch)

    def _anchors_and_level_sizes(self, sizes: list[tuple[int, int]], batch: ImageBatch) -> tuple[Tensor, list[int]]:
        """``Tensor[A, 4]`` anchors for the per-level feature ``sizes`` and the anchors per level."""
        k = self.anchor_generator.num_anchors_per_location
        return self.anchors_for(sizes, batch.tensor.device), [h * w * k for h, w in sizes]

    def _check_head_outputs(self, outputs: Mapping[str, Tensor], batch_size: int, num_anchors: int) -> None:
        for name, value in outputs.items():
            if value.ndim != 3 or value.shape[:2] != (batch_size, num_anchors):
                raise ShapeError(
                    f"head output {name!r}: expected Tensor[{batch_size}, {num_anchors}, ...] "
                    f"(one row per anchor), got shape {tuple(value.shape)}"
                )

    def prepare_targets(self, targets: Any, batch: ImageBatch) -> PaddedTargets:
        """Targets in input-image coordinates -> padded, scaled to the network input, labels checked."""
        return prepare_targets(
            targets, batch.tensor.shape[0], scales=batch.scales, num_classes=self.num_classes, device=batch.tensor.device
        )

    def assign(self, anchors: Tensor, targets: PaddedTargets) -> AnchorAssignment:
        """This model's matching (thresholds, low-quality matches) for a batch."""
        return self.assigner(anchors, targets)

    def _padded(self, targets: Any, outputs: Mapping[str, Tensor]) -> PaddedTargets:
        ref = next(iter(outputs.values()))
        return prepare_targets(targets, ref.shape[0], num_classes=self.num_classes, device=ref.device)

    def _box_term(self, deltas: Tensor, anchors: Tensor, targets: PaddedTargets, assignment: AnchorAssignment) -> Tensor:
        return detection_box_loss(
            deltas, anchors, targets, assignment, coder=self.coder, kind=self.box_loss, beta=self.smooth_l1_beta
        )

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Named losses from head outputs, anchors and targets in network coordinates."""
        raise NotImplementedError

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        """``Tensor[B, A, C]`` class probabilities from the head outputs."""
        raise NotImplementedError

    def losses(self, images: Tensor | Sequence[Tensor], targets: Any) -> dict[str, Tensor]:
        """Named losses for a batch (whatever the module's mode; BatchNorm follows the mode)."""
        out = self.forward_head(images)
        return self.compute_loss(out.outputs, out.anchors, self.prepare_targets(targets, out.batch))

    def postprocess(self, out: HeadOutput) -> list[dict[str, Tensor]]:
        """:class:`HeadOutput` -> per-image detections in the input images' coordinates."""
        return self.postprocessor(
            self.scores_from_outputs(out.outputs), out.outputs["bbox_regression"], out.anchors, out.level_sizes,
            out.batch, coder=self.coder,
        )

    def detect(self, images: Tensor | Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "scores", "labels"}`` (whatever the module's mode)."""
        return self.postprocess(self.forward_head(images))

    def forward(self, images: Tensor | Sequence[Tensor], targets: Any = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise InvalidArgumentError(
                    "targets: expected a list of {'boxes', 'labels'} dicts or Tensor[B, M, 5] in training mode, got None"
                )
            return self.losses(images, targets)
        return self.detect(images)

    # --- class names in the state_dict ---

    def get_extra_state(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "classes" not in state:
            raise CheckpointError(f"extra_state: expected a dict with 'classes', got {type(state).__name__}")
        names = state["classes"]
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"extra_state['classes']: expected a list of str, got {names!r}")
        self._check_loaded_classes(list(names))
        self.classes = list(names)

    def _check_loaded_classes(self, names: list[str]) -> None:
        if len(names) != self.num_classes:
            raise CheckpointError(
                f"state_dict: expected {self.num_classes} class names (this model's num_classes), got {len(names)}: "
                f"build the model with num_classes={len(names)}"
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, box_loss={self.box_loss!r}, "
            f"loss_weights={self.loss_weights}"
        )

def _postprocess_setting(name: str) -> property:
    def get(self: DenseDetector) -> Any:
        return getattr(self.postprocessor, name)

    def set_(self: DenseDetector, value: Any) -> None:
        setattr(self.postprocessor, name, value)

    return property(get, set_, doc=f"The post-processor's ``{name}`` (settable).")


for _name in _COMPONENT_OPTIONS["postprocessor"][1]:
    setattr(DenseDetector, _name, _postprocess_setting(_name))
del _name
