"""Meta-architectures (detectron2's ``modeling/meta_arch/``): ``GeneralizedRCNN``, ``RetinaNet``,
``SemanticSegmentor`` and ``build_model``."""

from detlayers.models.meta_arch.build import build_model
from detlayers.models.meta_arch.rcnn import GeneralizedRCNN
from detlayers.models.meta_arch.retinanet import RetinaNet
from detlayers.models.meta_arch.semantic_seg import SemanticSegmentor, build_sem_seg_head

__all__ = ["build_model", "GeneralizedRCNN", "RetinaNet", "SemanticSegmentor", "build_sem_seg_head"]
