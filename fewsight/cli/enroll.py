"""``fewsight enroll``: add classes to a DLDENet from a few boxed examples, without training.

``--tile SIZE`` embeds each support box from the SIZE x SIZE tile that shows it best
(:func:`fewsight.fewshot.tile_support`): support images larger than the model's input keep their
objects at full resolution, as sliced inference (``predict --tile``) will see them.
"""

from __future__ import annotations

import argparse
from typing import Any

from fewsight.cli.common import (
    add_data_source,
    add_enroll_settings,
    check_float,
    enroll_settings,
    flag_errors,
    load_dldenet,
    output_file,
    support_dataset,
    with_crop_embedder,
)

NAME = "enroll"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="add classes to a DLDENet from a few boxed examples (no training)",
        description="Enroll new classes into a DLDENet detector file from boxed examples, without gradient steps, "
        "and write a detector file that detects them (use it with predict / eval). Each new class's direction is "
        "the mean embedding of the anchors matched to its boxes.",
    )
    p.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    add_data_source(p, "--support", "boxed examples: a COCO .json, a CSV file, a VOC folder, a YOLO image folder, "
                    "or 'digits'")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="support classes to enroll (default: every class the model does not know; digits: 8 9)")
    p.add_argument("--shots", type=int, help="use K sampled examples per class (default: every box)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --shots sample (default 0)")
    add_enroll_settings(p)
    g = p.add_argument_group("large support images")
    g.add_argument("--tile", type=int, metavar="SIZE",
                   help="embed each support box from the SIZE x SIZE tile that holds it best (large images with "
                   "small objects; use the --tile of predict / eval; default: whole images)")
    g.add_argument("--overlap", type=float, default=0.2,
                   help="with --tile: overlap of neighbouring tiles, a fraction of the tile (default 0.2)")
    g.add_argument("--max-pixels", type=int, metavar="N",
                   help="read support images of up to N pixels (default: Pillow's limit, about 89 million)")
    p.add_argument("--crop-embedder", metavar="FILE",
                   help="also score the new classes on box crops with this embedder file (from `fewsight train` "
                   "with an embedder config): the detector proposes boxes, similarity to the support crops labels "
                   "them (fewsight.fewshot.CropRescorer; the output file holds both networks)")
    p.add_argument("--out", required=True, help="output detector file (.pt)")


def _check_tile(args: argparse.Namespace) -> None:
    from fewsight.errors import InvalidArgumentError

    for flag, value in (("--tile", args.tile), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    check_float("--overlap", args.overlap, low=0.0, high=0.95)
    if args.tile is None and args.overlap != 0.2:
        raise InvalidArgumentError(f"--overlap: expected --tile SIZE with it, got --overlap {args.overlap} alone")
    if args.max_pixels is not None and (args.format or args.support) == "digits":
        raise InvalidArgumentError("--max-pixels: expected an image-file --support, got the generated digits")


def _support(args: argparse.Namespace) -> Any:
    if args.max_pixels is None:
        return support_dataset(args)
    from fewsight.data import open_dataset

    with flag_errors("--images", "images"), flag_errors("--format", "format"):
        return open_dataset(args.support, args.format, images=args.images, max_pixels=args.max_pixels)


def run(args: argparse.Namespace) -> int:
    from fewsight.errors import InvalidArgumentError
    from fewsight.fewshot import enroll_from_dataset
    from fewsight.hub import save_model

    _check_tile(args)
    output_file(args.out, [args.checkpoint, args.crop_embedder, args.support, args.images])
    model = load_dldenet(args.checkpoint)
    if args.crop_embedder is not None and hasattr(model, "embedder"):
        raise InvalidArgumentError(f"--crop-embedder: expected a plain DLDENet --checkpoint, got {args.checkpoint}, "
                                   "which already has a crop embedder (enroll into it without --crop-embedder)")
    model = with_crop_embedder(model, args.crop_embedder)
    support = _support(args)
    names = args.classes
    if names is None and (args.format == "digits" or args.support == "digits"):
        names = ["8", "9"]
    before = list(model.classes)
    settings = enroll_settings(args)
    new = enroll_from_dataset(model, support, names, k=args.shots, seed=args.seed, settings=settings,
                              tile=args.tile, overlap=args.overlap)
    added = [model.classes[i] for i in new]
    save_model(model, args.out, metadata={"enrolled": added, "support": str(args.support), "shots": args.shots,
                                             "seed": args.seed, "calibrate": settings.calibrate,
                                             "rivalry": settings.rivalry, "base_classes": before,
                                             "crop_embedder": args.crop_embedder, "tile": args.tile,
                                             "overlap": args.overlap if args.tile is not None else None})
    print(f"enrolled {', '.join(added)} ({'every box' if args.shots is None else f'{args.shots} per class'}); "
          f"the model now has {len(model.classes)} classes; wrote {args.out}")
    return 0
