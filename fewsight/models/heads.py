"""Dense prediction heads shared across pyramid levels (RetinaNet, Lin et al. 2017, Fig. 3).

Every head is a tower of ``num_convs`` (conv3x3 + optional GroupNorm + ReLU) layers followed by a
conv3x3 predictor with ``K * outputs_per_anchor`` channels, applied with the same weights to every
level. Outputs are flattened to ``Tensor[B, A, outputs_per_anchor]`` with ``A = sum_l H_l * W_l * K``,
in the order level, row, column, anchor -- the order of
:class:`fewsight.geometry.AnchorGenerator` -- so head output ``a`` belongs to anchor ``a``.

    logits_l = conv_pred(ReLU(conv_4(... ReLU(conv_1(P_l)))))        (Lin et al. 2017, Sec. 4)

Initialisation as in the paper / torchvision: every conv ``N(0, 0.01)``, bias 0, except the
classification predictor whose bias is ``-log((1 - pi) / pi)`` with prior ``pi = 0.01``.

Example:
    >>> import torch
    >>> head = RetinaNetHead(16, num_anchors=9, num_classes=3, num_convs=2)
    >>> out = head([torch.rand(2, 16, 8, 8), torch.rand(2, 16, 4, 4)])
    >>> out["cls_logits"].shape, out["bbox_regression"].shape
    (torch.Size([2, 720, 3]), torch.Size([2, 720, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError

__all__ = [
    "DLDENetHead",
    "DenseHead",
    "EmbeddingHead",
    "RetinaNetClassificationHead",
    "RetinaNetHead",
    "RetinaNetRegressionHead",
    "conv_tower",
]

NormSpec = str | Callable[[int], nn.Module] | None


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also accepts groups of a single value (1 channel per group on a 1x1 map).

    torch refuses those ("more than 1 value per channel"), even in eval; the normalised value is then
    exactly 0 (x minus its own mean), so the output is the bias. Same parameters and state_dict keys.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim >= 2 and x.shape[0] > 0 and x[0].numel() // self.num_groups == 1:
            out = x * 0.0  # keeps the graph (x is finite) with the exact value 0
            if self.bias is not None:
                out = out + self.bias.view(1, -1, *([1] * (x.ndim - 2)))
            return out
        return super().forward(x)


def _norm_layer(norm: NormSpec, channels: int) -> nn.Module | None:
    if norm is None:
        return None
    if norm == "group":
        # 32 groups as in the GroupNorm paper and torchvision's RetinaNet v2; fewer when the
        # channel count does not allow 32.
        groups = math.gcd(32, channels)
        return _GroupNorm(groups, channels)
    if callable(norm):
        return norm(channels)
    raise InvalidArgumentError(f"norm: expected None, 'group' or a callable(channels) -> nn.Module, got {norm!r}")


def _conv3x3(in_channels: int, out_channels: int, *, bias: bool = True, bias_init: float = 0.0) -> nn.Conv2d:
    # RetinaNet's initialisation for every head conv: N(0, 0.01) weights, constant bias.
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias_init)
    return conv


def conv_tower(in_channels: int, channels: int, num_convs: int = 4, norm: NormSpec = None) -> nn.Sequential:
    """``num_convs`` x (conv3x3 [+ norm] + ReLU): ``Tensor[B, in_channels, H, W] -> Tensor[B, channels, H, W]``.

    Convs get ``N(0, 0.01)`` weights and zero bias (RetinaNet's initialisation); with a norm layer the
    conv has no bias.

    >>> conv_tower(8, 16, 2)(torch.rand(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """
    _positive_int("in_channels", in_channels)
    _positive_int("channels", channels)
    _positive_int("num_convs", num_convs, 0)
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(num_convs):
        norm_layer = _norm_layer(norm, channels)
        layers.append(_conv3x3(c, channels, bias=norm_layer is None))
        if norm_layer is not None:
            layers.append(norm_layer)
        layers.append(nn.ReLU(inplace=True))
        c = channels
    return nn.Sequential(*layers)


class DenseHead(nn.Module):
    """Tower + conv3x3 predictor shared across levels -> ``Tensor[B, A, outputs_per_anchor]``.

    Args:
        in_channels: channels of every pyramid level.
        num_anchors: anchors per location ``K``.
        outputs_per_anchor: values predicted per anchor (classes, 4 box deltas, embedding size).
        num_convs: tower depth (4 in RetinaNet).
        channels: tower width (default ``in_channels``, 256 in RetinaNet).
        norm: ``None``, ``"group"`` (GroupNorm, 32 groups) or a callable ``channels -> nn.Module``.
        bias_init: constant initial bias of the predictor.

    Shapes:
        forward(``[Tensor[B, in_channels, H_l, W_l]]``) -> ``Tensor[B, sum_l H_l W_l K, outputs_per_anchor]``.

    Example:
        >>> head = DenseHead(8, 9, 5, num_convs=1)
        >>> head([torch.rand(2, 8, 3, 4)]).shape
        torch.Size([2, 108, 5])
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        outputs_per_anchor: int,
        *,
        num_convs: int = 4,
        channels: int | None = None,
        norm: NormSpec = None,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.num_anchors = _positive_int("num_anchors", num_anchors)
        self.outputs_per_anchor = _positive_int("outputs_per_anchor", outputs_per_anchor, 0)
        channels = in_channels if channels is None else _positive_int("channels", channels)
        self.conv = conv_tower(in_channels, channels, num_convs, norm)
        tower_out = channels if num_convs > 0 else in_channels
        self.predictor = _conv3x3(tower_out, num_anchors * outputs_per_anchor, bias_init=bias_init)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) == 0:
            raise ShapeError("features: expected at least one pyramid level, got none")
        outs = []
        for level, x in enumerate(features):
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise ShapeError(
                    f"features[{level}]: expected Tensor[B, {self.in_channels}, H, W], got shape {tuple(x.shape)}"
                )
            y = self.predictor(self.conv(x))  # [B, K * O, H, W]
            b, _, h, w = y.shape
            # Channel k * O + o is output o of anchor k: [B, H, W, K * O] flattens to (row, col, anchor).
            outs.append(y.permute(0, 2, 3, 1).reshape(b, h * w * self.num_anchors, self.outputs_per_anchor))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"num_anchors={self.num_anchors}, outputs_per_anchor={self.outputs_per_anchor}"


class RetinaNetClassificationHead(DenseHead):
    """Class logits per anchor, bias prior ``pi`` (``-log((1 - pi) / pi)``) -> ``Tensor[B, A, C]``.

    >>> RetinaNetClassificationHead(8, 9, 4, num_convs=1)([torch.rand(1, 8, 2, 2)]).shape
    torch.Size([1, 36, 4])
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        channels: int | None = None,
        norm: NormSpec = None,
        prior_probability: float = 0.01,
    ) -> None:
        if not 0.0 < float(prior_probability) < 1.0:
            raise InvalidArgumentError(f"prior_probability: expected a float in (0, 1), got {prior_probability!r}")
        super().__init__(
            in_channels,
            num_anchors,
            num_classes,
            num_convs=num_convs,
            channels=channels,
            norm=norm,
            bias_init=-math.log((1.0 - prior_probability) / prior_probability),
        )
        self.num_classes = num_classes


class RetinaNetRegressionHead(DenseHead):
    """Box deltas per anchor -> ``Tensor[B, A, 4]``.

    >>> RetinaNetRegressionHead(8, 9, num_convs=1)([torch.rand(1, 8, 2, 2)]).shape
    torch.Size([1, 36, 4])
    """

    def __init__(
        self, in_channels: int, num_anchors: int, *, num_convs: int = 4, channels: int | None = None, norm: NormSpec = None
    ) -> None:
        super().__init__(in_channels, num_anchors, 4, num_convs=num_convs, channels=channels, norm=norm)


class EmbeddingHead(DenseHead):
    """L2-normalised ``D``-dim embedding per anchor -> ``Tensor[B, A, D]`` with unit rows.

    The normalisation is ``e / max(|e|, eps)``, so an all-zero output stays finite.

    >>> e = EmbeddingHead(8, 9, 16, num_convs=1)([torch.rand(1, 8, 2, 2)])
    >>> e.shape, bool(torch.allclose(e.norm(dim=-1), torch.ones(36)))
    (torch.Size([1, 36, 16]), True)
    """

    normalized_embeddings = True  # consumers may skip normalising the output again

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        embedding_dim: int = 256,
        *,
        num_convs: int = 4,
        channels: int | None = None,
        norm: NormSpec = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_channels, num_anchors, _positive_int("embedding_dim", embedding_dim), num_convs=num_convs, channels=channels, norm=norm
        )
        self.embedding_dim = embedding_dim
        self.eps = eps

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return F.normalize(super().forward(features), dim=-1, eps=self.eps)


class RetinaNetHead(nn.Module):
    """Classification + regression subnets -> ``{"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}``.

    Args:
        in_channels: FPN channels; num_anchors: ``K`` per location; num_classes: ``C``;
        num_convs, channels, norm: tower options (see :class:`DenseHead`);
        prior_probability: initial foreground probability of every class logit.

    Example:
        >>> head = RetinaNetHead(8, 9, 2, num_convs=1)
        >>> {k: tuple(v.shape) for k, v in head([torch.rand(1, 8, 2, 2)]).items()}
        {'cls_logits': (1, 36, 2), 'bbox_regression': (1, 36, 4)}
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        channels: int | None = None,
        norm: NormSpec = None,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes, num_convs=num_convs, channels=channels, norm=norm,
            prior_probability=prior_probability,
        )
        self.regression_head = RetinaNetRegressionHead(
            in_channels, num_anchors, num_convs=num_convs, channels=channels, norm=norm
        )
        self.num_anchors = num_anchors
        self.num_classes = num_classes

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(features), "bbox_regression": self.regression_head(features)}


class DLDENetHead(nn.Module):
    """Embedding + regression subnets -> ``{"embeddings": [B, A, D] (unit rows), "bbox_regression": [B, A, 4]}``.

    Example:
        >>> head = DLDENetHead(8, 9, embedding_dim=16, num_convs=1)
        >>> {k: tuple(v.shape) for k, v in head([torch.rand(1, 8, 2, 2)]).items()}
        {'embeddings': (1, 36, 16), 'bbox_regression': (1, 36, 4)}
    """

    normalized_embeddings = True  # the "embeddings" output has unit rows

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        embedding_dim: int = 256,
        *,
        num_convs: int = 4,
        channels: int | None = None,
        norm: NormSpec = None,
    ) -> None:
        super().__init__()
        self.embedding_head = EmbeddingHead(
            in_channels, num_anchors, embedding_dim, num_convs=num_convs, channels=channels, norm=norm
        )
        self.regression_head = RetinaNetRegressionHead(
            in_channels, num_anchors, num_convs=num_convs, channels=channels, norm=norm
        )
        self.num_anchors = num_anchors
        self.embedding_dim = embedding_dim

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"embeddings": self.embedding_head(features), "bbox_regression": self.regression_head(features)}
