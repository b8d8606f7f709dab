"""YOLO txt annotations: :class:`YOLODataset` reader and :func:`write_yolo` writer.

One ``<stem>.txt`` per image, one object per line ``class cx cy w h`` with coordinates as fractions
of the image width/height (Ultralytics / Darknet format). Segment lines ``class x1 y1 x2 y2 ...``
(an odd number >= 7 of values) are read as the bounding box of their polygon. As in Ultralytics,
an image without a label file, or with an empty one, has no objects.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from fewsight.data import save_image
    >>> root = Path(tempfile.mkdtemp())
    >>> save_image(torch.zeros(3, 20, 40), root / "images" / "a.png")
    >>> _ = write_yolo(root / "labels", ["a.png"], [(20, 40)],
    ...                [{"boxes": torch.tensor([[0., 0., 20., 10.]]), "labels": torch.tensor([1])}], ["cat", "dog"])
    >>> ds = YOLODataset(root / "images")
    >>> ds.classes, ds[0][1]["boxes"], ds[0][1]["labels"]
    (['cat', 'dog'], tensor([[ 0.,  0., 20., 10.]]), tensor([1]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewsight._io import atomic_write_bytes, read_text, short_repr
from fewsight.data.dataset import ImageFileDataset, Target, _describe_files, _Entry
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["IMAGE_EXTENSIONS", "MAX_CLASS_ID", "YOLODataset", "read_class_names", "write_yolo"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

#: The largest class id read without a names file: the names ``"0".."K-1"`` are made from the
#: largest id, so a stray huge id must not allocate that many.
MAX_CLASS_ID = 99_999


def _check_names(path: Path, names: list[Any]) -> list[str]:
    bad = [n for n in names if not isinstance(n, (str, int, float)) or isinstance(n, bool)]
    if bad:
        raise DataError(path, f"expected class names as text, got {short_repr(bad[0])}")
    out = [str(n) for n in names]
    seen: dict[str, int] = {}
    for k, n in enumerate(out):
        if n in seen:
            raise DataError(path, f"expected distinct class names, got {n!r} for ids {seen[n]} and {k}")
        seen[n] = k
    return out


def read_class_names(path: str | Path) -> list[str]:
    """Class names from ``classes.txt`` (one per line) or a YOLO ``data.yaml`` (``names`` list or dict).

    Raises :class:`~fewsight.errors.DataError` naming the file when it is missing, not UTF-8,
    malformed, without names, or names one class twice.
    """
    path = Path(path)
    text = read_text(path, what="class-name file")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(path, f"malformed YAML ({' '.join(str(exc).split())})") from None
        except RecursionError:
            raise DataError(path, "expected YAML, got lists or mappings nested too deeply to parse") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                keys = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise DataError(path, f"expected integer keys under 'names', got {short_repr(list(names))}") from None
            if keys != list(range(len(keys))):
                raise DataError(path, f"expected 'names' keys 0..{len(keys) - 1}, got {short_repr(keys)}")
            return _check_names(path, [names[k] if k in names else names[str(k)] for k in keys])
        if isinstance(names, list):
            return _check_names(path, names)
        raise DataError(path, "expected a 'names' list or mapping")
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise DataError(path, "no class names")
    return _check_names(path, names)


def _default_label_dir(image_dir: Path) -> Path:
    # Ultralytics' rule: the last "images" component of the path becomes "labels".
    parts = list(image_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return image_dir


def _class_file(image_dir: Path, label_dir: Path) -> Path | None:
    """The first ``classes.txt`` / ``data.yaml`` / ``dataset.yaml`` of the folders searched for names."""
    for folder in (label_dir, label_dir.parent, image_dir.parent, image_dir.parent.parent):
        for fname in ("classes.txt", "data.yaml", "dataset.yaml"):
            if (folder / fname).is_file():
                return folder / fname
    return None


def _refuse_other_labels(image_dir: Path, label_dir: Path, num_images: int) -> None:
    """Raise :class:`~fewsight.errors.DataError` when no image has a label file but the folders hold
    annotation-like files: images without labels are right for an unlabelled folder, and silently wrong
    for one labelled in another format (LabelImg's ``.xml`` beside the images, a COCO ``.json``)."""
    found = []
    for folder in dict.fromkeys((label_dir, image_dir)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.suffix.lower() in (".xml", ".json", ".txt") and p.is_file()]
    if not found:
        return
    suffixes = {p.suffix.lower() for p in found}
    hint = ""
    if ".xml" in suffixes:
        hint = "; .xml files are Pascal VOC annotations: read the folder with format 'voc'"
    elif ".json" in suffixes:
        hint = "; a .json file may be COCO annotations: read that file with format 'coco'"
    where = found[0].parent
    raise DataError(label_dir, f"expected a YOLO label file <image name>.txt for some of the {num_images} image(s) "
                    f"in {image_dir}, got none; found {_describe_files(where)}{hint}")


class YOLODataset(ImageFileDataset):
    """Images of a folder with YOLO txt labels.

    Args:
        image_dir: folder of images (sorted; extensions :data:`IMAGE_EXTENSIONS`).
        label_dir: folder of ``<stem>.txt`` labels; default: ``image_dir`` with its last ``images``
            component replaced by ``labels`` (Ultralytics layout), else ``image_dir`` itself.
        classes: names in label order, or a path to ``classes.txt`` / ``data.yaml``. ``None``: the
            first ``classes.txt`` / ``data.yaml`` / ``dataset.yaml`` found in ``label_dir``, its
            parent, or ``image_dir``'s parent or grand-parent; else names ``"0".."K-1"`` (``K`` = 1 +
            the largest class id found).
        transforms, on_error, verify_images, min_size, max_pixels: see :class:`ImageFileDataset`.

    Errors (:class:`~fewsight.errors.DataError` naming the file and line): a label file that is not
    UTF-8, a line that is not ``class cx cy w h`` numbers (or a polygon), a class id that is not an
    integer in ``[0, len(classes))`` (in ``[0, MAX_CLASS_ID]`` without names), a names file with a
    repeated name, a missing image folder, an unreadable image, no label file for any image while the
    folders hold other annotation files (``.xml``, ``.json``, ``.txt``: another format, never read as
    images without objects). Boxes with a non-finite value are dropped and counted in ``num_boxes_dropped``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path | None = None,
        *,
        classes: Sequence[str] | str | Path | None = None,
        transforms: Callable[..., Any] | None = None,
        on_error: str = "raise",
        verify_images: bool = False,
        min_size: float = 1.0,
        max_pixels: int | None = None,
    ) -> None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DataError(image_dir, "image folder not found")
        label_dir = _default_label_dir(image_dir) if label_dir is None else Path(label_dir)
        names: list[str] | None
        if isinstance(classes, (str, Path)):
            names = read_class_names(classes)
        elif classes is not None:
            names = [str(c) for c in classes]
        else:
            found = _class_file(image_dir, label_dir)
            names = None if found is None else read_class_names(found)
        super().__init__(
            names or [], transforms=transforms, on_error=on_error, verify_images=verify_images, min_size=min_size, max_pixels=max_pixels
        )
        self.image_dir, self.label_dir = image_dir, label_dir
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if images and not any((label_dir / f"{img.stem}.txt").is_file() for img in images):
            _refuse_other_labels(image_dir, label_dir, len(images))

        parsed: list[tuple[Path, Path, np.ndarray, np.ndarray]] = []
        for img in images:
            txt = label_dir / f"{img.stem}.txt"
            try:
                boxes, labels = self._parse(txt, None if names is None else len(names))
            except DataError as exc:
                self._fail(exc.path, exc.reason)
                continue
            parsed.append((img, txt, boxes, labels))
        if names is None:
            top = max((int(lab.max()) for *_, lab in parsed if len(lab)), default=-1)
            self.classes = [str(k) for k in range(top + 1)]
        self._index([_Entry(img, b, lab, txt, normalized=True) for img, txt, b, lab in parsed])

    @staticmethod
    def _parse(txt: Path, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
        if not txt.is_file():
            return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for n, line in enumerate(read_text(txt, what="label file").splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 5 and not (len(tokens) >= 7 and len(tokens) % 2 == 1):
                raise DataError(txt, f"line {n}: expected 'class cx cy w h', got {short_repr(line.strip())}")
            try:
                values = [float(v) for v in tokens[1:]]
                cls = float(tokens[0])
            except ValueError:
                raise DataError(txt, f"line {n}: expected numbers, got {short_repr(line.strip())}") from None
            top = MAX_CLASS_ID if num_classes is None else num_classes - 1
            if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls <= top:
                why = f"{num_classes} classes" if num_classes is not None else "the bound without a names file"
                raise DataError(txt, f"line {n}: unknown class id {tokens[0][:40]}: expected an integer in 0..{top} ({why})")
            if len(values) == 4:
                cx, cy, w, h = values
                boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            else:
                xs, ys = values[0::2], values[1::2]
                boxes.append([min(xs), min(ys), max(xs), max(ys)])
            labels.append(int(cls))
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def write_yolo(
    label_dir: str | Path,
    file_names: Sequence[str | Path],
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Target],
    classes: Sequence[str],
) -> list[Path]:
    """Write ``<stem>.txt`` YOLO labels (and ``classes.txt``) into ``label_dir``; returns the label paths."""
    if not len(file_names) == len(image_sizes) == len(targets):
        raise InvalidArgumentError(
            f"file_names, image_sizes, targets: expected equal lengths, got "
            f"{len(file_names)}, {len(image_sizes)}, {len(targets)}"
        )
    label_dir = Path(label_dir)
    label_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes("".join(f"{c}\n" for c in classes).encode("utf-8"), label_dir / "classes.txt")
    out = []
    for i, (name, (h, w), t) in enumerate(zip(file_names, image_sizes, targets)):
        b = t["boxes"].detach().cpu().double().reshape(-1, 4).tolist()
        lab = t["labels"].detach().cpu().reshape(-1).tolist()
        lines = []
        for (x1, y1, x2, y2), k in zip(b, lab):
            if not 0 <= int(k) < len(classes):
                raise InvalidArgumentError(f"targets[{i}]['labels']: expected labels in [0, {len(classes)}), got {k}")
            cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
            lines.append(f"{int(k)} {cx!r} {cy!r} {bw!r} {bh!r}\n")
        path = label_dir / f"{Path(name).stem}.txt"
        atomic_write_bytes("".join(lines).encode("utf-8"), path)
        out.append(path)
    return out
