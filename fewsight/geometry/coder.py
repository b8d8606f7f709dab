"""Box coders: regression targets relative to anchors (RetinaNet / Faster R-CNN and SSD styles)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fewsight.errors import InvalidArgumentError, NonFiniteError, as_floating, as_tensor, check_finite, check_last_dim, check_real

__all__ = ["BoxCoder", "DEFAULT_SCALE_CLAMP"]

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
"""Upper bound on decoded log-scale deltas: a box at most 1000/16 times its anchor's size."""


class BoxCoder:
    """Encode boxes as deltas from anchors and back (Girshick et al. 2014, R-CNN parametrisation).

    ``dx = wx * (cx - cx_a) / w_a``, ``dy = wy * (cy - cy_a) / h_a``, ``dw = ww * log(w / w_a)``,
    ``dh = wh * log(h / h_a)``. SSD's variances ``(0.1, 0.2)`` are the weights ``(10, 10, 5, 5)``
    (:meth:`from_variances`). Decoding clamps ``dw, dh`` (after dividing by the weights) to ``clamp``
    before ``exp``, so wild predictions cannot overflow.

    Computation is in float32 for half-precision inputs; outputs keep the input dtype, except that
    integer boxes / anchors are promoted to the default float dtype (integer deltas would truncate to
    0). Weights and clamp must be finite; NaN / +-inf in any tensor argument raise ``NonFiniteError``.

    >>> coder = BoxCoder()
    >>> anchors = torch.tensor([[0., 0., 10., 10.]])
    >>> gt = torch.tensor([[1., 2., 11., 22.]])
    >>> torch.allclose(coder.decode(coder.encode(gt, anchors), anchors), gt)
    True
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        try:
            weights = tuple(weights)
        except TypeError:
            raise InvalidArgumentError(f"weights: expected 4 positive numbers, got {weights!r}") from None
        if len(weights) != 4:
            raise InvalidArgumentError(f"weights: expected 4 positive numbers, got {weights}")
        self.weights = tuple(check_real("weights", w, low=0, low_open=True) for w in weights)
        self.clamp = check_real("clamp", clamp)

    @classmethod
    def from_variances(cls, variances: Sequence[float] = (0.1, 0.2), clamp: float = DEFAULT_SCALE_CLAMP) -> BoxCoder:
        """SSD coding (Liu et al. 2016): centre deltas divided by ``variances[0]``, log-sizes by ``variances[1]``."""
        if len(variances) != 2:
            raise InvalidArgumentError(f"variances: expected 2 positive numbers, got {tuple(variances)}")
        c, s = (check_real("variances", v, low=0, low_open=True) for v in variances)
        return cls((1 / c, 1 / c, 1 / s, 1 / s), clamp=clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clamp={self.clamp:.4g})"

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    @staticmethod
    def _work(t: Tensor) -> Tensor:
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """``Tensor[..., 4]`` boxes and broadcastable ``Tensor[..., 4]`` anchors -> ``Tensor[..., 4]`` deltas.

        Boxes of zero width or height would give ``-inf``; their size is floored at a tiny epsilon so
        the result stays finite (callers should sanitise boxes; see :func:`sanitize_boxes`). Finite
        boxes so far from or so much larger than their anchors that the deltas do not fit the output
        dtype raise :class:`~fewsight.errors.NonFiniteError` naming ``boxes``.
        """
        boxes, anchors = _coder_arg("boxes", boxes), _coder_arg("anchors", anchors)
        out_dtype = torch.promote_types(boxes.dtype, anchors.dtype)
        b, a = self._work(boxes), self._work(anchors)
        eps = torch.finfo(b.dtype).eps
        cx, cy, w, h = self._centre_size(b)
        acx, acy, aw, ah = self._centre_size(a)
        aw, ah = aw.clamp(min=eps), ah.clamp(min=eps)
        wx, wy, ww, wh = self.weights
        deltas = torch.stack(
            (
                wx * (cx - acx) / aw,
                wy * (cy - acy) / ah,
                ww * torch.log(w.clamp(min=eps) / aw),
                wh * torch.log(h.clamp(min=eps) / ah),
            ),
            dim=-1,
        ).to(out_dtype)
        if deltas.numel() and not bool(torch.isfinite(deltas).all()):
            raise NonFiniteError(
                f"boxes: expected deltas that fit {out_dtype} relative to their anchors, got an overflow; the boxes "
                "are far larger than, or far from, their anchors"
            )
        return deltas

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``Tensor[..., 4]`` deltas and broadcastable anchors -> ``Tensor[..., 4]`` xyxy boxes."""
        deltas, anchors = _coder_arg("deltas", deltas), _coder_arg("anchors", anchors)
        out_dtype = torch.promote_types(deltas.dtype, anchors.dtype)
        d, a = self._work(deltas), self._work(anchors)
        acx, acy, aw, ah = self._centre_size(a)
        wx, wy, ww, wh = self.weights
        cx = d[..., 0] / wx * aw + acx
        cy = d[..., 1] / wy * ah + acy
        w = torch.exp((d[..., 2] / ww).clamp(max=self.clamp)) * aw
        h = torch.exp((d[..., 3] / wh).clamp(max=self.clamp)) * ah
        boxes = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
        return boxes.to(out_dtype)


def _coder_arg(name: str, t: object) -> Tensor:
    t = as_tensor(name, t, expected="Tensor[..., 4]")
    check_last_dim(name, t, 4)
    t = as_floating(name, t)
    check_finite(name, t)
    return t
