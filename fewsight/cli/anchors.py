"""``fewsight anchors``: box statistics of a dataset, the anchors' best-possible recall, a fitted anchor set."""

from __future__ import annotations

import argparse
from typing import Any

from fewsight.cli.common import check_float, flag_errors

NAME = "anchors"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="fit anchors to a dataset (box statistics, best-possible recall, a YAML snippet)",
        description="Read the boxes of a dataset and print the distribution of their sizes and aspect ratios, the "
        "best-possible recall of the current anchors (the fraction of boxes some anchor matches at IoU >= the "
        "matcher's threshold, anchors at every stride position) and of anchors fitted to the boxes (IoU k-means "
        "clusters -> aspect ratios, per-level sizes chosen by recall), and a model.anchor_generator YAML snippet. "
        "With --config: the training split and the model of a training config, as its resizing or tiling feeds "
        "the network; what 'anchor_generator: auto' resolves to.",
    )
    p.add_argument("--data", help="a COCO .json, a CSV file, a VOC folder, a YOLO image folder, or 'digits'")
    from fewsight.data import FORMATS

    p.add_argument("--format", choices=FORMATS, help="dataset format of --data (default: inferred)")
    p.add_argument("--images", help="image folder for COCO / CSV (default: relative to the annotation file)")
    p.add_argument("--config", help="a training config (YAML): its data.train split (tiling and class_map "
                   "included) and its model's levels, anchors, resizing and matcher threshold")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--config: override a config entry (as fewsight train --set)")
    p.add_argument("--num-images", type=int, default=500, help="digits: number of training canvases (default 500)")
    p.add_argument("--levels", type=int, nargs="+", metavar="L",
                   help="--data: pyramid levels of the detector (default 3 4 5 6 7: strides 8 ... 128)")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="--data: the detector resizes images so their longer side is S (its max_size); boxes are "
                   "scaled alike (default: no resize)")
    p.add_argument("--iou-threshold", type=float,
                   help="--data: the matcher's foreground IoU (object_threshold, default 0.5)")
    p.add_argument("--clusters", type=int, default=9, help="IoU k-means clusters (default 9)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import yaml

    from fewsight.errors import DataError, InvalidArgumentError
    from fewsight.geometry import propose_anchors

    if (args.data is None) == (args.config is None):
        raise InvalidArgumentError("--data / --config: expected exactly one of them, got "
                                   + ("both" if args.data else "neither"))
    if args.config is not None:
        for flag in ("levels", "image_size", "iou_threshold", "format", "images"):
            if getattr(args, flag) is not None:
                raise InvalidArgumentError(f"--{flag.replace('_', '-')}: expected nothing with --config (the config's "
                                           f"model and data say it), got {getattr(args, flag)!r}")
    elif args.overrides:
        raise InvalidArgumentError(f"--set: only with --config, got {args.overrides}")
    for flag, value in (("--image-size", args.image_size), ("--clusters", args.clusters),
                        ("--num-images", args.num_images)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    if args.iou_threshold is not None:
        check_float("--iou-threshold", args.iou_threshold, low=0.0, high=1.0, low_open=True)
    source = _config_source(args) if args.config is not None else _data_source(args)
    boxes, sizes, current, threshold, label = source
    if len(boxes) == 0:
        raise DataError(args.data or args.config, "no boxes in the dataset: there is nothing to fit anchors to")
    _print_statistics(boxes, sizes)
    with flag_errors("--clusters", "k"):
        p = propose_anchors(boxes, sizes, current, clusters=min(args.clusters, len(boxes)),
                            threshold=threshold, seed=args.seed)
    print(f"\nIoU k-means, {len(p.centroids)} clusters (w x h px: boxes): " + ", ".join(
        f"{w:.0f}x{h:.0f}: {int(n)}" for (w, h), n in zip(p.centroids.tolist(), p.counts)))
    thr = f"IoU >= {threshold:g}"
    print(f"\nbest-possible recall ({thr}, anchors at every stride position):")
    print(f"  {label:<17s} {p.current_recall:.4f}  (mean best IoU {p.current_mean_iou:.3f})  {_describe(current)}")
    if p.multiplier is None:
        print(f"  the {label} are already the best of the candidates")
    else:
        print(f"  fitted anchors    {p.recall:.4f}  (mean best IoU {p.mean_iou:.3f})  {_describe(p.generator)}")
    print("\n# model.anchor_generator for a training config (the head's anchors per location follow it):")
    print(yaml.safe_dump({"model": {"anchor_generator": p.config()}}, default_flow_style=None, sort_keys=False).rstrip())
    return 0


def _data_source(args: argparse.Namespace) -> tuple[Any, Any, Any, float, str]:
    from fewsight.data import dataset_boxes, open_dataset
    from fewsight.geometry import AnchorGenerator
    from fewsight.models.transform import DetectionTransform
    from fewsight.train.anchors import scale_to_network

    with flag_errors("--levels", "levels"):
        current = AnchorGenerator(levels=[3, 4, 5, 6, 7] if args.levels is None else args.levels)
    with flag_errors("--images", "images"), flag_errors("--format", "format"):
        if (args.format or args.data) == "digits":
            dataset = open_dataset(None, "digits", split="train", num_images=args.num_images)
        else:
            dataset = open_dataset(args.data, args.format, images=args.images)
    boxes, sizes = _read_boxes(args, len(dataset), lambda advance: dataset_boxes(dataset, advance=advance))
    if args.image_size is not None:
        boxes, sizes = scale_to_network(boxes, sizes, DetectionTransform(max_size=args.image_size))
    threshold = 0.5 if args.iou_threshold is None else args.iou_threshold
    return boxes, sizes, current, threshold, "default anchors"


def _config_source(args: argparse.Namespace) -> tuple[Any, Any, Any, float, str]:
    from fewsight.data import TiledDataset
    from fewsight.train import load_config
    from fewsight.train.anchors import AUTO, MAX_IMAGES, network_boxes
    from fewsight.train.builders import anchor_probe, build_dataset

    cfg = load_config(args.config, args.overrides)
    train_set = build_dataset(cfg.data.train, training=True, where="data.train")
    auto = cfg.model.kwargs.get("anchor_generator") == AUTO
    model = anchor_probe(cfg.model, train_set.classes)
    images = train_set.num_images if isinstance(train_set, TiledDataset) else len(train_set)
    boxes, sizes = _read_boxes(args, min(images, MAX_IMAGES),
                               lambda advance: network_boxes(model, train_set, max_images=MAX_IMAGES, advance=advance))
    threshold = float(getattr(getattr(model, "assigner", None), "object_threshold", 0.5))
    return boxes, sizes, model.anchor_generator, threshold, "default anchors" if auto else "config's anchors"


def _read_boxes(args: argparse.Namespace, images: int, read: Any) -> tuple[Any, Any]:
    from fewsight.eval.evaluate import progress_bar

    with progress_bar(not args.quiet, transient=True) as bar:
        task = bar.add_task("read boxes", total=images)
        boxes, sizes = read(lambda: bar.advance(task))
    print(f"{images} image(s) of {args.data or args.config}")
    return boxes, sizes


def _describe(gen: Any) -> str:
    return (f"sizes {[round(s, 1) for s in gen.sizes]}, scales {[round(s, 3) for s in gen.scales]}, "
            f"ratios {[round(r, 3) for r in gen.aspect_ratios]}")


def _print_statistics(boxes: Any, sizes: Any) -> None:
    import torch

    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    keep = (wh > 0).all(dim=1)
    wh = wh[keep]
    side = wh.prod(dim=1).sqrt()
    ratio = wh[:, 1] / wh[:, 0]
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    print(f"{len(boxes)} boxes ({int((~keep).sum())} of zero area left out); image sizes "
          f"{int(sizes[:, 0].min())}-{int(sizes[:, 0].max())} x {int(sizes[:, 1].min())}-{int(sizes[:, 1].max())} px")
    print(f"{'':>16s}  {'min':>8s} {'p10':>8s} {'median':>8s} {'p90':>8s} {'max':>8s}")
    for name, values in (("width px", wh[:, 0]), ("height px", wh[:, 1]), ("sqrt(area) px", side),
                         ("ratio h/w", ratio)):
        print(f"{name:>16s}  " + " ".join(f"{v:8.2f}" for v in torch.quantile(values, q).tolist()))
    edges = [0, 8, 16, 32, 64, 128, 256, 512, float("inf")]
    counts = torch.histogram(side.clamp(max=1e9), torch.tensor(edges[:-1] + [1e9 + 1], dtype=torch.float64)).hist
    print("sqrt(area) px:  " + "  ".join(
        f"{lo:g}-{hi:g}: {int(c)}" if hi != float("inf") else f">={lo:g}: {int(c)}"
        for lo, hi, c in zip(edges[:-1], edges[1:], counts)))
