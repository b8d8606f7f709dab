"""Drawing emoji-logos canvases: real photographs as backgrounds, emoji resized, jittered and blended.

**Backgrounds.** Real photographs bundled with scikit-image (:data:`PHOTOS`; gray ones replicated to
RGB, larger ones downscaled to a longest side of 768), so no image is downloaded. Each photo is cut
along its longer side into disjoint bands, 60 / 20 / 20 % for ``train`` / ``val`` / ``test``
(:data:`PHOTO_BANDS`), and a split only crops inside its band, so held-out canvases show unseen photo
regions. A crop has the canvas's aspect ratio, a height in ``[0.4, 1.5] x`` the canvas height (capped
by the band), a random place, and is mirrored half the time.

**Pixels.** Canvases are ``float32[H, W, 3]`` in ``[0, 1]``; an emoji is resized as RGBA (Pillow
premultiplies alpha, so transparent pixels never bleed their colour) and alpha-blended in place. Every
random choice comes from the caller's numpy generator, which keeps a canvas a pure function of its seed.

Example:
    >>> import numpy as np
    >>> canvas = np.zeros((4, 4, 3), dtype=np.float32)
    >>> emoji = np.ones((2, 2, 4), dtype=np.float32)  # opaque white
    >>> _blend(canvas, emoji, 1, 1)
    >>> float(canvas[1:3, 1:3].min()), float(canvas[0].max())
    (1.0, 0.0)
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from fewsight.errors import MissingDependencyError

__all__ = [
    "BACKGROUNDS",
    "PHOTOS",
    "PHOTO_BANDS",
    "SPLITS",
    "load_photos",
]

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

_MAX_PHOTO_SIDE = 768


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
