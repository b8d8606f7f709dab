"""``fewsight bench``: the few-shot protocol (digits, emoji-logos) and retrieval / open set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewsight.cli.common import (
    add_enroll_settings,
    enroll_settings,
    check_float,
    flag_errors,
    load_dldenet,
    output_dir,
    parse_device,
    with_crop_embedder,
)

NAME = "bench"


def add_parser(sub: Any) -> None:
    be = sub.add_parser(
        NAME,
        help="benchmarks: the few-shot protocol, retrieval and open set",
        description="Run a benchmark protocol and write OUT/results.json and a plot.",
    )
    bsub = be.add_subparsers(dest="bench", required=True, metavar="BENCH")
    fs = bsub.add_parser(
        "fewshot",
        help="k-shot enrollment (+ fine-tuning) of novel classes: novel / base AP50, mean ± 95%% interval",
        description="The few-shot protocol: for each k and seed, sample k boxed examples per novel class, enroll "
        "them (and, with --modes finetune, fine-tune briefly on a balanced k-shot set), evaluate novel and base "
        "AP50 on the test set; writes OUT/results.json and OUT/fewshot.png (emoji: OUT/fewshot_<style>.png, one per "
        "test style).",
    )
    fs.add_argument("--checkpoint", required=True, help="a DLDENet trained on the base classes")
    fs.add_argument("--data", default="digits",
                    help="benchmark data: digits (base 0-7, novel 8-9; default), emoji (the 956 emoji-logos base "
                    "classes, --novel-classes novel ones enrolled from Google-style examples, tested on Google- and "
                    "Twitter-style scenes; needs `make emoji-data`), or the test set of your own data (a COCO .json, "
                    "VOC / YOLO folder or CSV file, with --support): its classes the model does not know are novel")
    fs.add_argument("--support", help="with a dataset --data: the dataset the k-shot examples are drawn from")
    fs.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="k values (default 1 5 10)")
    fs.add_argument("--seeds", type=int, default=5, help="support sets per k (seeds 0..N-1; default 5)")
    fs.add_argument("--modes", nargs="+", default=["enroll"], choices=("enroll", "finetune"),
                    help="enroll only, and/or enroll + fine-tune (default: enroll)")
    add_enroll_settings(fs)
    fs.add_argument("--crop-embedder", metavar="FILE",
                    help="score the enrolled classes on box crops with this embedder file (fewsight.fewshot."
                    "CropRescorer): the detector proposes boxes, crop similarity to each class's support crops ranks them")
    fs.add_argument("--finetune-steps", type=int, default=50)
    fs.add_argument("--finetune-lr", type=float, default=1e-4)
    fs.add_argument("--num-images", type=int, help="test images (per style for emoji; default 200, emoji 300)")
    fs.add_argument("--batch-size", type=int, default=16)
    fs.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    fs.add_argument("--device", help="run the models on this torch device, e.g. cuda (default: cpu)")
    fs.add_argument("--out", default="runs/fewshot", help="output folder (default: runs/fewshot)")
    fs.add_argument("--quiet", action="store_true", help="no progress bars")
    fe = fs.add_argument_group("emoji (with --data emoji)")
    fe.add_argument("--emoji-root", help="the emoji data folder (default: data/emoji)")
    fe.add_argument("--novel-classes", type=int, metavar="N",
                    help="enroll N novel classes (fewsight.fewshot.emoji.emoji_novel_subset, seed 0; default 50)")
    fe.add_argument("--image-size", type=int, help="canvas side of the support and test images (default 192)")
    fe.add_argument("--reference", metavar="CHECKPOINT",
                    help="a detector trained with full supervision on the novel classes (configs/emoji_supervised.yaml); "
                    "its novel AP50 is reported and each k-shot novel AP50 is divided by it")
    br = bsub.add_parser(
        "retrieval",
        help="object retrieval (Recall@k, MAP@R) and open-set rejection (AUROC, FPR@95%%TPR)",
        description="digits: embed every annotated object of a query set and a gallery set with a DLDENet "
        "(--checkpoint); report Recall@k and MAP@R for objects of the model's classes and of unseen classes, and how "
        "well the model's known-ness score rejects unseen classes (AUROC, FPR at 95%% TPR). emoji: the cross-style "
        "protocol of a crop embedder (--embedder): each Google-style image of the 955 novel emoji queries the "
        "Twitter-style gallery; cosine, then CSLS against base-class Google views. Writes OUT/results.json.",
    )
    br.add_argument("--checkpoint", help="digits: a DLDENet model.pt (or .ckpt)")
    br.add_argument("--embedder", help="emoji: a crop embedder file (fewsight train with task: embedder)")
    br.add_argument("--data", default="digits", choices=("digits", "emoji"), help="benchmark data (default: digits)")
    br.add_argument("--emoji-root", help="emoji: the emoji data folder (default: data/emoji)")
    br.add_argument("--no-csls", dest="csls", action="store_false", help="emoji: cosine ranking only")
    br.add_argument("--num-images", type=int, default=200, help="digits: query and gallery images each (default 200)")
    br.add_argument("--batch-size", type=int, default=16)
    br.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    br.add_argument("--out", default="runs/retrieval", help="output folder (default: runs/retrieval)")
    br.add_argument("--quiet", action="store_true", help="(no progress bars are shown by this benchmark)")


def run(args: argparse.Namespace) -> int:
    import torch

    from fewsight.errors import InvalidArgumentError

    if args.bench == "fewshot" and args.num_images is None:
        args.num_images = 300 if args.data == "emoji" else 200
    for flag, value in (("--num-images", args.num_images), ("--seeds", getattr(args, "seeds", 1))):
        if value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    inputs = [getattr(args, k, None) for k in ("checkpoint", "embedder", "crop_embedder", "reference", "data", "support",
                                                 "emoji_root")]
    output_dir(args.out, inputs, names=["results.json", "fewshot.png", "fewshot_google.png", "fewshot_twitter.png"])
    if args.bench == "retrieval":
        return _retrieval(args)
    check_float("--finetune-lr", args.finetune_lr, low=0.0, low_open=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "emoji":
        return _fewshot_emoji(args)
    for flag in ("emoji_root", "novel_classes", "image_size", "reference"):
        if getattr(args, flag) is not None:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')}: expected only with --data emoji, got --data {args.data}")
    if (args.data == "digits") != (args.support is None):
        raise InvalidArgumentError(f"--support: expected a support dataset with a dataset --data (none with digits), "
                                   f"got --data {args.data} --support {args.support}")
    return _fewshot_datasets(args)


def _retrieval(args: argparse.Namespace) -> int:
    from fewsight import data as fd
    from fewsight.errors import InvalidArgumentError
    from fewsight.eval import write_json
    from fewsight.eval.retrieval import run_retrieval

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.data == "emoji":
        return _retrieval_emoji(args)
    if args.checkpoint is None or args.embedder is not None:
        raise InvalidArgumentError("--checkpoint: expected a DLDENet file for --data digits (and no --embedder), got "
                                   f"--checkpoint {args.checkpoint} --embedder {args.embedder}")
    model = load_dldenet(args.checkpoint)
    result = run_retrieval(model, query_dataset=fd.DigitsDataset("val", args.num_images, seed=3),
                           gallery_dataset=fd.DigitsDataset("test", args.num_images, seed=1),
                           batch_size=args.batch_size)
    for part in ("known", "unknown"):
        row = result[part]
        print(f"{part:8s} classes ({', '.join(result[part + '_classes'])}): " + "  ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k != "num_queries") + f"  ({row['num_queries']} queries)")
    o = result["open_set"]
    print(f"open set: AUROC {o['auroc']:.4f}  FPR@95%TPR {o['fpr_at_95tpr']:.4f}  "
          f"({o['num_known']} known / {o['num_unknown']} unknown objects)")
    write_json({"data": args.data, "checkpoint": str(args.checkpoint), **result}, Path(args.out) / "results.json")
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _retrieval_emoji(args: argparse.Namespace) -> int:
    from fewsight.data.emoji import DEFAULT_ROOT, emoji_classes
    from fewsight.errors import InvalidArgumentError
    from fewsight.eval import write_json
    from fewsight.eval.embedding import emoji_retrieval
    from fewsight.fewshot import CropEmbedder
    from fewsight.hub import load_model

    if args.embedder is None or args.checkpoint is not None:
        raise InvalidArgumentError("--embedder: expected a crop embedder file for --data emoji (and no --checkpoint), "
                                   f"got --embedder {args.embedder} --checkpoint {args.checkpoint}")
    root = Path(args.emoji_root) if args.emoji_root is not None else DEFAULT_ROOT
    emoji_classes(root)  # DataError with the install hint when the data is absent
    embedder = load_model(args.embedder, expect=CropEmbedder)
    result = emoji_retrieval(embedder, root, csls=args.csls, batch_size=max(args.batch_size, 64))
    print(f"{result['num_classes']} novel emoji, {result['query_style']} queries -> {result['gallery_style']} gallery")
    for name, row in (("cosine", result), ("CSLS", result.get("csls") or {})):
        if row:
            print(f"  {name:6s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    write_json({"data": "emoji", "embedder": str(args.embedder), **result}, Path(args.out) / "results.json")
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def _fewshot_datasets(args: argparse.Namespace) -> int:
    """``bench fewshot`` on digits or on a test / support dataset pair of any format."""
    import torch

    from fewsight.data import open_dataset
    from fewsight.errors import DataError
    from fewsight.eval import plot_fewshot, write_json
    from fewsight.fewshot import digits_fewshot_datasets, run_fewshot

    model = with_crop_embedder(load_dldenet(args.checkpoint), args.crop_embedder)
    if args.device is not None:
        model.to(parse_device(args.device))
    if args.data == "digits":
        support, test = digits_fewshot_datasets(args.num_images)
    else:
        test = open_dataset(args.data)
        support = open_dataset(args.support, classes=list(test.classes))
        unknown = [c for c in model.classes if c not in test.classes]
        if unknown:
            raise DataError(args.data, f"the model's classes {unknown} are not classes of the test set {list(test.classes)}")
    novel = [c for c, name in enumerate(test.classes) if name not in model.classes]
    if not novel:
        raise DataError(args.data, f"no novel class: the model knows every class of the test set {list(test.classes)}")
    result = run_fewshot(
        model, support_dataset=support, test_dataset=test, novel_classes=novel, shots=args.shots,
        seeds=range(args.seeds), modes=args.modes, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        batch_size=args.batch_size, settings=enroll_settings(args), progress=not args.quiet, log=print,
    )
    out = Path(args.out)
    payload = {"data": args.data, "checkpoint": str(args.checkpoint), "novel": [test.classes[c] for c in novel],
               "calibrate": args.calibrate, "rivalry": args.rivalry, "crop_embedder": args.crop_embedder,
               "threads": torch.get_num_threads(), **result.to_dict()}
    write_json(payload, out / "results.json")
    plot_fewshot(result.summary(), out / "fewshot.png", base_before=result.base_before["ap50"],
                 title=f"Few-shot detection on {args.data}")
    print(f"base AP50 before enrollment {result.base_before['ap50']:.4f}")
    for row in result.summary():
        print(f"{row['mode']:8s} k={row['k']:<3d} novel AP50 {row['novel_ap50']:.4f} ± {row['novel_ap50_ci95']:.4f}  "
              f"base AP50 {row['base_ap50']:.4f} ± {row['base_ap50_ci95']:.4f}  ({row['seeds']} seeds)")
    print(f"wrote {out / 'results.json'} and {out / 'fewshot.png'}")
    return 0


def _fewshot_emoji(args: argparse.Namespace) -> int:
    """``bench fewshot --data emoji``: enroll novel emoji from Google-style examples, test in both styles."""
    import torch

    from fewsight.data.emoji import DEFAULT_ROOT, emoji_classes
    from fewsight.errors import InvalidArgumentError
    from fewsight.eval import plot_fewshot, write_json
    from fewsight.fewshot.emoji import (
        EMOJI_SIZE,
        base_support_size,
        check_reference,
        emoji_base_classes_of,
        emoji_fewshot_datasets,
        emoji_novel_subset,
        run_emoji_fewshot,
    )
    from fewsight.hub import load_model

    root = Path(args.emoji_root) if args.emoji_root is not None else DEFAULT_ROOT
    n = 50 if args.novel_classes is None else args.novel_classes
    catalog = emoji_classes(root)  # DataError with the install hint when the data is absent
    if not 1 <= n <= len(catalog.novel):
        raise InvalidArgumentError(f"--novel-classes: expected an int in [1, {len(catalog.novel)}], got {n}")
    if args.image_size is not None and args.image_size < EMOJI_SIZE[1]:
        raise InvalidArgumentError(f"--image-size: expected >= {EMOJI_SIZE[1]} (the largest emoji side), got {args.image_size}")
    model = load_dldenet(args.checkpoint)
    with flag_errors("--checkpoint", "model"):
        base = emoji_base_classes_of(model.classes, root)
    model = with_crop_embedder(model, args.crop_embedder)
    novel = emoji_novel_subset(root, n, seed=0)
    reference = load_model(args.reference) if args.reference is not None else None
    if args.device is not None:
        device = parse_device(args.device)
        model.to(device)
        if reference is not None:
            reference.to(device)
    canvas = {} if args.image_size is None else {"image_size": args.image_size}
    # Fine-tuning samples a balanced k-shot set of every class: base canvases to draw the base instances from.
    num_base_support = base_support_size(len(base), max(1, *args.shots)) if "finetune" in args.modes else 0
    data = emoji_fewshot_datasets(root, novel, base=base, num_test=args.num_images, num_base_support=num_base_support,
                                  **canvas)
    if reference is not None:
        with flag_errors("--reference", "reference"):
            check_reference(reference, data)
    result = run_emoji_fewshot(
        model, data, reference=reference, shots=args.shots, seeds=range(args.seeds), modes=args.modes,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, batch_size=args.batch_size,
        settings=enroll_settings(args), progress=not args.quiet, log=print,
    )
    out = Path(args.out)
    ref = None if result["reference"] is None else {"checkpoint": str(args.reference), **result["reference"]}
    payload = {
        "data": "emoji", "checkpoint": str(args.checkpoint), "emoji_root": str(root), "novel": data.novel_names,
        "novel_class_indices": list(data.novel_subset), "test_base": [data.classes[c] for c in data.test_base],
        "support_style": data.support_style, "image_size": data.image_size, "num_images": args.num_images,
        "num_support_images": len(data.support), "calibrate": args.calibrate, "rivalry": args.rivalry,
        "threads": torch.get_num_threads(), "crop_embedder": args.crop_embedder, "reference": ref,
        "styles": result["styles"],
    }
    write_json(payload, out / "results.json")
    plots = []
    for style, part in result["styles"].items():
        path = out / f"fewshot_{style}.png"
        plot_fewshot(part["summary"], path, base_before=part["base_before"]["ap50"],
                     title=f"emoji: {style} scenes ({part['role']}), enrolled from {data.support_style}")
        plots.append(path)
        print(f"{style} ({part['role']}): base AP50 before enrollment {part['base_before']['ap50']:.4f}")
    if ref is not None:
        print("reference (full supervision on the novel classes): novel AP50 "
              + "  ".join(f"{style} {ref[style]['novel_ap50']:.4f}" for style in result["styles"]))
    for style, part in result["styles"].items():
        for row in part["summary"]:
            ratio = f" ({row['novel_ap50_vs_reference']:.2f} x reference)" if ref is not None else ""
            print(f"{style:8s} {row['mode']:8s} k={row['k']:<3d} novel AP50 {row['novel_ap50']:.4f} ± "
                  f"{row['novel_ap50_ci95']:.4f}{ratio}  base AP50 {row['base_ap50']:.4f} ± {row['base_ap50_ci95']:.4f}"
                  f"  ({row['seeds']} seeds)")
    print(f"wrote {out / 'results.json'} and {', '.join(str(p) for p in plots)}")
    return 0
