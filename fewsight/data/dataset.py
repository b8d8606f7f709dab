"""The common detection-dataset interface and the machinery shared by the file readers.

Every dataset in :mod:`fewsight.data` is a :class:`DetectionDataset`:

* ``len(ds)``; ``ds[i] -> (image, target)`` with ``image: Tensor[3, H, W]`` float32 in ``[0, 1]``
  and ``target = {"boxes": Tensor[N, 4] float32 (xyxy, absolute pixels), "labels": Tensor[N] int64}``,
  labels indexing ``ds.classes`` (background is never a class);
* ``ds.classes`` (list of names), ``ds.num_classes``;
* ``ds.skipped`` (list of :class:`SkippedItem`) and ``ds.num_skipped``: items left out with
  ``on_error="skip"``;
* ``ds.num_boxes_clipped`` / ``ds.num_boxes_dropped``: boxes repaired (clipped to the image or with
  swapped corners) or dropped (degenerate, non-finite, entirely outside the image) while indexing;
* ``ds.transforms``: an optional callable ``(image, target) -> (image, target)`` in the
  torchvision.transforms.v2 style; see :func:`fewsight.data.transforms.apply_transforms`.

File readers (COCO, VOC, YOLO, CSV) subclass :class:`ImageFileDataset`: annotations are parsed and
every image header is opened once at construction (so a missing or unreadable image is reported
before training starts, naming the file); pixels are decoded lazily in ``__getitem__``.

Example:
    >>> import torch
    >>> from fewsight.data import DigitsDataset
    >>> ds = DigitsDataset(split="train", num_images=4)
    >>> image, target = ds[0]
    >>> image.shape, target["boxes"].dtype, target["labels"].dtype
    (torch.Size([3, 128, 128]), torch.float32, torch.int64)
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from fewsight._io import atomic_write_bytes, short_repr
from fewsight.errors import DataError, InvalidArgumentError, check_choice
from fewsight.geometry import sanitize_boxes

__all__ = [
    "ON_ERROR",
    "check_index",
    "DetectionDataset",
    "ImageFileDataset",
    "RelabeledDataset",
    "SkippedItem",
    "Target",
    "load_image",
    "read_image_size",
    "save_image",
    "unwrap_relabeled",
]

logger = logging.getLogger("fewsight.data")

ON_ERROR = ("raise", "skip")

Target = dict[str, Tensor]


@dataclass(frozen=True)
class SkippedItem:
    """An image or annotation left out with ``on_error="skip"``: the offending file and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: What Pillow raises for a file it cannot read: unknown or truncated data (``OSError``, including
#: ``UnidentifiedImageError``), malformed headers (``SyntaxError``, ``ValueError``, ``EOFError``,
#: ``struct.error``, ``IndexError``, ``KeyError``) and images past its pixel limit.
_PIL_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)  # fmt: skip


#: Pillow checks an image's size against the module-global ``Image.MAX_IMAGE_PIXELS`` (warning above it,
#: refusing above twice it) when a file is opened, when a TIFF prepares its pixel buffer at load time
#: and on every crop; it has no per-call setting. An open allowed more pixels by ``max_pixels`` raises
#: that global for its duration (:func:`_pillow_allows`); the lock guards the global and this record.
_PILLOW_LOCK = threading.Lock()
_raised_limits: list[int] = []  # the limits of the opens raising Pillow's now
_pillow_own: list[int | None] = [None]  # Pillow's limit as set before the first of them


def _pillow_limit() -> int | None:
    """Pillow's limit as its user set it (not one raised for an open in progress in another thread)."""
    with _PILLOW_LOCK:
        return _pillow_own[0] if _raised_limits else Image.MAX_IMAGE_PIXELS


@contextmanager
def _pillow_allows(limit: int | None) -> Iterator[None]:
    """Pillow's limit raised to at least ``limit`` for the ``with`` block (decoding included), then restored.

    Nothing changes when Pillow's own limit already allows ``limit`` pixels. Concurrent opens keep the
    highest limit asked for until the last one ends; meanwhile plain Pillow calls in other threads see
    it too (Pillow has no per-call limit), and fewsight's own check still refuses what each caller's
    ``max_pixels`` does not allow.
    """
    raised = False
    with _PILLOW_LOCK:
        own = _pillow_own[0] if _raised_limits else Image.MAX_IMAGE_PIXELS
        if limit is not None and own is not None and limit > own:
            if not _raised_limits:
                _pillow_own[0] = own
            _raised_limits.append(limit)
            Image.MAX_IMAGE_PIXELS = max(_raised_limits)
            raised = True
    try:
        yield
    finally:
        if raised:
            with _PILLOW_LOCK:
                _raised_limits.remove(limit)  # type: ignore[arg-type]
                Image.MAX_IMAGE_PIXELS = max(_raised_limits) if _raised_limits else _pillow_own[0]


def _pixel_limit(max_pixels: int | None) -> int | None:
    if max_pixels is None:
        return _pillow_limit()  # read on each call: a caller may have changed Pillow's limit
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise InvalidArgumentError(f"max_pixels: expected a positive int or None, got {max_pixels!r}")
    return max_pixels


@contextmanager
def _open_image(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """The one place fewsight opens an image file: Pillow's failures become ``DataError(path, ...)``.

    An image of more than ``max_pixels`` pixels (``None``: Pillow's ``Image.MAX_IMAGE_PIXELS``) is
    refused before any pixel is decoded, whether Pillow would have warned about it or refused it;
    one within ``max_pixels`` opens and decodes inside the ``with`` block even above Pillow's own
    limit (:func:`_pillow_allows`). Pillow's ``DecompressionBombWarning`` is not emitted (the
    ``DataError`` says it, or ``max_pixels`` allowed the image).
    """
    if not path.is_file():
        raise DataError(path, "image file not found")
    limit = _pixel_limit(max_pixels)
    with _pillow_allows(limit):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                w, h = im.size
                if limit is not None and w * h > limit:
                    raise DataError(
                        path,
                        f"cannot read image: expected at most {limit} pixels, got {w}x{h} = {w * h} "
                        "(refused as a possible decompression bomb)",
                    )
                yield im
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(path, f"cannot read image: expected at most {limit} pixels, got more ({exc})") from None
        except UnidentifiedImageError:
            raise DataError(
                path, "cannot read image: expected an image file, got data of no format Pillow knows") from None
        except _PIL_ERRORS as exc:
            raise DataError(
                path, f"cannot decode image: truncated or corrupt data ({type(exc).__name__}: {exc})") from exc


#: Modes of more than 8 bits a sample, which RGB conversion would saturate.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")
#: Bytes of decoded pixels copied out per strip: Pillow's whole-image ``tobytes`` would double the peak.
_STRIP_BYTES = 1 << 24
_DTYPES = (torch.float32, torch.uint8, None)


def _rgb8(im: Image.Image) -> np.ndarray:
    """The RGB pixels of a decoded 8-bit image as ``uint8[3, H, W]``, copied out in strips of about 16 MB.

    Each strip is converted and transposed on its own, so the peak is Pillow's decoded image plus
    the ``3 H W`` bytes of the result.
    """
    w, h = im.size
    out = np.empty((3, h, w), dtype=np.uint8)
    rows = max(1, _STRIP_BYTES // (3 * max(w, 1)))
    for y in range(0, h, rows):
        strip = im.crop((0, y, w, min(h, y + rows)))
        out[:, y : y + rows] = np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB")).transpose(2, 0, 1)
    return out


def load_image(
    path: str | Path, *, max_pixels: int | None = None, dtype: torch.dtype | None = torch.float32
) -> Tensor:
    """Decode an image file to ``Tensor[3, H, W]`` (RGB; alpha dropped): float32 in ``[0, 1]`` by default.

    Grayscale, palette and RGBA files are converted to RGB. EXIF orientation is ignored, as in
    ``torchvision.io.decode_image``: annotations refer to the stored pixel grid.

    ``dtype``: ``torch.float32`` (default); ``torch.uint8``, the 8-bit values the float image is
    ``/ 255`` of (a quarter of the memory: 3 bytes a pixel; 16/32-bit grayscale is rounded to 8
    bits); ``None``, ``uint8`` when that is exact and float32 for 16/32-bit grayscale (large images at
    full precision: what sliced inference takes). The pixels are copied out of Pillow in strips, so
    the peak is Pillow's decoded image plus the result.

    ``max_pixels``: the largest image read, in pixels (``None``: Pillow's ``Image.MAX_IMAGE_PIXELS``);
    it is authoritative: a larger image is refused before decoding, a smaller one is read even above
    Pillow's own limit (TIFF included). Raises :class:`~fewsight.errors.DataError` naming the file when
    it is missing, not an image, truncated or corrupt, or larger than ``max_pixels``.

    >>> import tempfile, os
    >>> from PIL import Image
    >>> p = os.path.join(tempfile.mkdtemp(), "a.png"); Image.new("RGB", (5, 3), (255, 0, 0)).save(p)
    >>> load_image(p).shape, load_image(p)[0, 0, 0].item(), load_image(p, dtype=torch.uint8)[0, 0, 0].item()
    (torch.Size([3, 3, 5]), 1.0, 255)
    """
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype: expected one of {_DTYPES}, got {dtype!r}")
    path = Path(path)
    with _open_image(path, max_pixels) as im:
        if im.mode in _WIDE_MODES:
            # 16/32-bit grayscale: PIL's RGB conversion would saturate; scale by the type's range.
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / (65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0))
            gray = torch.from_numpy(arr)
            if dtype is torch.uint8:
                gray = gray.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
            return gray.unsqueeze(0).repeat(3, 1, 1)
        im.load()
        rgb = torch.from_numpy(_rgb8(im))
    if dtype is torch.float32:
        return rgb.float().div_(255.0)
    return rgb


def read_image_size(path: str | Path, *, full: bool = False, max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (``full=True`` also decodes every pixel).

    Raises :class:`~fewsight.errors.DataError` naming the file when it is missing, unreadable, empty
    or larger than ``max_pixels`` (see :func:`load_image`).
    """
    path = Path(path)
    with _open_image(path, max_pixels) as im:
        w, h = im.size
        if full:
            im.load()
    if w <= 0 or h <= 0:
        raise DataError(path, f"image has an empty size {w}x{h}")
    return h, w


def save_image(image: Tensor, path: str | Path) -> None:
    """Write a ``Tensor[3, H, W]`` (or ``[1, H, W]``/``[H, W]``) float image in ``[0, 1]`` to a file.

    The format follows the suffix (PNG is lossless; use it for round trips); the file is written
    atomically.
    """
    t = image.detach().to("cpu", torch.float32)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        if t.shape[0] != 3:
            raise InvalidArgumentError(f"image: expected Tensor[3, H, W] or Tensor[H, W], got shape {tuple(t.shape)}")
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise InvalidArgumentError(f"image: expected Tensor[3, H, W] or Tensor[H, W], got shape {tuple(t.shape)}")
    arr = t.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(f"path: expected an image file suffix such as '.png', got {str(path)!r}")
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt)
    atomic_write_bytes(buffer.getvalue(), path)


#: Suffixes of annotation files, named first when a message lists what a folder holds.
_LABEL_SUFFIXES = (".xml", ".txt", ".json", ".csv", ".yaml", ".yml")


def _describe_files(folder: Path, examples: int = 3) -> str:
    """What ``folder`` holds, for a message: ``"12 files in DIR: 10 .jpg, 2 .txt (classes.txt, a.txt)"``.

    Counts by suffix (most frequent first); the examples are annotation-like files when there are some.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"no folder {folder}"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not files:
        return f"no files in {folder}"
    counts: dict[str, int] = {}
    for name in files:
        suffix = Path(name).suffix.lower() or "(no suffix)"
        counts[suffix] = counts.get(suffix, 0) + 1
    kinds = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    labelled = [n for n in files if Path(n).suffix.lower() in _LABEL_SUFFIXES]
    shown = (labelled or files)[:examples]
    more = ", ..." if len(labelled or files) > examples else ""
    return f"{len(files)} file(s) in {folder}: {kinds} ({', '.join(shown)}{more})"


def check_index(index: Any, n: int) -> int:
    """``index`` as a position in ``[0, n)`` (negative counts from the end); ``IndexError`` outside."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"index: expected an int, got {type(index).__name__}") from None
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index: expected -{n} <= index < {n}, got {index}")
    return i


class RelabeledDataset(Dataset[tuple[Tensor, Target]]):
    """A view of ``dataset`` whose labels go through ``mapping`` (``Long[K]``, old label -> new label);
    boxes mapped to ``-1`` are dropped from the target. ``classes``: the view's class names.

    >>> import torch
    >>> from fewsight.data import DigitsDataset
    >>> view = RelabeledDataset(DigitsDataset("test", 2, classes=[3, 5]), torch.tensor([-1, 0]), ["5"])
    >>> bool((view[0][1]["labels"] == 0).all()), view.classes
    (True, ['5'])
    """

    def __init__(self, dataset: Any, mapping: Sequence[int] | Tensor, classes: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        self.mapping = torch.as_tensor(mapping, dtype=torch.long)
        self.classes = list(classes) if classes is not None else list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def _relabel(self, target: Target) -> Target:
        labels = self.mapping[target["labels"]]
        keep = labels >= 0
        return {**target, "boxes": target["boxes"][keep], "labels": labels[keep]}

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, target = self.dataset[index]
        return image, self._relabel(target)

    def get_target(self, index: int) -> Target:
        """The relabelled target of item ``index``, without decoding when the source can."""
        get = getattr(self.dataset, "get_target", None)
        return self._relabel(get(index) if callable(get) else self.dataset[index][1])


def unwrap_relabeled(dataset: Any) -> Any:
    """The dataset under any :class:`RelabeledDataset` views of it (they show its images).

    >>> import torch
    >>> from fewsight.data import DigitsDataset
    >>> src = DigitsDataset("test", 2, classes=[3, 5])
    >>> unwrap_relabeled(RelabeledDataset(src, torch.tensor([0, 0]), ["digit"])) is src
    True
    """
    while isinstance(dataset, RelabeledDataset):
        dataset = dataset.dataset
    return dataset


class DetectionDataset(Dataset[tuple[Tensor, Target]]):
    """Base of every fewsight detection dataset (see the module docstring for the contract).

    Subclasses implement ``__len__`` and :meth:`load` (the untransformed sample); ``__getitem__``
    validates the index and applies ``transforms``.
    """

    def __init__(self, classes: Sequence[str], *, transforms: Callable[..., Any] | None = None) -> None:
        self.classes: list[str] = [str(c) for c in classes]
        self.transforms = transforms
        self.skipped: list[SkippedItem] = []
        self.num_boxes_clipped = 0
        self.num_boxes_dropped = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[Tensor, Target]:  # pragma: no cover - abstract
        """The sample at ``index`` before ``transforms``."""
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self))

    def get_target(self, index: int) -> Target:
        """The (untransformed) target of item ``index`` (this default loads the whole sample)."""
        return self.load(self._check_index(index))[1]

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, target = self.load(self._check_index(index))
        if self.transforms is not None:
            from fewsight.data.transforms import apply_transforms

            image, target = apply_transforms(self.transforms, image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, classes={self.classes})"


@dataclass
class _Entry:
    """One image as parsed from the annotations, before images are checked and boxes sanitised."""

    image: Path
    boxes: np.ndarray  # float64 [N, 4] xyxy
    labels: np.ndarray  # int64 [N]
    source: Path  # the annotation file, for messages
    normalized: bool = False  # boxes in [0, 1] image fractions (YOLO); scaled once the size is known


class ImageFileDataset(DetectionDataset):
    """Images on disk with parsed annotations: the shared half of the COCO/VOC/YOLO/CSV readers.

    Subclasses parse their annotations into entries (``image path, boxes, labels``), reporting
    problems through :meth:`_fail`, then call :meth:`_index`, which opens every image header (or
    decodes it with ``verify_images=True``), clips boxes to the image and drops degenerate ones
    (counted in ``num_boxes_clipped`` / ``num_boxes_dropped``), and stores everything in flat arrays
    (cheap to share with DataLoader workers).

    ``on_error="skip"`` skips (and records in ``skipped``) what is found bad while indexing; a file
    that is corrupt only in its pixel data is found at indexing time only with
    ``verify_images=True`` — otherwise ``__getitem__`` raises :class:`~fewsight.errors.DataError`
    naming it. ``max_pixels`` bounds the pixels of each image (``None``: Pillow's
    ``Image.MAX_IMAGE_PIXELS``); a larger one is a ``DataError`` (or a skip) at indexing time.
    ``image_dtype`` (an attribute, default ``torch.float32`` in ``[0, 1]``) may be set to ``torch.uint8``
    for consumers that take such images (sliced inference: a quarter of the memory of a float image);
    training transforms expect floats.
    """

    def __init__(
        self,
        classes: Sequence[str],
        *,
        transforms: Callable[..., Any] | None = None,
        on_error: str = "raise",
        verify_images: bool = False,
        min_size: float = 1.0,
        max_pixels: int | None = None,
    ) -> None:
        super().__init__(classes, transforms=transforms)
        _pixel_limit(max_pixels)  # validated now, not at the first image
        if len(set(self.classes)) != len(self.classes):
            raise InvalidArgumentError(f"classes: expected distinct names, got {short_repr(self.classes)}")
        check_choice("on_error", on_error, ON_ERROR)
        if not min_size >= 0:
            raise InvalidArgumentError(f"min_size: expected >= 0, got {min_size}")
        self.on_error = on_error
        self.verify_images = bool(verify_images)
        self.min_size = float(min_size)
        self.max_pixels = max_pixels
        self.image_dtype = torch.float32
        self._paths = np.array([], dtype=str)
        self._sizes = np.zeros((0, 2), dtype=np.int64)
        self._boxes = np.zeros((0, 4), dtype=np.float32)
        self._labels = np.zeros((0,), dtype=np.int64)
        self._offsets = np.zeros((1,), dtype=np.int64)

    # -- construction helpers -------------------------------------------------------------------
    def _fail(self, path: str | Path, reason: str) -> None:
        """Raise ``DataError(path, reason)``, or record the skip when ``on_error="skip"``."""
        if self.on_error == "raise":
            raise DataError(path, reason)
        self.skipped.append(SkippedItem(Path(path), reason))

    def _index(self, entries: Sequence[_Entry]) -> list[int]:
        """Check images, sanitise boxes and store ``entries``; returns the positions of those kept."""
        kept_at: list[int] = []
        paths: list[str] = []
        sizes: list[tuple[int, int]] = []
        kept: list[_Entry] = []
        for pos, e in enumerate(entries):
            try:
                size = read_image_size(e.image, full=self.verify_images, max_pixels=self.max_pixels)
            except DataError as exc:
                self._fail(exc.path, exc.reason)
                continue
            paths.append(str(e.image))
            sizes.append(size)
            kept.append(e)
            kept_at.append(pos)

        counts = np.array([len(e.labels) for e in kept], dtype=np.int64)
        scaled = []
        for e, (h, w) in zip(kept, sizes):
            b = e.boxes.reshape(-1, 4).astype(np.float64)
            scaled.append(b * np.array([w, h, w, h], dtype=np.float64) if e.normalized else b)
        boxes = np.concatenate(scaled) if kept else np.zeros((0, 4))
        labels = np.concatenate([e.labels.reshape(-1) for e in kept]) if kept else np.zeros((0,))
        size_arr = np.array(sizes, dtype=np.int64).reshape(-1, 2)

        # One batched sanitize for the whole dataset: per-box image bounds, then drop degenerate rows.
        b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        hw = torch.as_tensor(np.repeat(size_arr, counts, axis=0), dtype=torch.float64).reshape(-1, 2)
        lo = torch.minimum(b[:, :2], b[:, 2:])
        hi = torch.maximum(b[:, :2], b[:, 2:])
        bound = hw.flip(-1)  # (W, H) for (x, y)
        clipped = torch.cat((torch.minimum(lo.clamp(min=0), bound), torch.minimum(hi.clamp(min=0), bound)), dim=1)
        finite = torch.isfinite(b).all(dim=1)
        # Clamping would turn an infinite corner into the image edge: a box with any non-finite
        # coordinate is dropped (and counted) like any other degenerate box instead.
        clipped = torch.where(finite.unsqueeze(1), clipped, torch.full_like(clipped, float("nan")))
        result = sanitize_boxes(clipped, torch.as_tensor(labels, dtype=torch.int64), min_size=self.min_size)
        repaired = finite & (clipped != b).any(dim=1) & result.keep
        self.num_boxes_clipped += int(repaired.sum())
        self.num_boxes_dropped += result.num_dropped

        keep_np = result.keep.numpy()
        owner = np.repeat(np.arange(len(kept)), counts)
        new_counts = np.bincount(owner[keep_np], minlength=len(kept)).astype(np.int64)
        self._paths = np.array(paths, dtype=str)
        self._sizes = size_arr
        self._boxes = result.boxes.to(torch.float32).numpy().reshape(-1, 4)
        self._labels = result.labels.numpy().astype(np.int64) if result.labels is not None else np.zeros(0, np.int64)
        self._offsets = np.concatenate(([0], np.cumsum(new_counts))).astype(np.int64)

        if self.skipped or self.num_boxes_dropped or self.num_boxes_clipped:
            first = f" (first: {self.skipped[0]})" if self.skipped else ""
            logger.warning(
                "%s: %d item(s) skipped%s, %d box(es) clipped, %d box(es) dropped",
                type(self).__name__,
                self.num_skipped,
                first,
                self.num_boxes_clipped,
                self.num_boxes_dropped,
            )
        return kept_at

    def map_classes(self, classes: Sequence[str]) -> None:
        """Re-express the labels against ``classes`` by name, in place; ``self.classes`` becomes ``classes``.

        ``classes`` must hold every name of ``self.classes`` and may hold more (a file annotated with a
        subset of a model's classes), so the same object keeps its skip records and image checks.
        Raises :class:`~fewsight.errors.InvalidArgumentError` naming the names it lacks.

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from fewsight.data import CSVDataset, write_csv
        >>> root = Path(tempfile.mkdtemp()); save_image(torch.zeros(3, 8, 8), root / "a.png")
        >>> target = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}
        >>> ds = CSVDataset(write_csv(root / "a.csv", ["a.png"], [target], ["dog"]))
        >>> ds.map_classes(["cat", "dog"])
        >>> ds.classes, ds.get_target(0)["labels"]
        (['cat', 'dog'], tensor([1]))
        """
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise InvalidArgumentError(f"classes: expected distinct names, got {classes}")
        unknown = [c for c in self.classes if c not in classes]
        if unknown:
            raise InvalidArgumentError(
                f"classes: expected every class of the dataset {self.classes}, got {classes} (missing {unknown})"
            )
        lookup = np.array([classes.index(c) for c in self.classes], dtype=np.int64)
        self._labels = lookup[self._labels]
        self.classes = classes

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return Path(self._paths[self._check_index(index)])

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of item ``index`` (from the image header)."""
        h, w = self._sizes[self._check_index(index)]
        return int(h), int(w)

    def get_target(self, index: int) -> Target:
        """The (untransformed) target of item ``index`` without decoding the image."""
        i = self._check_index(index)
        s, e = self._offsets[i], self._offsets[i + 1]
        return {
            "boxes": torch.from_numpy(self._boxes[s:e].copy()),
            "labels": torch.from_numpy(self._labels[s:e].copy()),
        }

    def load(self, index: int) -> tuple[Tensor, Target]:
        image = load_image(self._paths[index], max_pixels=self.max_pixels, dtype=self.image_dtype)
        return image, self.get_target(index)
