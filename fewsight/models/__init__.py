"""fewsight.models."""

from fewsight.models.backbones import (
    BACKBONES,
    BackboneWithFPN,
    MobileNetV2Features,
    ResNetFeatures,
    build_backbone,
    freeze_batchnorm,
    offline_weights_path,
)
from fewsight.models.fpn import FPN

__all__: list[str] = [
    "BACKBONES",
    "BackboneWithFPN",
    "FPN",
    "MobileNetV2Features",
    "ResNetFeatures",
    "build_backbone",
    "freeze_batchnorm",
    "offline_weights_path",
]
