"""Lightning checkpoint IO: atomic same-folder writes and ``weights_only=True`` reads.

Lightning's own "atomic" save stages the file in the system temp dir and moves it, which is a copy
— not atomic — when that is another file system. :class:`AtomicCheckpointIO` writes through a
temporary file in the destination folder and ``os.replace``, and reads with
:func:`fewsight.hub.load_checkpoint_file` (a missing, truncated or foreign file raises
:class:`~fewsight.errors.CheckpointError` naming it). Model files (``model.pt``, ``embedder.pt``)
are :mod:`fewsight.hub`'s.

Example:
    >>> import os, tempfile, torch
    >>> io = AtomicCheckpointIO()
    >>> p = os.path.join(tempfile.mkdtemp(), "last.ckpt")
    >>> io.save_checkpoint({"step": torch.tensor(3)}, p)
    >>> io.load_checkpoint(p)["step"].item()
    3
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fewsight._io import atomic_write_bytes
from fewsight.hub import check_finite_weights, load_checkpoint_file

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic same-folder writes, ``weights_only=True`` reads (local paths;
    remote ``scheme://`` paths fall back to Lightning's implementation for writing)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(buffer.getvalue(), path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        ckpt = load_checkpoint_file(path)
        # NaN / inf weights would train or evaluate silently into NaN.
        if isinstance(ckpt.get("state_dict"), dict):
            check_finite_weights(path, ckpt["state_dict"])
        return ckpt
