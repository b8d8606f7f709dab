"""Write any :class:`~fewsight.data.DetectionDataset` to a folder in COCO, VOC, YOLO or CSV layout.

Used to turn the built-in synthetic datasets into ordinary folders (demo, tests, sharing) that the
readers of :mod:`fewsight.data` read back with the same boxes and labels.

Example:
    >>> import tempfile
    >>> from fewsight.data import DigitsDataset, COCODataset
    >>> src = DigitsDataset("val", num_images=3)
    >>> ann = export_dataset(src, tempfile.mkdtemp(), fmt="coco")
    >>> back = COCODataset(ann)
    >>> len(back), back.classes == src.classes
    (3, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fewsight.data.dataset import DetectionDataset, Target, save_image
from fewsight.data.formats import FORMATS, get_format
from fewsight.errors import InvalidArgumentError, check_choice

__all__ = ["EXPORT_FORMATS", "export_dataset"]

#: The formats of :data:`~fewsight.data.formats.FORMATS` that have a writer.
EXPORT_FORMATS: tuple[str, ...] = tuple(name for name in FORMATS if get_format(name).writer is not None)


def export_dataset(
    dataset: DetectionDataset,
    root: str | Path,
    *,
    fmt: str = "coco",
    indices: Sequence[int] | None = None,
) -> Path:
    """Save the images (PNG, lossless) and annotations of ``dataset`` under ``root``.

    Layouts (what to pass to the matching reader, or to :func:`~fewsight.data.open_dataset`, is
    returned):

    * ``"coco"``: ``root/images/*.png`` + ``root/annotations.json`` (returns the JSON path; its
      ``file_name`` entries are ``images/<name>``, relative to ``root``, so ``COCODataset(path)``
      reads it as is);
    * ``"voc"``: ``root/JPEGImages/*.png`` + ``root/Annotations/*.xml`` (returns ``root``);
    * ``"yolo"``: ``root/images/*.png`` + ``root/labels/*.txt`` + ``root/labels/classes.txt``
      (returns ``root/images``);
    * ``"csv"``: ``root/images/*.png`` + ``root/annotations.csv`` (returns the CSV path).

    Images are the dataset's items as ``dataset[i]`` returns them (after its ``transforms``).
    """
    check_choice("fmt", fmt, EXPORT_FORMATS)
    spec = get_format(fmt)
    if spec.writer is None:  # pragma: no cover - EXPORT_FORMATS holds only formats with a writer
        raise InvalidArgumentError(f"fmt: expected one of {EXPORT_FORMATS}, got {fmt!r}")
    root = Path(root)
    image_folder = root / spec.image_folder
    idx = range(len(dataset)) if indices is None else indices
    names: list[str] = []
    sizes: list[tuple[int, int]] = []
    targets: list[Target] = []
    for i in idx:
        image, target = dataset[i]
        name = f"{int(i):06d}.png"
        save_image(image, image_folder / name)
        names.append(name)
        sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        targets.append(target)
    return spec.writer(root, names, sizes, targets, list(dataset.classes))
