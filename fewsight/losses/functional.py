"""Every fewsight loss as a pure function: ``fewsight.losses.functional.<name>(...)``."""

from fewsight.losses.ccs import ccs_detection_loss, ccs_loss
from fewsight.losses.circle import circle_loss, circle_loss_class_level, circle_loss_from_similarities
from fewsight.losses.center import center_loss, center_loss_from_distances
from fewsight.losses.margin import arcface_loss, cosface_loss
from fewsight.losses.triplet import triplet_loss
from fewsight.losses.box import box_regression_loss, giou_loss, l1_loss, smooth_l1_loss
from fewsight.losses.focal import focal_loss, focal_loss_detection
from fewsight.losses.multibox import multibox_loss
from fewsight.losses.directional import (
    directional_focal_loss,
    directional_log_probs,
    directional_probabilities,
    dispersion_loss,
    focal_loss_from_log_probs,
    log1mexp,
    rival_log_gate,
)

__all__ = [
    "ccs_loss",
    "ccs_detection_loss",
    "center_loss",
    "center_loss_from_distances",
    "arcface_loss",
    "cosface_loss",
    "triplet_loss",
    "circle_loss",
    "circle_loss_from_similarities",
    "circle_loss_class_level",
    "focal_loss",
    "focal_loss_detection",
    "multibox_loss",
    "smooth_l1_loss",
    "l1_loss",
    "giou_loss",
    "box_regression_loss",
    "directional_log_probs",
    "directional_probabilities",
    "directional_focal_loss",
    "focal_loss_from_log_probs",
    "dispersion_loss",
    "rival_log_gate",
    "log1mexp",
]
