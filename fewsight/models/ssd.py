"""SSD (Liu et al. 2016, "SSD: Single Shot MultiBox Detector") on a fewsight backbone + FPN.

The feature maps are the FPN levels (default P3-P7: for a 300x300 input exactly SSD300's first five
maps, 38, 19, 10, 5, 3). Every level has its own 3x3 conv predicting, per default box of each location,
``C + 1`` class logits (index 0 = background, internal only) and 4 SSD-coded deltas (variances 0.1,
0.2). Default boxes come from :func:`fewsight.geometry.default_boxes` for the *actual* feature sizes of
the network input, so any input size works. Training uses the MultiBox loss
(:func:`fewsight.losses.multibox.multibox_loss`):

    L = mean_i [((2 - alpha) L_loc_i + alpha L_cls_i) / max(1, N_i)]          (Liu et al. 2016, Eq. 1)

returned as ``{"classification": alpha * L_cls, "box_regression": (2 - alpha) * L_loc}`` (their sum is
the total). Inference: softmax over ``C + 1``, background dropped, then the shared post-processing of
:func:`fewsight.models.postprocess.postprocess_detections` (score threshold, per-level top-k, one batched
class-wise NMS, boxes in the original image coordinates). Labels are always ``0 .. C-1``.

Example:
    >>> import torch
    >>> from fewsight.models import SSD
    >>> model = SSD(3, levels=(3, 4, 5), fpn_channels=32, image_size=(128, 128))
    >>> images = torch.rand(2, 3, 97, 131)
    >>> targets = [{"boxes": torch.tensor([[10., 12., 50., 60.]]), "labels": torch.tensor([1])},
    ...            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    >>> sorted(model(images, targets))
    ['box_regression', 'classification']
    >>> _ = model.eval()
    >>> sorted(model(images)[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.geometry import SSD300_ASPECT_RATIOS, BoxCoder, PaddedTargets, default_boxes, feature_size
from fewsight.losses import check_multibox_options
from fewsight.losses.functional import multibox_loss
from fewsight.models.assignment import AnchorAssigner
from fewsight.models.detector import _DEFAULT_LEVELS, DenseDetector
from fewsight.models.transform import ImageBatch

__all__ = ["SSD", "DefaultBoxGenerator", "SSDHead", "ssd_loss"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
    return value


# --- default boxes ----------------------------------------------------------------------------------


class DefaultBoxGenerator:
    """SSD default boxes for pyramid levels of any input size (a cached :func:`default_boxes` wrapper).

    Level ``k`` of ``m`` has scale ``s_k = min_scale + (max_scale - min_scale) k / (m - 1)`` (or
    ``scales[k]``), boxes ``s_k`` and ``sqrt(s_k s_{k+1})`` of ratio 1 plus ``(s_k sqrt(r), s_k / sqrt(r))``
    and its transpose per ratio ``r`` (Liu et al. 2016, Sec. 2.2), relative to the network input size.

    Args:
        levels: pyramid levels (stride ``2**l``).
        min_scale, max_scale: SSD's ``s_min``, ``s_max`` (0.2, 0.9).
        scales: explicit ``m + 1`` scales instead (e.g. torchvision SSD300's
            ``(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)``).
        aspect_ratios: per level a sequence of ratios ``> 0``, or one flat sequence for every level;
            default SSD300's per-level ratios ``((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))`` truncated to
            ``m`` levels.
        steps: per level the centre spacing in pixels; default ``W / w_k`` and ``H / h_k`` (the paper's
            ``(j + 0.5) / |f_k|``).
        clip: clip the boxes to the image (SSD's default).

    Order: level, row, column, then per location ``[s_k, sqrt(s_k s_k+1), ratio pairs...]``, the order of
    :class:`SSDHead`'s flattened outputs.

    Example:
        >>> gen = DefaultBoxGenerator((3, 4, 5, 6, 7))
        >>> gen.num_boxes_per_level
        (4, 6, 6, 6, 4)
        >>> gen((300, 300)).shape          # 38^2*4 + 19^2*6 + 10^2*6 + 5^2*6 + 3^2*4
        torch.Size([8728, 4])
    """

    def __init__(
        self,
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        *,
        min_scale: float = 0.2,
        max_scale: float = 0.9,
        scales: Sequence[float] | None = None,
        aspect_ratios: Sequence[float] | Sequence[Sequence[float]] | None = None,
        steps: Sequence[float] | None = None,
        clip: bool = True,
    ) -> None:
        try:
            self.levels = tuple(int(v) for v in levels)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"levels: expected a sequence of ints, got {levels!r}") from None
        if not self.levels or min(self.levels) < 0:
            raise InvalidArgumentError(f"levels: expected a non-empty sequence of levels >= 0, got {levels!r}")
        m = len(self.levels)
        self.strides = tuple(2**lv for lv in self.levels)
        if not 0.0 < float(min_scale) <= float(max_scale):
            raise InvalidArgumentError(
                f"min_scale, max_scale: expected 0 < min_scale <= max_scale, got {min_scale!r}, {max_scale!r}"
            )
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        if scales is not None:
            scales = tuple(float(s) for s in scales)
            if len(scales) != m + 1 or min(scales) <= 0:
                raise InvalidArgumentError(
                    f"scales: expected {m + 1} positive values (one per level plus one), got {scales}"
                )
        self.scales = scales
        if aspect_ratios is None:
            ratios = tuple(SSD300_ASPECT_RATIOS[min(k, len(SSD300_ASPECT_RATIOS) - 1)] for k in range(m))
        elif len(aspect_ratios) > 0 and all(isinstance(r, (int, float)) for r in aspect_ratios):
            ratios = (tuple(aspect_ratios),) * m  # type: ignore[arg-type]
        else:
            ratios = tuple(tuple(r) for r in aspect_ratios)  # type: ignore[union-attr]
        ratios = tuple(tuple(float(r) for r in level) for level in ratios)
        if len(ratios) != m or any(r <= 0 for level in ratios for r in level):
            raise InvalidArgumentError(
                f"aspect_ratios: expected {m} sequences of positive ratios (one per level) or one flat "
                f"sequence, got {aspect_ratios!r}"
            )
        self.aspect_ratios = ratios
        if steps is not None:
            steps = tuple(float(s) for s in steps)
            if len(steps) != m or min(steps) <= 0:
                raise InvalidArgumentError(f"steps: expected {m} positive values (one per level), got {steps}")
        self.steps = steps
        self.clip = bool(clip)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_boxes_per_level(self) -> tuple[int, ...]:
        """Default boxes per location of each level: ``2 + 2 * len(ratios)``."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    def feature_sizes(self, image_size: Sequence[int]) -> list[tuple[int, int]]:
        """``(ceil(H / s), ceil(W / s))`` per level, the fewsight backbones' exact sizes."""
        h, w = (int(v) for v in image_size)
        return [feature_size((h, w), s) for s in self.strides]

    def num_anchors(self, image_size: Sequence[int]) -> int:
        return sum(h * w * k for (h, w), k in zip(self.feature_sizes(image_size), self.num_boxes_per_level))

    def grid_anchors(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        image_size: Sequence[int],
    ) -> Tensor:
        """Default boxes for explicit per-level feature sizes of an ``image_size = (H, W)`` input
        -> ``Tensor[sum_k h_k w_k K_k, 4]`` xyxy pixels (cached; a fresh copy is returned)."""
        if len(feature_sizes) != len(self.levels):
            raise InvalidArgumentError(
                f"feature_sizes: expected {len(self.levels)} sizes (one per level), got {len(feature_sizes)}"
            )
        size = (int(image_size[0]), int(image_size[1]))
        fs = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (size, fs, dtype, None if device is None else torch.device(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = default_boxes(
                size,
                fs,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                scales=self.scales,
                aspect_ratios=self.aspect_ratios,
                steps=self.steps,
                clip=self.clip,
                dtype=dtype,
                device=device,
            )
            if len(self._cache) > 16:  # a run sees a handful of input sizes
                self._cache.clear()
            self._cache[key] = cached
        return cached.clone()

    def __call__(
        self, image_size: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """Default boxes of an ``(H, W)`` network input -> ``Tensor[A, 4]``."""
        return self.grid_anchors(self.feature_sizes(image_size), dtype, device, image_size=image_size)

    def __repr__(self) -> str:
        scales = self.scales if self.scales is not None else f"{self.min_scale}..{self.max_scale}"
        return (
            f"DefaultBoxGenerator(levels={self.levels}, scales={scales}, aspect_ratios={self.aspect_ratios}, "
            f"steps={self.steps}, clip={self.clip})"
        )


# --- head ---------------------------------------------------------------------------------------------


class SSDHead(nn.Module):
    """One 3x3 conv per level for class logits and one for box deltas (Liu et al. 2016, Fig. 2).

    ``logits_k = conv3x3_k(P_k) -> [B, K_k (C + 1), h_k, w_k]`` flattened to ``[B, h_k w_k K_k, C + 1]``
    (order row, column, box), then concatenated over levels; index 0 is the background logit.
    Xavier-uniform weights and zero biases, as torchvision's SSD.

    Args:
        in_channels: channels of every level (an int) or one per level.
        num_boxes: default boxes per location, one per level.
        num_classes: ``C`` object classes (the head predicts ``C + 1``).

    Shapes:
        forward(``[Tensor[B, in_channels_k, h_k, w_k]]``) -> ``{"cls_logits": Tensor[B, A, C + 1],
        "bbox_regression": Tensor[B, A, 4]}`` with ``A = sum_k h_k w_k K_k``.

    Example:
        >>> head = SSDHead(8, (4, 6), num_classes=2)
        >>> out = head([torch.rand(1, 8, 4, 4), torch.rand(1, 8, 2, 2)])
        >>> tuple(out["cls_logits"].shape), tuple(out["bbox_regression"].shape)
        ((1, 88, 3), (1, 88, 4))
    """

    def __init__(self, in_channels: int | Sequence[int], num_boxes: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.num_boxes = tuple(_positive_int("num_boxes", k) for k in num_boxes)
        if not self.num_boxes:
            raise InvalidArgumentError("num_boxes: expected one count per level, got none")
        channels = [in_channels] * len(self.num_boxes) if isinstance(in_channels, int) else list(in_channels)
        if len(channels) != len(self.num_boxes):
            raise InvalidArgumentError(
                f"in_channels: expected an int or {len(self.num_boxes)} values (one per level), got {in_channels!r}"
            )
        self.in_channels = tuple(_positive_int("in_channels", c) for c in channels)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.cls_convs = nn.ModuleList(
            nn.Conv2d(c, k * (num_classes + 1), 3, padding=1) for c, k in zip(self.in_channels, self.num_boxes)
        )
        self.box_convs = nn.ModuleList(nn.Conv2d(c, k * 4, 3, padding=1) for c, k in zip(self.in_channels, self.num_boxes))
        for conv in [*self.cls_convs, *self.box_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    @staticmethod
    def _flatten(y: Tensor, k: int) -> Tensor:
        b, c, h, w = y.shape
        # Channel k_i * O + o is output o of box k_i: [B, h, w, K * O] flattens to (row, col, box).
        return y.permute(0, 2, 3, 1).reshape(b, h * w * k, c // k)

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        if len(features) != len(self.num_boxes):
            raise ShapeError(f"features: expected {len(self.num_boxes)} levels, got {len(features)}")
        cls, box = [], []
        for i, (x, k) in enumerate(zip(features, self.num_boxes)):
            if x.ndim != 4 or x.shape[1] != self.in_channels[i]:
                raise ShapeError(
                    f"features[{i}]: expected Tensor[B, {self.in_channels[i]}, H, W], got shape {tuple(x.shape)}"
                )
            cls.append(self._flatten(self.cls_convs[i](x), k))
            box.append(self._flatten(self.box_convs[i](x), k))
        return {"cls_logits": torch.cat(cls, dim=1), "bbox_regression": torch.cat(box, dim=1)}

    def extra_repr(self) -> str:
        return f"num_boxes={self.num_boxes}, num_classes={self.num_classes}"


# --- loss ----------------------------------------------------------------------------------------------


def _as_padded_tensor(targets: PaddedTargets) -> Tensor:
    """:class:`PaddedTargets` -> ``Tensor[B, G, 5]`` with label ``-1`` on invalid rows."""
    labels = torch.where(targets.valid, targets.labels, torch.full_like(targets.labels, -1))
    return torch.cat((targets.boxes, labels.to(targets.boxes.dtype).unsqueeze(-1)), dim=-1)


def ssd_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    default_boxes: Tensor,
    targets: Any,
    *,
    coder: BoxCoder | None = None,
    iou_threshold: float = 0.5,
    neg_pos_ratio: float = 3.0,
    alpha: float = 1.0,
    min_negatives: int = 0,
    smooth_l1_beta: float = 1.0,
) -> dict[str, Tensor]:
    """SSD's named losses from head outputs: ``{"classification": alpha * L_cls, "box_regression":
    (2 - alpha) * L_loc}`` of :func:`~fewsight.losses.multibox.multibox_loss` (their sum is its ``"loss"``).

    ``L = mean_i [((2 - alpha) L_loc_i + alpha L_cls_i) / max(1, N_i)]`` (Liu et al. 2016, Eq. 1).

    Args:
        cls_logits: ``Tensor[B, A, C + 1]`` (index 0 background); bbox_regression: ``Tensor[B, A, 4]``;
        default_boxes: ``Tensor[A, 4]``; targets: list of ``{"boxes", "labels"}``, padded
        ``Tensor[B, M, 5]`` or :class:`~fewsight.geometry.PaddedTargets`, labels ``0 .. C-1``.
        Target boxes with an unknown label (``< 0``) are dropped before matching (MultiBox has no
        ignore state).

    Example:
        >>> priors = torch.tensor([[0., 0., 10., 10.], [10., 0., 20., 10.]])
        >>> t = [{"boxes": torch.tensor([[0., 0., 10., 9.]]), "labels": torch.tensor([0])}]
        >>> out = ssd_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 4), priors, t)
        >>> sorted(out), round(sum(out.values()).item(), 4)
        (['box_regression', 'classification'], 1.6501)
    """
    if isinstance(targets, PaddedTargets):
        targets = _as_padded_tensor(targets)
    out = multibox_loss(
        cls_logits,
        bbox_regression,
        default_boxes,
        targets,
        iou_threshold=iou_threshold,
        neg_pos_ratio=neg_pos_ratio,
        alpha=alpha,
        min_negatives=min_negatives,
        beta=smooth_l1_beta,
        coder=coder,
    )
    return {"classification": alpha * out["loss_cls"], "box_regression": (2.0 - alpha) * out["loss_loc"]}


# --- model -----------------------------------------------------------------------------------------------


class SSD(DenseDetector):
    """SSD detector (Liu et al. 2016) on a fewsight backbone + FPN.

    Args:
        num_classes: ``C`` object classes (no background class in the public API).
        min_scale, max_scale, scales, aspect_ratios, steps, clip_default_boxes: default boxes (see
            :class:`DefaultBoxGenerator`); or inject ``default_box_generator``.
        head: module mapping the level features to ``{"cls_logits": [B, A, C + 1], "bbox_regression":
            [B, A, 4]}`` (index 0 = background); default :class:`SSDHead`.
        iou_threshold, neg_pos_ratio, alpha, min_negatives: MultiBox loss (0.5, 3, 1, 0), with the base's
            ``smooth_l1_beta`` (default 1.0 here); ``loss_weights`` further scales
            ``{"classification", "box_regression"}``.
        **kwargs: the keywords of :class:`~fewsight.models.detector.DenseDetector` (as
            :class:`~fewsight.models.RetinaNet`: ``backbone``, ``weights``, ``levels``, ``fpn_channels``, ...,
            ``loss_weights``, ``class_names``, the transform and post-processing options), with SSD's
            defaults (:attr:`default_options`): ``image_size=(300, 300)`` (every image resized to it, aspect
            not kept, as torchvision's SSD300; ``None`` keeps the input size -- default boxes follow the
            actual feature sizes -- or use ``min_size`` / ``max_size`` with ``image_size=None``);
            ``score_threshold``, ``topk_per_level``, ``nms_threshold``, ``detections_per_image`` 0.01, 400,
            0.45, 200 (torchvision's SSD values; the top-k is per level over all classes); ``coder``
            ``BoxCoder.from_variances((0.1, 0.2))``.

    Shapes:
        train: ``model(images, targets) -> {"classification": Tensor[], "box_regression": Tensor[]}``;
        eval: ``model(images) -> [{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Long[K]}]``
        in the input images' coordinates, labels in ``0 .. C-1``.
    """

    spec_name = "ssd"

    default_loss_weights = {"classification": 1.0, "box_regression": 1.0}
    default_options = {
        "image_size": (300, 300),
        "score_threshold": 0.01,
        "topk_per_level": 400,
        "nms_threshold": 0.45,
        "detections_per_image": 200,
    }

    def __init__(
        self,
        num_classes: int,
        *,
        min_scale: float = 0.2,
        max_scale: float = 0.9,
        scales: Sequence[float] | None = None,
        aspect_ratios: Sequence[float] | Sequence[Sequence[float]] | None = None,
        steps: Sequence[float] | None = None,
        clip_default_boxes: bool = True,
        default_box_generator: DefaultBoxGenerator | None = None,
        head: nn.Module | None = None,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        alpha: float = 1.0,
        min_negatives: int = 0,
        **kwargs: Any,
    ) -> None:
        smooth_l1_beta = kwargs.setdefault("smooth_l1_beta", 1.0)  # SSD's smooth-L1 is the plain one
        check_multibox_options(iou_threshold, neg_pos_ratio, alpha, min_negatives, smooth_l1_beta)
        levels = kwargs.get("levels", _DEFAULT_LEVELS)
        backbone = kwargs.get("backbone")
        if isinstance(backbone, nn.Module) and getattr(backbone, "levels", None) is not None:
            levels = tuple(int(v) for v in backbone.levels)  # the base class checks the rest
        if default_box_generator is None:
            default_box_generator = DefaultBoxGenerator(
                levels, min_scale=min_scale, max_scale=max_scale, scales=scales, aspect_ratios=aspect_ratios,
                steps=steps, clip=clip_default_boxes,
            )
        elif not isinstance(default_box_generator, DefaultBoxGenerator):
            raise InvalidArgumentError(
                f"default_box_generator: expected a DefaultBoxGenerator or None, got {type(default_box_generator).__name__}"
            )
        if kwargs.get("coder") is None:
            kwargs["coder"] = BoxCoder.from_variances((0.1, 0.2))
        super().__init__(
            num_classes,
            anchor_generator=default_box_generator,  # type: ignore[arg-type]
            # The MultiBox loss matches by itself; this matching (thresholds at iou_threshold, no
            # low-quality rule) serves callers of assign() such as embedding or enrollment code.
            assigner=AnchorAssigner(object_threshold=iou_threshold, background_threshold=iou_threshold, low_quality=False),
            box_loss="smooth_l1",
            **kwargs,
        )
        self.iou_threshold = float(iou_threshold)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.alpha = float(alpha)
        self.min_negatives = int(min_negatives)
        k = default_box_generator.num_boxes_per_level
        if head is None:
            head = SSDHead(self.in_channels, k, self.num_classes)
        elif not isinstance(head, nn.Module):
            raise InvalidArgumentError(f"head: expected an nn.Module or None, got {type(head).__name__}")
        own = getattr(head, "num_boxes", None)
        if own is not None and tuple(own) != k:
            raise InvalidArgumentError(
                f"head: expected {k} default boxes per location per level (the default box generator's), got {tuple(own)}"
            )
        self.head = head

    @property
    def default_box_generator(self) -> DefaultBoxGenerator:
        return self.anchor_generator  # type: ignore[return-value]

    def anchors_for(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device | None = None,
        *,
        image_size: Sequence[int] | None = None,
    ) -> Tensor:
        """``Tensor[A, 4]`` float32 default boxes for the per-level feature sizes of an ``image_size``
        network input (SSD's boxes are relative to the input size, so it is required)."""
        if image_size is None:
            raise InvalidArgumentError("image_size: expected the (H, W) of the network input for SSD default boxes, got None")
        return self.default_box_generator.grid_anchors(feature_sizes, torch.float32, device, image_size=image_size)

    def _anchors_and_level_sizes(self, sizes: list[tuple[int, int]], batch: ImageBatch) -> tuple[Tensor, list[int]]:
        anchors = self.anchors_for(sizes, batch.tensor.device, image_size=batch.tensor.shape[-2:])
        return anchors, [h * w * k for (h, w), k in zip(sizes, self.default_box_generator.num_boxes_per_level)]

    def _check_head_outputs(self, outputs: Mapping[str, Tensor], batch_size: int, num_anchors: int) -> None:
        super()._check_head_outputs(outputs, batch_size, num_anchors)
        logits = outputs["cls_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ShapeError(
                f"head output 'cls_logits': expected Tensor[B, A, {self.num_classes + 1}] (C + 1, index 0 background), "
                f"got shape {tuple(logits.shape)}"
            )

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Weighted ``{"classification", "box_regression"}`` (see :func:`ssd_loss`) from head outputs,
        ``Tensor[A, 4]`` default boxes and targets in network coordinates."""
        losses = ssd_loss(
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            anchors,
            targets,
            coder=self.coder,
            iou_threshold=self.iou_threshold,
            neg_pos_ratio=self.neg_pos_ratio,
            alpha=self.alpha,
            min_negatives=self.min_negatives,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {name: value * self.loss_weights[name] for name, value in losses.items()}

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        """Softmax over ``C + 1`` with the background column dropped -> ``Tensor[B, A, C]``."""
        return F.softmax(head_outputs["cls_logits"].detach().float(), dim=-1)[..., 1:]

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, levels={self.levels}, iou_threshold={self.iou_threshold}, "
            f"neg_pos_ratio={self.neg_pos_ratio}, alpha={self.alpha}, min_negatives={self.min_negatives}"
        )

