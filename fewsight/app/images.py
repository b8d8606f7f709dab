"""The image folder the app labels: files listed once, addressed by id, unreadable ones listed and skipped.

Only files of this listing are ever served or read, by their integer id (their rank in name order),
so no request path reaches the file system: a ``../`` or an absolute path is not an id. Each file's
header is read when the folder is listed; a file that is not an image fewsight reads, or whose header
is corrupt, goes to :attr:`ImageFolder.skipped` with the reason, and so does one whose pixels later
fail to decode (thumbnail, enrollment, proposals).

Example:
    >>> import os, tempfile
    >>> from PIL import Image
    >>> d = tempfile.mkdtemp()
    >>> Image.new("RGB", (8, 6)).save(os.path.join(d, "a.png"))
    >>> _ = open(os.path.join(d, "b.png"), "wb").write(b"not a png")
    >>> folder = ImageFolder(d)
    >>> [im.name for im in folder.images], [s["name"] for s in folder.skipped]
    (['a.png'], ['b.png'])
    >>> folder.get(0).size
    (6, 8)
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from fewsight.data import IMAGE_EXTENSIONS, load_image
from fewsight.data.dataset import read_image_size
from fewsight.errors import DataError, InvalidArgumentError

__all__ = ["BROWSER_TYPES", "ImageFolder", "ImageInfo"]

#: Suffixes a browser shows as they are (served as the file); other images are sent re-encoded as PNG.
BROWSER_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                 ".webp": "image/webp", ".bmp": "image/bmp"}
THUMB_SIDE = 160
_THUMB_CACHE = 4096


@dataclass(frozen=True)
class ImageInfo:
    """One listed image: its id (rank in name order), file name, path and ``(H, W)``."""

    id: int
    name: str
    path: Path
    size: tuple[int, int]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "height": self.size[0], "width": self.size[1]}


class ImageFolder:
    """The images directly inside ``root`` (not its sub-folders), in name order (module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidArgumentError(f"images: expected a folder of images, got {str(root)!r} (no such folder)")
        self._lock = threading.Lock()
        self._skipped: dict[str, str] = {}
        self.images: list[ImageInfo] = []
        for path in sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self._skipped[path.name] = f"unsupported file type {path.suffix or '(none)'!r}: expected one of " \
                                           f"{', '.join(IMAGE_EXTENSIONS)}"
                continue
            try:
                size = read_image_size(path)
            except DataError as exc:
                self._skipped[path.name] = exc.reason
                continue
            self.images.append(ImageInfo(len(self.images), path.name, path, size))
        self._by_name = {im.name: im for im in self.images}
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """``[{"name", "reason"}]``: the files left out, in name order."""
        with self._lock:
            return [{"name": n, "reason": r} for n, r in sorted(self._skipped.items())]

    def is_skipped(self, name: str) -> bool:
        with self._lock:
            return name in self._skipped

    def get(self, image_id: Any) -> ImageInfo:
        """The image with id ``image_id`` (an int or its decimal text); :class:`KeyError` with the reason otherwise."""
        text = str(image_id)
        # ASCII digits only, no sign, no leading zero, bounded length: one spelling per id, nothing int() balks at.
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or text != str(int(text)) \
                or int(text) >= len(self.images):
            raise KeyError(f"image: expected an image id from /api/images (0..{len(self.images) - 1}), got {text[:80]!r}")
        return self.images[int(text)]

    def by_name(self, name: str) -> ImageInfo | None:
        return self._by_name.get(name)

    def _skip(self, info: ImageInfo, exc: DataError) -> None:
        with self._lock:
            self._skipped[info.name] = exc.reason

    def load(self, info: ImageInfo) -> Tensor:
        """``Tensor[3, H, W]`` in ``[0, 1]``; a file that fails to decode is added to :attr:`skipped` and the
        :class:`~fewsight.errors.DataError` re-raised."""
        try:
            return load_image(info.path)
        except DataError as exc:
            self._skip(info, exc)
            raise

    def browser_bytes(self, info: ImageInfo) -> tuple[bytes | Path, str]:
        """What to send a browser for ``info``: ``(path, media type)`` for the types it shows, else PNG bytes."""
        kind = BROWSER_TYPES.get(info.path.suffix.lower())
        if kind is not None:
            return info.path, kind
        return self._encode(info, None, "PNG"), "image/png"

    def thumbnail(self, info: ImageInfo) -> bytes:
        """A JPEG at most :data:`THUMB_SIDE` pixels a side (cached in memory, least recently used dropped)."""
        with self._lock:
            if info.id in self._thumbs:
                self._thumbs.move_to_end(info.id)
                return self._thumbs[info.id]
        data = self._encode(info, THUMB_SIDE, "JPEG")
        with self._lock:
            self._thumbs[info.id] = data
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def _encode(self, info: ImageInfo, side: int | None, fmt: str) -> bytes:
        from PIL import Image

        image = self.load(info)  # decodes through the one checked reader (DataError names the file)
        arr = image.mul(255).round_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr)
        if side is not None:
            pil.thumbnail((side, side))
        buffer = io.BytesIO()
        pil.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        return buffer.getvalue()
