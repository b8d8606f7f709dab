"""CSV annotations: :class:`CSVDataset` reader and :func:`write_csv` writer.

One object per row: ``image_path,x1,y1,x2,y2,class_name`` (absolute pixel xyxy; the layout of
keras-retinanet). A row ``image_path,,,,,`` lists an image without objects. Rows of the same image
need not be adjacent; images keep the order of their first row. The first row is a header when it
has six cells whose coordinate columns are named ``x1,y1,x2,y2`` or ``xmin,ymin,xmax,ymax`` (any
case; the image and class columns may have any name); any other first row is data, so a first row
that is short or not numeric is an error naming line 1 rather than a header taken on trust.
Relative image paths are relative to ``image_dir`` (default: the CSV file's folder). The file is
strict UTF-8 (a leading byte-order mark is allowed).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from fewsight.data import save_image
    >>> root = Path(tempfile.mkdtemp())
    >>> save_image(torch.zeros(3, 20, 30), root / "a.png")
    >>> _ = write_csv(root / "ann.csv", ["a.png"], [{"boxes": torch.tensor([[1., 2., 11., 12.]]),
    ...                                             "labels": torch.tensor([0])}], ["cat"])
    >>> ds = CSVDataset(root / "ann.csv")
    >>> ds.classes, ds[0][1]["boxes"]
    (['cat'], tensor([[ 1.,  2., 11., 12.]]))
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewsight._io import atomic_write_bytes, read_text, short_repr
from fewsight.data.dataset import ImageFileDataset, Target, _Entry
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["CSV_COLUMNS", "CSV_COORDINATE_NAMES", "CSVDataset", "is_csv_header", "write_csv"]

CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "class")

#: The spellings of the four coordinate columns that make a first row a header.
CSV_COORDINATE_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("x1", "y1", "x2", "y2"),
    ("xmin", "ymin", "xmax", "ymax"),
    ("x_min", "y_min", "x_max", "y_max"),
)


def is_csv_header(row: Sequence[str]) -> bool:
    """Whether ``row`` is a header: six cells whose coordinate columns carry one of
    :data:`CSV_COORDINATE_NAMES` (case and surrounding spaces ignored).

    >>> is_csv_header(["image", "x1", "y1", "x2", "y2", "class"]), is_csv_header(["a.png", "1", "2", "3", "cat"])
    (True, False)
    """
    return len(row) == 6 and tuple(c.strip().lower() for c in row[1:5]) in CSV_COORDINATE_NAMES


class CSVDataset(ImageFileDataset):
    """Images and boxes listed in a CSV file (see the module docstring for the layout).

    Args:
        csv_file: the CSV file.
        image_dir: folder relative image paths start from (default: the CSV's folder).
        classes: names in label order; a row with another name is an error naming the class, the
            file and the line. ``None``: the sorted names found.
        header: whether the first row is a header; ``None``: it is one when :func:`is_csv_header`
            says so.
        transforms, on_error, verify_images, min_size, max_pixels: see :class:`ImageFileDataset`.

    Errors (:class:`~fewsight.errors.DataError` naming the file and line): missing or empty file,
    text that is not UTF-8, a row without 6 columns (the first row included), a non-numeric
    coordinate, a row with only some coordinates, an unknown class, a missing or unreadable image.
    With ``on_error="skip"`` the image of a bad row is skipped entirely (a partly annotated image
    would teach false negatives). Boxes with a non-finite coordinate are dropped and counted in
    ``num_boxes_dropped``.
    """

    def __init__(
        self,
        csv_file: str | Path,
        *,
        image_dir: str | Path | None = None,
        classes: Sequence[str] | None = None,
        header: bool | None = None,
        transforms: Callable[..., Any] | None = None,
        on_error: str = "raise",
        verify_images: bool = False,
        min_size: float = 1.0,
        max_pixels: int | None = None,
    ) -> None:
        csv_file = Path(csv_file)
        super().__init__(
            list(classes) if classes is not None else [],
            transforms=transforms,
            on_error=on_error,
            verify_images=verify_images,
            min_size=min_size,
            max_pixels=max_pixels,
        )
        self.csv_file = csv_file
        text = read_text(csv_file)
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not a cell
        try:
            rows = [(n, r) for n, r in enumerate(reader, start=1) if r and any(c.strip() for c in r)]
        except csv.Error as exc:
            raise DataError(csv_file, f"line {reader.line_num}: cannot parse CSV ({exc})") from None
        if not rows:
            raise DataError(csv_file, "annotation file is empty")
        first_line = rows[0][0]
        if header is None:
            header = is_csv_header(rows[0][1])
        if header:
            rows = rows[1:]
        image_dir = csv_file.parent if image_dir is None else Path(image_dir)

        order: list[str] = []
        objects: dict[str, list[tuple[int, list[float], str]]] = {}
        bad: set[str] = set()
        for n, row in rows:
            cells = [c.strip() for c in row]
            if len(cells) != 6:
                self._fail(csv_file, f"line {n}: expected 6 columns {CSV_COLUMNS}, got {len(cells)}: {short_repr(row)}")
                if cells and cells[0]:
                    bad.add(cells[0])
                continue
            img, *coords, name = cells
            if not img:
                self._fail(csv_file, f"line {n}: empty image path")
                continue
            if img not in objects:
                objects[img] = []
                order.append(img)
            if not any(coords) and not name:
                continue  # an image without objects
            try:
                values = [float(c) for c in coords]
            except ValueError:
                hint = " (a header row names the columns image,x1,y1,x2,y2,class)" if n == first_line and not header else ""
                self._fail(csv_file, f"line {n}: expected numbers x1,y1,x2,y2, got {short_repr(coords)}{hint}")
                bad.add(img)
                continue
            if not name:
                self._fail(csv_file, f"line {n}: empty class name")
                bad.add(img)
                continue
            objects[img].append((n, values, name))

        if classes is None:
            self.classes = sorted({name for img in order for _, _, name in objects[img]})
        label_of = {c: k for k, c in enumerate(self.classes)}
        entries: list[_Entry] = []
        for img in order:
            if img in bad:
                continue
            unknown = [(n, name) for n, _, name in objects[img] if name not in label_of]
            if unknown:
                n, name = unknown[0]
                self._fail(csv_file, f"line {n}: unknown class {name!r} (known: {self.classes})")
                continue
            path = Path(img)
            entries.append(
                _Entry(
                    path if path.is_absolute() else image_dir / path,
                    np.asarray([v for _, v, _ in objects[img]], dtype=np.float64).reshape(-1, 4),
                    np.asarray([label_of[name] for _, _, name in objects[img]], dtype=np.int64),
                    csv_file,
                )
            )
        self._index(entries)


def write_csv(
    path: str | Path,
    file_names: Sequence[str | Path],
    targets: Sequence[Target],
    classes: Sequence[str],
    *,
    header: bool = True,
) -> Path:
    """Write ``image,x1,y1,x2,y2,class`` rows (``image,,,,,`` for an image without objects)."""
    if len(file_names) != len(targets):
        raise InvalidArgumentError(
            f"file_names, targets: expected equal lengths, got {len(file_names)}, {len(targets)}"
        )
    f = io.StringIO(newline="")
    w = csv.writer(f)
    if header:
        w.writerow(CSV_COLUMNS)
    for i, (name, t) in enumerate(zip(file_names, targets)):
        b = t["boxes"].detach().cpu().double().reshape(-1, 4).tolist()
        lab = t["labels"].detach().cpu().reshape(-1).tolist()
        if not b:
            w.writerow([str(name), "", "", "", "", ""])
        for box, k in zip(b, lab):
            if not 0 <= int(k) < len(classes):
                raise InvalidArgumentError(
                    f"targets[{i}]['labels']: expected labels in [0, {len(classes)}), got {k}"
                )
            w.writerow([str(name), *(repr(v) for v in box), classes[int(k)]])
    return atomic_write_bytes(f.getvalue().encode("utf-8"), path)
