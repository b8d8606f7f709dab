"""fewsight.models."""

from fewsight.models.backbones import (
    BACKBONES,
    BackboneWithFPN,
    build_backbone,
)
from fewsight.models.fpn import FPN
from fewsight.models.crops import crop_boxes
from fewsight.models.detector import DenseDetector
from fewsight.models.transform import DetectionTransform
from fewsight.models.assignment import AnchorAssigner
from fewsight.models.postprocess import DetectionPostprocess
from fewsight.models.heads import DLDENetHead, RetinaNetHead
from fewsight.models.retinanet import RetinaNet
from fewsight.models.dldenet import DLDENet
from fewsight.models.sliced import SlicedDetector, detection_cap, greedy_merge, predict_sliced
from fewsight.models.ssd import SSD, DefaultBoxGenerator, SSDHead
from fewsight.models.export import OnnxExportInfo, export_onnx, postprocess_onnx_outputs, read_onnx_info

__all__: list[str] = [
    "BACKBONES",
    "BackboneWithFPN",
    "FPN",
    "crop_boxes",
    "build_backbone",
    "DenseDetector",
    "DetectionTransform",
    "AnchorAssigner",
    "DetectionPostprocess",
    "DLDENetHead",
    "RetinaNetHead",
    "RetinaNet",
    "DLDENet",
    "SlicedDetector",
    "detection_cap",
    "greedy_merge",
    "predict_sliced",
    "SSD",
    "DefaultBoxGenerator",
    "SSDHead",
    "OnnxExportInfo",
    "export_onnx",
    "postprocess_onnx_outputs",
    "read_onnx_info",
]
