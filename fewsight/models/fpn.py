"""Feature pyramid network (Lin et al. 2017) with the RetinaNet extra levels P6 and P7.

Level ``l`` has stride ``2**l``. The pyramid takes the backbone maps ``C3, C4, C5`` (strides 8, 16,
32) and returns any increasing subset of ``P3 .. P7``, building only the layers that subset needs:

    P5 = out5(lat5(C5));  P_l = out_l(lat_l(C_l) + up(lat_{l+1} ... )) for l = 4, 3 (top-down path)
    P6 = conv3x3_s2(P5 or C5);  P7 = conv3x3_s2(ReLU(P6))          (Lin et al. 2017, RetinaNet)

The top-down upsampling is nearest-neighbour *to the exact size of the lateral map* (not a fixed
factor 2), so inputs whose sides are not multiples of 32 work: with the fewsight backbones the level-l
map of an ``H x W`` image is exactly ``(ceil(H / 2**l), ceil(W / 2**l))``.

Example:
    >>> import torch
    >>> from fewsight.models.fpn import FPN
    >>> fpn = FPN((32, 64, 128), out_channels=16, levels=(3, 4, 5, 6, 7))
    >>> fpn.in_levels                     # the C levels forward() expects, in order
    (3, 4, 5)
    >>> feats = [torch.rand(2, 32, 13, 17), torch.rand(2, 64, 7, 9), torch.rand(2, 128, 4, 5)]
    >>> [tuple(p.shape[-2:]) for p in fpn(feats)]
    [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_choice

__all__ = ["FPN", "SUPPORTED_LEVELS", "validate_levels"]

#: Pyramid levels fewsight can build (level ``l`` has stride ``2**l``).
SUPPORTED_LEVELS: tuple[int, ...] = (3, 4, 5, 6, 7)
_BACKBONE_LEVELS = (3, 4, 5)


def validate_levels(levels: Iterable[int], name: str = "levels") -> tuple[int, ...]:
    """Return ``levels`` as a tuple after checking it is a strictly increasing subset of 3..7.

    Raises :class:`~fewsight.errors.InvalidArgumentError` otherwise.

    Example:
        >>> validate_levels(range(3, 8))
        (3, 4, 5, 6, 7)
    """
    try:
        out = tuple(int(level) for level in levels)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{name}: expected a sequence of ints in {SUPPORTED_LEVELS}, got {levels!r}"
        ) from None
    if (
        not out
        or any(level not in SUPPORTED_LEVELS for level in out)
        or any(a >= b for a, b in zip(out, out[1:]))
    ):
        raise InvalidArgumentError(
            f"{name}: expected a non-empty strictly increasing subset of {SUPPORTED_LEVELS}, got {levels!r}"
        )
    return out


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
    # Same init as torchvision's FeaturePyramidNetwork / LastLevelP6P7.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.constant_(conv.bias, 0)
    return conv


class FPN(nn.Module):
    """Feature pyramid over ``C3..C5`` returning the requested levels of ``P3..P7``.

    Args:
        in_channels: channels of ``C3, C4, C5`` (a sequence of three ints) or a mapping
            ``{level: channels}`` that covers at least :attr:`in_levels`.
        out_channels: channels of every output level (256 in RetinaNet).
        levels: strictly increasing subset of ``(3, 4, 5, 6, 7)``; outputs come in this order.
        p6_from: ``"p5"`` (torchvision's ``retinanet_resnet50_fpn`` v1, FCOS) or ``"c5"``
            (the RetinaNet paper, torchvision's v2) — the input of the stride-2 conv giving P6.

    Attributes:
        levels: the returned levels; strides: ``2**l`` per returned level;
        in_levels: the backbone levels ``forward`` expects (only those the outputs depend on:
        the top-down path always starts at C5, so e.g. ``levels=(4, 5, 6, 7)`` needs C4, C5).

    Shapes:
        forward(``[Tensor[B, in_channels[l], H_l, W_l] for l in in_levels]``) ->
        ``[Tensor[B, out_channels, H_l, W_l] for l in levels]``, with P6/P7 sizes
        ``ceil(H_5 / 2)``, ``ceil(H_5 / 4)``.

    Example:
        >>> import torch
        >>> fpn = FPN((8, 16, 32), out_channels=4, levels=(6, 7), p6_from="c5")
        >>> fpn.in_levels, [tuple(p.shape) for p in fpn([torch.rand(1, 32, 5, 5)])]
        ((5,), [(1, 4, 3, 3), (1, 4, 2, 2)])
    """

    def __init__(
        self,
        in_channels: Sequence[int] | Mapping[int, int],
        *,
        out_channels: int = 256,
        levels: Iterable[int] = SUPPORTED_LEVELS,
        p6_from: str = "p5",
    ) -> None:
        super().__init__()
        self.levels = validate_levels(levels)
        check_choice("p6_from", p6_from, ("p5", "c5"))
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise InvalidArgumentError(f"out_channels: expected a positive int, got {out_channels!r}")
        self.out_channels = out_channels
        self.p6_from = p6_from
        self.strides = tuple(2**level for level in self.levels)

        need_p6 = any(level >= 6 for level in self.levels)
        low = [level for level in self.levels if level <= 5]
        # Levels whose P map must be computed: the requested ones up to 5, plus P5 when it feeds P6.
        p_levels = set(low) | ({5} if need_p6 and p6_from == "p5" else set())
        if p_levels:
            self.in_levels: tuple[int, ...] = tuple(range(min(p_levels), 6))
        else:  # only P6/P7 from C5: no top-down path at all
            self.in_levels = (5,)
        self._p_levels = tuple(sorted(p_levels))

        channels = self._in_channel_map(in_channels)
        self.in_channels = {level: channels[level] for level in self.in_levels}

        self.lateral = nn.ModuleDict(
            {f"c{level}": _conv(channels[level], out_channels, 1) for level in (self.in_levels if p_levels else ())}
        )
        self.output = nn.ModuleDict({f"p{level}": _conv(out_channels, out_channels, 3) for level in self._p_levels})
        self.p6 = _conv(out_channels if p6_from == "p5" else channels[5], out_channels, 3, 2) if need_p6 else None
        self.p7 = _conv(out_channels, out_channels, 3, 2) if 7 in self.levels else None

    def _in_channel_map(self, in_channels: Sequence[int] | Mapping[int, int]) -> dict[int, int]:
        if isinstance(in_channels, Mapping):
            channels = {int(k): v for k, v in in_channels.items()}
        else:
            values = list(in_channels)
            if len(values) != len(_BACKBONE_LEVELS):
                raise InvalidArgumentError(
                    f"in_channels: expected 3 ints (channels of C3, C4, C5), got {in_channels!r}"
                )
            channels = dict(zip(_BACKBONE_LEVELS, values))
        for level in self.in_levels:
            value = channels.get(level)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"in_channels: expected a positive int for C{level}, got {value!r} (in {in_channels!r})"
                )
        return channels

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_levels):
            raise ShapeError(
                f"features: expected {len(self.in_levels)} maps for levels {self.in_levels}, got {len(features)}"
            )
        for level, feat in zip(self.in_levels, features):
            if not isinstance(feat, Tensor) or feat.ndim != 4 or feat.shape[1] != self.in_channels[level]:
                raise ShapeError(
                    f"features: expected C{level} as Tensor[B, {self.in_channels[level]}, H, W], "
                    f"got {tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__}"
                )
        out: dict[int, Tensor] = {}
        if self._p_levels:
            top = self.lateral["c5"](features[-1])
            if 5 in self._p_levels:
                out[5] = self.output["p5"](top)
            for level, feat in zip(reversed(self.in_levels[:-1]), reversed(features[:-1])):
                lateral = self.lateral[f"c{level}"](feat)
                # Exact target size (not scale_factor=2): odd-sized maps stay aligned with C_l.
                top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
                if level in self._p_levels:
                    out[level] = self.output[f"p{level}"](top)
        if self.p6 is not None:
            p6 = self.p6(out[5] if self.p6_from == "p5" else features[-1])
            out[6] = p6
            if self.p7 is not None:
                out[7] = self.p7(F.relu(p6))
        return [out[level] for level in self.levels]

    def extra_repr(self) -> str:
        return f"levels={self.levels}, in_levels={self.in_levels}, p6_from={self.p6_from!r}"

