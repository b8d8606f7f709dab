"""Pascal VOC XML annotations: :class:`VOCDataset` reader, :func:`write_voc` writer, :func:`voc_layout`.

Layouts read (:func:`voc_layout`): the standard ``Annotations/*.xml`` + ``JPEGImages/``; LabelImg's
default, each ``a.xml`` beside its image ``a.jpg``; ``annotations/*.xml`` (or XML files in the
folder itself) with the images in ``images/`` or ``JPEGImages/``.

VOC pixel coordinates are 1-based and inclusive; like detectron2 we convert them to pixel-edge
xyxy with ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (the writer does the inverse), so a
box covering the whole ``W x H`` image reads ``(0, 0, W, H)``.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from fewsight.data import save_image
    >>> root = Path(tempfile.mkdtemp())
    >>> save_image(torch.zeros(3, 20, 30), root / "JPEGImages" / "a.png")
    >>> _ = write_voc(root / "Annotations", ["a.png"], [(20, 30)],
    ...               [{"boxes": torch.tensor([[0., 2., 11., 12.]]), "labels": torch.tensor([0])}], ["cat"])
    >>> ds = VOCDataset(root, classes=["cat"])
    >>> ds[0][1]["boxes"]
    tensor([[ 0.,  2., 11., 12.]])
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewsight._io import atomic_write_bytes, read_text, short_repr
from fewsight.data.dataset import ImageFileDataset, Target, _Entry, _describe_files
from fewsight.data.yolo import IMAGE_EXTENSIONS
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["VOC_CLASSES", "VOCDataset", "voc_layout", "write_voc"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _has_suffix(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in suffixes and p.is_file() for p in folder.iterdir())


def voc_layout(root: str | Path) -> tuple[Path, Path] | None:
    """``(annotation folder, image folder)`` of a Pascal VOC dataset at ``root``; ``None`` if it is none.

    In order: ``root/Annotations`` (with ``root/JPEGImages``: the standard layout); else the first of
    ``root/annotations`` and ``root`` that holds ``*.xml`` files, with the images beside them
    (LabelImg's default) or, when none are, in ``root/JPEGImages`` or ``root/images``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("a.jpg", "a.xml"):
    ...     _ = (root / name).write_bytes(b"")
    >>> voc_layout(root) == (root, root), voc_layout(root / "nothing")
    (True, None)
    """
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / "Annotations").is_dir():
        return root / "Annotations", root / "JPEGImages"
    for ann in (root / "annotations", root):
        if not _has_suffix(ann, (".xml",)):
            continue
        if _has_suffix(ann, IMAGE_EXTENSIONS):
            return ann, ann
        for name in ("JPEGImages", "images"):
            if (root / name).is_dir():
                return ann, root / name
        return ann, ann  # images named by the XML files are missing: reading names the first
    return None


def _image_of(xml: Path, filename: str, img_path: Path) -> Path:
    """The image of an annotation: ``<filename>`` in the image folder, else the file named like the XML
    with an image suffix (a LabelImg folder whose images were renamed or converted)."""
    named = img_path / filename if filename else None
    if named is not None and named.is_file():
        return named
    for ext in IMAGE_EXTENSIONS:
        for candidate in (img_path / f"{xml.stem}{ext}", img_path / f"{xml.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return named if named is not None else img_path / f"{xml.stem}.jpg"


class _Parsed:
    __slots__ = ("xml", "image", "boxes", "names")

    def __init__(self, xml: Path, image: Path, boxes: list[list[float]], names: list[str]) -> None:
        self.xml, self.image, self.boxes, self.names = xml, image, boxes, names


class VOCDataset(ImageFileDataset):
    """A Pascal VOC style folder: ``root/Annotations/*.xml`` and ``root/JPEGImages/<filename>``, or XML
    files beside their images (LabelImg): see :func:`voc_layout`.

    Args:
        root: dataset folder.
        image_set: optional name of a list ``root/ImageSets/Main/<image_set>.txt`` of image ids;
            ``None`` reads every ``*.xml`` of ``ann_dir`` (sorted).
        classes: class names in label order (e.g. :data:`VOC_CLASSES`); an object of another name
            is an error naming the class and the file. ``None``: the sorted names found.
        keep_difficult: keep objects flagged ``<difficult>1</difficult>`` (left out by default, as
            VOC evaluation ignores them).
        ann_dir, image_dir: sub-folders of ``root`` (or absolute paths); ``None``: as :func:`voc_layout`
            finds them (``Annotations`` / ``JPEGImages`` when it finds no layout).
        transforms, on_error, verify_images, min_size, max_pixels: see :class:`ImageFileDataset`.

    An XML names its image by ``<filename>`` in the image folder (else the image named like the XML).
    An XML without ``<object>`` is an image without objects (empty target). Errors
    (:class:`~fewsight.errors.DataError` naming the file): no VOC layout at ``root`` or no ``*.xml`` in
    the annotation folder (naming the files found instead), a missing or malformed XML (text is
    decoded as its XML declaration says, UTF-8 without one; bytes that do not decode are malformed),
    an object without a name or with a missing / non-numeric ``bndbox`` coordinate, an unknown
    class, a missing or unreadable image. A box with a non-finite coordinate (``inf``, ``nan``) is
    dropped and counted in ``num_boxes_dropped``, like any other degenerate box.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_set: str | None = None,
        classes: Sequence[str] | None = None,
        keep_difficult: bool = False,
        ann_dir: str | Path | None = None,
        image_dir: str | Path | None = None,
        transforms: Callable[..., Any] | None = None,
        on_error: str = "raise",
        verify_images: bool = False,
        min_size: float = 1.0,
        max_pixels: int | None = None,
    ) -> None:
        root = Path(root)
        self.root = root
        layout = voc_layout(root) if ann_dir is None or image_dir is None else None
        if ann_dir is None and layout is None and image_set is None:
            raise DataError(root / "Annotations", "annotation folder not found: expected Annotations/*.xml and "
                            f"JPEGImages/, or *.xml files beside their images; got {_describe_files(root)}")
        ann_path = (layout[0] if layout else root / "Annotations") if ann_dir is None else root / ann_dir
        img_path = (layout[1] if layout else root / "JPEGImages") if image_dir is None else root / image_dir
        self.ann_dir, self.image_dir = ann_path, img_path
        # Classes may be inferred from the files, so parse first with a provisional base init.
        super().__init__(
            list(classes) if classes is not None else [],
            transforms=transforms,
            on_error=on_error,
            verify_images=verify_images,
            min_size=min_size,
            max_pixels=max_pixels,
        )
        if image_set is not None:
            list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
            ids = [ln.split()[0] for ln in read_text(list_file, what="image-set list").splitlines() if ln.strip()]
            xml_files = [ann_path / f"{i}.xml" for i in ids]
        else:
            if not ann_path.is_dir():
                raise DataError(ann_path, "annotation folder not found")
            xml_files = sorted(p for p in ann_path.iterdir() if p.suffix.lower() == ".xml" and p.is_file())
            if not xml_files:
                # Never an empty dataset from a folder of something else (YOLO .txt labels, a COCO .json).
                raise DataError(ann_path, f"expected Pascal VOC *.xml annotation files, got {_describe_files(ann_path)}")

        parsed: list[_Parsed] = []
        for xml in xml_files:
            try:
                parsed.append(self._parse(xml, img_path, keep_difficult))
            except DataError as exc:
                self._fail(exc.path, exc.reason)

        if classes is None:
            self.classes = sorted({n for p in parsed for n in p.names})
        label_of = {n: k for k, n in enumerate(self.classes)}
        entries: list[_Entry] = []
        for p in parsed:
            unknown = [n for n in p.names if n not in label_of]
            if unknown:
                self._fail(p.xml, f"unknown class {unknown[0]!r} (known: {self.classes})")
                continue
            entries.append(
                _Entry(
                    p.image,
                    np.asarray(p.boxes, dtype=np.float64).reshape(-1, 4),
                    np.asarray([label_of[n] for n in p.names], dtype=np.int64),
                    p.xml,
                )
            )
        self._index(entries)

    @staticmethod
    def _parse(xml: Path, img_path: Path, keep_difficult: bool) -> _Parsed:
        if not xml.is_file():
            raise DataError(xml, "annotation file not found")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as exc:
            raise DataError(xml, f"malformed XML ({exc})") from None
        except (OSError, RecursionError, ValueError) as exc:
            raise DataError(xml, f"cannot read XML ({type(exc).__name__}: {exc})") from None
        ann = tree.getroot()
        filename = (ann.findtext("filename") or "").strip()
        boxes: list[list[float]] = []
        names: list[str] = []
        for k, obj in enumerate(ann.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DataError(xml, f"object {k}: missing <name>")
            difficult = (obj.findtext("difficult") or "0").strip()
            if difficult not in ("0", "") and not keep_difficult:
                continue
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(xml, f"object {k} ({name}): missing <bndbox>")
            coords = []
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                text = bb.findtext(tag)
                try:
                    coords.append(float(text))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise DataError(
                        xml, f"object {k} ({name[:60]}): expected a number in <{tag}>, got {short_repr(text)}"
                    ) from None
            xmin, ymin, xmax, ymax = coords
            boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
            names.append(name)
        return _Parsed(xml, _image_of(xml, filename, img_path), boxes, names)


def _fmt(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and v == int(v) else repr(float(v))


def write_voc(
    ann_dir: str | Path,
    file_names: Sequence[str | Path],
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Target],
    classes: Sequence[str],
) -> list[Path]:
    """Write one VOC XML per image (``<stem>.xml`` in ``ann_dir``); returns the written paths.

    Boxes (pixel-edge xyxy) are stored as 1-based inclusive ``xmin = x1 + 1, ..., xmax = x2``.
    """
    if not len(file_names) == len(image_sizes) == len(targets):
        raise InvalidArgumentError(
            f"file_names, image_sizes, targets: expected equal lengths, got "
            f"{len(file_names)}, {len(image_sizes)}, {len(targets)}"
        )
    ann_dir = Path(ann_dir)
    ann_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, (h, w), t) in enumerate(zip(file_names, image_sizes, targets)):
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = Path(name).name
        size = ET.SubElement(root, "size")
        for tag, v in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(int(v))
        b = t["boxes"].detach().cpu().double().reshape(-1, 4).tolist()
        lab = t["labels"].detach().cpu().reshape(-1).tolist()
        for (x1, y1, x2, y2), k in zip(b, lab):
            if not 0 <= int(k) < len(classes):
                raise InvalidArgumentError(f"targets[{i}]['labels']: expected labels in [0, {len(classes)}), got {k}")
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = str(classes[int(k)])
            ET.SubElement(obj, "difficult").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(bb, tag).text = _fmt(v)
        ET.indent(root)
        path = ann_dir / f"{Path(name).stem}.xml"
        atomic_write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True), path)
        out.append(path)
    return out
