"""Class-balanced batches for metric learning: ``P`` classes × ``K`` items per batch.

Pair- and proxy-based losses need several items of each class in a batch (positives) and many classes
(negatives). :class:`ClassBalancedBatchSampler` draws, per epoch, the classes in a seeded random order,
``P`` per batch, and ``K`` items of each. When the items have domains (drawing styles, cameras), each
class's ``K`` is split across the domains it has, so every anchor has a positive in another domain —
the pairs a cross-domain retrieval is measured on.

An epoch visits every class once per *pass*; ``passes`` (default: enough for each item to be drawn
about once) sets how many. Items of a class are drawn from a per-epoch shuffle, cyclically, so they
are used evenly; a class with fewer than ``K`` items (in a domain) repeats some. Batches depend only on
``(seed, epoch)`` (:meth:`set_epoch`, called by Lightning each epoch), and under DDP each rank takes
every ``world_size``-th batch (padded so all ranks have the same count), so ranks never share a batch.

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(6), 4)                 # 6 classes, 4 items each
    >>> domains = np.tile([0, 1], 12)                       # 2 items per class in each domain
    >>> s = ClassBalancedBatchSampler(labels, 3, 2, domains=domains, seed=0)
    >>> batches = list(s)
    >>> len(batches), [len(b) for b in batches]
    (4, [6, 6, 6, 6])
    >>> all(len(set(domains[b[i:i + 2]])) == 2 for b in batches for i in range(0, 6, 2))
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from fewsight.errors import InvalidArgumentError, ShapeError

__all__ = ["ClassBalancedBatchSampler"]


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` (P) classes × ``items_per_class`` (K) item indices.

    Args:
        labels: ``int[N]`` class of each item (``< 0``: never drawn).
        classes_per_batch: ``P``; with fewer classes, every batch holds all of them.
        items_per_class: ``K`` (>= 2 for pair losses); split across a class's domains when ``domains``.
        domains: optional ``int[N]`` domain of each item.
        passes: visits of every class per epoch (default: ``max(1, round(mean items per class / K))``).
        seed: the batches of epoch ``e`` depend only on ``(seed, e)``.
        rank, world_size: this process's share under DDP (every ``world_size``-th batch).
        encode_epoch: yield ``epoch * N + index`` instead of ``index``, for datasets that read the epoch
            from the key (the training data module's seeded view).

    ``len(sampler)`` is this rank's batch count, the same every epoch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes_per_batch: int,
        items_per_class: int,
        *,
        domains: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        passes: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        encode_epoch: bool = False,
    ) -> None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
        self.p = _int("classes_per_batch", classes_per_batch, 1)
        self.k = _int("items_per_class", items_per_class, 1)
        self.world_size = _int("world_size", world_size, 1)
        self.rank = _int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise InvalidArgumentError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {rank}")
        d = None
        if domains is not None:
            d = np.asarray(domains.cpu() if isinstance(domains, torch.Tensor) else domains).astype(np.int64).reshape(-1)
            if d.shape != y.shape:
                raise ShapeError(f"domains: expected int[{len(y)}] (one per label), got shape {d.shape}")
        self.classes = np.unique(y[y >= 0])
        if len(self.classes) == 0:
            raise InvalidArgumentError("labels: expected at least one item with a label >= 0, got none")
        self.size, self.seed, self.encode_epoch, self.epoch = len(y), int(seed), bool(encode_epoch), 0
        # Per class, one item array per domain it has (all items together without domains).
        order = np.argsort(y, kind="stable")
        starts = np.searchsorted(y[order], self.classes)
        ends = np.searchsorted(y[order], self.classes, side="right")
        self.pools: list[list[np.ndarray]] = []
        for s, e in zip(starts, ends):
            items = order[s:e]
            if d is None:
                self.pools.append([items])
            else:
                self.pools.append([items[d[items] == v] for v in np.unique(d[items])])
        mean_items = (y >= 0).sum() / len(self.classes)
        self.passes = _int("passes", passes, 1) if passes is not None else max(1, round(mean_items / self.k))
        # Each pass cuts a class permutation into groups of P (the remainder waits for the next epoch).
        self.per_pass = max(1, len(self.classes) // self.p)
        self.total_batches = self.passes * self.per_pass

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` (Lightning calls this at every epoch start)."""
        self.epoch = int(epoch)

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A3B])
        per = min(self.p, len(self.classes))
        # Per (class, domain) pool: a per-epoch shuffle read cyclically, so items are used evenly.
        queues: dict[tuple[int, int], list] = {}

        def take(c: int, j: int, n: int) -> np.ndarray:
            q = queues.get((c, j))
            if q is None:
                q = queues[(c, j)] = [rng.permutation(self.pools[c][j]), 0]
            idx = (q[1] + np.arange(n)) % len(q[0])
            q[1] += n
            return q[0][idx]

        def items(c: int) -> np.ndarray:
            m = len(self.pools[c])
            share = np.full(m, self.k // m)
            # The remainder goes to randomly chosen domains, so no domain is favoured across classes.
            share[rng.permutation(m)[: self.k % m]] += 1
            return np.concatenate([take(c, j, int(n)) for j, n in enumerate(share)])

        groups = []
        for _ in range(self.passes):
            perm = rng.permutation(len(self.classes))
            groups += [perm[i * per : (i + 1) * per] for i in range(self.per_pass)]
        offset = self.epoch * self.size if self.encode_epoch else 0
        return [(np.concatenate([items(int(c)) for c in g]) + offset).tolist() for g in groups]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch is read at the first batch, not when the loader makes its iterator
        # (Lightning makes a run's first iterator before the epoch-start hooks set the epoch).
        batches = self._epoch_batches()
        n = len(self)
        padded = (batches * (n * self.world_size // len(batches) + 1))[: n * self.world_size]
        yield from padded[self.rank :: self.world_size]

    def __len__(self) -> int:
        return -(-self.total_batches // self.world_size)
