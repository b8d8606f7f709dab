"""Class directions of a directional classifier: a store of unit vectors with per-class scale and bias.

:class:`DirectionalClassifier` holds, per class ``c``, a direction ``mu_c`` (``Tensor[C, D]``), a scale
``w_c = softplus(raw_scale_c) > 0`` and a bias ``b_c``, and scores embeddings with
:func:`fewsight.losses.functional.directional_log_probs` (training) and
:func:`~fewsight.losses.functional.directional_probabilities` (inference).

The directions are either tracked -- a buffer ``means`` moved without gradient towards the
normalised mean of the embeddings assigned to each class (an EMA per batch, or accumulated sums
applied at epoch end; sums are all-reduced under DDP so every rank holds the same means) -- or
learned, a parameter ``weight`` trained by gradient (a cosine classifier). Classes can be appended
(:meth:`DirectionalClassifier.add_classes`, used by few-shot enrollment), and loading a ``state_dict``
with another number of classes resizes the store first.

Example:
    >>> clf = DirectionalClassifier(2, 4)
    >>> clf.add_classes(torch.eye(4)[:1])
    >>> clf.num_classes, tuple(clf.probabilities(torch.randn(5, 4)).shape)
    (3, (5, 3))
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError, ShapeError, check_choice, check_ndim
from fewsight.losses.functional import directional_log_probs, directional_probabilities

__all__ = ["DIRECTIONS", "DirectionalClassifier"]

#: The two kinds of class directions: a buffer moved without gradient, or a trained parameter.
DIRECTIONS = ("tracked", "learned")


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _all_reduce_sum_(t: Tensor) -> Tensor:
    # Every rank calls this at the same point of every training step (even without positives),
    # so the collective never deadlocks.
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _random_directions(num: int, dim: int) -> Tensor:
    return F.normalize(torch.randn(num, dim), dim=-1)


class DirectionalClassifier(nn.Module):
    """Class directions, scales ``w = softplus(raw_scale)`` and biases ``b``; ``forward(e) -> (log p, log(1-p))``.

    Args:
        num_classes: ``C`` (may be 0: classes can be added with :meth:`add_classes`).
        embedding_dim: ``D``.
        directions: ``"tracked"`` (buffer ``means``, updated without gradient) or ``"learned"``
            (parameter ``weight``, trained by gradient; a cosine classifier).
        init_scale: initial ``w`` (7); init_bias: initial ``b`` (-0.5).

    Buffer ``rivalry`` (``Tensor[C]``, zeros): per-class ``r`` of :func:`~fewsight.losses.functional.rival_log_gate`, set by enrollment.

    Initial directions: random unit vectors from torch's global RNG (seed it for reproducibility).
    ``w`` is ``softplus`` of a raw parameter, so it stays ``> 0`` whatever the optimiser does.

    Shapes:
        forward(``Tensor[..., D]``) -> two ``Tensor[..., C]`` (see :func:`directional_log_probs`).

    Example:
        >>> clf = DirectionalClassifier(3, 8)
        >>> lp, l1mp = clf(torch.randn(2, 5, 8))
        >>> lp.shape, bool((lp <= 0).all())
        (torch.Size([2, 5, 3]), True)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int = 256,
        *,
        directions: str = "tracked",
        init_scale: float = 7.0,
        init_bias: float = -0.5,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise InvalidArgumentError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise InvalidArgumentError(f"embedding_dim: expected an int >= 1, got {embedding_dim!r}")
        check_choice("directions", directions, DIRECTIONS)
        if not float(init_scale) > 0:
            raise InvalidArgumentError(f"init_scale: expected a float > 0, got {init_scale!r}")
        self.embedding_dim = embedding_dim
        self.mode = directions
        self.init_scale = float(init_scale)
        self.init_bias = float(init_bias)
        init = _random_directions(num_classes, embedding_dim)
        if directions == "tracked":
            self.register_buffer("means", init)
            self.register_buffer("mean_sums", torch.zeros(num_classes, embedding_dim))
            self.register_buffer("mean_counts", torch.zeros(num_classes))
        else:
            self.weight = nn.Parameter(init)
        self.raw_scale = nn.Parameter(torch.full((num_classes,), _softplus_inverse(self.init_scale)))
        self.bias = nn.Parameter(torch.full((num_classes,), self.init_bias))
        self.register_buffer("rivalry", torch.zeros(num_classes))

    @property
    def num_classes(self) -> int:
        return self.raw_scale.shape[0]

    @property
    def scale(self) -> Tensor:
        """``Tensor[C]`` ``w = softplus(raw_scale) >= 0``."""
        return F.softplus(self.raw_scale)

    def directions(self) -> Tensor:
        """``Tensor[C, D]`` the class directions (means, or the learned weight), as stored."""
        return self.means if self.mode == "tracked" else self.weight

    def active_rivalry(self) -> Tensor | None:
        """The ``rivalry`` buffer, or ``None`` when every entry is 0 (nothing to adjust)."""
        return self.rivalry if bool((self.rivalry != 0).any()) else None

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        return directional_log_probs(embeddings, self.directions(), self.scale, self.bias, rivalry=self.active_rivalry())

    def probabilities(self, embeddings: Tensor) -> Tensor:
        """``Tensor[..., C]`` calibrated probabilities ``p`` in ``[0, 1]`` (see :func:`directional_probabilities`)."""
        return directional_probabilities(
            embeddings, self.directions(), self.scale, self.bias, rivalry=self.active_rivalry()
        )

    # --- tracked means ---

    def _check_tracked(self, what: str) -> None:
        if self.mode != "tracked":
            raise InvalidArgumentError(f"directions: expected 'tracked' for {what}, got {self.mode!r}")

    def _class_sums(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        sums = self.means.new_zeros(self.means.shape).index_add_(0, labels, embeddings.to(self.means.dtype))
        counts = torch.bincount(labels, minlength=self.num_classes).to(self.means.dtype)
        return sums, counts

    @torch.no_grad()
    def update_means_ema(self, embeddings: Tensor, labels: Tensor, lr: float = 0.1) -> None:
        """One EMA step per class present in the batch (out of place, no gradient, all-reduced under DDP):
        ``mu_c <- normalize((1 - lr) mu_c + lr normalize(sum_{i: y_i = c} e_i))``; other classes keep ``mu_c``.

        Args: embeddings ``Tensor[P, D]``, labels ``Long[P]`` in ``[0, C)`` (``< 0`` ignored).
        """
        self._check_tracked("update_means_ema")
        known = labels >= 0
        sums, counts = self._class_sums(embeddings[known], labels[known])
        packed = _all_reduce_sum_(torch.cat((sums, counts.unsqueeze(1)), dim=1))
        sums, counts = packed[:, :-1], packed[:, -1]
        self.means = self._blend(sums, counts, lr)

    @torch.no_grad()
    def accumulate(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add embeddings to the per-class sums (``"manual"`` mode); :meth:`update_means` uses them."""
        self._check_tracked("accumulate")
        known = labels >= 0
        sums, counts = self._class_sums(embeddings[known], labels[known])
        self.mean_sums = self.mean_sums + sums
        self.mean_counts = self.mean_counts + counts

    @torch.no_grad()
    def update_means(self, lr: float = 1.0) -> None:
        """Set each class's mean from the accumulated sums, then clear them (all-reduced under DDP):
        ``mu_c <- normalize((1 - lr) mu_c + lr normalize(sums_c))`` (``lr = 1``: the epoch's mean
        direction). A class without sums keeps its mean."""
        self._check_tracked("update_means")
        packed = _all_reduce_sum_(torch.cat((self.mean_sums, self.mean_counts.unsqueeze(1)), dim=1))
        self.means = self._blend(packed[:, :-1], packed[:, -1], lr)
        self.mean_sums = torch.zeros_like(self.mean_sums)
        self.mean_counts = torch.zeros_like(self.mean_counts)

    def _blend(self, sums: Tensor, counts: Tensor, lr: float) -> Tensor:
        norm = torch.linalg.vector_norm(sums, dim=1, keepdim=True)
        # A class is updated only with a usable direction (some embeddings, not cancelling out).
        present = (counts > 0).unsqueeze(1) & (norm > 1e-12)
        batch_mean = sums / norm.clamp(min=1e-12)
        blended = F.normalize((1.0 - lr) * self.means + lr * batch_mean, dim=1, eps=1e-12)
        # (1 - lr) mu + lr m can vanish only if m = -mu and lr = 0.5: keep mu then.
        ok = present & (torch.linalg.vector_norm((1.0 - lr) * self.means + lr * batch_mean, dim=1, keepdim=True) > 1e-12)
        return torch.where(ok, blended, self.means)

    # --- growing ---

    def add_classes(
        self, directions: Tensor, scale: float | None = None, bias: float | None = None, rivalry: float = 0.0
    ) -> None:
        """Append ``Tensor[N, D]`` directions (normalised) with default ``w``, ``b`` (and ``rivalry``,
        default 0). Parameters are replaced by larger ones: build the optimiser after adding classes."""
        if not float(rivalry) >= 0:
            raise InvalidArgumentError(f"rivalry: expected a float >= 0, got {rivalry!r}")
        check_ndim("directions", directions, 2, f"Tensor[N, {self.embedding_dim}]")
        if directions.shape[1] != self.embedding_dim:
            raise ShapeError(f"directions: expected Tensor[N, {self.embedding_dim}], got shape {tuple(directions.shape)}")
        ref = self.raw_scale
        n = directions.shape[0]
        new_dirs = F.normalize(directions.detach().to(device=ref.device, dtype=self.directions().dtype), dim=1, eps=1e-12)
        raw = _softplus_inverse(self.init_scale if scale is None else float(scale))
        b = self.init_bias if bias is None else float(bias)
        self._grow(
            new_dirs,
            torch.full((n,), raw, dtype=ref.dtype, device=ref.device),
            torch.full((n,), b, dtype=self.bias.dtype, device=ref.device),
            float(rivalry),
        )

    def _grow(self, dirs: Tensor, raw: Tensor, bias: Tensor, rivalry: float = 0.0) -> None:
        with torch.no_grad():
            if self.mode == "tracked":
                self.means = torch.cat((self.means, dirs))
                self.mean_sums = torch.cat((self.mean_sums, self.mean_sums.new_zeros(dirs.shape)))
                self.mean_counts = torch.cat((self.mean_counts, self.mean_counts.new_zeros(dirs.shape[0])))
            else:
                self.weight = nn.Parameter(torch.cat((self.weight.detach(), dirs)), self.weight.requires_grad)
            self.raw_scale = nn.Parameter(torch.cat((self.raw_scale.detach(), raw)), self.raw_scale.requires_grad)
            self.bias = nn.Parameter(torch.cat((self.bias.detach(), bias)), self.bias.requires_grad)
            self.rivalry = torch.cat((self.rivalry, self.rivalry.new_full(bias.shape, rivalry)))

    def _resize(self, num_classes: int) -> None:
        c = self.num_classes
        if num_classes > c:
            ref = self.raw_scale
            n = num_classes - c
            self._grow(
                _random_directions(n, self.embedding_dim).to(device=ref.device, dtype=self.directions().dtype),
                torch.full((n,), _softplus_inverse(self.init_scale), dtype=ref.dtype, device=ref.device),
                torch.full((n,), self.init_bias, dtype=self.bias.dtype, device=ref.device),
            )
        elif num_classes < c:
            with torch.no_grad():
                if self.mode == "tracked":
                    self.means = self.means[:num_classes].clone()
                    self.mean_sums = self.mean_sums[:num_classes].clone()
                    self.mean_counts = self.mean_counts[:num_classes].clone()
                else:
                    self.weight = nn.Parameter(self.weight.detach()[:num_classes].clone(), self.weight.requires_grad)
                self.raw_scale = nn.Parameter(self.raw_scale.detach()[:num_classes].clone(), self.raw_scale.requires_grad)
                self.bias = nn.Parameter(self.bias.detach()[:num_classes].clone(), self.bias.requires_grad)
                self.rivalry = self.rivalry[:num_classes].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # A checkpoint may hold more (enrolled) or fewer classes than this module: resize first.
        raw = state_dict.get(prefix + "raw_scale")
        if isinstance(raw, Tensor) and raw.ndim == 1 and raw.shape[0] != self.num_classes:
            self._resize(int(raw.shape[0]))
        if isinstance(raw, Tensor) and raw.ndim == 1 and prefix + "rivalry" not in state_dict:
            # A state_dict without the rivalry buffer: no class has any.
            state_dict[prefix + "rivalry"] = raw.new_zeros(raw.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, directions={self.mode!r}"

