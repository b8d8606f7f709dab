"""What several commands share: data-source arguments, image lists, devices, model loading, printing."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_data_source",
    "check_float",
    "output_dir",
    "output_file",
    "add_enroll_settings",
    "enroll_settings",
    "flag_errors",
    "read_class_map",
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


def eval_dataset(args: argparse.Namespace, classes: list[str], **options: Any) -> Any:
    """The ``--data`` dataset labelled in the model's ``classes`` (digits / digits_large: held-out test
    canvases, ``--num-images`` of them); ``options`` go to :func:`fewsight.data.open_dataset`
    (``class_map``, ``max_pixels``)."""
    from fewsight.data import open_dataset
    from fewsight.errors import InvalidArgumentError
    from fewsight.fewshot.digits import TEST_SEED

    generated = {"digits": 200, "digits_large": 10}  # default canvases
    with flag_errors("--images", "images"), flag_errors("--format", "format"), flag_errors("--class-map", "class_map"):
        name = args.format or args.data
        if name in generated:
            return open_dataset(None, name, classes=classes, split="test", seed=TEST_SEED,
                                num_images=args.num_images or generated[name], **options)
        if args.num_images is not None:
            raise InvalidArgumentError(f"--num-images: only for the generated digits / digits_large, got --data "
                                       f"{args.data}")
        return open_dataset(args.data, args.format, classes=classes, images=args.images, **options)


def read_class_map(path: str | None) -> dict[str, Any] | None:
    """The ``{name: new name or null}`` mapping of a YAML / JSON file (``None`` without one)."""
    if path is None:
        return None
    import yaml

    from fewsight.data.formats import check_class_map
    from fewsight.errors import DataError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"expected a readable YAML / JSON class map, got {type(exc).__name__}") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(path, f"expected YAML / JSON {{name: new name or null}}, got unparsable text ({' '.join(str(exc).split())[:120]})") from None
    with flag_errors("--class-map", "class_map"):
        return check_class_map(mapping)


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


# -- command-line values and output paths ---------------------------------------------------------


def check_float(flag: str, value: float | None, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float | None:
    """``value`` unchanged when it is ``None`` or a finite number in ``[low, high]`` (``(low, high]`` with
    ``low_open``); otherwise :class:`~fewsight.errors.InvalidArgumentError` naming ``flag``."""
    import math

    from fewsight.errors import InvalidArgumentError

    if value is None:
        return None
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"<= {high:g}"
    wanted = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
           or (high is not None and value > high))
    if bad:
        raise InvalidArgumentError(f"{flag}: expected {wanted}, got {value!r}")
    return value


#: The outputs the running command declared (output_dir / output_file): an operating-system error that
#: names no file (ENOSPC while writing, ...) is reported against them.
declared_outputs: list[Path] = []


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _existing_parent_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder (``None``: the folders can be made)."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _inputs(inputs: Sequence[str | Path | None]) -> list[Path]:
    return [Path(p) for p in inputs if p is not None and str(p) not in ("", "digits", "emoji")]


def output_dir(path: str | Path, inputs: Sequence[str | Path | None] = (), *, names: Sequence[str] = (),
               flag: str = "--out") -> Path:
    """The output folder ``path`` of a command, checked before any work.

    Refuses (:class:`~fewsight.errors.InvalidArgumentError` naming ``flag``) a ``path`` that is an
    existing file or lies under one, that is one of the ``inputs`` folders (outputs would mix with
    the inputs, and a later run would read them), or whose files ``names`` would replace one of the
    ``inputs`` files. ``inputs``: the command's input files and folders (``None`` / ``'digits'``
    entries are skipped).
    """
    from fewsight.errors import InvalidArgumentError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{flag}: expected a folder, got the existing file {out}")
    blocker = _existing_parent_file(out)
    if blocker is not None:
        raise InvalidArgumentError(f"{flag}: expected a folder that can be created, got {out} (under the file {blocker})")
    for item in _inputs(inputs):
        if item.is_dir() and _same(item, out):
            raise InvalidArgumentError(f"{flag}: expected a folder other than the input folder {item} "
                                       "(outputs would be written among the inputs)")
    for name in names:
        _not_an_input(flag, out / name, inputs)
    declared_outputs.append(out)
    return out


def output_file(path: str | Path, inputs: Sequence[str | Path | None] = (), *, flag: str = "--out") -> Path:
    """The output file ``path`` of a command, checked before any work: not an existing folder, not under
    an existing file, and not one of the ``inputs`` (no command writes over its inputs)."""
    from fewsight.errors import InvalidArgumentError

    out = Path(path)
    if out.is_dir():
        raise InvalidArgumentError(f"{flag}: expected a file name, got the existing folder {out}")
    blocker = _existing_parent_file(out)
    if blocker is not None:
        raise InvalidArgumentError(f"{flag}: expected a file in a folder that can be created, got {out} "
                                   f"(under the file {blocker})")
    _not_an_input(flag, out, inputs)
    declared_outputs.append(out)
    return out


def _not_an_input(flag: str, out: Path, inputs: Sequence[str | Path | None]) -> None:
    from fewsight.errors import InvalidArgumentError

    for item in _inputs(inputs):
        if _same(item, out):
            raise InvalidArgumentError(f"{flag}: expected outputs that are none of the command's inputs, got {out}, "
                                       "an input that would be overwritten")
