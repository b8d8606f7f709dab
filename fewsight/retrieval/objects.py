"""Object embeddings from a DLDENet: galleries of detected objects, example-crop queries, open-set scores.

An object's embedding is :meth:`fewsight.models.DLDENet.embed_boxes` of its box: the normalised mean
embedding of the anchors the detector matches to it (the same anchors enrollment uses), so gallery
items, queries and enrolled class directions live in one space. Given an ``embedder`` (a
:class:`fewsight.fewshot.CropEmbedder`, called as ``embedder(images, boxes)``), the detector only
finds the objects and the embedder embeds their crops, whitening included.

Example:
    >>> import torch
    >>> from fewsight.models import DLDENet
    >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=32, embedding_dim=16, score_threshold=0.0)
    >>> gallery = index_images(model, [torch.rand(3, 96, 96), torch.rand(3, 96, 80)], score_threshold=0.0)
    >>> query = embed_crop(model, torch.rand(3, 30, 40))
    >>> query.shape, gallery.search(query[None], k=1).indices.shape
    (torch.Size([16]), torch.Size([1, 1]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from fewsight.errors import InvalidArgumentError, ShapeError
from fewsight.retrieval.gallery import Gallery

__all__ = ["detect_objects", "embed_crop", "embed_objects", "index_images", "known_scores"]


def _check_model(model: nn.Module) -> None:
    if not callable(getattr(model, "embed_boxes", None)):
        raise InvalidArgumentError(f"model: expected a DLDENet (with embed_boxes), got {type(model).__name__}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_objects(
    model: nn.Module, images: Sequence[Tensor], boxes: Sequence[Tensor], *, batch_size: int = 8
) -> Tensor:
    """``Tensor[sum N_i, D]`` unit embeddings of every box (image by image, in order; see ``embed_boxes``)."""
    _check_model(model)
    device = _device(model)
    parts = model.embed_boxes([im.to(device) for im in images], [b.to(device) for b in boxes], batch_size=batch_size)
    dim = model.classifier.embedding_dim
    return torch.cat(parts) if parts else torch.zeros(0, dim, device=device)


@torch.no_grad()
def index_images(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    score_threshold: float = 0.3,
    nms_threshold: float = 0.5,
    batch_size: int = 8,
    image_ids: Sequence[int] | None = None,
    embedder: nn.Module | None = None,
) -> Gallery:
    """A :class:`Gallery` of the objects ``model`` detects in ``images`` (``Tensor[3, H_i, W_i]`` in [0, 1]).

    Detections with ``score >= score_threshold`` go through class-agnostic NMS (``nms_threshold``), so an
    object is one item: the embedding of its box, its best label, its image id (``image_ids[i]``,
    default ``i``) and its box. ``embedder``: embed the boxes' crops with it instead of the detector.
    """
    _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if image_ids is not None and len(image_ids) != len(images):
        raise ShapeError(f"image_ids: expected {len(images)} ids (one per image), got {len(image_ids)}")
    ids = list(range(len(images))) if image_ids is None else [int(i) for i in image_ids]
    device = _device(model)
    dim = model.classifier.embedding_dim if embedder is None else embedder.dim
    gallery = Gallery(dim, class_names=list(model.classes))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            batch = [im.to(device) for im in images[start : start + batch_size]]
            emb, labels, owner, boxes = detect_objects(model, batch, score_threshold=score_threshold,
                                                       nms_threshold=nms_threshold, embedder=embedder)
            if len(emb):
                first = torch.tensor(ids[start : start + len(batch)], device=owner.device)
                gallery.add(emb, labels=labels, image_ids=first[owner], boxes=boxes)
    finally:
        model.train(was_training)
    return gallery


@torch.no_grad()
def detect_objects(
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    score_threshold: float = 0.3,
    nms_threshold: float = 0.5,
    embedder: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The objects ``model`` (in eval mode, on the images' device) finds in one batch of ``images``.

    Returns ``(embeddings Tensor[N, D], labels Long[N], owner Long[N], boxes Tensor[N, 4])``, ``owner``
    being the index of each object's image in ``images``; objects in image order, then by score.
    Detections below ``score_threshold`` are dropped, then class-agnostic NMS (``nms_threshold``)
    keeps one item per object (see :func:`index_images`). The batch is one forward pass, so an
    object's values depend on which images share its batch (padding): callers that must reproduce
    a result batch the same way.
    """
    detections = model(list(images))
    # One item per object: the detector keeps one box per class, so an object may carry several.
    boxes = torch.cat([d["boxes"] for d in detections])
    scores = torch.cat([d["scores"] for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    owner = torch.cat([torch.full((len(d["boxes"]),), j, dtype=torch.long) for j, d in enumerate(detections)])
    owner = owner.to(boxes.device)
    keep = (scores >= score_threshold).nonzero().flatten()
    keep = keep[batched_nms(boxes[keep], scores[keep], owner[keep], nms_threshold)]
    keep = keep[torch.argsort(owner[keep] * len(scores) + keep, stable=True)]  # image order, then rank
    per_image = list(boxes[keep].split(torch.bincount(owner[keep], minlength=len(images)).tolist()))
    if embedder is None:
        parts = model.embed_boxes(list(images), per_image)
        emb = torch.cat(parts) if parts else boxes.new_zeros(0, model.classifier.embedding_dim)
    else:
        emb = embedder(list(images), per_image)
    return emb, labels[keep], owner[keep], boxes[keep]


@torch.no_grad()
def embed_crop(model: nn.Module, crop: Tensor, *, box: Tensor | None = None, context: float = 1.0,
               embedder: nn.Module | None = None) -> Tensor:
    """``Tensor[D]``: the embedding of a query object.

    With ``box`` (``Tensor[4]`` xyxy), ``crop`` is a whole image and the object is that box. Without it,
    ``crop`` is the object itself: it is pasted at the centre of a grey canvas ``1 + 2 * context`` times
    its size, so the detector sees it at the scale and with the margins of an object in a scene.
    ``embedder``: embed the object's crop with it (``model`` is then not used).
    """
    if crop.ndim != 3 or crop.shape[0] != 3:
        raise ShapeError(f"crop: expected Tensor[3, H, W], got shape {tuple(crop.shape)}")
    if embedder is not None:
        if box is None:
            box = torch.tensor([0.0, 0.0, crop.shape[2], crop.shape[1]])
        if box.shape != (4,):
            raise ShapeError(f"box: expected Tensor[4] (x1, y1, x2, y2), got shape {tuple(box.shape)}")
        device = next(embedder.parameters()).device
        return embedder([crop.to(device)], [box.reshape(1, 4).float().to(device)])[0]
    _check_model(model)
    if box is None:
        if context < 0:
            raise InvalidArgumentError(f"context: expected >= 0, got {context}")
        h, w = crop.shape[1:]
        pad_y, pad_x = round(h * context), round(w * context)
        canvas = crop.new_full((3, h + 2 * pad_y, w + 2 * pad_x), 0.5)
        canvas[:, pad_y : pad_y + h, pad_x : pad_x + w] = crop
        crop, box = canvas, torch.tensor([pad_x, pad_y, pad_x + w, pad_y + h], dtype=torch.float32)
    if box.shape != (4,):
        raise ShapeError(f"box: expected Tensor[4] (x1, y1, x2, y2), got shape {tuple(box.shape)}")
    return embed_objects(model, [crop], [box.reshape(1, 4).float()])[0]


@torch.no_grad()
def known_scores(model: nn.Module, embeddings: Tensor) -> Tensor:
    """``Tensor[N]``: how known each object is, its highest calibrated class probability ``max_c p_c``
    (0 for a zero embedding). Unknown objects should score low; see :func:`fewsight.retrieval.auroc`."""
    _check_model(model)
    if embeddings.ndim != 2:
        raise ShapeError(f"embeddings: expected Tensor[N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0 or model.classifier.num_classes == 0:
        return embeddings.new_zeros(embeddings.shape[0])
    probs = model.classifier.probabilities(F.normalize(embeddings, dim=1, eps=1e-12))
    return probs.max(dim=1).values * (embeddings.norm(dim=1) > 0)
