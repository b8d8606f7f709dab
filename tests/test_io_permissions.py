"""Outputs are written atomically with the permissions of an ordinary new file (the umask's)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import fewsight._io as fio
from fewsight._io import atomic_write_bytes, current_umask
from fewsight.data import save_image, write_coco
from fewsight.eval import write_json

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_files_get_the_umask_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    assert _mode(atomic_write_bytes(b"x", tmp_path / "model.pt")) == expected
    assert _mode(write_json({"map": 0.5}, tmp_path / "metrics.json")) == expected
    save_image(torch.zeros(3, 4, 4), tmp_path / "img.png")
    assert _mode(tmp_path / "img.png") == expected
    target = {"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0]]), "labels": torch.tensor([0])}
    assert _mode(write_coco(tmp_path / "ann.json", ["img.png"], [(4, 4)], [target], ["cat"])) == expected


def test_overwrite_takes_the_umask_not_the_old_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    path.chmod(0o600)
    write_json({"a": 1}, path)
    assert _mode(path) == 0o644 and path.read_text().startswith("{")


def test_new_folders_get_the_default_permissions(tmp_path, umask):
    umask(0o022)
    atomic_write_bytes(b"x", tmp_path / "a" / "b" / "f.bin")
    assert _mode(tmp_path / "a") == 0o755 and _mode(tmp_path / "a" / "b") == 0o755


def test_umask_without_proc(tmp_path, umask, monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(fio, "open", no_proc, raising=False)
    umask(0o027)
    assert current_umask() == 0o027
    assert _mode(atomic_write_bytes(b"x", tmp_path / "f")) == 0o640
    assert os.umask(0o027) == 0o027  # reading it left it as it was


def test_no_temporary_file_left_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes("not bytes", path)  # type: ignore[arg-type]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(b"new", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert path.read_bytes() == b"old"
