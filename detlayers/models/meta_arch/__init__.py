"""Meta-architectures (detectron2's ``modeling/meta_arch/``): ``GeneralizedRCNN``, ``RetinaNet``,
``PanopticFPN``, ``SemanticSegmentor``, the ``SemSegFPNHead`` semantic head, ``build_sem_seg_head``
and ``build_model``."""

from detlayers.models.meta_arch.build import build_model
from detlayers.models.meta_arch.panoptic_fpn import PanopticFPN
from detlayers.models.meta_arch.rcnn import GeneralizedRCNN
from detlayers.models.meta_arch.retinanet import RetinaNet
from detlayers.models.meta_arch.semantic_seg import SemanticSegmentor, SemSegFPNHead, build_sem_seg_head

__all__ = ["build_model", "GeneralizedRCNN", "RetinaNet", "PanopticFPN", "SemanticSegmentor", "SemSegFPNHead",
           "build_sem_seg_head"]
