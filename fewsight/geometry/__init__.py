"""Batched detection geometry: boxes, IoU, anchors, matching and box coding.

Pure tensor functions; every one takes a whole batch and follows its inputs' device and dtype.
"""

from fewsight.geometry.anchors import SSD300_ASPECT_RATIOS, AnchorGenerator, default_boxes, feature_size
from fewsight.geometry.anchor_fit import (
    AnchorProposal,
    best_anchor_iou,
    best_possible_recall,
    kmeans_anchors,
    propose_anchors,
    wh_iou,
)
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
from fewsight.geometry.tiling import TileTargets, tile_grid, tile_starts, tile_targets

__all__ = [
    "SSD300_ASPECT_RATIOS",
    "feature_size",
    "BACKGROUND",
    "BOX_FORMATS",
    "IGNORE",
    "AnchorGenerator",
    "AnchorProposal",
    "BoxCoder",
    "Match",
    "PaddedTargets",
    "SanitizedBoxes",
    "TileTargets",
    "best_anchor_iou",
    "best_possible_recall",
    "box_area",
    "box_convert",
    "box_ioa",
    "box_iou",
    "clip_boxes",
    "default_boxes",
    "kmeans_anchors",
    "match",
    "pad_targets",
    "propose_anchors",
    "sanitize_boxes",
    "tile_grid",
    "tile_starts",
    "tile_targets",
    "wh_iou",
]
