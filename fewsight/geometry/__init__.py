"""Batched detection geometry: boxes, IoU, anchors, matching and box coding.

Pure tensor functions; every one takes a whole batch and follows its inputs' device and dtype.
"""

from fewsight.geometry.anchors import SSD300_ASPECT_RATIOS, AnchorGenerator, default_boxes, feature_size
from fewsight.geometry.boxes import (
    BOX_FORMATS,
    SanitizedBoxes,
    box_area,
    box_convert,
    box_ioa,
    box_iou,
    clip_boxes,
    sanitize_boxes,
)
from fewsight.geometry.coder import BoxCoder
from fewsight.geometry.matching import BACKGROUND, IGNORE, Match, match
from fewsight.geometry.targets import PaddedTargets, pad_targets

__all__ = [
    "SSD300_ASPECT_RATIOS",
    "feature_size",
    "BACKGROUND",
    "BOX_FORMATS",
    "IGNORE",
    "AnchorGenerator",
    "BoxCoder",
    "Match",
    "PaddedTargets",
    "SanitizedBoxes",
    "box_area",
    "box_convert",
    "box_ioa",
    "box_iou",
    "clip_boxes",
    "default_boxes",
    "match",
    "pad_targets",
    "sanitize_boxes",
]
