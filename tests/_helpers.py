"""Shared test helpers: a one-thread fixture for tiny models and a dispatch mode measuring tensor sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module (``from tests._helpers import one_thread``) to run it on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds barrier waits on a shared machine
    yield
    torch.set_num_threads(threads)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (``max_numel``) while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out
