"""detectron2's DeepLab project (``projects/DeepLab``): the ResNet backbone with DeepLab's stem,
dilation and multi-grid (``build_resnet_deeplab_backbone``) and the ``DeepLabV3PlusHead`` /
``DeepLabV3Head`` semantic-segmentation heads; the keys come from
:func:`detlayers.models.config.add_deeplab_config`."""

from detlayers.models.deeplab.resnet import build_resnet_deeplab_backbone
from detlayers.models.deeplab.semantic_seg import DeepLabV3Head, DeepLabV3PlusHead

__all__ = ["build_resnet_deeplab_backbone", "DeepLabV3Head", "DeepLabV3PlusHead"]
