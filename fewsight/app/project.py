"""The app's project folder: the boxes a person drew or accepted, as a COCO JSON rewritten after every change.

Layout of a project folder (everything the app knows; a killed server loses nothing)::

    annotations.json   COCO instances: every saved image, its boxes (extra keys "source": "drawn" |
                       "proposal", "score" and "proposal" for accepted proposals) and the class names
    model.pt           the enrolled detector (fewsight.hub.save_model), once "enroll" ran
    proposals/         chunk-NNNNNN.json: the enrolled detector's proposals, a chunk of images per file
    decisions.json     which proposals were accepted / rejected
    propose.json       whether a proposal run was going on (a restarted server resumes it)
    exports/FORMAT/    the last export in each format

:class:`Annotations` keeps the boxes per image file name. A change replaces one image's boxes (last
write wins per image) and rewrites the whole file through :func:`fewsight._io.atomic_write_bytes`
while holding a lock, so two requests never interleave and a reader or a crash never sees a torn
file. A file that does not parse stops the app at start rather than being overwritten.

Example:
    >>> import tempfile
    >>> ann = Annotations(tempfile.mkdtemp())
    >>> ann.set_boxes("a.png", (64, 80), [{"box": [1, 2, 30, 40], "label": "dog"}])
    [{'box': [1.0, 2.0, 30.0, 40.0], 'label': 'dog', 'source': 'drawn'}]
    >>> Annotations(ann.root).boxes("a.png")[0]["label"], ann.classes
    ('dog', ['dog'])
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fewsight._io import atomic_write_bytes, read_json, short_repr
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["ANNOTATIONS_FILE", "MAX_BOXES", "MAX_LABEL", "SOURCES", "Annotations", "clean_boxes"]

ANNOTATIONS_FILE = "annotations.json"
MAX_BOXES = 2000
MAX_LABEL = 100
SOURCES = ("drawn", "proposal")

Box = dict[str, Any]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clean_label(label: Any, where: str) -> str:
    """``label`` stripped: a non-empty string of at most :data:`MAX_LABEL` printable characters."""
    if not isinstance(label, str) or not label.strip() or len(label.strip()) > MAX_LABEL \
            or any(not c.isprintable() for c in label.strip()):
        raise InvalidArgumentError(f"{where}.label: expected a class name of 1 to {MAX_LABEL} printable characters, "
                                   f"got {short_repr(label)}")
    return label.strip()


def clean_boxes(boxes: Any, size: tuple[int, int], where: str = "boxes") -> list[Box]:
    """Checked copies of ``boxes`` (``[{"box": [x1, y1, x2, y2], "label", "source"?, "score"?, "proposal"?}]``)
    clipped to an image of ``size = (H, W)``.

    Raises :class:`~fewsight.errors.InvalidArgumentError` naming the box for a malformed entry, a
    non-finite coordinate, or a box with no area inside the image.
    """
    if not isinstance(boxes, Sequence) or isinstance(boxes, (str, bytes)):
        raise InvalidArgumentError(f"{where}: expected a list of boxes, got {short_repr(boxes)}")
    if len(boxes) > MAX_BOXES:
        raise InvalidArgumentError(f"{where}: expected at most {MAX_BOXES} boxes per image, got {len(boxes)}")
    h, w = size
    out = []
    for i, b in enumerate(boxes):
        at = f"{where}[{i}]"
        if not isinstance(b, Mapping):
            raise InvalidArgumentError(f"{at}: expected {{'box': [x1, y1, x2, y2], 'label': name}}, got {short_repr(b)}")
        xy = b.get("box")
        if not isinstance(xy, Sequence) or isinstance(xy, (str, bytes)) or len(xy) != 4 or not all(map(_finite, xy)):
            raise InvalidArgumentError(f"{at}.box: expected 4 finite numbers [x1, y1, x2, y2], got {short_repr(xy)}")
        x1, y1, x2, y2 = (float(v) for v in xy)
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if not (x2 > x1 and y2 > y1):
            raise InvalidArgumentError(f"{at}.box: expected x1 < x2 and y1 < y2 inside the {w}x{h} image, got "
                                       f"{short_repr(list(xy))}")
        box: Box = {"box": [x1, y1, x2, y2], "label": clean_label(b.get("label"), at),
                    "source": b.get("source", "drawn")}
        if box["source"] not in SOURCES:
            raise InvalidArgumentError(f"{at}.source: expected one of {SOURCES}, got {short_repr(box['source'])}")
        if b.get("score") is not None:
            if not _finite(b["score"]) or not 0.0 <= b["score"] <= 1.0:
                raise InvalidArgumentError(f"{at}.score: expected a number in [0, 1], got {short_repr(b['score'])}")
            box["score"] = float(b["score"])
        if b.get("proposal") is not None:
            if not isinstance(b["proposal"], str) or len(b["proposal"]) > 1000:
                raise InvalidArgumentError(f"{at}.proposal: expected a proposal key, got {short_repr(b['proposal'])}")
            box["proposal"] = b["proposal"]
        out.append(box)
    return out


class Annotations:
    """The boxes of a project folder ``root`` (module docstring), read from its file when there is one."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / ANNOTATIONS_FILE
        self._lock = threading.RLock()
        self._boxes: dict[str, list[Box]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._ids: dict[str, int] = {}
        self.classes: list[str] = []
        if self.path.exists():
            self._read()

    # -- reading -------------------------------------------------------------------------------------
    def _read(self) -> None:
        data = read_json(self.path, what="project annotations")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                          "categories")):
            raise DataError(self.path, "expected the COCO JSON the app writes (lists 'images', 'annotations', "
                                       "'categories'); move it away to start a new project")
        names: dict[int, str] = {}
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise DataError(self.path, f"malformed category {short_repr(c)}")
            names[c["id"]] = c["name"]
            if c["name"] not in self.classes:
                self.classes.append(c["name"])
        files: dict[int, str] = {}
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or not isinstance(im.get("id"), int) \
                    or not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")):
                raise DataError(self.path, f"malformed image entry {short_repr(im)}")
            files[im["id"]] = im["file_name"]
            self._ids[im["file_name"]] = im["id"]
            self._sizes[im["file_name"]] = (im["height"], im["width"])
            self._boxes[im["file_name"]] = []
        for a in data["annotations"]:
            try:
                name = files[a["image_id"]]
                x, y, bw, bh = a["bbox"]
                raw = {"box": [x, y, x + bw, y + bh], "label": names[a["category_id"]],
                       **{k: a[k] for k in ("source", "score", "proposal") if k in a}}
                self._boxes[name].extend(clean_boxes([raw], self._sizes[name], "annotation"))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(self.path, f"malformed annotation {short_repr(a)} ({type(exc).__name__}: {exc})") from None

    # -- queries -------------------------------------------------------------------------------------
    def boxes(self, name: str) -> list[Box]:
        """Copies of the boxes of image ``name`` (``[]`` when it has none)."""
        with self._lock:
            return [dict(b, box=list(b["box"])) for b in self._boxes.get(name, [])]

    def counts(self) -> dict[str, int]:
        """Boxes per saved image name."""
        with self._lock:
            return {n: len(b) for n, b in self._boxes.items()}

    def snapshot(self) -> dict[str, list[Box]]:
        """Every saved image's boxes (copies), by file name."""
        with self._lock:
            return {n: self.boxes(n) for n in self._boxes}

    def size(self, name: str) -> tuple[int, int] | None:
        with self._lock:
            return self._sizes.get(name)

    # -- changes -------------------------------------------------------------------------------------
    def set_boxes(self, name: str, size: tuple[int, int], boxes: Iterable[Any]) -> list[Box]:
        """Replace the boxes of image ``name`` (``size = (H, W)``) and rewrite the file; returns the stored boxes."""
        clean = clean_boxes(list(boxes), size)
        with self._lock:
            self._store(name, size, clean)
            return self.boxes(name)

    def add_boxes(self, name: str, size: tuple[int, int], boxes: Iterable[Any]) -> int:
        """Append ``boxes`` to image ``name``, leaving out a box whose ``proposal`` key is already there;
        rewrites the file when something was added; returns how many were."""
        clean = clean_boxes(list(boxes), size)
        with self._lock:
            current = self._boxes.get(name, [])
            have = {b.get("proposal") for b in current} - {None}
            new = [b for b in clean if b.get("proposal") is None or b["proposal"] not in have]
            if new:
                self._store(name, size, current + new)
            return len(new)

    def set_many(self, boxes: Mapping[str, tuple[tuple[int, int], Iterable[Any]]]) -> None:
        """Replace the boxes of several images (``{name: ((H, W), boxes)}``), writing the file once."""
        clean = {n: (size, clean_boxes(list(b), size, f"boxes of {n}")) for n, (size, b) in boxes.items()}
        with self._lock:
            for name, (size, b) in clean.items():
                self._boxes[name], self._sizes[name] = b, (int(size[0]), int(size[1]))
                self._ids.setdefault(name, max(self._ids.values(), default=0) + 1)
                self.classes.extend(dict.fromkeys(x["label"] for x in b if x["label"] not in self.classes))
            atomic_write_bytes(self._encode(), self.path)

    def remove_proposals(self, name: str, keys: Iterable[str]) -> int:
        """Remove the boxes of image ``name`` accepted from the proposals ``keys``; returns how many were."""
        drop = set(keys)
        with self._lock:
            current = self._boxes.get(name, [])
            kept = [b for b in current if b.get("proposal") not in drop]
            if len(kept) != len(current):
                self._store(name, self._sizes[name], kept)
            return len(current) - len(kept)

    def _store(self, name: str, size: tuple[int, int], boxes: list[Box]) -> None:
        # Called with the lock held: the file is written before the next change is accepted, so its
        # content is always the state after the latest change.
        if name not in self._ids:
            self._ids[name] = max(self._ids.values(), default=0) + 1
        for b in boxes:
            if b["label"] not in self.classes:
                self.classes.append(b["label"])
        old = (self._boxes.get(name), self._sizes.get(name))
        self._boxes[name], self._sizes[name] = boxes, (int(size[0]), int(size[1]))
        try:
            atomic_write_bytes(self._encode(), self.path)
        except BaseException:
            # The file still holds the previous state: so does memory.
            if old[0] is None:
                self._boxes.pop(name, None)
                self._sizes.pop(name, None)
            else:
                self._boxes[name], self._sizes[name] = old[0], old[1]  # type: ignore[assignment]
            raise

    def _encode(self) -> bytes:
        cat = {n: k + 1 for k, n in enumerate(self.classes)}
        images, annotations = [], []
        for name in sorted(self._boxes, key=self._ids.__getitem__):
            h, w = self._sizes[name]
            images.append({"id": self._ids[name], "file_name": name, "height": h, "width": w})
            for b in self._boxes[name]:
                x1, y1, x2, y2 = b["box"]
                ann = {"id": len(annotations) + 1, "image_id": self._ids[name], "category_id": cat[b["label"]],
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                       "source": b["source"]}
                ann.update({k: b[k] for k in ("score", "proposal") if k in b})
                annotations.append(ann)
        data = {"info": {"description": "fewsight app annotations"}, "images": images, "annotations": annotations,
                "categories": [{"id": k, "name": n, "supercategory": ""} for n, k in cat.items()]}
        return json.dumps(data, indent=1).encode("utf-8")
