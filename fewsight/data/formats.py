"""One registry of dataset formats: how each is recognised, read and written.

Every format fewsight reads is a :class:`DatasetFormat` here — the file formats ``coco``, ``voc``,
``yolo``, ``csv`` and the generated ``digits`` and ``emoji`` datasets — so the command line, the
YAML configs and :func:`~fewsight.data.export_dataset` all agree on the names, the readers and the
writers, and a new format is added in one place.

* :func:`infer_format` tells the format of a path (a COCO ``.json``, a ``.csv``, a VOC folder with
  ``Annotations/``, a YOLO folder, an emoji-logos folder) and raises
  :class:`~fewsight.errors.DataError` for anything else, rather than reading an empty dataset.
* :func:`open_dataset` reads a path in its format and, given ``classes`` (a model's class list),
  expresses the labels against that list by class name: a file may hold a subset of those classes,
  and a class the list lacks is an error naming the file.
* :func:`apply_class_map` (``open_dataset(..., class_map=...)``) renames, merges or drops classes by
  name as a dataset is read: ``{old: new}`` renames, several olds onto one new merge, ``{old: None}``
  drops that class's boxes (its images stay, as background where nothing else is left).
* :func:`get_format` looks a format up; :data:`FORMATS` lists the names.

Example:
    >>> import tempfile
    >>> from fewsight.data import DigitsDataset, export_dataset
    >>> src = DigitsDataset("val", num_images=2, classes=[3, 5])
    >>> ann = export_dataset(src, tempfile.mkdtemp(), fmt="coco")
    >>> infer_format(ann)
    'coco'
    >>> ds = open_dataset(ann, classes=["1", "3", "5"])  # the file's classes onto a longer list
    >>> ds.classes, set(ds[0][1]["labels"].tolist()) <= {1, 2}
    (['1', '3', '5'], True)
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewsight.data.coco import COCODataset, write_coco
from fewsight.data.csvfile import CSVDataset, write_csv
import numpy as np

from fewsight.data.dataset import DetectionDataset, ImageFileDataset, RelabeledDataset, Target
from fewsight.data.digits import DigitsDataset, LargeDigitsDataset
from fewsight.data.voc import VOCDataset, voc_layout, write_voc
from fewsight.data.yolo import IMAGE_EXTENSIONS, YOLODataset, _class_file, _default_label_dir, write_yolo
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["FORMATS", "DatasetFormat", "apply_class_map", "check_class_map", "get_format", "infer_format",
           "open_dataset"]

logger = logging.getLogger("fewsight.data")

#: ``reader(path, images, classes, options)``: the dataset, labels indexing ``classes`` when given.
Reader = Callable[[Path | None, Path | None, Any, dict[str, Any]], Any]
#: ``writer(root, file_names, image_sizes, targets, classes)``: writes the annotations of images already
#: saved in ``root / image_folder`` and returns the path to read them back from.
Writer = Callable[[Path, Sequence[str], Sequence[tuple[int, int]], Sequence[Target], Sequence[str]], Path]


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format of the registry (see :func:`get_format`).

    Attributes:
        name: the format's name, as ``open_dataset(..., format=name)`` and a config's ``type`` take it.
        dataset: ``"module:Class"`` of the dataset class, imported on use (:attr:`dataset_class`) so
            that listing formats loads no optional dataset.
        reader: ``reader(path, images, classes, options)`` -> the dataset (see :func:`open_dataset`).
        layout: what a path of this format looks like, for messages and help texts.
        detect: ``detect(path) -> bool`` for :func:`infer_format`; ``None``: never inferred from a path.
        writer: writes a dataset's annotations (see :data:`Writer`); ``None``: not writable.
        image_folder: sub-folder of the export root that images are saved to before ``writer`` runs.
        fixed: arguments of the dataset class that ``open_dataset`` fills itself (from ``path``,
            ``images`` and ``classes``); every other keyword argument is an option.
        uses_images: whether ``open_dataset(..., images=DIR)`` applies (file names relative to DIR).
        generated: a dataset drawn on the fly, whose ``classes`` select what is drawn.

    Example:
        >>> fmt = get_format("voc")
        >>> fmt.dataset_class.__name__, fmt.writer is not None, "image_set" in fmt.option_names()
        ('VOCDataset', True, True)
    """

    name: str
    dataset: str
    reader: Reader
    layout: str
    detect: Callable[[Path], bool] | None = None
    writer: Writer | None = None
    image_folder: str = "images"
    fixed: tuple[str, ...] = ("classes",)
    uses_images: bool = False
    generated: bool = False

    @property
    def dataset_class(self) -> type:
        """The dataset class (what a config of this ``type`` builds with its keyword arguments)."""
        module, _, cls = self.dataset.partition(":")
        return getattr(importlib.import_module(module), cls)

    def option_names(self) -> tuple[str, ...]:
        """The keyword options ``open_dataset`` passes on to the dataset class."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(self.dataset_class).parameters
        return tuple(n for n, p in params.items() if p.kind in kinds and n not in self.fixed)


# -- readers ---------------------------------------------------------------------------------------
def _onto(dataset: ImageFileDataset, classes: list[str] | None, source: Path) -> ImageFileDataset:
    """``dataset`` with its labels expressed against ``classes`` by name (unchanged when ``None``)."""
    if classes is None:
        return dataset
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise DataError(source, f"unknown class(es) {unknown}: expected classes among {classes}")
    dataset.map_classes(classes)
    return dataset


def _read_coco(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    # COCODataset's own ``classes`` keeps only the listed categories: read them all, then map by name.
    return _onto(COCODataset(path, images, **options), classes, path)


def _read_csv(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    # The reader maps names itself; a row of another class is an error naming the file and line.
    return CSVDataset(path, image_dir=images, classes=classes, **options)


def _read_voc(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    # Likewise: an object of another class is an error naming its XML file.
    return VOCDataset(path, classes=classes, **options)


def _yolo_image_dir(path: Path) -> Path:
    return path / "images" if (path / "images").is_dir() else path


def _read_yolo(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    image_dir = _yolo_image_dir(path)
    label_dir = options.pop("label_dir", None)
    names_file = _class_file(image_dir, _default_label_dir(image_dir) if label_dir is None else Path(label_dir))
    if classes is not None and names_file is None:
        # Without a names file the class ids are the only names there are: they index ``classes``.
        return YOLODataset(image_dir, label_dir, classes=classes, **options)
    return _onto(YOLODataset(image_dir, label_dir, **options), classes, names_file or image_dir)


def _read_digits(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    if path is not None and str(path) != "digits":
        raise InvalidArgumentError(f"path: expected 'digits' or None with format 'digits', got {str(path)!r}")
    return DigitsDataset(classes=classes, **options)


def _read_digits_large(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    if path is not None and str(path) != "digits_large":
        raise InvalidArgumentError(f"path: expected 'digits_large' or None with format 'digits_large', got {str(path)!r}")
    return LargeDigitsDataset(classes=classes, **options)


def _read_emoji(path: Path | None, images: Path | None, classes: Any, options: dict[str, Any]) -> Any:
    from fewsight.data.emoji import DEFAULT_ROOT, EmojiLogosDataset  # on use: `import fewsight.data` stays emoji-free

    root = DEFAULT_ROOT if path is None or (str(path) == "emoji" and not path.exists()) else path
    return EmojiLogosDataset(root, classes="all" if classes is None else classes, **options)


# -- writers ---------------------------------------------------------------------------------------
def _write_coco(root: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]], targets: Sequence[Target],
                classes: Sequence[str]) -> Path:
    return write_coco(root / "annotations.json", [f"images/{n}" for n in names], sizes, targets, classes)


def _write_voc(root: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]], targets: Sequence[Target],
               classes: Sequence[str]) -> Path:
    write_voc(root / "Annotations", names, sizes, targets, classes)
    return root


def _write_yolo(root: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]], targets: Sequence[Target],
                classes: Sequence[str]) -> Path:
    write_yolo(root / "labels", names, sizes, targets, classes)
    return root / "images"


def _write_csv(root: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]], targets: Sequence[Target],
               classes: Sequence[str]) -> Path:
    return write_csv(root / "annotations.csv", [f"images/{n}" for n in names], targets, classes)


# -- detection -------------------------------------------------------------------------------------
def _is_coco(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _is_csv(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv"


def _is_voc(path: Path) -> bool:
    return voc_layout(path) is not None  # Annotations/ + JPEGImages/, or *.xml beside the images (LabelImg)


def _is_emoji(path: Path) -> bool:
    from fewsight.data.emoji.catalog import STYLES  # not at import: `import fewsight.data` stays emoji-free

    return path.is_dir() and all((path / s / "emoji.json").is_file() for s in STYLES)


def _is_yolo(path: Path) -> bool:
    # Images with .txt files where YOLODataset looks for labels; a folder of images alone is not a
    # labelled dataset, and reading it would silently give images without objects.
    if not path.is_dir():
        return False
    image_dir = _yolo_image_dir(path)
    label_dir = _default_label_dir(image_dir)
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in image_dir.iterdir())
    return has_images and label_dir.is_dir() and any(label_dir.glob("*.txt"))


_REGISTRY: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat(
            "digits", "fewsight.data.digits:DigitsDataset", _read_digits,
            "the word 'digits' (MNIST digits drawn on canvases)", generated=True,
        ),
        DatasetFormat(
            "digits_large", "fewsight.data.digits:LargeDigitsDataset", _read_digits_large,
            "the word 'digits_large' (2,048 px canvases of 100-300 small MNIST digits)", generated=True,
        ),
        DatasetFormat(
            "emoji", "fewsight.data.emoji.datasets:EmojiLogosDataset", _read_emoji,
            "an emoji-logos folder with google/ and twitter/ emoji.json (make emoji-data), or the word 'emoji'",
            detect=_is_emoji, fixed=("root", "classes"), generated=True,
        ),
        DatasetFormat(
            "coco", "fewsight.data.coco:COCODataset", _read_coco, "a COCO instances .json file",
            detect=_is_coco, writer=_write_coco, fixed=("ann_file", "image_dir", "classes"), uses_images=True,
        ),
        DatasetFormat(
            "voc", "fewsight.data.voc:VOCDataset", _read_voc,
            "a Pascal VOC folder with Annotations/*.xml and JPEGImages/, or *.xml files beside their images",
            detect=_is_voc, writer=_write_voc, image_folder="JPEGImages", fixed=("root", "classes"),
        ),
        DatasetFormat(
            "yolo", "fewsight.data.yolo:YOLODataset", _read_yolo,
            "a YOLO folder: DIR/images + DIR/labels/*.txt, or images with their .txt labels beside them",
            detect=_is_yolo, writer=_write_yolo, fixed=("image_dir", "classes"),
        ),
        DatasetFormat(
            "csv", "fewsight.data.csvfile:CSVDataset", _read_csv, "a .csv file of image,x1,y1,x2,y2,class rows",
            detect=_is_csv, writer=_write_csv, fixed=("csv_file", "image_dir", "classes"), uses_images=True,
        ),
    )
}

#: Names of every registered format, in registry order.
FORMATS: tuple[str, ...] = tuple(_REGISTRY)


def get_format(name: str) -> DatasetFormat:
    """The :class:`DatasetFormat` called ``name``; :class:`~fewsight.errors.InvalidArgumentError` otherwise.

    >>> get_format("coco").layout
    'a COCO instances .json file'
    """
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"format: expected one of {FORMATS}, got {name!r}")
    return _REGISTRY[name]


def _expected() -> str:
    return "; ".join(f"{f.name}: {f.layout}" for f in _REGISTRY.values())


def infer_format(path: str | Path) -> str:
    """The name of the format of ``path``, from what is on disk.

    A ``.json`` file is ``coco``, a ``.csv`` file ``csv``; a folder with ``Annotations/`` or with
    ``*.xml`` files beside its images (:func:`~fewsight.data.voc.voc_layout`) is ``voc``,
    one with ``google/emoji.json`` and ``twitter/emoji.json`` is ``emoji``, and one of images with
    their ``.txt`` labels (``DIR/images`` + ``DIR/labels``, or side by side) is ``yolo``. The words
    ``"digits"`` and ``"emoji"`` name the generated datasets when no such file or folder exists.
    Anything else raises :class:`~fewsight.errors.DataError` naming the path and listing what was
    expected, so a wrong path never reads as an empty dataset.

    >>> infer_format("digits")
    'digits'
    >>> try:
    ...     infer_format("/nonexistent/annotations.json")
    ... except DataError as e:
    ...     print(e.reason.split(";")[0])
    no such file or folder
    """
    p = Path(path)
    if not p.exists():
        if str(path) in _REGISTRY and _REGISTRY[str(path)].generated:
            return str(path)
        raise DataError(p, f"no such file or folder; expected {_expected()}")
    for fmt in _REGISTRY.values():
        if fmt.detect is not None and fmt.detect(p):
            return fmt.name
    got = f"a file with suffix {p.suffix!r}" if p.is_file() else "a folder that is none of these"
    raise DataError(p, f"cannot tell the dataset format: expected {_expected()}; got {got} (pass format= to choose)")


def open_dataset(
    path: str | Path | None,
    format: str | None = None,
    *,
    classes: Sequence[str | int] | str | None = None,
    images: str | Path | None = None,
    class_map: Mapping[Any, Any] | None = None,
    **options: Any,
) -> DetectionDataset:
    """Read the dataset at ``path`` in ``format`` (default: :func:`infer_format`).

    Args:
        path: the annotation file or dataset folder (see :func:`infer_format`); ``"digits"`` or
            ``None`` for the generated digits, the emoji folder (or ``"emoji"`` / ``None`` for
            ``data/emoji``) for emoji-logos.
        format: one of :data:`FORMATS`; ``None`` infers it from ``path``.
        classes: for the file formats, class names the labels will index (a model's classes, say):
            the file's classes are mapped onto them by name, so a file may hold a subset of them, and
            a class of the file that ``classes`` lacks raises :class:`~fewsight.errors.DataError`
            naming the file and the classes. ``None``: the file's own classes. For the generated
            datasets, the classes to draw, in label order (whatever their ``classes`` argument takes).
        images: the folder COCO ``file_name`` / CSV image paths are relative to (default: the
            annotation file's folder); only for ``coco`` and ``csv``.
        class_map: ``{name: new name or None}`` applied as the file is read (:func:`apply_class_map`),
            before the labels are mapped onto ``classes`` (file formats: the file is read with its own
            classes, mapped, then expressed against ``classes``; generated datasets: drawn with
            ``classes``, then mapped).
        options: keyword arguments of the format's dataset class (:meth:`DatasetFormat.option_names`),
            e.g. ``on_error="skip"``, ``transforms``; ``split``, ``num_images``, ``seed`` for the
            generated datasets. An unknown option raises :class:`~fewsight.errors.InvalidArgumentError`.

    The same call works for every format, which is what lets the command line and configs take
    any of them without knowing their readers.

    >>> ds = open_dataset("digits", classes=["8", "9"], split="test", num_images=2, seed=1)
    >>> ds.classes, len(ds)
    (['8', '9'], 2)
    """
    if path is None and format is None:
        raise InvalidArgumentError("path: expected a dataset file or folder (or a format), got None")
    fmt = get_format(infer_format(path) if format is None else format)
    p = None if path is None else Path(path)
    if p is None and not fmt.generated:
        raise InvalidArgumentError(f"path: expected {fmt.layout}, got None")
    if images is not None and not fmt.uses_images:
        users = [f.name for f in _REGISTRY.values() if f.uses_images]
        raise InvalidArgumentError(f"images: expected only with the formats {users}, got {str(images)!r} "
                                   f"for format {fmt.name!r}")
    allowed = fmt.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgumentError(f"options: expected options of format {fmt.name!r} among {list(allowed)}, "
                                   f"got unknown {unknown}")
    if classes is not None and not fmt.generated:
        if isinstance(classes, (str, bytes)) or not all(isinstance(c, str) for c in classes):
            raise InvalidArgumentError(f"classes: expected a sequence of class names, got {classes!r}")
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise InvalidArgumentError(f"classes: expected distinct class names, got {classes}")
    image_dir = None if images is None else Path(images)
    if class_map is None:
        return fmt.reader(p, image_dir, classes, dict(options))
    class_map = check_class_map(class_map)
    if fmt.generated:
        return apply_class_map(fmt.reader(p, image_dir, classes, dict(options)), class_map)
    dataset = apply_class_map(fmt.reader(p, image_dir, None, dict(options)), class_map)
    try:
        return _onto(dataset, classes, p)  # type: ignore[arg-type]
    except DataError as exc:
        raise DataError(exc.path, f"{exc.reason} (after class_map; map such a class to one of them, or to null to "
                                  f"drop it)") from None


# -- class maps ------------------------------------------------------------------------------------
def check_class_map(class_map: Any) -> dict[str, str | None]:
    """``class_map`` as ``{str: str | None}`` (int names, as YAML reads ``0: zero``, become strings).

    >>> check_class_map({0: "zero", "car": "vehicle", "bus": None})
    {'0': 'zero', 'car': 'vehicle', 'bus': None}
    """
    if not isinstance(class_map, Mapping):
        raise InvalidArgumentError(f"class_map: expected a mapping {{name: new name or null}}, got {class_map!r}")
    out: dict[str, str | None] = {}
    for key, value in class_map.items():
        for part, v in (("class name", key), ("new class name", value)):
            if part == "new class name" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
                raise InvalidArgumentError(f"class_map[{key!r}]: expected a {part} (a string or int"
                                           f"{' or null to drop the class' if part == 'new class name' else ''}), got {v!r}")
        if str(key) in out:
            raise InvalidArgumentError(f"class_map: expected distinct names, got {key!r} twice")
        out[str(key)] = None if value is None else str(value)
    return out


def _class_lookup(classes: Sequence[str], class_map: Mapping[str, str | None]) -> tuple[list[str], list[int]]:
    """New class names (first-appearance order) and ``old label -> new label`` (``-1``: dropped)."""
    names: list[str] = []
    lookup: list[int] = []
    for old in classes:
        new = class_map.get(old, old)
        if new is None:
            lookup.append(-1)
            continue
        if new not in names:
            names.append(new)
        lookup.append(names.index(new))
    return names, lookup


def apply_class_map(dataset: Any, class_map: Mapping[Any, Any]) -> Any:
    """Rename, merge or drop the classes of ``dataset`` by name: ``{old: new}`` renames, several olds
    onto one new merge, ``{old: None}`` drops that class's boxes. Classes not named keep their name;
    the new class list keeps the order of first appearance. Images whose boxes are all dropped stay,
    as background images. Names the dataset lacks are ignored (a map shared by splits that do not all
    hold every class), with a log warning.

    A file dataset (:class:`~fewsight.data.ImageFileDataset`) is changed in place and returned, so it
    keeps its image sizes, paths and skip records; any other dataset is wrapped in a
    :class:`~fewsight.data.RelabeledDataset` view.

    >>> from fewsight.data import DigitsDataset
    >>> ds = apply_class_map(DigitsDataset("val", 4, classes=[1, 2, 3]), {1: "odd", 3: "odd", 2: None})
    >>> ds.classes, set(ds[0][1]["labels"].tolist()) <= {0}
    (['odd'], True)
    """
    class_map = check_class_map(class_map)
    old = [str(c) for c in dataset.classes]
    missing = [k for k in class_map if k not in old]
    if missing:
        logger.warning("class_map: %s not among the classes %s of %s (ignored)", missing, old, type(dataset).__name__)
    names, lookup = _class_lookup(old, class_map)
    if not isinstance(dataset, ImageFileDataset):
        return RelabeledDataset(dataset, lookup, names)
    # In place on the reader's flat arrays (the layout ImageFileDataset._index builds): relabel, drop
    # the unmapped boxes, recount each image's boxes.
    table = np.array(lookup, dtype=np.int64).reshape(-1)
    labels = table[dataset._labels] if len(table) else np.zeros(0, np.int64)
    keep = labels >= 0
    owner = np.repeat(np.arange(len(dataset)), np.diff(dataset._offsets))
    counts = np.bincount(owner[keep], minlength=len(dataset)).astype(np.int64)
    dataset._boxes = dataset._boxes[keep]
    dataset._labels = labels[keep]
    dataset._offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    dataset.classes = names
    return dataset
