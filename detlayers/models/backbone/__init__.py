"""Backbones (detectron2's ``modeling/backbone/``): ResNet and FPN, and ``build_backbone``."""

from detlayers.models.backbone.build import build_backbone
from detlayers.models.backbone.fpn import (
    FPN,
    LastLevelMaxPool,
    LastLevelP6P7,
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detlayers.models.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet, build_resnet_backbone

__all__ = [
    "build_backbone", "FPN", "LastLevelMaxPool", "LastLevelP6P7", "build_resnet_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone", "BasicBlock", "BasicStem", "BottleneckBlock", "ResNet",
    "build_resnet_backbone",
]
