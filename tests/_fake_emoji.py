"""Tiny fake emoji installs (the real layout: ``<style>/emoji.json`` + ``<style>/64/<code>.png``), no npm needed."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fewsight.data.emoji import STYLES

CODES = [f"{0x1F600 + i:X}" for i in range(12)]
NAMES = [f"emoji_{i}" for i in range(12)]
COLOURS = {"google": (220, 40, 40), "twitter": (40, 60, 220)}


def emoji_entry(code: str, name: str, google: bool = True, twitter: bool = True) -> dict:
    """One ``emoji.json`` record."""
    return {"unified": code, "short_name": name, "image": f"{code.lower()}.png", "category": "Test",
            "has_img_google": google, "has_img_twitter": twitter}


def write_emoji_install(
    root: Path,
    entries: Sequence[dict],
    draw: Callable[[int, str], np.ndarray],
    missing: Collection[tuple[str, str]] = (),
) -> Path:
    """Write ``entries`` as both styles' catalogue and ``draw(k, style)`` as the PNG of entry ``k`` in every
    style it has, except the ``(style, code)`` pairs in ``missing`` (a catalogue entry without its file)."""
    for style in STYLES:
        folder = root / style / "64"
        folder.mkdir(parents=True)
        (root / style / "emoji.json").write_text(json.dumps(list(entries)))
        for k, entry in enumerate(entries):
            if entry[f"has_img_{style}"] and (style, entry["unified"]) not in missing:
                Image.fromarray(draw(k, style), "RGBA").save(folder / entry["image"])
    return root


def _png(k: int, style: str) -> np.ndarray:
    """An opaque 64x64-ish square per class with a class-specific white bar, in the style's colour."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[4:60, 4:60] = (*COLOURS[style], 255)
    rgba[8 : 8 + 4 * (k + 1), 10:16, :3] = 255
    return rgba


def write_fake_emoji(root: Path) -> Path:
    """12 classes, both styles, every image present."""
    return write_emoji_install(root, [emoji_entry(c, n) for c, n in zip(CODES, NAMES)], _png)
