"""`fewsight train` killed (SIGKILL) mid-epoch on a COCO / VOC folder, then `--resume`: same result as uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fewsight.data import DigitsDataset, export_dataset
from fewsight.hub import load_model

from ._tiny import tiny_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def _folder(tmp_path: Path, fmt: str) -> dict:
    src = DigitsDataset("train", 24, image_size=64, digit_size=(16, 32), max_digits=2, classes=(0, 1), seed=3)
    path = export_dataset(src, tmp_path / fmt, fmt=fmt)
    return {"type": "coco", "ann_file": str(path)} if fmt == "coco" else {"type": "voc", "root": str(path)}


def _train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fewsight.cli", "train", "--config", str(config), "--out", str(out), "--quiet", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path, fmt):
    cfg = tiny_config(tmp_path / "unused", name="dldenet", epochs=3, train=_folder(tmp_path, fmt), embedding_dim=16)
    cfg["trainer"]["threads"] = 1
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))

    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_train_cmd(config, full), check=True, env=_env(), timeout=300, capture_output=True)

    # Kill as soon as epoch 0's checkpoint exists: the process is then inside epoch 1 (6 steps per epoch).
    proc = subprocess.Popen(_train_cmd(config, cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (cut / "checkpoints" / "epoch=000.ckpt").is_file():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "model.pt").exists()  # it really stopped before the end

    done = subprocess.run(_train_cmd(config, cut, "--resume"), env=_env(), timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    a = load_model(full / "model.pt").state_dict()
    b = load_model(cut / "model.pt").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    ha = json.loads((full / "metrics.json").read_text())
    hb = json.loads((cut / "metrics.json").read_text())
    drop = {"seconds", "images_per_second", "train_seconds", "total_seconds"}
    assert "map50" in ha
    assert {k: v for k, v in ha.items() if k not in drop} == {k: v for k, v in hb.items() if k not in drop}
