"""Whole-image vs sliced inference on large canvases of small objects (``digits_large``).

For one detector file (``--checkpoint``, trained on digits: its classes are digit names) and ``--num-images``
held-out 2,048 x 2,048 canvases of 100-300 MNIST digits 12-40 px tall (``fewsight.data.digits.LargeDigitsDataset``,
test split, seed ``--seed``), three ways to run the detector:

* ``whole``: the whole canvas at once, as the model resizes it (``min_size`` / ``max_size``; a model without
  them runs at full resolution), or shrunk to ``--whole-size`` px on its longer side first (a detector with a
  fixed input: a 12 px digit of a 2,048 px canvas is 3 px at 512);
* ``sliced``: ``fewsight.models.predict_sliced``, ``--tile`` px tiles overlapping by ``--overlap``, merged by
  class-wise NMS (the default);
* ``sliced-greedy``: the same tiles, greedy merging of the boxes cut by a tile border (an object cut by a
  border is one detection);
* ``sliced-full``: ``sliced`` plus one pass over the whole canvas downscaled to a tile (``full_image=True``).

Training on tiles against training on downscaled canvases, on one wall-clock budget (``--train MINUTES``):
``configs/digits_large_tiles.yaml`` (random 512 px crops at full resolution) and
``configs/digits_large_downscaled.yaml`` (whole canvases the model shrinks to 1,024 px), both with
``anchor_generator: auto``, are trained at the same time, one thread and no loader worker each (so the load
of the machine falls on both alike), into ``--runs`` (default ``runs/``); then each model runs as it was
trained: the tile model sliced (and whole, at full resolution), the downscaled one whole. Models already in
``--runs`` are evaluated without training again unless ``--retrain``.

Per mode: AP50 and AP (COCO AP@[.50:.95]) over all digits and over the "small" ones (area < 32 x 32 px,
most digits here), detections per image, and seconds per image (inference only, the canvas already drawn;
one warm-up image first, not counted). The metric is torchmetrics' ``MeanAveragePrecision`` (pycocotools
backend), as in ``fewsight.eval``; AP is averaged from its precision table (``extended_summary``) at
``--max-detections`` detections per image, because pycocotools' summary AP counts at most 100 (fewer than the
objects of one canvas).

    python bench/large_images.py --checkpoint runs/digits/model.pt                      # 10 canvases, tile 512
    python bench/large_images.py --checkpoint runs/digits/model.pt --tile 256 --overlap 0.25 --num-images 20
    python bench/large_images.py --checkpoint model.pt --device cuda --batch-size 16
    python bench/large_images.py --train 35 --num-images 10                             # tiles vs downscaled

Prints the versions, the machine and a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchmetrics.detection import MeanAveragePrecision

from _env import cpu_name  # bench/ is on sys.path when a script runs
import fewsight
from fewsight.data.digits import LargeDigitsDataset
from fewsight.hub import load_model
from fewsight.models import detection_cap, predict_sliced


MODES = ("whole", "sliced", "sliced-greedy", "sliced-full")
TRAININGS = ("tiles", "downscaled")
ROOT = Path(__file__).resolve().parent.parent


def _metric(max_detections: int) -> MeanAveragePrecision:
    m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=[1, 10, max_detections],
                             extended_summary=True, backend="pycocotools")
    m.warn_on_many_detections = False
    return m


def _ap(precision: torch.Tensor, iou: slice | int, area: int) -> float:
    """COCO's mean over the valid entries of ``precision[T, R, K, A, M]`` at the largest max-detections:
    ``iou`` 0 is IoU 0.5; ``area`` 0 all, 1 small."""
    p = precision[iou, :, :, area, -1]
    p = p[p > -1]
    return float(p.mean()) if p.numel() else float("nan")


def _whole(model, image: torch.Tensor, size: int | None) -> dict:
    x = image.float().div_(255.0).unsqueeze(0)
    if size is None:
        (pred,) = model(x)
        return pred
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    small = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                          align_corners=False)
    (pred,) = model(small)
    return {**pred, "boxes": pred["boxes"] / scale}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(model, canvases, targets, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    metric = _metric(args.max_detections)
    seconds, counts = [], []
    for k, image in enumerate(canvases):
        t0 = time.perf_counter()
        if mode == "whole":
            with torch.inference_mode(), detection_cap(model, args.max_detections):
                pred = _whole(model, image.to(device), args.whole_size)
        else:
            pred = predict_sliced(model, image.to(device), tile=args.tile, overlap=args.overlap,
                                  batch_size=args.batch_size, full_image=mode == "sliced-full",
                                  merge="greedy" if mode == "sliced-greedy" else "nms",
                                  max_detections=args.max_detections, detections_per_tile=args.max_detections)
        _sync(device)
        if k > 0 or len(canvases) == 1:  # the first image warms up (allocations, kernels)
            seconds.append(time.perf_counter() - t0)
        pred = {key: v.detach().cpu() for key, v in pred.items()}
        counts.append(len(pred["boxes"]))
        metric.update([pred], [targets[k]])
    precision = metric.compute()["precision"]
    return {"mode": mode if args.whole_size is None or mode != "whole" else f"whole at {args.whole_size} px",
            "ap50": _ap(precision, 0, 0), "ap50_small": _ap(precision, 0, 1),
            "ap": _ap(precision, slice(None), 0), "ap_small": _ap(precision, slice(None), 1),
            "detections": statistics.mean(counts), "seconds": statistics.mean(seconds)}


def train_both(args: argparse.Namespace) -> dict[str, Path]:
    """Train the tiles and the downscaled configs side by side on one budget; their model files."""
    runs = Path(args.runs)
    models = {name: runs / f"digits_large_{name}" / "model.pt" for name in TRAININGS}
    todo = [n for n in TRAININGS if args.retrain or not models[n].is_file()]
    procs = []
    for name in todo:
        out = runs / f"digits_large_{name}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fewsight.cli", "train", "--config", str(ROOT / f"configs/digits_large_{name}.yaml"),
               "--set", f"out_dir={out}", "--set", f"trainer.max_time={round(args.train * 60)}", "--set", "trainer.threads=1",
               "--set", "data.num_workers=0", "--set", "trainer.progress_bar=false",
               "--set", "checkpoint.resume=false"]
        print(f"training {name} for {args.train} min: {' '.join(cmd[1:])}", flush=True)
        procs.append((name, subprocess.Popen(cmd, stdout=open(out / "train.log", "w"), stderr=subprocess.STDOUT)))
    for name, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"training {name} failed: see {runs / f'digits_large_{name}' / 'train.log'}")
    return models


def evaluate_trainings(models: dict[str, Path], canvases, targets, args, device) -> list[dict]:
    rows = []
    for name, path in models.items():
        model = load_model(path).to(device).eval()
        steps = _steps(path.parent)
        modes = ("sliced", "whole") if name == "tiles" else ("whole",)
        for mode in modes:
            r = run_mode(model, canvases, targets, mode, args, device)
            size = model.max_size or "full resolution"
            r["mode"] = f"trained on {name} ({steps} steps), {'sliced' if mode == 'sliced' else f'whole at {size}'}"
            rows.append(r)
    return rows


def _steps(run: Path) -> str:
    """Optimizer steps of a run, from its CSV log (the last logged step)."""
    log = run / "logs" / "metrics.csv"
    if not log.is_file():
        return "?"
    with open(log) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]
    return str(max(steps) + 1) if steps else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a detector file trained on digits (model.pt); not with --train")
    p.add_argument("--train", type=float, metavar="MINUTES",
                   help="train the tiles and the downscaled configs on this budget each (side by side), then compare")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="--train: where the two runs go (default runs/)")
    p.add_argument("--retrain", action="store_true", help="--train: train again even if the models exist")
    p.add_argument("--num-images", type=int, default=10, help="test canvases (default 10)")
    p.add_argument("--image-size", type=int, default=2048, help="canvas side (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="canvas seed of the test split (default 0)")
    p.add_argument("--tile", type=int, default=512, help="tile side of sliced inference (default 512)")
    p.add_argument("--overlap", type=float, default=0.2, help="tile overlap, a fraction of the tile (default 0.2)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--max-detections", type=int, default=2000, help="detections kept and scored per image, and per "
                   "tile (default 2000)")
    p.add_argument("--whole-size", type=int, help="whole mode: shrink the canvas to this longer side first "
                   "(default: the model's own resizing)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help=f"default: {' '.join(MODES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if (args.checkpoint is None) == (args.train is None):
        raise SystemExit("expected --checkpoint FILE or --train MINUTES")
    models = train_both(args) if args.train is not None else None
    model = load_model(args.checkpoint or models["tiles"]).to(device).eval()
    classes = list(model.classes)
    if not all(c.isdigit() and len(c) == 1 for c in classes):
        raise SystemExit(f"--checkpoint: expected a model of digit classes (0-9), got classes {classes}")

    data = LargeDigitsDataset("test", args.num_images, image_size=args.image_size, classes=classes, seed=args.seed)
    canvases, targets = [], []
    for i in range(len(data)):
        image, target = data[i]
        canvases.append(image.mul(255.0).round_().to(torch.uint8))  # a quarter of the float's memory
        targets.append(target)

    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, fewsight {fewsight.__version__}, "
          f"python {platform.python_version()}; {hw}")
    objects = sum(len(t["boxes"]) for t in targets)
    print(f"{args.checkpoint or 'trained: ' + ', '.join(map(str, models.values()))}: {type(model).__name__}, "
          f"classes {classes}; {len(canvases)} canvases of {args.image_size} px "
          f"({objects} digits, seed {args.seed}); tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, "
          f"max detections {args.max_detections}, whole size {args.whole_size or 'as the model resizes'}")
    if models is not None:
        rows = evaluate_trainings(models, canvases, targets, args, device)
    else:
        rows = [run_mode(model, canvases, targets, mode, args, device) for mode in args.modes]
    print()
    print("| mode | AP50 | AP50 small | AP | AP small | detections / image | s / image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['ap50']:.3f} | {r['ap50_small']:.3f} | {r['ap']:.3f} | {r['ap_small']:.3f} | "
              f"{r['detections']:.0f} | {r['seconds']:.3f} |")


if __name__ == "__main__":
    main()
