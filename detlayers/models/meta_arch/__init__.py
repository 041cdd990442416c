"""Meta-architectures (detectron2's ``modeling/meta_arch/``): ``GeneralizedRCNN``, ``RetinaNet`` and
``build_model``."""

from detlayers.models.meta_arch.build import build_model
from detlayers.models.meta_arch.rcnn import GeneralizedRCNN
from detlayers.models.meta_arch.retinanet import RetinaNet

__all__ = ["build_model", "GeneralizedRCNN", "RetinaNet"]
