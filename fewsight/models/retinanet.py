"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection").

Backbone + FPN (P3-P7), 9 anchors per location, a classification and a box subnet shared across
levels, sigmoid focal loss + smooth-L1 (or L1 / GIoU) box regression:

    L = FL(p, y) / N_pos + sum_{a positive} l_box(d_a, t_a) / N_pos     (N_pos over the whole batch, >= 1)

Everything in the loss is batched: one :func:`fewsight.geometry.match` call for the batch, the focal
loss over ``[B, A, C]`` without one-hot targets, the box loss over the gathered positive anchors.
Inference: per-level top-k over ``[B, A_l * C]``, decoding, one ``batched_nms`` for the whole batch.

Example:
    >>> import torch
    >>> from fewsight.models import RetinaNet
    >>> model = RetinaNet(3, levels=(3, 4, 5), fpn_channels=32)
    >>> images = torch.rand(2, 3, 96, 80)
    >>> targets = [{"boxes": torch.tensor([[10., 12., 50., 60.]]), "labels": torch.tensor([1])},
    ...            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    >>> sorted(model(images, targets))
    ['box_regression', 'classification']
    >>> _ = model.eval()
    >>> sorted(model(images)[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError
from fewsight.geometry import BoxCoder
from fewsight.losses import check_focal_options
from fewsight.losses.functional import focal_loss_detection
from fewsight.models.assignment import assign_anchors, detection_box_loss, prepare_targets
from fewsight.models.detector import DenseDetector
from fewsight.models.heads import NormSpec, RetinaNetHead

__all__ = ["RetinaNet", "retinanet_loss"]


def retinanet_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    targets: Any,
    *,
    coder: BoxCoder | None = None,
    object_threshold: float = 0.5,
    background_threshold: float = 0.4,
    low_quality: bool = True,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 0.11,
) -> dict[str, Tensor]:
    """RetinaNet losses of a batch from its head outputs (Lin et al. 2017, Sec. 4):
    ``{"classification": FL / N_pos, "box_regression": sum l_box / N_pos}``, ``N_pos = max(1, #positive anchors)``.

    Args:
        cls_logits: ``Tensor[B, A, C]``; bbox_regression: ``Tensor[B, A, 4]``; anchors: ``Tensor[A, 4]``.
        targets: list of ``{"boxes", "labels"}``, padded ``Tensor[B, M, 5]`` or
            :class:`~fewsight.geometry.PaddedTargets`, in the anchors' coordinates.
        coder: box coder (default ``BoxCoder((1, 1, 1, 1))``); object/background thresholds and
            ``low_quality``: matching; alpha, gamma: focal; box_loss: ``"smooth_l1"``, ``"l1"``, ``"giou"``.

    Example:
        >>> a = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
        >>> t = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0])}]
        >>> out = retinanet_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 4), a, t)
        >>> round(out["classification"].item(), 4), out["box_regression"].item()
        (0.4332, 0.0)
    """
    coder = coder if coder is not None else BoxCoder()
    padded = prepare_targets(targets, cls_logits.shape[0], num_classes=cls_logits.shape[-1], device=cls_logits.device)
    assignment = assign_anchors(
        anchors, padded, object_threshold=object_threshold, background_threshold=background_threshold,
        low_quality=low_quality,
    )
    cls = focal_loss_detection(cls_logits, assignment.labels, alpha, gamma, fused=True)
    num_pos = assignment.positive.sum().clamp(min=1)
    box = detection_box_loss(
        bbox_regression, anchors, padded, assignment, coder=coder, kind=box_loss, beta=smooth_l1_beta
    )
    return {"classification": cls, "box_regression": box / num_pos.to(box.dtype)}


class RetinaNet(DenseDetector):
    """RetinaNet detector (Lin et al. 2017) on a fewsight backbone + FPN.

    Args:
        num_classes: ``C`` object classes (no background class).
        head: module mapping the level features to ``{"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}``;
            default :class:`~fewsight.models.heads.RetinaNetHead` with ``head_convs`` convs,
            ``head_norm`` (None or ``"group"``) and ``prior_probability``.
        focal_alpha, focal_gamma: focal loss (0.25, 2).
        **kwargs: the keywords of :class:`~fewsight.models.detector.DenseDetector`, with its defaults:
            ``backbone`` (``"resnet18"``: a name of :data:`fewsight.models.BACKBONES` or a module from
            :func:`~fewsight.models.build_backbone`), ``weights``, ``levels`` (P3-P7), ``fpn_channels``
            (256), ``frozen_bn``, ``trainable_layers``, ``p6_from``; ``anchor_generator`` (sizes 32-512,
            3 scales, 3 ratios); ``coder`` (``BoxCoder((1, 1, 1, 1))`` as torchvision's RetinaNet);
            ``box_loss`` (``"smooth_l1"`` with ``smooth_l1_beta`` 0.11 as Detectron's RetinaNet, ``"l1"`` as
            torchvision's, or ``"giou"``); ``loss_weights`` (``{"classification": 1.0, "box_regression": 1.0}``
            overrides; the returned losses are weighted); ``class_names`` (stored in the ``state_dict``);
            the components ``transform`` / ``assigner`` / ``postprocessor`` or their options: resizing
            ``min_size``, ``max_size``, ``image_size``, ``size_divisible`` (default none), normalisation
            ``image_mean``, ``image_std`` (ImageNet), matching ``object_threshold``, ``background_threshold``,
            ``low_quality`` (0.5, 0.4, True), inference ``score_threshold``, ``topk_per_level``,
            ``nms_threshold``, ``detections_per_image`` (0.05, 1000, 0.5, 100 as torchvision).

    Shapes:
        train: ``model(images, targets) -> {"classification": Tensor[], "box_regression": Tensor[]}``;
        eval: ``model(images) -> [{"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Long[K]}]``.
        ``images``: ``Tensor[B, 3, H, W]`` or list of ``Tensor[3, H_i, W_i]`` in ``[0, 1]``;
        ``targets``: list of ``{"boxes": Tensor[N, 4], "labels": Long[N]}`` or ``Tensor[B, M, 5]``.
    """

    spec_name = "retinanet"

    default_loss_weights = {"classification": 1.0, "box_regression": 1.0}

    def __init__(
        self,
        num_classes: int,
        *,
        head: nn.Module | None = None,
        head_convs: int = 4,
        head_norm: NormSpec = None,
        prior_probability: float = 0.01,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, **kwargs)
        self.focal_alpha = check_focal_options(focal_alpha, focal_gamma)
        self.focal_gamma = float(focal_gamma)
        k = self.anchor_generator.num_anchors_per_location
        if head is None:
            head = RetinaNetHead(
                self.in_channels, k, self.num_classes, num_convs=head_convs, norm=head_norm,
                prior_probability=prior_probability,
            )
        elif not isinstance(head, nn.Module):
            raise InvalidArgumentError(f"head: expected an nn.Module or None, got {type(head).__name__}")
        self.head = head
        self._check_head(k)

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Weighted ``{"classification", "box_regression"}`` from head outputs, ``Tensor[A, 4]`` anchors and
        targets in network coordinates (one batched match; see :func:`retinanet_loss`)."""
        losses = retinanet_loss(
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            anchors,
            targets,
            coder=self.coder,
            object_threshold=self.object_threshold,
            background_threshold=self.background_threshold,
            low_quality=self.low_quality,
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            box_loss=self.box_loss,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {name: value * self.loss_weights[name] for name, value in losses.items()}

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        return torch.sigmoid(head_outputs["cls_logits"].detach().float())
