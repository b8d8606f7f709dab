"""``fewsight predict``: detect objects in images, a PNG and a JSON per image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewsight.cli.common import check_float, image_files, output_dir

NAME = "predict"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="detect objects in images (PNG + JSON per image)",
        description="Run a detector on image files (or every image of a folder) and write OUT/<name>.png with the "
        "boxes drawn, OUT/<name>.json and OUT/predictions.json.",
    )
    p.add_argument("--checkpoint", required=True, help="a model file (model.pt from training, or enroll's output) or a .ckpt")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections at least this score (0.3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from fewsight.data import load_image
    from fewsight.eval import detections_to_json, plot_detections, predict, write_json
    from fewsight.hub import load_model

    check_float("--score-threshold", args.score_threshold, low=0.0, high=1.0)
    files = image_files(args.images)
    names = _output_names(files)
    out = output_dir(args.out, [args.checkpoint, *args.images, *files],
                     names=[f"{n}{ext}" for n in names for ext in (".png", ".json")] + ["predictions.json"])
    images = [load_image(f) for f in files]  # DataError naming a corrupt file, before any work
    model = load_model(args.checkpoint)
    classes = list(model.classes)
    predictions = predict(model, images, batch_size=args.batch_size, progress=not args.quiet)
    summary = []
    for f, name, image, pred in zip(files, names, images, predictions):
        keep = pred["scores"] >= args.score_threshold
        kept = {k: v[keep] for k, v in pred.items()}
        dets = detections_to_json(kept, classes)
        plot_detections(image, kept, None, classes, out / f"{name}.png", score_threshold=args.score_threshold)
        write_json({"image": str(f), "detections": dets}, out / f"{name}.json")
        summary.append({"image": str(f), "output": f"{name}.png", "detections": dets})
        print(f"{f}: {len(dets)} detection(s)")
    write_json({"classes": classes, "score_threshold": args.score_threshold, "images": summary},
               out / "predictions.json")
    print(f"wrote {len(files)} image(s) to {out}")
    return 0


def _output_names(files: list[Path]) -> list[str]:
    """One output stem per image: its own, with ``_1``, ``_2`` ... for repeated stems."""
    used: set[str] = set()
    names = []
    for f in files:
        name, k = f.stem, 1
        while name in used:
            name, k = f"{f.stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names
