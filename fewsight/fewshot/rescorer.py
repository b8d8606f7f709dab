"""Few-shot classes scored on box crops by a second network: a detector proposes, a :class:`CropEmbedder`
recognises.

:class:`CropRescorer` wraps a trained detector (DLDENet). Its base classes keep the detector's own
detections. A class enrolled through the wrapper gets a prototype, the mean crop embedding of its
support boxes, and is detected as:

* candidates: the detector's detections of its base classes with score ``> proposal_threshold`` (from
  its ``proposals_per_image`` best), merged by class-agnostic NMS at ``nms_threshold``, the
  ``candidates_per_image`` best;
* each candidate is labelled with its ``top_classes`` most similar enrolled classes c, with score
  ``sigmoid(s_c (cos(e(box), prototype_c) − t_c))``. Enrollment calibrates ``t_c`` halfway between the
  mean cosine of the class's support boxes and that of the support images' other candidates (the
  ``CALIBRATION_CANDIDATES`` strongest per image), and
  ``s_c = 4 / (their gap)``: 0.5 at the midpoint, 0.88 at the support mean. The score is monotone in the
  cosine within a class, so AP is that of ranking by crop similarity.

The detector's score is not used for the enrolled classes: it is a base-class score, low on objects of
new classes.

Example:
    >>> import torch
    >>> from fewsight.fewshot import CropEmbedder
    >>> from fewsight.models import DLDENet
    >>> det = DLDENet(2, backbone="resnet18", levels=(3, 4, 5), fpn_channels=16, embedding_dim=8, head_convs=1)
    >>> model = CropRescorer(det.eval(), CropEmbedder(dim=8, grid=1, crop_size=16, pretrained=False)).eval()
    >>> images = [torch.rand(3, 64, 64)]
    >>> model.enroll(images, [{"boxes": torch.tensor([[8., 8., 40., 40.]]), "labels": torch.tensor([0])}], ["new"])
    [2]
    >>> model.classes
    ['0', '1', 'new']
    >>> sorted(model(images)[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, LabelError
from fewsight.fewshot.crop_embedder import CropEmbedder

__all__ = ["CALIBRATION_CANDIDATES", "CropRescorer"]

#: Candidates per support image whose crop similarity calibrates an enrolled class's score.
CALIBRATION_CANDIDATES = 5


def _first_per_image(image: Tensor, score: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` highest scores of each image, grouped by image (``Long[M]`` image of each item)."""
    order = score.argsort(descending=True)
    order = order[image[order].argsort(stable=True)]
    img = image[order]
    start = torch.searchsorted(img, img)  # first position of each item's image in the sorted list
    rank = torch.arange(len(img), device=img.device) - start
    return order[rank < n]


class CropRescorer(nn.Module):
    """A detector plus a frozen :class:`CropEmbedder` that scores the classes enrolled through it.

    Args:
        detector: a trained detector with ``classes``, ``score_threshold``, ``detections_per_image``
            and an ``enroll(images, targets, names, ...)`` method (DLDENet).
        embedder: the crop network (frozen here: fine-tuning trains the detector only).
        proposal_threshold, proposals_per_image, nms_threshold, candidates_per_image, top_classes:
            candidate selection (module docstring).

    Training-mode calls (``model(images, targets)``) go to the detector, with the boxes of enrolled
    classes as unknown (``-1``), so :func:`fewsight.fewshot.finetune` trains its base classes only.
    """

    def __init__(
        self,
        detector: nn.Module,
        embedder: CropEmbedder,
        *,
        proposal_threshold: float = 0.001,
        proposals_per_image: int = 100,
        nms_threshold: float = 0.5,
        candidates_per_image: int = 30,
        top_classes: int = 3,
    ) -> None:
        super().__init__()
        for name in ("classes", "enroll", "score_threshold", "detections_per_image"):
            if not hasattr(detector, name):
                raise InvalidArgumentError(f"detector: expected a DLDENet-like detector with {name!r}, got "
                                           f"{type(detector).__name__}")
        if not 0.0 <= proposal_threshold < 1.0 or not 0.0 < nms_threshold <= 1.0:
            raise InvalidArgumentError(f"proposal_threshold, nms_threshold: expected [0, 1) and (0, 1], got "
                                       f"{proposal_threshold!r}, {nms_threshold!r}")
        for name, value in (("proposals_per_image", proposals_per_image), ("candidates_per_image", candidates_per_image),
                            ("top_classes", top_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name}: expected an int >= 1, got {value!r}")
        self.detector = detector
        self.embedder = embedder.requires_grad_(False)
        self.proposal_threshold, self.proposals_per_image = proposal_threshold, proposals_per_image
        self.nms_threshold, self.candidates_per_image, self.top_classes = nms_threshold, candidates_per_image, top_classes
        self.enrolled: list[str] = []
        self.register_buffer("prototypes", torch.zeros(0, embedder.dim))
        self.register_buffer("thresholds", torch.zeros(0))
        self.register_buffer("scales", torch.zeros(0))

    spec_name = "crop_rescorer"

    def to_spec(self) -> dict[str, Any]:
        """``{"name", "kwargs", "classes", "enrolled", "children": {"detector", "embedder"}}`` (see :mod:`fewsight.hub`)."""
        return {"name": self.spec_name, "kwargs": self.settings(), "classes": self.classes,
                "enrolled": list(self.enrolled),
                "children": {"detector": self.detector.to_spec(), "embedder": self.embedder.to_spec()}}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], children: Mapping[str, nn.Module]) -> CropRescorer:
        """The wrapper ``spec`` describes around the rebuilt ``children``, its buffers sized for the
        enrolled classes (their values come from the state dict that follows)."""
        model = cls(children["detector"], children["embedder"], **dict(spec.get("kwargs") or {}))
        model.enrolled = [str(n) for n in spec.get("enrolled") or []]
        n = len(model.enrolled)
        model.prototypes = torch.zeros(n, model.embedder.dim)
        model.thresholds = torch.zeros(n)
        model.scales = torch.zeros(n)
        return model

    def settings(self) -> dict[str, Any]:
        """The candidate-selection arguments of the constructor (what a saved file records)."""
        return {"proposal_threshold": self.proposal_threshold, "proposals_per_image": self.proposals_per_image,
                "nms_threshold": self.nms_threshold, "candidates_per_image": self.candidates_per_image,
                "top_classes": self.top_classes}

    # The detector's attributes that the few-shot tools read or set.
    @property
    def classes(self) -> list[str]:
        """The detector's classes, then those enrolled here."""
        return [*self.detector.classes, *self.enrolled]

    @property
    def num_base(self) -> int:
        return len(self.detector.classes)

    @property
    def backbone(self) -> nn.Module | None:
        return getattr(self.detector, "backbone", None)

    @property
    def means_update(self) -> Any:
        return getattr(self.detector, "means_update", None)

    @means_update.setter
    def means_update(self, value: Any) -> None:
        self.detector.means_update = value

    def train(self, mode: bool = True) -> CropRescorer:
        super().train(mode)
        self.embedder.eval()  # frozen, BatchNorm statistics included
        return self

    @torch.no_grad()
    def enroll(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], names: Sequence[str],
               *, calibrate: bool = True) -> list[int]:
        """Enroll new classes: each gets the mean crop embedding of its support boxes (labels index
        ``names``; ``-1``: ignored). ``calibrate``: place each class's score on the support images' other
        candidates (module docstring); without it the score is ``sigmoid(cos)``. The detector is not
        changed, so its proposals never depend on the support draw.

        Returns the new classes' label indices.
        """
        names = list(names)
        clash = sorted(set(names) & set(self.classes)) + sorted({n for n in names if names.count(n) > 1})
        if clash or not names:
            raise InvalidArgumentError(f"names: expected new, distinct class names, got {names} (clashing: {clash})")
        boxes, labels = [], []
        for i, t in enumerate(targets):
            lab = t["labels"].long()
            if bool((lab >= len(names)).any()) or bool((lab < -1).any()):
                raise LabelError(f"targets[{i}]['labels']: expected -1 or indices into the {len(names)} names, got "
                                 f"{sorted(set(lab.tolist()))}")
            keep = lab >= 0
            boxes.append(t["boxes"][keep])
            labels.append(lab[keep])
        was_training = self.training
        self.eval()
        try:
            device = self.prototypes.device
            images = [im.to(device) for im in images]
            boxes = [b.to(device) for b in boxes]
            emb = self.embedder(images, boxes)
            lab = torch.cat(labels).to(device)
            sums = emb.new_zeros(len(names), emb.shape[1]).index_add_(0, lab, emb)
            protos = F.normalize(sums, dim=1)
            pos = (emb * protos[lab]).sum(1)
            pos_mean = pos.new_zeros(len(names)).index_add_(0, lab, pos) / torch.bincount(lab, minlength=len(names))
            if calibrate:
                # Negatives: the support images' strongest candidates that are not a support box of the class
                # (the ones that compete at test time; a few per image keep enrollment cheap).
                cand_boxes, cand_image = self._proposals(images, limit=CALIBRATION_CANDIDATES)[2:]
                neg_mean = self._negative_means(cand_boxes, cand_image, protos, images, boxes, lab)
        finally:
            self.train(was_training)
        if calibrate:
            threshold, scale = (pos_mean + neg_mean) / 2, 4.0 / (pos_mean - neg_mean).clamp(min=0.1)
        else:
            threshold, scale = torch.zeros_like(pos_mean), torch.ones_like(pos_mean)
        self.prototypes = torch.cat([self.prototypes, protos.to(self.prototypes.dtype)])
        self.thresholds = torch.cat([self.thresholds, threshold.to(self.thresholds.dtype)])
        self.scales = torch.cat([self.scales, scale.to(self.scales.dtype)])
        start = len(self.classes)
        self.enrolled.extend(names)
        return list(range(start, start + len(names)))

    def _negative_means(self, cand_boxes: Tensor, cand_image: Tensor, protos: Tensor, images: Sequence[Tensor],
                        boxes: Sequence[Tensor], lab: Tensor) -> Tensor:
        """Mean cosine to each prototype of the candidates overlapping none of its class's support boxes
        (IoU < 0.5 in the same image); 0 for a class without any."""
        k = len(protos)
        counts = [len(b) for b in boxes]
        sup_image = torch.repeat_interleave(torch.arange(len(boxes), device=lab.device), torch.tensor(counts, device=lab.device))
        if len(cand_boxes) == 0:
            return protos.new_zeros(k)
        emb = self.embedder(list(images), list(cand_boxes.split(torch.bincount(cand_image, minlength=len(images)).tolist())))
        iou = torchvision.ops.box_iou(cand_boxes.float(), torch.cat(boxes).float())
        iou = iou * (cand_image[:, None] == sup_image[None, :])
        own = torch.zeros(len(cand_boxes), k, device=lab.device).scatter_reduce_(
            1, lab[None, :].expand(len(cand_boxes), -1), iou, reduce="amax")
        negative = (own < 0.5).float()
        cos = emb @ protos.T
        return (cos * negative).sum(0) / negative.sum(0).clamp(min=1) * (negative.sum(0) > 0)

    def _proposals(self, images: Sequence[Tensor], limit: int | None = None
                   ) -> tuple[dict[str, Tensor], list[int], Tensor, Tensor]:
        """The detector at the proposal threshold: its base detections at its own settings (per-image
        counts) and the candidates for the enrolled classes (boxes, image index, grouped by image; at
        most ``limit`` per image, default ``candidates_per_image``)."""
        det = self.detector
        saved = det.score_threshold, det.detections_per_image
        det.score_threshold, det.detections_per_image = self.proposal_threshold, self.proposals_per_image
        try:
            raw = det(list(images))
        finally:
            det.score_threshold, det.detections_per_image = saved
        n_img, device = len(raw), raw[0]["boxes"].device if raw else torch.device("cpu")
        boxes = torch.cat([r["boxes"] for r in raw])
        scores = torch.cat([r["scores"] for r in raw])
        labels = torch.cat([r["labels"] for r in raw])
        image = torch.repeat_interleave(torch.arange(n_img, device=device),
                                        torch.tensor([len(r["boxes"]) for r in raw], device=device))
        # Base classes: the detector's own detections at its own threshold and count.
        base = torch.nonzero((labels < self.num_base) & (scores > saved[0])).squeeze(1)
        base = base[_first_per_image(image[base], scores[base], saved[1])]
        # Candidates for the enrolled classes: the base classes' detections, merged across classes (a
        # detector with classes enrolled by other means does not propose with them).
        pool = torch.nonzero(labels < self.num_base).squeeze(1)
        cand = pool[torchvision.ops.batched_nms(boxes[pool].float(), scores[pool].float(), image[pool], self.nms_threshold)]
        cand = cand[_first_per_image(image[cand], scores[cand], limit or self.candidates_per_image)]
        base_part = {"boxes": boxes[base], "scores": scores[base], "labels": labels[base]}
        return base_part, torch.bincount(image[base], minlength=n_img).tolist(), boxes[cand], image[cand]

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None) -> Any:
        """Training: the detector's losses. Inference: ``[{"boxes", "scores", "labels"}]`` per image."""
        if self.training or targets is not None:
            # The detector knows the base classes only: boxes of enrolled classes are unknown (-1, ignored).
            targets = None if targets is None else [
                {**t, "labels": torch.where(t["labels"] < self.num_base, t["labels"], -1)} for t in targets]
            return self.detector(images, targets)
        parts, base_counts, cand_boxes, cand_image = self._proposals(images)
        if len(self.prototypes) == 0:
            return [dict(zip(parts, v)) for v in zip(*(t.split(base_counts) for t in parts.values()))]
        cand_counts = torch.bincount(cand_image, minlength=len(images)).tolist()
        emb = self.embedder(list(images), list(cand_boxes.split(cand_counts)))
        top = (emb @ self.prototypes.to(emb).T).topk(min(self.top_classes, len(self.prototypes)), dim=1)
        k = top.indices.shape[1]
        cls = top.indices.flatten()
        score = torch.sigmoid(self.scales[cls] * (top.values.flatten() - self.thresholds[cls]))
        new = {
            "boxes": cand_boxes.repeat_interleave(k, dim=0),
            "scores": score.to(parts["scores"].dtype),
            "labels": (cls + self.num_base).to(parts["labels"].dtype),
        }
        new_counts = [c * k for c in cand_counts]
        out = []
        for old_part, new_part in zip(zip(*(t.split(base_counts) for t in parts.values())),
                                      zip(*(t.split(new_counts) for t in new.values()))):
            out.append({key: torch.cat([a, b]) for key, a, b in zip(parts, old_part, new_part)})
        return out
