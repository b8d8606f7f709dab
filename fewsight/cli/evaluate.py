"""``fewsight eval``: evaluate a detector file on a dataset (COCO mAP); ``--tile`` evaluates it sliced."""

from __future__ import annotations

import argparse
from typing import Any

from fewsight.cli.common import add_data_source, eval_dataset, output_dir, print_metrics, read_class_map
from fewsight.cli.predict import add_tile_options, check_tile_options

NAME = "eval"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="evaluate a trained detector on a dataset (COCO mAP)",
        description="Evaluate a detector file (model.pt or a training checkpoint) on a dataset and print / write "
        "COCO mAP, mAP50 and per-class AP. The dataset's classes are the model's. With --tile, each image is run "
        "tile by tile (large images with small objects).",
    )
    p.add_argument("--checkpoint", required=True, help="a model file (model.pt from training, or enroll's output) or a .ckpt")
    add_data_source(p, "--data", "a COCO .json, a CSV file, a VOC folder (with Annotations/), a YOLO image folder, "
                    "or 'digits'")
    p.add_argument("--num-images", type=int, help="digits / digits_large: number of held-out canvases (default 200 "
                   "digits, 10 digits_large)")
    p.add_argument("--batch-size", type=int, default=8, help="images (tiles with --tile) per forward pass (8)")
    p.add_argument("--out", help="folder for metrics.json, pr_curve.png and detections.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--class-map", metavar="FILE",
                   help="YAML / JSON {name: new name or null}: rename, merge or drop (null) the data's classes as "
                   "they are read, so they match the model's")
    add_tile_options(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from fewsight.data import ImageFileDataset, unwrap_relabeled
    from fewsight.errors import DataError, InvalidArgumentError
    from fewsight.eval import evaluate_model, plot_detection_grid, plot_precision_recall, write_json
    from fewsight.hub import load_model
    from fewsight.models import SlicedDetector, detection_cap

    sliced = check_tile_options(args)
    out = None if args.out is None else output_dir(
        args.out, [args.checkpoint, args.data, args.images], names=["metrics.json", "pr_curve.png", "detections.png"])
    model = load_model(args.checkpoint)
    classes = list(model.classes)
    options: dict[str, Any] = {"class_map": read_class_map(args.class_map)}
    if args.max_pixels is not None:
        if (args.format or args.data) in ("digits", "digits_large"):
            raise InvalidArgumentError(f"--max-pixels: expected an image-file dataset, got the generated "
                                       f"{args.format or args.data}")
        options["max_pixels"] = args.max_pixels
    dataset = eval_dataset(args, classes, **options)
    if len(dataset) == 0:
        raise DataError(args.data, "the dataset has no images")
    files = unwrap_relabeled(dataset)
    if sliced is not None and isinstance(files, ImageFileDataset):
        files.image_dtype = torch.uint8  # tiles are cut from 3 bytes per pixel, not 12
    # Sliced: one image at a time through the wrapper, whose tiles are batched by --batch-size.
    detector = model if sliced is None else SlicedDetector(model, **sliced)
    with detection_cap(model, args.max_detections if sliced is None else None):
        metrics, predictions = evaluate_model(
            detector, dataset, args.batch_size if sliced is None else 1, class_names=classes,
            progress=not args.quiet, pr_curves=out is not None, return_predictions=True,
            max_detections=max(100, args.max_detections or 100),
        )
    curves = metrics.pop("pr_curves", None)
    if metrics.get("num_ground_truth") == 0:
        raise DataError(args.data, f"no ground-truth boxes in its {len(dataset)} image(s): there is nothing to score "
                        "the detections against (is it a labelled dataset of the model's classes?)")
    print_metrics(metrics)
    if out is not None:
        write_json(metrics, out / "metrics.json")
        if curves is not None:
            plot_precision_recall(curves, path=out / "pr_curve.png")
        n = min(8, len(dataset))
        samples = [dataset[i] for i in range(n)]
        plot_detection_grid([s[0].float() / 255 if s[0].dtype == torch.uint8 else s[0] for s in samples], predictions[:n], [s[1] for s in samples], classes,
                            out / "detections.png")
        print(f"wrote {out / 'metrics.json'}")
    return 0
