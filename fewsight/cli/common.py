"""What several commands share: data-source arguments, image lists, devices, model loading, printing."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_data_source",
    "add_enroll_settings",
    "enroll_settings",
    "flag_errors",
    "image_files",
    "load_dldenet",
    "parse_device",
    "print_metrics",
    "with_crop_embedder",
]


def add_data_source(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """``flag`` (a dataset path or 'digits'), ``--format`` and ``--images``."""
    parser.add_argument(flag, required=True, help=help)
    from fewsight.data import FORMATS

    parser.add_argument("--format", choices=FORMATS, help=f"dataset format (default: inferred from {flag})")
    parser.add_argument("--images", help="image folder for COCO / CSV (default: relative to the annotation file)")


def print_metrics(metrics: dict[str, Any]) -> None:
    """mAP50 / mAP / mAP75 and per-class AP, one line each (``n/a`` where undefined)."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.4f}"

    print(f"mAP50 {fmt(metrics.get('map50'))}  mAP {fmt(metrics.get('map'))}  mAP75 {fmt(metrics.get('map75'))}")
    for name, vals in metrics.get("per_class", {}).items():
        print(f"  {name:>12s}  AP50 {fmt(vals.get('ap50'))}  AP {fmt(vals.get('ap'))}")


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders whose images are listed in name order)."""
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


def parse_device(spec: str) -> Any:
    """``torch.device(spec)``, refusing an unknown or unavailable device with a one-line reason."""
    import torch

    from fewsight.errors import InvalidArgumentError

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"--device: expected a torch device such as cpu or cuda, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device: expected an available device, got {spec!r} (torch.cuda.is_available() is False)")
    return device


def load_dldenet(path: str) -> Any:
    """The DLDENet (or crop-rescored DLDENet) in the model file ``path``."""
    from fewsight.errors import InvalidArgumentError
    from fewsight.fewshot import CropRescorer
    from fewsight.hub import load_model
    from fewsight.models import DLDENet

    model = load_model(path)
    if not isinstance(model, (DLDENet, CropRescorer)):
        raise InvalidArgumentError(f"--checkpoint: expected a DLDENet (the detector that enrolls classes), got "
                                   f"{type(model).__name__} in {path}")
    return model


def with_crop_embedder(model: Any, path: str | None) -> Any:
    """``model`` wrapped in a :class:`~fewsight.fewshot.CropRescorer` with the embedder at ``path`` (if any)."""
    if path is None:
        return model
    from fewsight.fewshot import CropEmbedder, CropRescorer
    from fewsight.hub import load_model

    return CropRescorer(model, load_model(path, expect=CropEmbedder)).eval()


def eval_dataset(args: argparse.Namespace, classes: list[str]) -> Any:
    """The ``--data`` dataset labelled in the model's ``classes`` (digits: held-out test canvases)."""
    from fewsight.data import open_dataset
    from fewsight.fewshot.digits import TEST_SEED

    with flag_errors("--images", "images"), flag_errors("--format", "format"):
        if (args.format or args.data) == "digits":
            return open_dataset(None, "digits", classes=classes, split="test", num_images=args.num_images,
                                seed=TEST_SEED)
        return open_dataset(args.data, args.format, classes=classes, images=args.images)


def support_dataset(args: argparse.Namespace) -> Any:
    """The ``--support`` dataset with its own class names (digits: the few-shot support canvases)."""
    from fewsight.data import open_dataset
    from fewsight.fewshot import digits_fewshot_datasets

    if (args.format or args.support) == "digits":
        return digits_fewshot_datasets(num_test=1)[0]
    with flag_errors("--images", "images"), flag_errors("--format", "format"):
        return open_dataset(args.support, args.format, images=args.images)


@contextlib.contextmanager
def flag_errors(flag: str, argument: str) -> Iterator[None]:
    """Re-raise a library error about ``argument`` as one about the command-line ``flag``."""
    from fewsight.errors import InvalidArgumentError

    try:
        yield
    except InvalidArgumentError as exc:
        text = str(exc)
        if text.startswith(f"{argument}:"):
            raise InvalidArgumentError(f"{flag}:{text[len(argument) + 1:]}") from None
        raise


def add_enroll_settings(parser: argparse.ArgumentParser) -> None:
    """``--calibrate / --no-calibrate`` and ``--rivalry``, defaults from :class:`~fewsight.fewshot.EnrollSettings`."""
    from fewsight.fewshot import EnrollSettings

    default = EnrollSettings()
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=default.calibrate,
                        help="calibrate each new class's score on the support images' background "
                        f"(fewsight.fewshot.EnrollSettings; default: {'on' if default.calibrate else 'off'})")
    parser.add_argument("--rivalry", type=float, default=default.rivalry, metavar="R",
                        help="gate a new class by how much closer an object is to it than to the best trained class: "
                        f"p * sigmoid(R (cos - best trained cos)); 0: no gate (default {default.rivalry:g})")


def enroll_settings(args: argparse.Namespace) -> Any:
    """The :class:`~fewsight.fewshot.EnrollSettings` of the parsed flags (a bad value names its flag)."""
    from fewsight.fewshot import EnrollSettings

    with flag_errors("--rivalry", "rivalry"):
        return EnrollSettings(calibrate=args.calibrate, rivalry=args.rivalry)
