"""``fewsight train``: train a detector or a crop embedder from a YAML config."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fewsight.cli.common import output_dir, print_metrics

NAME = "train"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="train a detector or an embedder from a YAML config",
        description="Train from a YAML config (see fewsight.train.config): checkpoints each epoch, best and "
        "last under OUT/checkpoints, logs, the model file and metrics.json.",
    )
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--out", help="output folder (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt if present (another checkpoint: --set checkpoint.resume=PATH)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.lr=0.005 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from fewsight.train import load_config, train

    # --resume first, so that an explicit --set checkpoint.resume=PATH wins.
    overrides = ["checkpoint.resume=true"] if args.resume else []
    overrides += list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={json.dumps(str(args.out))}")
    if args.quiet:
        overrides.append("trainer.progress_bar=false")
    cfg = load_config(args.config, overrides)
    output_dir(cfg.out_dir, [args.config], names=["config.yaml", "metrics.json", "model.pt", "embedder.pt"],
               flag="--out" if args.out else "out_dir")
    result = train(cfg)
    metrics = getattr(result, "metrics", None)
    if metrics is not None and "map50" in metrics:
        print_metrics(metrics)
    elif metrics:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if getattr(result, "model_path", None) is not None:
        print(f"model: {result.model_path}")
    return 0
