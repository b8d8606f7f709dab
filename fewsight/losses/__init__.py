"""fewsight.losses."""

from fewsight.losses import functional
from fewsight.losses.ccs import CCSDetectionLoss, CCSLoss
from fewsight.losses.center import CenterLoss
from fewsight.losses.circle import CircleLoss, ClassCircleLoss
from fewsight.losses.margin import ArcFaceLoss, CosFaceLoss
from fewsight.losses.triplet import TripletLoss
from fewsight.losses.focal import FocalLoss, check_focal_options
from fewsight.losses.multibox import MultiBoxLoss, check_multibox_options
from fewsight.losses.directional import DirectionalFocalLoss, DispersionLoss

__all__: list[str] = [
    "check_focal_options",
    "check_multibox_options",
    "functional",
    "CCSLoss",
    "CCSDetectionLoss",
    "CenterLoss",
    "ArcFaceLoss",
    "CosFaceLoss",
    "TripletLoss",
    "CircleLoss",
    "ClassCircleLoss",
    "FocalLoss",
    "MultiBoxLoss",
    "DirectionalFocalLoss",
    "DispersionLoss",
]
