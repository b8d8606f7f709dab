"""COCO JSON detection annotations: :class:`COCODataset` reader and :func:`write_coco` writer.

Reading: ``categories`` sorted by id give ``classes`` (label ``k`` is the ``k``-th category by id;
``dataset.category_ids[k]`` maps back). ``bbox`` is ``[x, y, w, h]`` and becomes xyxy. Crowd
annotations (``iscrowd=1``) are left out (counted in ``num_crowd``), as in torchvision's detection
references. Images listed without annotations are kept with an empty target.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from fewsight.data import save_image
    >>> root = Path(tempfile.mkdtemp())
    >>> save_image(torch.zeros(3, 20, 30), root / "a.png")
    >>> _ = write_coco(root / "ann.json", ["a.png"], [(20, 30)],
    ...                [{"boxes": torch.tensor([[1., 2., 11., 12.]]), "labels": torch.tensor([1])}], ["cat", "dog"])
    >>> ds = COCODataset(root / "ann.json", root)
    >>> ds.classes, ds[0][1]["boxes"], ds[0][1]["labels"]
    (['cat', 'dog'], tensor([[ 1.,  2., 11., 12.]]), tensor([1]))
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewsight._io import atomic_write_bytes, read_json, short_repr
from fewsight.data.dataset import ImageFileDataset, Target, _Entry
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["COCODataset", "write_coco"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    # Ids are compared and hashed: a list or object would raise TypeError far from the file.
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _crowd_flag(v: Any) -> bool | None:
    """``iscrowd`` as a bool: only ``0`` / ``1`` / ``false`` / ``true`` (``None`` for anything else)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    return None


class COCODataset(ImageFileDataset):
    """Images listed in a COCO ``instances`` JSON file.

    Args:
        ann_file: the JSON file.
        image_dir: folder that ``file_name`` entries are relative to (default: the JSON's folder).
        classes: optional category names to keep, in label order; annotations of other (known)
            categories are left out. ``None``: every category, ordered by id.
        transforms, on_error, verify_images, min_size, max_pixels: see :class:`ImageFileDataset`.

    Errors (:class:`~fewsight.errors.DataError` naming the file): a missing or empty file, text that
    is not UTF-8, malformed or too deeply nested JSON, no ``categories``, a malformed category or
    image entry, two categories with one id or one name (always raised: nothing sound would be
    left); an annotation whose ``category_id`` is not among the categories or whose ``image_id`` is
    not among the images, a malformed ``bbox``, an ``iscrowd`` other than ``0`` / ``1`` / ``false``
    / ``true`` (a string such as ``"0"`` included), a missing or unreadable image. With
    ``on_error="skip"`` the faulty annotation's image (or the unreadable image) is skipped and
    recorded in ``skipped``. Boxes with a non-finite value are dropped and counted in
    ``num_boxes_dropped``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path | None = None,
        *,
        classes: Sequence[str] | None = None,
        transforms: Callable[..., Any] | None = None,
        on_error: str = "raise",
        verify_images: bool = False,
        min_size: float = 1.0,
        max_pixels: int | None = None,
    ) -> None:
        ann_file = Path(ann_file)
        data = self._read_json(ann_file)
        cats = data["categories"]
        cat_by_id: dict[int, str] = {}
        for c in cats:
            if (
                not isinstance(c, dict)
                or not isinstance(c.get("id"), int)
                or isinstance(c["id"], bool)
                or not isinstance(c.get("name"), (str, int))
                or isinstance(c["name"], bool)
            ):
                raise DataError(ann_file, f"malformed category {short_repr(c)}: expected {{'id': int, 'name': str}}")
            if c["id"] in cat_by_id:
                raise DataError(ann_file, f"duplicate category id {c['id']}")
            name = str(c["name"])
            if name in cat_by_id.values():
                first = next(i for i, n in cat_by_id.items() if n == name)
                raise DataError(
                    ann_file, f"expected distinct category names, got {name!r} for ids {first} and {c['id']}"
                )
            cat_by_id[c["id"]] = name
        ordered = sorted(cat_by_id)
        if classes is None:
            names = [cat_by_id[i] for i in ordered]
            label_of = {cid: k for k, cid in enumerate(ordered)}
        else:
            names = [str(c) for c in classes]
            by_name = {cat_by_id[i]: i for i in ordered}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise InvalidArgumentError(
                    f"classes: expected category names of {ann_file}, got unknown {missing} "
                    f"(known: {list(by_name)})"
                )
            label_of = {by_name[n]: k for k, n in enumerate(names)}
        super().__init__(
            names, transforms=transforms, on_error=on_error, verify_images=verify_images, min_size=min_size,
            max_pixels=max_pixels,
        )
        self.ann_file = ann_file
        self.category_ids: list[int] = list(label_of)
        self.num_crowd = 0
        image_dir = ann_file.parent if image_dir is None else Path(image_dir)

        images: dict[Any, dict[str, Any]] = {}
        order: list[Any] = []
        for im in data["images"]:
            if not isinstance(im, dict) or not _is_id(im.get("id")) or not isinstance(im.get("file_name"), str):
                raise DataError(
                    ann_file, f"malformed image entry {short_repr(im)}: expected {{'id': int or str, 'file_name': str}}"
                )
            if im["id"] in images:
                raise DataError(ann_file, f"duplicate image id {im['id']!r}")
            images[im["id"]] = im
            order.append(im["id"])

        boxes: dict[Any, list[list[float]]] = {i: [] for i in order}
        labels: dict[Any, list[int]] = {i: [] for i in order}
        bad: set[Any] = set()
        for a in data.get("annotations", []):
            if not isinstance(a, dict):
                self._fail(ann_file, f"malformed annotation {short_repr(a)}: expected an object")
                continue
            aid = short_repr(a.get("id", "?"))
            iid = a.get("image_id")
            if not _is_id(iid) or iid not in images:
                self._fail(ann_file, f"annotation {aid}: image_id {short_repr(iid)} is not among the images")
                continue
            cid = a.get("category_id")
            if not _is_id(cid) or cid not in cat_by_id:
                self._fail(
                    ann_file, f"annotation {aid}: category_id {short_repr(cid)} is not among the categories {ordered}"
                )
                bad.add(iid)
                continue
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                self._fail(ann_file, f"annotation {aid}: expected bbox [x, y, w, h] numbers, got {short_repr(bbox)}")
                bad.add(iid)
                continue
            crowd = _crowd_flag(a.get("iscrowd", 0))
            if crowd is None:
                self._fail(
                    ann_file, f"annotation {aid}: expected iscrowd 0 or 1 (or false / true), got {short_repr(a['iscrowd'])}"
                )
                bad.add(iid)
                continue
            if crowd:
                self.num_crowd += 1
                continue
            if cid not in label_of:
                continue
            x, y, w, h = (float(v) for v in bbox)
            boxes[iid].append([x, y, x + w, y + h] if math.isfinite(w) and math.isfinite(h) else [x, y, x, y])
            labels[iid].append(label_of[cid])

        entries = [
            _Entry(
                image_dir / images[i]["file_name"],
                np.asarray(boxes[i], dtype=np.float64).reshape(-1, 4),
                np.asarray(labels[i], dtype=np.int64),
                ann_file,
            )
            for i in order
            if i not in bad
        ]
        ids = [i for i in order if i not in bad]
        self.image_ids: list[Any] = [ids[k] for k in self._index(entries)]

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(path, f"expected a JSON object with 'images' and 'categories', got {type(data).__name__}")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(path, f"expected a list under {key!r}, got {type(data.get(key)).__name__}")
        if not data["categories"]:
            raise DataError(path, "no categories")
        if not data["images"]:
            raise DataError(path, "no images")
        if not isinstance(data.get("annotations", []), list):
            raise DataError(path, "expected a list under 'annotations'")
        return data


def write_coco(
    path: str | Path,
    file_names: Sequence[str | Path],
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[Target],
    classes: Sequence[str],
) -> Path:
    """Write a COCO ``instances`` JSON: one image per ``file_names[i]`` with ``(H, W) = image_sizes[i]``.

    ``targets[i]["boxes"]`` (xyxy) become ``bbox [x, y, w, h]``; label ``k`` becomes category id
    ``k + 1`` named ``classes[k]``. Image ids are ``1..n``. Returns the path.
    """
    if not len(file_names) == len(image_sizes) == len(targets):
        raise InvalidArgumentError(
            f"file_names, image_sizes, targets: expected equal lengths, got "
            f"{len(file_names)}, {len(image_sizes)}, {len(targets)}"
        )
    images, annotations = [], []
    for i, (name, (h, w), t) in enumerate(zip(file_names, image_sizes, targets), start=1):
        images.append({"id": i, "file_name": str(name), "height": int(h), "width": int(w)})
        b = t["boxes"].detach().cpu().double().reshape(-1, 4).tolist()
        lab = t["labels"].detach().cpu().reshape(-1).tolist()
        for (x1, y1, x2, y2), k in zip(b, lab):
            if not 0 <= int(k) < len(classes):
                raise InvalidArgumentError(f"targets[{i - 1}]['labels']: expected labels in [0, {len(classes)}), got {k}")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(k) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(n), "supercategory": ""} for k, n in enumerate(classes)],
    }
    return atomic_write_bytes(json.dumps(data).encode("utf-8"), path)
