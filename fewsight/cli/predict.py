"""``fewsight predict``: detect objects in images, a PNG and a JSON per image.

With ``--tile SIZE`` each image is run tile by tile (:func:`fewsight.models.predict_sliced`): large
images with small objects. Then images are decoded one at a time as ``uint8`` (3 bytes a pixel; each
batch of tiles becomes float on its own), so a 10,000 x 10,000 image is held in 300 MB (decoding peaks
near 700 MB, Pillow's own copy included), not the 1.2 GB of its float tensor. ``--max-pixels`` allows images above Pillow's decompression-bomb limit.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewsight.cli.common import check_float, image_files, output_dir

NAME = "predict"

#: The drawn PNG is 600 px wide: images are thinned to at most this side before drawing.
_PLOT_SIDE = 2048


def add_tile_options(p: argparse.ArgumentParser) -> None:
    """``--tile``, ``--overlap``, ``--merge``, ``--full-image``, ``--max-detections``, ``--max-pixels``."""
    g = p.add_argument_group("large images (sliced inference)")
    g.add_argument("--tile", type=int, metavar="SIZE",
                   help="run the detector on overlapping SIZE x SIZE tiles and merge their detections (large images "
                   "with small objects; default: the whole image at once)")
    g.add_argument("--overlap", type=float, default=0.2, help="with --tile: overlap of neighbouring tiles, a fraction "
                   "of the tile (default 0.2; an overlap of at least an object's size keeps each object whole in some tile)")
    g.add_argument("--merge", choices=("nms", "greedy"),
                   help="with --tile: keep the best of overlapping detections (class-wise NMS, default), or also "
                   "join the parts of an object cut by a tile border into one detection (greedy: counts objects)")
    g.add_argument("--full-image", action="store_true",
                   help="with --tile: also run on the whole image downscaled to one tile (objects larger than a tile)")
    g.add_argument("--max-detections", type=int, metavar="N",
                   help="keep at most N detections per image (and per tile with --tile; default: the model's "
                   "detections_per_image, all merged ones with --tile); eval also scores up to N per image and "
                   "class (COCO's 100 otherwise): crowded images need it")
    g.add_argument("--max-pixels", type=int, metavar="N",
                   help="read images of up to N pixels (default: Pillow's limit, about 89 million; larger ones are "
                   "refused as possible decompression bombs)")


def check_tile_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The :func:`~fewsight.models.predict_sliced` settings of ``--tile`` ... (``None`` without ``--tile``)."""
    from fewsight.errors import InvalidArgumentError

    for flag, value in (("--tile", args.tile), ("--max-detections", args.max_detections),
                        ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    check_float("--overlap", args.overlap, low=0.0, high=0.95)
    if args.tile is None:
        if args.full_image or args.merge is not None or args.overlap != 0.2:
            raise InvalidArgumentError("--overlap/--merge/--full-image: expected --tile SIZE with them, got no --tile")
        return None
    return {"tile": args.tile, "overlap": args.overlap, "merge": args.merge or "nms", "full_image": args.full_image,
            "batch_size": args.batch_size, "max_detections": args.max_detections,
            "detections_per_tile": args.max_detections}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="detect objects in images (PNG + JSON per image)",
        description="Run a detector on image files (or every image of a folder) and write OUT/<name>.png with the "
        "boxes drawn, OUT/<name>.json and OUT/predictions.json. With --tile, large images are run tile by tile.",
    )
    p.add_argument("--checkpoint", required=True, help="a model file (model.pt from training, or enroll's output) or a .ckpt")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections at least this score (0.3)")
    p.add_argument("--batch-size", type=int, default=8, help="images (tiles with --tile) per forward pass (8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_tile_options(p)


def run(args: argparse.Namespace) -> int:
    from fewsight.data import load_image
    from fewsight.data.dataset import read_image_size
    from fewsight.eval import detections_to_json, predict, write_json
    from fewsight.hub import load_model
    from fewsight.models import detection_cap

    check_float("--score-threshold", args.score_threshold, low=0.0, high=1.0)
    sliced = check_tile_options(args)
    files = image_files(args.images)
    names = _output_names(files)
    out = output_dir(args.out, [args.checkpoint, *args.images, *files],
                     names=[f"{n}{ext}" for n in names for ext in (".png", ".json")] + ["predictions.json"])
    if sliced is None:
        images = [load_image(f, max_pixels=args.max_pixels) for f in files]  # DataError naming a corrupt file, first
        model = load_model(args.checkpoint)
        with detection_cap(model, args.max_detections):
            predictions = predict(model, images, batch_size=args.batch_size, progress=not args.quiet)
        pairs = zip(images, predictions)
    else:
        for f in files:  # a missing, unreadable or too large file is named before any work
            read_image_size(f, max_pixels=args.max_pixels)
        model = load_model(args.checkpoint)
        pairs = _sliced_predictions(model, files, args, sliced)  # one decoded image at a time
    classes = list(model.classes)
    summary = []
    for f, name, (image, pred) in zip(files, names, pairs):
        keep = pred["scores"] >= args.score_threshold
        kept = {k: v[keep] for k, v in pred.items()}
        dets = detections_to_json(kept, classes)
        _plot(image, kept, classes, out / f"{name}.png", args.score_threshold)
        write_json({"image": str(f), "detections": dets}, out / f"{name}.json")
        summary.append({"image": str(f), "output": f"{name}.png", "detections": dets})
        print(f"{f}: {len(dets)} detection(s)")
    write_json({"classes": classes, "score_threshold": args.score_threshold, "images": summary},
               out / "predictions.json")
    print(f"wrote {len(files)} image(s) to {out}")
    return 0


def _sliced_predictions(model: Any, files: list[Path], args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    """``(image, detections)`` per file, decoding each image only when its turn comes."""
    from fewsight.data import load_image
    from fewsight.eval.evaluate import progress_bar
    from fewsight.models import predict_sliced

    with progress_bar(not args.quiet) as bar:
        task = bar.add_task("predict (tiles)", total=len(files))
        for f in files:
            image = load_image(f, max_pixels=args.max_pixels, dtype=None)  # uint8: 3 bytes a pixel
            pred = predict_sliced(model, image, **settings)
            bar.advance(task)
            yield image, {k: v.detach().cpu() for k, v in pred.items()}


def _plot(image: Any, prediction: dict[str, Any], classes: list[str], path: Path, score_threshold: float) -> None:
    """The PNG of one image; a large image is thinned first (the figure is 600 px wide) so that drawing
    it costs no float copy of every pixel."""
    from fewsight.eval import plot_detections

    step = -(-max(image.shape[-2:]) // _PLOT_SIDE)
    if step > 1:
        image = image[:, ::step, ::step]
        prediction = {**prediction, "boxes": prediction["boxes"] / step}
    if not image.is_floating_point():
        image = image.float() / 255
    plot_detections(image, prediction, None, classes, path, score_threshold=score_threshold)


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
