"""A tiny fake emoji install (the real layout: ``<style>/emoji.json`` + ``<style>/64/<code>.png``), no npm needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fewsight.data.emoji import STYLES

CODES = [f"{0x1F600 + i:X}" for i in range(12)]
NAMES = [f"emoji_{i}" for i in range(12)]
_COLOURS = {"google": (220, 40, 40), "twitter": (40, 60, 220)}


def _png(k: int, style: str) -> np.ndarray:
    """An opaque 64x64-ish square per class with a class-specific white bar, in the style's colour."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[4:60, 4:60] = (*_COLOURS[style], 255)
    rgba[8 : 8 + 4 * (k + 1), 10:16, :3] = 255
    return rgba


def write_fake_emoji(root: Path) -> Path:
    entries = [{"unified": c, "short_name": n, "image": f"{c.lower()}.png", "category": "Test",
                "has_img_google": True, "has_img_twitter": True} for c, n in zip(CODES, NAMES)]
    for style in STYLES:
        folder = root / style / "64"
        folder.mkdir(parents=True)
        (root / style / "emoji.json").write_text(json.dumps(entries))
        for k, code in enumerate(CODES):
            Image.fromarray(_png(k, style), "RGBA").save(folder / f"{code.lower()}.png")
    return root
