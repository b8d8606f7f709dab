"""Metric learning on emoji (cross-style retrieval of unseen classes): one row per loss and seed.

    python bench/metric_learning.py --seeds 0 1                                 # the best recipe, both seeds
    python bench/metric_learning.py --losses circle triplet arcface --size 64 --set model.grid=2 model.tta_scales=[]
    python bench/metric_learning.py --epochs 1 --set data.max_classes=64 --losses circle   # smoke run

Each run is ``fewsight train`` on ``configs/emoji_embedder.yaml`` with ``loss.name``, ``seed``, ``data.size``
and ``trainer.max_epochs`` replaced (and any ``--set`` override): the base emoji classes train, the 955 novel
classes are the test (Google-style queries against the Twitter-style gallery, one image per class). The table
reads each run's ``metrics.json``: Recall@1 of the plain cosine, after the learned whitening, and with CSLS
against augmented base-class Google views; wall-clock seconds on the machine at hand.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, on cores shared with other processes. Set before torch
# loads its OpenMP runtime; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fewsight.train import train
from fewsight.train.embedder_config import EMBEDDER_LOSSES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/emoji_embedder.yaml")
    p.add_argument("--losses", nargs="+", default=["circle_arcface"], choices=EMBEDDER_LOSSES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=None, help="crop side (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/metric_learning"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for loss in args.losses:
        runs = []
        for seed in args.seeds:
            out = args.out / f"{loss}_seed{seed}"
            overrides = [f"loss.name={loss}", f"seed={seed}", f"out_dir={out}", "trainer.progress_bar=false", *args.set]
            if args.size:
                overrides.append(f"data.size={args.size}")
            if args.epochs:
                overrides.append(f"trainer.max_epochs={args.epochs}")
            t0 = time.perf_counter()
            train(args.config, overrides=overrides)
            test = json.loads((out / "metrics.json").read_text())["test"]
            white = test.get("whitened", {})
            runs.append({"seed": seed, "cosine": test["cosine"]["recall@1"], "r5": test["cosine"]["recall@5"],
                         "whitened": white.get("recall@1", float("nan")),
                         "csls": white.get("csls", {}).get("recall@1", float("nan")), "s": time.perf_counter() - t0})
            print(f"{loss} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items() if k != "seed"), flush=True)
        rows.append((loss, runs))
    print("\n| loss | novel R@1 cosine | per seed | R@5 | whitened | whitened + CSLS | s / run |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for loss, runs in rows:
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "seed"}
        per_seed = " / ".join(f"{r['cosine']:.3f}" for r in runs)
        print(f"| {loss} | {mean['cosine']:.3f} | {per_seed} | {mean['r5']:.3f} | {mean['whitened']:.3f} "
              f"| {mean['csls']:.3f} | {mean['s']:.0f} |")


if __name__ == "__main__":
    main()
