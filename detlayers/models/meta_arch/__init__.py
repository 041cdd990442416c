"""Meta-architectures (detectron2's ``modeling/meta_arch/``): ``GeneralizedRCNN`` and ``build_model``."""

from detlayers.models.meta_arch.build import build_model
from detlayers.models.meta_arch.rcnn import GeneralizedRCNN

__all__ = ["build_model", "GeneralizedRCNN"]
