"""DDP through Lightning with 2 CPU processes (gloo): ``fewsight train`` with ``strategy: ddp``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train._tiny import digits_split, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_ddp_two_cpu_processes(tmp_path):
    cfg = tiny_config(tmp_path / "run", name="dldenet", embedding_dim=8, val=digits_split("val", 4))
    cfg["trainer"].update({"strategy": "ddp", "devices": 2, "accelerator": "cpu", "threads": 1})
    cfg["eval"] = {"plot_images": 0, "pr_curves": False}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "fewsight.cli", "train", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "MEMBER: 2/2" in log  # both ranks joined the process group
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"map", "map50"} <= set(metrics)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        assert "val/map50" in f.readline()
