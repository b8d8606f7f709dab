"""``emoji-logos``: the same emoji drawn in two styles (Google Noto, Twitter Twemoji) on real photographs.

A logo-detection and metric-learning benchmark (a FlickrLogos-32 stand-in): train on base classes in
one style, enroll or retrieve novel classes from a few examples of the other style. One module per
concept, all names re-exported here:

* :mod:`~fewsight.data.emoji.installer` — :func:`install_emoji` fetches the npm packages into
  ``data/emoji`` (``make emoji-data``, or ``python -m fewsight.data.emoji --install DIR``).
* :mod:`~fewsight.data.emoji.catalog` — the classes (:func:`emoji_classes`), their images
  (:func:`emoji_images`), the fixed base / novel split (:func:`split_base_novel`), :data:`STYLES`
  and :data:`DEFAULT_ROOT`.
* :mod:`~fewsight.data.emoji.rendering` — photograph backgrounds (:func:`load_photos`, the disjoint
  per-split :data:`PHOTO_BANDS`) and the pixel operations that draw an emoji on a canvas.
* :mod:`~fewsight.data.emoji.datasets` — :class:`EmojiLogosDataset` (detection canvases) and
  :class:`EmojiCrops` (one emoji per item, for metric learning).

Example:
    >>> from fewsight.data.emoji import STYLES, split_base_novel
    >>> STYLES
    ('google', 'twitter')
    >>> split_base_novel(["1F600", "1F601", "1F602", "1F603", "1F604"])
    ((1, 2, 4), (0, 3))
"""

from fewsight.data.emoji.catalog import (
    CLASS_SPLIT_SEED,
    DEFAULT_ROOT,
    STYLES,
    EmojiClasses,
    emoji_classes,
    emoji_images,
    split_base_novel,
)
from fewsight.data.emoji.datasets import EmojiCanvas, EmojiCrops, EmojiLogosDataset
from fewsight.data.emoji.installer import (
    EMOJI_DATASOURCE_VERSION,
    NPM_PACKAGES,
    extract_emoji_tarball,
    install_emoji,
    main,
)
from fewsight.data.emoji.rendering import BACKGROUNDS, PHOTO_BANDS, PHOTOS, SPLITS, load_photos

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
