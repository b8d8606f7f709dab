"""fewsight.losses."""

from fewsight.losses import functional
from fewsight.losses.ccs import CCSDetectionLoss, CCSLoss
from fewsight.losses.center import CenterLoss
from fewsight.losses.circle import CircleLoss, ClassCircleLoss
from fewsight.losses.margin import ArcFaceLoss, CosFaceLoss
from fewsight.losses.triplet import TripletLoss
from fewsight.losses.focal import FocalLoss
from fewsight.losses.multibox import MultiBoxLoss

__all__: list[str] = [
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
]
