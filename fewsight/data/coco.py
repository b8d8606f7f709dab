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

from fewsight.data.dataset import ImageFileDataset, Target, _Entry
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["COCODataset", "write_coco"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class COCODataset(ImageFileDataset):
    """Images listed in a COCO ``instances`` JSON file.

    Args:
        ann_file: the JSON file.
        image_dir: folder that ``file_name`` entries are relative to (default: the JSON's folder).
        classes: optional category names to keep, in label order; annotations of other (known)
            categories are left out. ``None``: every category, ordered by id.
        transforms, on_error, verify_images, min_size: see :class:`ImageFileDataset`.

    Errors (:class:`~fewsight.errors.DataError` naming the file): missing, empty or malformed JSON
    (always raised: nothing would be left), no ``categories``, an annotation whose ``category_id``
    is not among the categories or whose ``image_id`` is not among the images, a malformed
    ``bbox``, a missing or unreadable image. With ``on_error="skip"`` the faulty annotation's image
    (or the unreadable image) is skipped and recorded in ``skipped``.
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
    ) -> None:
        ann_file = Path(ann_file)
        data = self._read_json(ann_file)
        cats = data["categories"]
        cat_by_id: dict[int, str] = {}
        for c in cats:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
                raise DataError(ann_file, f"malformed category {c!r}: expected {{'id': int, 'name': str}}")
            if c["id"] in cat_by_id:
                raise DataError(ann_file, f"duplicate category id {c['id']}")
            cat_by_id[c["id"]] = str(c["name"])
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
        super().__init__(names, transforms=transforms, on_error=on_error, verify_images=verify_images, min_size=min_size)
        self.ann_file = ann_file
        self.category_ids: list[int] = list(label_of)
        self.num_crowd = 0
        image_dir = ann_file.parent if image_dir is None else Path(image_dir)

        images: dict[Any, dict[str, Any]] = {}
        order: list[Any] = []
        for im in data["images"]:
            if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
                raise DataError(ann_file, f"malformed image entry {im!r}: expected {{'id', 'file_name'}}")
            if im["id"] in images:
                raise DataError(ann_file, f"duplicate image id {im['id']!r}")
            images[im["id"]] = im
            order.append(im["id"])

        boxes: dict[Any, list[list[float]]] = {i: [] for i in order}
        labels: dict[Any, list[int]] = {i: [] for i in order}
        bad: set[Any] = set()
        for a in data.get("annotations", []):
            if not isinstance(a, dict):
                self._fail(ann_file, f"malformed annotation {a!r}")
                continue
            aid = a.get("id", "?")
            iid = a.get("image_id")
            if iid not in images:
                self._fail(ann_file, f"annotation {aid}: image_id {iid!r} is not among the images")
                continue
            cid = a.get("category_id")
            if cid not in cat_by_id:
                self._fail(
                    ann_file, f"annotation {aid}: category_id {cid!r} is not among the categories {ordered}"
                )
                bad.add(iid)
                continue
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                self._fail(ann_file, f"annotation {aid}: expected bbox [x, y, w, h] numbers, got {bbox!r}")
                bad.add(iid)
                continue
            if a.get("iscrowd", 0):
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
        if not path.is_file():
            raise DataError(path, "annotation file not found")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(path, "annotation file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"malformed JSON ({exc})") from exc
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
