"""``fewsight demo``: train and evaluate DLDENet on the digits data (CPU, minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewsight.cli.common import output_dir, print_metrics

NAME = "demo"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="train and evaluate DLDENet on the digits data (CPU, minutes)",
        description="Train DLDENet on handwritten-digit canvases (configs/demo.yaml), evaluate it on held-out "
        "canvases and write OUT/metrics.json (map50, map, per class, timing) and OUT/detections.png.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", help="a YAML config to use instead of the built-in demo recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.max_epochs=2 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from fewsight.train.demo import run_demo

    output_dir(args.out, [args.config], names=["config.yaml", "metrics.json", "detections.png", "model.pt"])
    metrics = run_demo(
        args.out, config=args.config, overrides=args.overrides, threads=args.threads, progress=not args.quiet
    )
    print_metrics(metrics)
    print(f"total {metrics['total_seconds']:.1f} s; wrote {Path(args.out) / 'metrics.json'} and "
          f"{Path(args.out) / 'detections.png'}")
    return 0
