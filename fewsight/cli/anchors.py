"""``fewsight anchors``: box statistics of a dataset, the anchors' best-possible recall, a fitted anchor set."""

from __future__ import annotations

import argparse
from typing import Any

from fewsight.cli.common import add_data_source, check_float, flag_errors

NAME = "anchors"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="fit anchors to a dataset (box statistics, best-possible recall, a YAML snippet)",
        description="Read the boxes of a dataset and print the distribution of their sizes and aspect ratios, the "
        "best-possible recall of the default anchors (the fraction of boxes some anchor matches at IoU >= the "
        "matcher's threshold, anchors at every stride position) and of anchors fitted to the boxes (IoU k-means "
        "clusters -> aspect ratios, per-level sizes chosen by recall), and a model.anchor_generator YAML snippet.",
    )
    add_data_source(p, "--data", "a COCO .json, a CSV file, a VOC folder (with Annotations/), a YOLO image folder, "
                    "or 'digits'")
    p.add_argument("--num-images", type=int, default=500, help="digits: number of training canvases (default 500)")
    p.add_argument("--levels", type=int, nargs="+", default=[3, 4, 5, 6, 7], metavar="L",
                   help="pyramid levels of the detector (default 3 4 5 6 7: strides 8 ... 128)")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="the detector resizes images so their longer side is S (its max_size); boxes are scaled "
                   "alike (default: no resize)")
    p.add_argument("--iou-threshold", type=float, default=0.5,
                   help="the matcher's foreground IoU (object_threshold, default 0.5)")
    p.add_argument("--clusters", type=int, default=9, help="IoU k-means clusters (default 9)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import yaml

    from fewsight.errors import DataError, InvalidArgumentError
    from fewsight.geometry import AnchorGenerator, propose_anchors

    check_float("--iou-threshold", args.iou_threshold, low=0.0, high=1.0, low_open=True)
    for flag, value in (("--image-size", args.image_size), ("--clusters", args.clusters),
                        ("--num-images", args.num_images)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    with flag_errors("--levels", "levels"):
        current = AnchorGenerator(levels=args.levels)
    boxes, sizes = _dataset_boxes(args)
    if len(boxes) == 0:
        raise DataError(args.data, "no boxes in the dataset: there is nothing to fit anchors to")
    if args.image_size is not None:  # as DetectionTransform(max_size=S): one scale per image
        scale = args.image_size / sizes.amax(dim=1, keepdim=True)
        boxes, sizes = boxes * scale, (sizes * scale).round().clamp(min=1)
    _print_statistics(boxes, sizes)
    with flag_errors("--clusters", "k"):
        p = propose_anchors(boxes, sizes, current, clusters=min(args.clusters, len(boxes)),
                            threshold=args.iou_threshold, seed=args.seed)
    print(f"\nIoU k-means, {len(p.centroids)} clusters (w x h px: boxes): " + ", ".join(
        f"{w:.0f}x{h:.0f}: {int(n)}" for (w, h), n in zip(p.centroids.tolist(), p.counts)))
    thr = f"IoU >= {args.iou_threshold:g}"
    print(f"\nbest-possible recall ({thr}, anchors at every stride position):")
    print(f"  default anchors   {p.current_recall:.4f}  (mean best IoU {p.current_mean_iou:.3f})  {_describe(current)}")
    if p.multiplier is None:
        print("  the default anchors are already the best of the candidates")
    else:
        print(f"  fitted anchors    {p.recall:.4f}  (mean best IoU {p.mean_iou:.3f})  {_describe(p.generator)}")
    print("\n# model.anchor_generator for a training config (the head's anchors per location follow it):")
    print(yaml.safe_dump({"model": {"anchor_generator": p.config()}}, default_flow_style=None, sort_keys=False).rstrip())
    return 0


def _describe(gen: Any) -> str:
    return (f"sizes {[round(s, 1) for s in gen.sizes]}, scales {[round(s, 3) for s in gen.scales]}, "
            f"ratios {[round(r, 3) for r in gen.aspect_ratios]}")


def _dataset_boxes(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(boxes: Tensor[N, 4] float64, image sizes: Tensor[N, 2] (H, W))`` of every box of the dataset.

    File datasets give boxes and image sizes from their annotations and headers (no pixel is decoded).
    """
    import torch

    from fewsight.data import open_dataset
    from fewsight.eval.evaluate import progress_bar

    with flag_errors("--images", "images"), flag_errors("--format", "format"):
        if (args.format or args.data) == "digits":
            dataset = open_dataset(None, "digits", split="train", num_images=args.num_images)
        else:
            dataset = open_dataset(args.data, args.format, images=args.images)
    boxes, sizes = [], []
    header_sizes = callable(getattr(dataset, "image_size", None))
    with progress_bar(not args.quiet, transient=True) as bar:
        task = bar.add_task("read boxes", total=len(dataset))
        for i in range(len(dataset)):
            if header_sizes:
                target, (h, w) = dataset.get_target(i), dataset.image_size(i)
            else:
                image, target = dataset[i]
                h, w = image.shape[-2:]
            b = target["boxes"].reshape(-1, 4).double()
            boxes.append(b)
            sizes.append(torch.tensor([[float(h), float(w)]], dtype=torch.float64).expand(len(b), 2))
            bar.advance(task)
    if not boxes:
        return torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64)
    print(f"{len(dataset)} image(s) of {args.data}")
    return torch.cat(boxes), torch.cat(sizes)


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
