"""The emoji-logos classes: which emoji are classes, their names, images and the base / novel split.

**Classes.** The emoji drawn in both styles (:data:`STYLES`; 1,911 in emoji-datasource 16.0.0;
skin-tone variants are not used), sorted by their ``unified`` code point string; a class's name is its
``short_name``. :func:`emoji_classes` returns names, codes and the split; :func:`emoji_images` the
decoded 64x64 RGBA images of one style in the same order.

**Split.** :func:`split_base_novel` ranks the classes by ``sha256(f"{CLASS_SPLIT_SEED}:{unified}")`` — a
seeded permutation that depends on neither the machine nor the numpy version, and keeps an emoji on its
side when a later release adds others — and puts the first ``ceil(n / 2)`` in base.

The folder is the one :func:`~fewsight.data.emoji.install_emoji` writes (``make emoji-data``); without
it every function here raises :class:`~fewsight.errors.DataError` telling to run that step.

Example:
    >>> split_base_novel(["1F600", "1F601", "1F602"])
    ((1, 2), (0,))
    >>> from fewsight.errors import DataError
    >>> try:
    ...     emoji_classes("/nonexistent/emoji")
    ... except DataError as e:
    ...     print(e.reason.split(":")[0])
    emoji data not found
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from fewsight._io import read_json
from fewsight.data.dataset import _open_image
from fewsight.errors import DataError, InvalidArgumentError, check_choice

__all__ = [
    "CLASS_SPLIT_SEED",
    "DEFAULT_ROOT",
    "STYLES",
    "EmojiClasses",
    "emoji_classes",
    "emoji_images",
    "split_base_novel",
]

STYLES: tuple[str, ...] = ("google", "twitter")
DEFAULT_ROOT = Path("data/emoji")
#: Seed of the base / novel class split (see :func:`split_base_novel`). Changing it changes the benchmark.
CLASS_SPLIT_SEED = 1911

_EMOJI_SIDE = 64
_HINT = "run `make emoji-data` (or `python -m fewsight.data.emoji --install DIR`)"


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
    entries = read_json(path, what="emoji.json")
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
        with _open_image(path, None) as im:
            rgba = im.convert("RGBA")
            if rgba.size != (_EMOJI_SIDE, _EMOJI_SIDE):
                rgba = rgba.resize((_EMOJI_SIDE, _EMOJI_SIDE), Image.LANCZOS)
            out[i] = np.asarray(rgba)
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
