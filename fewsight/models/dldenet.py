"""DLDENet: a RetinaNet whose classification head emits directional embeddings (few-shot detection).

The classification subnet emits a ``D``-dim L2-normalised embedding ``e`` per anchor. Class ``c`` is a
direction ``mu_c`` on the sphere with a learnable scale ``w_c > 0`` and bias ``b_c``
(:class:`~fewsight.models.directions.DirectionalClassifier`); its calibrated probability is

    p_c(e) = sigmoid(w_c (cos(e, mu_c) + b_c)) / sigmoid(w_c (1 + b_c))          (so p in [0, 1], p(cos=1) = 1)

computed in log space by :mod:`fewsight.losses.directional`. Scoring by direction is what lets a class
be added from a few examples: its direction is their mean embedding, with no retraining.

Training loss (each term weighted by ``loss_weights`` and returned by name):

* ``"classification"``: focal loss (Lin et al. 2017) on these probabilities
  (:func:`~fewsight.losses.functional.directional_focal_loss`), normalised by the positive anchors of the batch;
* ``"box_regression"``: as RetinaNet;
* ``"ccs"``: CCS (Guo & Zhang 2017) between positive embeddings and their class directions, IoU-weighted;
* ``"dispersion"`` (``directions="learned"`` only, weight > 0): mean positive part of the cosine between
  different class directions (:func:`~fewsight.losses.functional.dispersion_loss`).

Class directions: ``directions="tracked"`` (default) keeps the means ``mu`` as a buffer updated
without gradient from the positive embeddings of the loss's own matching (``means_update="batch"``:
EMA per batch; ``"manual"``: accumulate, :meth:`DLDENet.update_means` at epoch end; ``"none"``: frozen);
``directions="learned"`` makes them a parameter (a cosine classifier). New classes are added without
gradient steps by :meth:`DLDENet.enroll` from a few boxed examples, optionally with a rivalry gate
(:func:`~fewsight.losses.functional.rival_log_gate`) against the classes the network was trained on.

Example:
    >>> import torch
    >>> from fewsight.models import DLDENet
    >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=32, embedding_dim=16)
    >>> images = torch.rand(1, 3, 96, 96)
    >>> targets = [{"boxes": torch.tensor([[20., 20., 70., 60.]]), "labels": torch.tensor([1])}]
    >>> sorted(model(images, targets))
    ['box_regression', 'ccs', 'classification']
    >>> support = [{"boxes": torch.tensor([[10., 30., 60., 90.]]), "labels": torch.tensor([0])}]
    >>> model.enroll(images, support, ["novel"]), model.classes
    ([2], ['0', '1', 'novel'])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import CheckpointError, InvalidArgumentError, ShapeError, check_choice, check_real
from fewsight.geometry import BACKGROUND
from fewsight.losses import check_focal_options
from fewsight.losses.functional import ccs_loss, directional_focal_loss, dispersion_loss
from fewsight.models.assignment import prepare_targets
from fewsight.models.detector import DenseDetector
from fewsight.models.directions import DIRECTIONS, DirectionalClassifier
from fewsight.models.heads import DLDENetHead, NormSpec

__all__ = ["DLDENet"]

MEANS_UPDATES = ("batch", "manual", "none")


class DLDENet(DenseDetector):
    """DLDENet detector: RetinaNet with a directional-embedding classification head.

    Args (the keywords of :class:`~fewsight.models.detector.DenseDetector` pass through, with the
    defaults and meaning given for :class:`~fewsight.models.RetinaNet`):
        num_classes: initial classes ``C`` (0 allowed: enroll every class later).
        embedding_dim: ``D`` (256).
        directions: ``"tracked"`` (means buffer, default) or ``"learned"`` (cosine classifier).
        means_update: ``"batch"`` (EMA with ``means_lr`` once per class per training batch),
            ``"manual"`` (accumulate; call :meth:`update_means` at epoch end) or ``"none"``.
        means_lr: EMA rate (0.1).
        init_scale, init_bias: initial ``w`` (7) and ``b`` (-0.5) of every class, enrolled ones too.
        ccs_iou_weighted: weight each positive's CCS term by its IoU (soft CCS).
        focal_alpha, focal_gamma: focal loss on the calibrated probabilities (0.25, 2).
        loss_weights: overrides of ``{"classification": 1, "box_regression": 1, "ccs": 1, "dispersion": 0}``;
            ``"dispersion"`` needs ``directions="learned"``. Returned losses are weighted; the
            dispersion term is returned only when its weight is > 0.
        head: module returning ``{"embeddings": [B, A, D], "bbox_regression": [B, A, 4]}``
            (default :class:`~fewsight.models.heads.DLDENetHead` with ``head_convs`` convs). The loss
            normalises the embeddings unless the head has ``normalized_embeddings = True``.
        head_norm: ``"group"`` by default (GroupNorm in the towers; ``None`` for the paper's plain
            RetinaNet towers): without it, ReLU features with a large common component make every
            anchor's initial embedding point the same way, and the tracked means chase that cluster
            for many more steps before classes separate.

    Means updates happen inside :meth:`compute_loss` when the module is in training mode, under
    ``no_grad``, out of place, from the positive anchors of the loss's own matching.

    Class names, directions, ``w`` and ``b`` travel in the ``state_dict``; loading a checkpoint with a
    different number of classes resizes the model.
    """

    spec_name = "dldenet"

    default_loss_weights = {"classification": 1.0, "box_regression": 1.0, "ccs": 1.0, "dispersion": 0.0}

    def __init__(
        self,
        num_classes: int,
        *,
        embedding_dim: int = 256,
        directions: str = "tracked",
        means_update: str = "batch",
        means_lr: float = 0.1,
        init_scale: float = 7.0,
        init_bias: float = -0.5,
        head: nn.Module | None = None,
        head_convs: int = 4,
        head_norm: NormSpec = "group",
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        ccs_iou_weighted: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, min_classes=0, **kwargs)
        check_choice("directions", directions, DIRECTIONS)
        check_choice("means_update", means_update, MEANS_UPDATES)
        if isinstance(means_lr, bool) or not isinstance(means_lr, (int, float)) or not 0.0 < means_lr <= 1.0:
            raise InvalidArgumentError(f"means_lr: expected a float in (0, 1], got {means_lr!r}")
        if directions != "learned" and self.loss_weights["dispersion"] > 0:
            raise InvalidArgumentError(
                f"loss_weights['dispersion']: expected 0 with directions={directions!r} (only 'learned' directions "
                f"move by gradient), got {self.loss_weights['dispersion']}"
            )
        self.directions = directions
        self.means_update = means_update
        self.means_lr = float(means_lr)
        self.focal_alpha = check_focal_options(focal_alpha, focal_gamma)
        self.focal_gamma = float(focal_gamma)
        self.ccs_iou_weighted = bool(ccs_iou_weighted)
        self.classifier = DirectionalClassifier(
            num_classes, embedding_dim, directions=directions, init_scale=init_scale, init_bias=init_bias
        )
        k = self.anchor_generator.num_anchors_per_location
        if head is None:
            head = DLDENetHead(self.in_channels, k, embedding_dim, num_convs=head_convs, norm=head_norm)
        elif not isinstance(head, nn.Module):
            raise InvalidArgumentError(f"head: expected an nn.Module or None, got {type(head).__name__}")
        self.head = head
        self._check_head(k)
        self.embedding_dim = embedding_dim
        self.register_load_state_dict_post_hook(DLDENet._check_after_load)

    # --- classes ---

    @property
    def num_classes(self) -> int:
        # During __init__ (before the classifier exists) the names are the truth.
        clf = self._modules.get("classifier")
        return len(self.classes) if clf is None else clf.num_classes

    def _check_loaded_classes(self, names: list[str]) -> None:
        pass  # the classifier is resized after the names are set; checked in _check_after_load

    @staticmethod
    def _check_after_load(module: DLDENet, incompatible_keys: Any) -> None:
        if len(module.classes) != module.classifier.num_classes:
            raise CheckpointError(
                f"state_dict: expected as many class names as class directions ({module.classifier.num_classes}), "
                f"got {len(module.classes)} names"
            )

    # --- losses ---

    def compute_loss(self, head_outputs: Mapping[str, Tensor], anchors: Tensor, targets: Any) -> dict[str, Tensor]:
        """Weighted ``{"classification", "box_regression", "ccs"[, "dispersion"]}`` from head outputs,
        ``Tensor[A, 4]`` anchors and targets in network coordinates. One batched match; in training
        mode it also updates the tracked means from the same positives."""
        embeddings = head_outputs["embeddings"]
        deltas = head_outputs["bbox_regression"]
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.classifier.embedding_dim:
            raise ShapeError(
                f"head_outputs['embeddings']: expected Tensor[B, A, {self.classifier.embedding_dim}], "
                f"got shape {tuple(embeddings.shape)}"
            )
        padded = self._padded(targets, head_outputs)
        assignment = self.assign(anchors, padded)
        clf = self.classifier
        cls = directional_focal_loss(
            embeddings, clf.directions(), clf.scale, clf.bias, assignment.labels, self.focal_alpha, self.focal_gamma,
            normalized=bool(getattr(self.head, "normalized_embeddings", False)), rivalry=clf.active_rivalry(),
        )
        num_pos = assignment.positive.sum().clamp(min=1)
        box = self._box_term(deltas, anchors, padded, assignment)
        image, anchor = assignment.positive.nonzero(as_tuple=True)
        pos_embeddings = embeddings[image, anchor]
        pos_labels = assignment.labels[image, anchor]
        ccs = ccs_loss(
            pos_embeddings,
            self.classifier.directions(),
            pos_labels,
            assignment.iou[image, anchor].detach().float() if self.ccs_iou_weighted else None,
            reduction="sum",
        )
        losses = {
            "classification": cls * self.loss_weights["classification"],
            "box_regression": box / num_pos.to(box.dtype) * self.loss_weights["box_regression"],
            "ccs": ccs / num_pos.to(ccs.dtype) * self.loss_weights["ccs"],
        }
        if self.directions == "learned" and self.loss_weights["dispersion"] > 0:
            losses["dispersion"] = dispersion_loss(self.classifier.weight) * self.loss_weights["dispersion"]
        if self.training and self.directions == "tracked":
            # After the loss graph is built: the update replaces the buffer, the graph keeps the old one.
            if self.means_update == "batch":
                self.classifier.update_means_ema(pos_embeddings.detach(), pos_labels, self.means_lr)
            elif self.means_update == "manual":
                self.classifier.accumulate(pos_embeddings.detach(), pos_labels)
        return losses

    def scores_from_outputs(self, head_outputs: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return self.classifier.probabilities(head_outputs["embeddings"].detach())

    def update_means(self, lr: float = 1.0) -> None:
        """``"manual"`` mode: set the class means from the sums accumulated since the last call (see
        :meth:`DirectionalClassifier.update_means`). Call it on every rank at the end of each epoch."""
        self.classifier.update_means(lr)

    # --- enrollment ---

    def _matched_embeddings(
        self, images: Tensor | Sequence[Tensor], targets: Any, num_labels: int, batch_size: int | None,
        background: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """Eval-mode forward over chunks of ``images``; yields per chunk the float32 embeddings
        ``Tensor[P, D]`` of the positive anchors (this model's matching), their labels ``Long[P]``, the
        global index ``Long[P]`` of the box each matched (boxes numbered image by image, in order) and,
        with ``background``, the embeddings ``Tensor[N, D]`` of the background anchors (else ``None``)."""
        num_images = images.shape[0] if isinstance(images, Tensor) else len(images)
        if len(targets) != num_images:
            raise ShapeError(f"targets: expected {num_images} entries (one per image), got {len(targets)}")
        step = max(num_images, 1) if batch_size is None else batch_size
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InvalidArgumentError(f"batch_size: expected None or an int >= 1, got {batch_size!r}")
        was_training = self.training
        self.eval()
        offset = 0
        try:
            for start in range(0, num_images, step):  # chunks of images, not single images
                chunk = targets[start : start + step]
                out = self.forward_head(images[start : start + step])
                padded = prepare_targets(
                    chunk, out.batch.tensor.shape[0], scales=out.batch.scales, num_classes=num_labels,
                    device=out.batch.tensor.device,
                )
                assignment = self.assign(out.anchors, padded)
                image, anchor = assignment.positive.nonzero(as_tuple=True)
                if isinstance(chunk, Tensor):  # padded Tensor[B, M, 5]: boxes numbered by row
                    counts = torch.full((chunk.shape[0],), chunk.shape[1], device=image.device)
                else:
                    counts = torch.tensor([len(t["boxes"]) for t in chunk], device=image.device, dtype=torch.long)
                first_box = torch.cumsum(counts, 0) - counts + offset
                offset += int(counts.sum())
                yield (
                    out.outputs["embeddings"][image, anchor].float(),
                    assignment.labels[image, anchor],
                    first_box[image] + assignment.matched[image, anchor],
                    out.outputs["embeddings"][assignment.labels == BACKGROUND].float() if background else None,
                )
        finally:
            self.train(was_training)

    @torch.no_grad()
    def embed_boxes(
        self, images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor], *, batch_size: int | None = None
    ) -> list[Tensor]:
        """The embedding of each given box: the normalised mean embedding of the anchors this model
        matches to it (the anchors :meth:`enroll` and training would use), for retrieval galleries and queries.

        Args:
            images: ``Tensor[B, 3, H, W]`` or a list of ``Tensor[3, H_i, W_i]`` floats in ``[0, 1]``.
            boxes: one ``Tensor[N_i, 4]`` (xyxy, input-image pixels) per image.
            batch_size: images per forward pass (default: all at once).

        Returns:
            One ``Tensor[N_i, D]`` float32 per image; a box that matches no anchor (degenerate, or outside
            the image) gets a zero row, whose cosine with anything is 0.

        Example:
            >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=32, embedding_dim=16)
            >>> [e.shape for e in model.embed_boxes(torch.rand(2, 3, 96, 96), [torch.tensor([[10., 10., 60., 50.]]), torch.zeros(0, 4)])]
            [torch.Size([1, 16]), torch.Size([0, 16])]
        """
        if len(boxes) != (images.shape[0] if isinstance(images, Tensor) else len(images)):
            raise ShapeError(f"boxes: expected one Tensor[N_i, 4] per image, got {len(boxes)} for {len(images)} images")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.ndim != 2 or b.shape[1] != 4:
                raise ShapeError(f"boxes[{i}]: expected Tensor[N, 4], got {getattr(b, 'shape', type(b).__name__)}")
        sizes = [int(b.shape[0]) for b in boxes]
        targets = [{"boxes": b, "labels": torch.zeros(n, dtype=torch.long, device=b.device)} for b, n in zip(boxes, sizes)]
        sums = torch.zeros(sum(sizes), self.classifier.embedding_dim, device=self.classifier.raw_scale.device)
        for emb, _, box, _ in self._matched_embeddings(images, targets, 1, batch_size):
            sums.index_add_(0, box, emb)
        return list(F.normalize(sums, dim=1, eps=1e-12).split(sizes))


    @torch.no_grad()
    def _calibrated_bias(self, images: Any, targets: Any, directions: Tensor, batch_size: int | None) -> Tensor:
        """``Tensor[n]`` biases ``b = -(mean positive cos + q_99.9 background cos) / 2`` of new directions."""
        n = directions.shape[0]
        pos_sum = torch.zeros(n, device=directions.device)
        pos_count = torch.zeros(n, device=directions.device)
        background = []

        def new_cos(emb: Tensor) -> Tensor:  # Tensor[P, n]: cosines with the new directions
            return F.normalize(emb, dim=1, eps=1e-12) @ directions.T

        for emb, lab, _, bg in self._matched_embeddings(images, targets, n, batch_size, background=True):
            cos = new_cos(emb).gather(1, lab[:, None]).squeeze(1)
            pos_sum.index_add_(0, lab, cos)
            pos_count.index_add_(0, lab, torch.ones_like(cos))
            background.append(new_cos(bg))
        bg_cos = torch.cat(background) if background else directions.new_zeros(0, n)
        if bg_cos.shape[0]:  # kthvalue, not quantile: quantile refuses inputs above 2^24 elements
            q = bg_cos.kthvalue(max(1, math.ceil(0.999 * bg_cos.shape[0])), dim=0).values
        else:
            q = directions.new_full((n,), -1.0)
        return -(pos_sum / pos_count.clamp(min=1) + q) / 2

    @torch.no_grad()
    def enroll(
        self,
        images: Tensor | Sequence[Tensor],
        targets: Any,
        names: Sequence[str],
        *,
        batch_size: int | None = None,
        calibrate: bool = False,
        rivalry: float = 0.0,
    ) -> list[int]:
        """Add classes from a few boxed examples, without gradient steps.

        The direction of new class ``names[j]`` is the normalised mean of the embeddings of the
        anchors matched (same thresholds and low-quality rule as training) to the boxes labelled ``j``
        in ``targets``; its ``w`` and ``b`` are the defaults. The model runs in eval mode (BatchNorm
        statistics untouched); its mode is restored afterwards.

        This is the plain operation, each option off unless asked for. The product's enrollment —
        :func:`fewsight.fewshot.enroll` with :class:`fewsight.fewshot.EnrollSettings`, used by the
        command line — turns calibration and rivalry on by default.

        Args:
            images: the support images (``Tensor[B, 3, H, W]`` or a list), floats in ``[0, 1]``.
            targets: one per image, labels index ``names`` (``< 0``: ignored).
            names: the new class names (unique, not already in :attr:`classes`).
            batch_size: process the support set in chunks of this many images (default: at once).
            calibrate: instead of the default ``b``, set each new class's bias from the support images
                (:meth:`_calibrated_bias`): its threshold ``-b`` halfway between the mean cosine of its
                positive anchors and the 99.9th percentile over the support images' background anchors,
                so a direction that lies near background cannot flood every image with detections.
            rivalry: ``r >= 0`` of the new classes: multiply their probability by
                ``sigmoid(r (cos - best cos of a trained class))`` (:func:`rival_log_gate`; ``0``: no gate).
                A network trained on few classes embeds a new class near mixtures of them, whose objects
                the plain probability then ranks high for the new class; the gate ranks them by their
                margin over the best trained class instead.

        Returns:
            The indices of the new classes.

        Raises:
            InvalidArgumentError: duplicate names, or a name with no matched anchor. LabelError: a
            label ``>= len(names)``.
        """
        if isinstance(names, (str, bytes)):
            # list("dog") would enroll three classes "d", "o", "g".
            raise InvalidArgumentError(f"names: expected a list of class names, got the string {names!r} (write [{names!r}])")
        rivalry = check_real("rivalry", rivalry, low=0)
        names = list(names)
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentError(f"names: expected a non-empty list of str, got {names!r}")
        clash = sorted(set(names) & set(self.classes)) + sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise InvalidArgumentError(f"names: expected new, unique class names, got duplicates {clash}")
        n = len(names)
        device = self.classifier.raw_scale.device
        sums = torch.zeros(n, self.classifier.embedding_dim, device=device)
        counts = torch.zeros(n, dtype=torch.long, device=device)
        for emb, lab, _, _ in self._matched_embeddings(images, targets, n, batch_size):
            sums.index_add_(0, lab, emb)
            counts += torch.bincount(lab, minlength=n)
        missing = [names[i] for i in (counts == 0).nonzero().flatten().tolist()]
        if missing:
            raise InvalidArgumentError(
                f"targets: expected at least one box matching an anchor for every new class, got none for {missing} "
                "(labels index `names`)"
            )
        if not float(rivalry) >= 0:
            raise InvalidArgumentError(f"rivalry: expected a float >= 0, got {rivalry!r}")
        bias = None
        if calibrate:
            bias = self._calibrated_bias(images, targets, F.normalize(sums, dim=1, eps=1e-12), batch_size)
        first = self.num_classes
        self.classifier.add_classes(sums, rivalry=float(rivalry))
        if bias is not None:
            with torch.no_grad():
                self.classifier.bias[first:] = bias.to(self.classifier.bias)
        self.classes.extend(names)
        return list(range(first, first + n))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", directions={self.directions!r}, means_update={self.means_update!r}"
