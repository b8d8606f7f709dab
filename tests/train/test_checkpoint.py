"""Lightning checkpoint IO: atomic writes keep the old file, weights_only reads raise CheckpointError."""

from __future__ import annotations

import pickle

import pytest
import torch

from fewsight.errors import CheckpointError
from fewsight.train import AtomicCheckpointIO


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io_plugin.load_checkpoint(path)["step"].item() == 1
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        io_plugin.save_checkpoint({"bad": lambda: 0}, path)  # lambdas cannot be pickled
    assert io_plugin.load_checkpoint(path)["step"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        io_plugin.load_checkpoint(path)
