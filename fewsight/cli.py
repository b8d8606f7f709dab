"""The ``fewsight`` command line: ``demo``, ``train``, ``eval``, ``predict``, ``export``, ``enroll``, ``bench``, ``search``.

Every command has ``--help``. Bad input (a missing or corrupt file, an unknown class, a bad config
key, ...) prints one line ``fewsight <command>: <reason>`` on stderr and exits with status 1
(argparse usage errors exit with 2). Long work shows rich progress bars (``--quiet`` hides them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_PROG = "fewsight"


class _ExportUnavailable(Exception):
    """ONNX export is not provided by fewsight.models yet."""


# -- parser ----------------------------------------------------------------------------------------


def _add_data_source(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """``flag`` (a dataset path or 'digits'), ``--format`` and ``--images``."""
    parser.add_argument(flag, required=True, help=help)
    parser.add_argument("--format", choices=("coco", "voc", "yolo", "csv", "digits"),
                        help=f"dataset format (default: inferred from {flag})")
    parser.add_argument("--images", help="image folder for COCO / CSV (default: relative to the annotation file)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Few-shot object detection and metric learning with directional embeddings.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train and evaluate DLDENet on the digits data (CPU, minutes)",
        description="Train DLDENet on handwritten-digit canvases (configs/demo.yaml), evaluate it on held-out "
        "canvases and write OUT/metrics.json (map50, map, per class, timing) and OUT/detections.png.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--config", help="a YAML config to use instead of the built-in demo recipe")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set trainer.max_epochs=2 (repeatable)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    tr = sub.add_parser(
        "train",
        help="train a detector from a YAML config",
        description="Train a detector from a YAML config (see fewsight.train.config): checkpoints each epoch, "
        "best and last under OUT/checkpoints, logs, model.pt, metrics.json.",
    )
    tr.add_argument("--config", required=True, help="YAML config file")
    tr.add_argument("--out", help="output folder (overrides out_dir)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt if present")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optimizer.lr=0.005 (repeatable)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser(
        "eval",
        help="evaluate a trained detector on a dataset (COCO mAP)",
        description="Evaluate a detector file (model.pt or a training checkpoint) on a dataset and print / write "
        "COCO mAP, mAP50 and per-class AP. The dataset's classes are the model's.",
    )
    ev.add_argument("--checkpoint", required=True, help="model.pt from training / save_detector, or a .ckpt")
    _add_data_source(ev, "--data", "a COCO .json, a CSV file, a VOC folder (with Annotations/), a YOLO image folder, "
                     "or 'digits'")
    ev.add_argument("--num-images", type=int, default=200, help="digits: number of held-out canvases (default 200)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--out", help="folder for metrics.json, pr_curve.png and detections.png")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    pr = sub.add_parser(
        "predict",
        help="detect objects in images (PNG + JSON per image)",
        description="Run a detector on image files (or every image of a folder) and write OUT/<name>.png with the "
        "boxes drawn, OUT/<name>.json and OUT/predictions.json.",
    )
    pr.add_argument("--checkpoint", required=True, help="model.pt from training / save_detector, or a .ckpt")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", default="runs/predict", help="output folder (default: runs/predict)")
    pr.add_argument("--score-threshold", type=float, default=0.3, help="keep detections at least this score (0.3)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--quiet", action="store_true", help="no progress bars")

    ex = sub.add_parser(
        "export",
        help="export a detector's inference graph to ONNX",
        description="Export a detector file to ONNX (needs fewsight[onnx]).",
    )
    ex.add_argument("--checkpoint", required=True, help="model.pt from training / save_detector, or a .ckpt")
    ex.add_argument("--out", default="model.onnx", help="output .onnx file (default: model.onnx)")
    ex.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                    help="input image size of the exported graph (default 128 128)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")

    en = sub.add_parser(
        "enroll",
        help="add classes to a DLDENet from a few boxed examples (no training)",
        description="Enroll new classes into a DLDENet detector file from boxed examples, without gradient steps, "
        "and write a detector file that detects them (use it with predict / eval). Each new class's direction is "
        "the mean embedding of the anchors matched to its boxes.",
    )
    en.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    _add_data_source(en, "--support", "boxed examples: a COCO .json, a CSV file, a VOC folder, a YOLO image folder, "
                     "or 'digits'")
    en.add_argument("--classes", nargs="+", metavar="NAME",
                    help="support classes to enroll (default: every class the model does not know; digits: 8 9)")
    en.add_argument("--shots", type=int, help="use K sampled examples per class (default: every box)")
    en.add_argument("--seed", type=int, default=0, help="seed of the --shots sample (default 0)")
    en.add_argument("--calibrate", action="store_true",
                    help="set each new class's bias from the support images' background (see DLDENet.enroll)")
    en.add_argument("--rivalry", type=float, default=5.0,
                    help="gate new classes by how much closer an object is to them than to the best trained class: "
                         "p * sigmoid(R (cos - best trained cos)) (see DLDENet.enroll; 0: no gate; default 5)")
    en.add_argument("--crop-embedder", metavar="FILE",
                    help="also score the new classes on box crops with this fewsight.fewshot.CropEmbedder file "
                    "(bench/export_crop_embedder.py): the detector proposes boxes, similarity to the support crops "
                    "labels them (fewsight.fewshot.CropRescorer; the output file holds both networks)")
    en.add_argument("--out", required=True, help="output detector file (.pt)")

    be = sub.add_parser(
        "bench",
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
    fs.add_argument("--data", default="digits", choices=("digits", "emoji"),
                    help="benchmark data: digits (base 0-7, novel 8-9; default) or emoji (the 956 emoji-logos base "
                    "classes, --novel-classes novel ones enrolled from Google-style examples, tested on Google- and "
                    "Twitter-style scenes; needs `make emoji-data`)")
    fs.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="k values (default 1 5 10)")
    fs.add_argument("--seeds", type=int, default=5, help="support sets per k (seeds 0..N-1; default 5)")
    fs.add_argument("--modes", nargs="+", default=["enroll"], choices=("enroll", "finetune"),
                    help="enroll only, and/or enroll + fine-tune (default: enroll)")
    fs.add_argument("--calibrate", action="store_true", help="enroll with calibrated biases (see DLDENet.enroll)")
    fs.add_argument("--rivalry", type=float, default=5.0,
                    help="rivalry R of the enrolled classes (see DLDENet.enroll; 0: no gate; default 5)")
    fs.add_argument("--crop-embedder", metavar="FILE",
                    help="score the enrolled classes on box crops with this fewsight.fewshot.CropEmbedder file "
                    "(bench/export_crop_embedder.py): the detector proposes boxes, crop similarity to each class's "
                    "support crops ranks them (fewsight.fewshot.CropRescorer)")
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
        description="Embed every annotated object of a query set and a gallery set with a DLDENet; report "
        "Recall@k and MAP@R for objects of the model's classes and of unseen classes, and how well the model's "
        "known-ness score rejects unseen classes (AUROC, FPR at 95%% TPR). Writes OUT/results.json.",
    )
    br.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    br.add_argument("--data", default="digits", choices=("digits",), help="benchmark data (default: digits)")
    br.add_argument("--num-images", type=int, default=200, help="query and gallery images each (default 200)")
    br.add_argument("--batch-size", type=int, default=16)
    br.add_argument("--out", default="runs/retrieval", help="output folder (default: runs/retrieval)")
    br.add_argument("--quiet", action="store_true", help="(no progress bars are shown by this benchmark)")

    se = sub.add_parser(
        "search",
        help="object search: index the objects of images, query by an example crop",
        description="Object search with a DLDENet's embeddings and a faiss index (needs fewsight[retrieval]). "
        "`search index` detects the objects of a set of images and stores their embeddings; `search query` "
        "finds the objects most like an example crop (or a box of an image).",
    )
    ssub = se.add_subparsers(dest="search", required=True, metavar="ACTION")
    si = ssub.add_parser("index", help="build a gallery from the objects detected in images",
                         description="Detect objects in images and write OUT/gallery.pt (faiss index + labels, "
                         "image ids, boxes) and OUT/images.json (the image paths).")
    si.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    si.add_argument("images", nargs="+", help="image files or folders")
    si.add_argument("--out", default="runs/gallery", help="output folder (default: runs/gallery)")
    si.add_argument("--score-threshold", type=float, default=0.3, help="index detections at least this score (0.3)")
    si.add_argument("--batch-size", type=int, default=8)
    sq = ssub.add_parser("query", help="find the gallery objects most like an example",
                         description="Embed an example object (a crop, or --box of an image) and print the k most "
                         "similar gallery objects (cosine); with --out, also OUT/results.json and OUT/results.png.")
    sq.add_argument("--checkpoint", required=True, help="the DLDENet the gallery was built with")
    sq.add_argument("--gallery", required=True, help="a folder from `search index` (or its gallery.pt)")
    sq.add_argument("--image", required=True, help="the example: a crop of the object, or an image with --box")
    sq.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="the object's box in --image")
    sq.add_argument("--k", type=int, default=10, help="results (default 10)")
    sq.add_argument("--out", help="folder for results.json and results.png")
    return parser


# -- commands --------------------------------------------------------------------------------------


def _print_metrics(metrics: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.4f}"

    print(f"mAP50 {fmt(metrics.get('map50'))}  mAP {fmt(metrics.get('map'))}  mAP75 {fmt(metrics.get('map75'))}")
    for name, vals in metrics.get("per_class", {}).items():
        print(f"  {name:>12s}  AP50 {fmt(vals.get('ap50'))}  AP {fmt(vals.get('ap'))}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from fewsight.train.demo import run_demo

    metrics = run_demo(
        args.out, config=args.config, overrides=args.overrides, threads=args.threads, progress=not args.quiet
    )
    _print_metrics(metrics)
    print(f"total {metrics['total_seconds']:.1f} s; wrote {Path(args.out) / 'metrics.json'} and "
          f"{Path(args.out) / 'detections.png'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fewsight.train import load_config, train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={json.dumps(str(args.out))}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.quiet:
        overrides.append("trainer.progress_bar=false")
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    if result.metrics is not None:
        _print_metrics(result.metrics)
    if result.model_path is not None:
        print(f"model: {result.model_path}")
    return 0


def _infer_format(data: Path) -> str:
    if data.is_file():
        suffix = data.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix == ".csv":
            return "csv"
        raise FileNotFoundError(f"{data}: cannot tell the dataset format from the file name; pass --format")
    if data.is_dir():
        if (data / "Annotations").is_dir():
            return "voc"
        return "yolo"
    raise FileNotFoundError(f"{data}: no such file or folder")


def _relabel(dataset: Any, classes: list[str], source: Path) -> Any:
    """Map a reader's own class names onto the model's (a file may hold a subset of them)."""
    import torch

    from fewsight.data import RelabeledDataset
    from fewsight.errors import DataError

    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise DataError(source, f"unknown class(es) {unknown} (the model knows {classes})")
    lookup = torch.tensor([classes.index(c) for c in dataset.classes], dtype=torch.int64)
    return RelabeledDataset(dataset, lookup, list(classes))


def _eval_dataset(args: argparse.Namespace, classes: list[str]) -> Any:
    from fewsight import data as fd
    from fewsight.errors import InvalidArgumentError

    fmt = args.format or ("digits" if args.data == "digits" else _infer_format(Path(args.data)))
    if fmt == "digits":
        return fd.DigitsDataset("test", args.num_images, classes=classes, seed=1)
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt == "coco":
        return _relabel(fd.COCODataset(path, args.images), classes, path)
    if fmt == "csv":
        return fd.CSVDataset(path, image_dir=args.images, classes=classes)
    if fmt == "voc":
        return fd.VOCDataset(path, classes=classes)
    if fmt == "yolo":
        image_dir = path / "images" if (path / "images").is_dir() else path
        return fd.YOLODataset(image_dir, classes=classes)
    raise InvalidArgumentError(f"--format: expected coco, voc, yolo, csv or digits, got {fmt!r}")  # pragma: no cover


def _cmd_eval(args: argparse.Namespace) -> int:
    from fewsight.errors import DataError
    from fewsight.eval import evaluate_model, plot_detection_grid, plot_precision_recall, write_json
    from fewsight.train import load_detector

    model = load_detector(args.checkpoint)
    classes = list(model.classes)
    dataset = _eval_dataset(args, classes)
    if len(dataset) == 0:
        raise DataError(args.data, "the dataset has no images")
    metrics, predictions = evaluate_model(
        model, dataset, args.batch_size, class_names=classes, progress=not args.quiet, pr_curves=bool(args.out),
        return_predictions=True,
    )
    curves = metrics.pop("pr_curves", None)
    _print_metrics(metrics)
    if args.out:
        out = Path(args.out)
        write_json(metrics, out / "metrics.json")
        if curves is not None:
            plot_precision_recall(curves, path=out / "pr_curve.png")
        n = min(8, len(dataset))
        samples = [dataset[i] for i in range(n)]
        plot_detection_grid([s[0] for s in samples], predictions[:n], [s[1] for s in samples], classes,
                            out / "detections.png")
        print(f"wrote {out / 'metrics.json'}")
    return 0


def _image_files(inputs: Sequence[str]) -> list[Path]:
    from fewsight.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise FileNotFoundError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _cmd_predict(args: argparse.Namespace) -> int:
    from fewsight.data import load_image
    from fewsight.eval import detections_to_json, plot_detections, predict, write_json
    from fewsight.train import load_detector

    files = _image_files(args.images)
    images = [load_image(f) for f in files]  # DataError naming a corrupt file, before any work
    model = load_detector(args.checkpoint)
    classes = list(model.classes)
    predictions = predict(model, images, batch_size=args.batch_size, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    used: set[str] = set()
    for f, image, pred in zip(files, images, predictions):
        keep = pred["scores"] >= args.score_threshold
        kept = {k: v[keep] for k, v in pred.items()}
        name = f.stem
        k = 1
        while name in used:
            name = f"{f.stem}_{k}"
            k += 1
        used.add(name)
        dets = detections_to_json(kept, classes)
        plot_detections(image, kept, None, classes, out / f"{name}.png", score_threshold=args.score_threshold)
        write_json({"image": str(f), "detections": dets}, out / f"{name}.json")
        summary.append({"image": str(f), "output": f"{name}.png", "detections": dets})
        print(f"{f}: {len(dets)} detection(s)")
    write_json({"classes": classes, "score_threshold": args.score_threshold, "images": summary},
               out / "predictions.json")
    print(f"wrote {len(files)} image(s) to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fewsight.train import load_detector

    try:
        from fewsight.models import export_onnx  # type: ignore[attr-defined]
    except ImportError:
        raise _ExportUnavailable(
            "ONNX export is not available in this fewsight build (fewsight.models has no export_onnx); nothing was written"
        ) from None
    model = load_detector(args.checkpoint)
    info = export_onnx(model, args.out, image_size=tuple(args.image_size), opset=args.opset)
    h, w = args.image_size
    print(f"wrote {args.out} ({type(model).__name__}, input [B, 3, {h}, {w}], "
          f"{len(getattr(info, 'classes', model.classes))} classes)")
    return 0


def _load_dldenet(path: str) -> Any:
    from fewsight.errors import InvalidArgumentError
    from fewsight.train import load_detector

    model = load_detector(path)
    if not hasattr(model, "enroll"):
        raise InvalidArgumentError(f"--checkpoint: expected a DLDENet (the detector that enrolls classes), got {type(model).__name__}")
    return model


def _support_dataset(args: argparse.Namespace) -> Any:
    from fewsight import data as fd

    fmt = args.format or ("digits" if args.support == "digits" else _infer_format(Path(args.support)))
    if fmt == "digits":
        return fd.DigitsDataset("train", 200, seed=100)
    path = Path(args.support)
    if fmt == "coco":
        return fd.COCODataset(path, args.images)
    if fmt == "csv":
        return fd.CSVDataset(path, image_dir=args.images)
    if fmt == "voc":
        return fd.VOCDataset(path)
    image_dir = path / "images" if (path / "images").is_dir() else path
    return fd.YOLODataset(image_dir)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from fewsight.fewshot import enroll_from_dataset
    from fewsight.train import save_detector

    model = _load_dldenet(args.checkpoint)
    if args.crop_embedder is not None and hasattr(model, "embedder"):
        from fewsight.errors import InvalidArgumentError

        raise InvalidArgumentError(f"--crop-embedder: expected a plain DLDENet --checkpoint, got {args.checkpoint}, "
                                   "which already has a crop embedder (enroll into it without --crop-embedder)")
    model = _with_crop_embedder(model, args.crop_embedder)
    support = _support_dataset(args)
    names = args.classes
    if names is None and (args.format == "digits" or args.support == "digits"):
        names = ["8", "9"]
    before = list(model.classes)
    new = enroll_from_dataset(model, support, names, k=args.shots, seed=args.seed, calibrate=args.calibrate,
                              rivalry=args.rivalry)
    added = [model.classes[i] for i in new]
    save_detector(model, args.out, metadata={"enrolled": added, "support": str(args.support), "shots": args.shots,
                                             "seed": args.seed, "rivalry": args.rivalry, "base_classes": before,
                                             "crop_embedder": args.crop_embedder})
    print(f"enrolled {', '.join(added)} ({'every box' if args.shots is None else f'{args.shots} per class'}); "
          f"the model now has {len(model.classes)} classes; wrote {args.out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from fewsight import data as fd
    from fewsight.errors import InvalidArgumentError
    from fewsight.eval import plot_fewshot, write_json
    from fewsight.fewshot import run_fewshot

    if args.bench == "fewshot" and args.num_images is None:
        args.num_images = 300 if args.data == "emoji" else 200
    for flag, value in (("--num-images", args.num_images), ("--seeds", getattr(args, "seeds", 1))):
        if value < 1:
            raise InvalidArgumentError(f"{flag}: expected an int >= 1, got {value}")
    if args.bench == "retrieval":
        from fewsight.eval.retrieval import run_retrieval

        model = _load_dldenet(args.checkpoint)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "emoji":
        return _bench_fewshot_emoji(args)
    for flag in ("emoji_root", "novel_classes", "image_size", "reference"):
        if getattr(args, flag) is not None:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')}: expected only with --data emoji, got --data {args.data}")
    model = _with_crop_embedder(_load_dldenet(args.checkpoint), args.crop_embedder)
    if args.device is not None:
        model.to(_device(args.device))
    support = fd.DigitsDataset("train", 300, seed=100)
    test = fd.DigitsDataset("test", args.num_images, seed=1)
    novel = [c for c, name in enumerate(test.classes) if name not in model.classes]
    result = run_fewshot(
        model, support_dataset=support, test_dataset=test, novel_classes=novel, shots=args.shots,
        seeds=range(args.seeds), modes=args.modes, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        batch_size=args.batch_size, calibrate=args.calibrate, rivalry=args.rivalry, progress=not args.quiet, log=print,
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


def _device(spec: str) -> Any:
    import torch

    from fewsight.errors import InvalidArgumentError

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"--device: expected a torch device such as cpu or cuda, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device: expected an available device, got {spec!r} (torch.cuda.is_available() is False)")
    return device


def _with_crop_embedder(model: Any, path: str | None) -> Any:
    """``model`` wrapped in a :class:`~fewsight.fewshot.CropRescorer` with the embedder at ``path`` (if any)."""
    if path is None:
        return model
    from fewsight.fewshot import CropEmbedder, CropRescorer

    return CropRescorer(model, CropEmbedder.load(path)).eval()


def _bench_fewshot_emoji(args: argparse.Namespace) -> int:
    """``bench fewshot --data emoji``: enroll novel emoji from Google-style examples, test in both styles."""
    import torch

    from fewsight.data.emoji import DEFAULT_ROOT, emoji_classes
    from fewsight.errors import InvalidArgumentError
    from fewsight.eval import plot_fewshot, write_json
    from fewsight.fewshot.emoji import base_support_size, emoji_fewshot_datasets, emoji_novel_subset, run_emoji_fewshot
    from fewsight.train import load_detector

    root = Path(args.emoji_root) if args.emoji_root is not None else DEFAULT_ROOT
    n = 50 if args.novel_classes is None else args.novel_classes
    image_size = 192 if args.image_size is None else args.image_size
    emoji_size, objects = (24, 64), (2, 6)  # the training recipe's (configs/emoji_base.yaml)
    catalog = emoji_classes(root)  # DataError with the install hint when the data is absent
    if not 1 <= n <= len(catalog.novel):
        raise InvalidArgumentError(f"--novel-classes: expected an int in [1, {len(catalog.novel)}], got {n}")
    if image_size < emoji_size[1]:
        raise InvalidArgumentError(f"--image-size: expected >= {emoji_size[1]} (the largest emoji side), got {image_size}")
    model = _load_dldenet(args.checkpoint)
    base_index = {catalog.names[i]: i for i in catalog.base}
    not_base = [c for c in model.classes if c not in base_index]
    if not model.classes or not_base:
        raise InvalidArgumentError(
            f"--checkpoint: expected a DLDENet over emoji base classes (configs/emoji_base.yaml), got one over "
            f"{len(model.classes)} classes, not base classes: {not_base[:5]}{'...' if len(not_base) > 5 else ''}"
        )
    base = [base_index[c] for c in model.classes]  # the model's label order
    model = _with_crop_embedder(model, args.crop_embedder)
    novel = emoji_novel_subset(root, n, seed=0)
    novel_names = [catalog.names[i] for i in novel]
    reference = None
    if args.reference is not None:
        reference = load_detector(args.reference)
        ref_names = [str(c) for c in getattr(reference, "classes", [])]
        if sorted(ref_names) != sorted(novel_names):
            raise InvalidArgumentError(
                f"--reference: expected a detector over the {n} novel classes of --novel-classes {n} "
                f"(configs/emoji_supervised.yaml for 50: {', '.join(novel_names[:3])}, ...), got one over "
                f"{len(ref_names)} classes {ref_names[:5]}{'...' if len(ref_names) > 5 else ''}"
            )
    if args.device is not None:
        device = _device(args.device)
        model.to(device)
        if reference is not None:
            reference.to(device)
    # Fine-tuning samples a balanced k-shot set of every class: base canvases to draw the base instances from.
    num_base_support = 0
    if "finetune" in args.modes:
        num_base_support = base_support_size(len(base), max(1, *args.shots), sum(objects) / 2)
    data = emoji_fewshot_datasets(root, novel, base=base, num_test=args.num_images, num_base_support=num_base_support,
                                  image_size=image_size, emoji_size=emoji_size, min_objects=objects[0],
                                  max_objects=objects[1])
    result = run_emoji_fewshot(
        model, data, reference=reference, shots=args.shots, seeds=range(args.seeds), modes=args.modes,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, batch_size=args.batch_size,
        calibrate=args.calibrate, rivalry=args.rivalry, progress=not args.quiet, log=print,
    )
    out = Path(args.out)
    ref = None if result["reference"] is None else {"checkpoint": str(args.reference), **result["reference"]}
    payload = {
        "data": "emoji", "checkpoint": str(args.checkpoint), "emoji_root": str(root), "novel": data.novel_names,
        "novel_class_indices": list(data.novel_subset), "test_base": [data.classes[c] for c in data.test_base],
        "support_style": data.support_style, "image_size": image_size, "num_images": args.num_images,
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


def _gallery_paths(path: str) -> tuple[Path, Path]:
    p = Path(path)
    folder = p if p.is_dir() or p.suffix == "" else p.parent
    return (folder / "gallery.pt" if p.is_dir() or p.suffix == "" else p), folder / "images.json"


def _cmd_search(args: argparse.Namespace) -> int:
    import torch

    from fewsight.data import load_image
    from fewsight.errors import DataError
    from fewsight.eval import write_json

    model = _load_dldenet(args.checkpoint)
    if args.search == "index":
        from fewsight.retrieval import index_images

        files = _image_files(args.images)
        images = [load_image(f) for f in files]
        gallery = index_images(model, images, score_threshold=args.score_threshold, batch_size=args.batch_size)
        gallery_file, images_file = _gallery_paths(args.out)
        gallery.save(gallery_file)
        write_json({"images": [str(f) for f in files]}, images_file)
        print(f"indexed {len(gallery)} object(s) from {len(files)} image(s); wrote {gallery_file}")
        return 0
    from fewsight.retrieval import Gallery, embed_crop

    gallery_file, images_file = _gallery_paths(args.gallery)
    gallery = Gallery.load(gallery_file)
    paths = json.loads(images_file.read_text())["images"] if images_file.is_file() else None
    query_image = load_image(args.image)
    box = torch.tensor(args.box, dtype=torch.float32) if args.box else None
    if box is not None and not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(args.image, f"--box: expected x1 < x2 and y1 < y2, got {args.box}")
    query = embed_crop(model, query_image, box=box)
    if not bool(query.norm() > 0):
        raise DataError(args.image, f"--box {args.box}: the query object matches no anchor of the detector (is the box inside the image?)")
    if gallery.dim is not None and query.shape[0] != gallery.dim:
        raise DataError(gallery_file, f"the gallery holds {gallery.dim}-D embeddings, the model gives {query.shape[0]}-D")
    found = gallery.search(query[None], k=args.k)
    rows = []
    names = list(model.classes)
    for rank, (i, score) in enumerate(zip(found.indices[0].tolist(), found.scores[0].tolist()), start=1):
        if i < 0:
            break
        image_id = int(found.image_ids[0, rank - 1])
        label = int(found.labels[0, rank - 1])
        row = {"rank": rank, "score": round(score, 4), "image": paths[image_id] if paths else image_id,
               "box": [round(v, 1) for v in found.boxes[0, rank - 1].tolist()],
               "label": names[label] if 0 <= label < len(names) else None}
        rows.append(row)
        print(f"{rank:3d}  {row['score']:.4f}  {row['image']}  box {row['box']}  ({row['label']})")
    if not rows:
        print("the gallery is empty")
    if args.out:
        out = Path(args.out)
        write_json({"query": args.image, "box": args.box, "results": rows}, out / "results.json")
        if rows and paths:
            _plot_search(query_image, box, rows, out / "results.png")
        print(f"wrote {out / 'results.json'}")
    return 0


def _plot_search(query: Any, box: Any, rows: list[dict[str, Any]], path: Path) -> None:
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fewsight.data import load_image

    def crop(image: Any, b: Any) -> Any:
        x1, y1, x2, y2 = (int(round(float(v))) for v in b)
        return image[:, max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)].permute(1, 2, 0).numpy()

    items = [("query", crop(query, box) if box is not None else query.permute(1, 2, 0).numpy())]
    cache: dict[str, Any] = {}
    for r in rows:
        img = cache.setdefault(r["image"], load_image(r["image"]))
        items.append((f"#{r['rank']} {r['score']:.2f}", crop(img, torch.tensor(r["box"]))))
    fig = Figure(figsize=(1.6 * len(items), 1.9), dpi=100)
    FigureCanvasAgg(fig)
    for j, (title, arr) in enumerate(items):
        ax = fig.add_subplot(1, len(items), j + 1)
        ax.imshow(arr)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


_COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "predict": _cmd_predict,
    "export": _cmd_export,
    "enroll": _cmd_enroll,
    "bench": _cmd_bench,
    "search": _cmd_search,
}


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fewsight`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    from fewsight.errors import FewsightError

    if getattr(args, "quiet", False):
        import logging

        import lightning.pytorch  # noqa: F401  (sets its loggers' level on import: import first)

        # Lightning's "GPU available", "Trainer.fit stopped" ... info lines.
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        return _COMMANDS[args.command](args)
    except (FewsightError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            _ExportUnavailable) as exc:
        print(f"{_PROG} {args.command}: {_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
