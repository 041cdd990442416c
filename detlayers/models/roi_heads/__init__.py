"""ROI heads (detectron2's ``modeling/roi_heads/``): ``StandardROIHeads`` with the
``FastRCNNConvFCHead`` box head, ``FastRCNNOutputLayers`` and the ``MaskRCNNConvUpsampleHead``;
``Res5ROIHeads`` (the C4 models' per-region res5); ``CascadeROIHeads`` (Cascade R-CNN's box stages)."""

from detlayers.models.roi_heads.box_head import FastRCNNConvFCHead, build_box_head
from detlayers.models.roi_heads.cascade_rcnn import CascadeROIHeads
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detlayers.models.roi_heads.mask_head import MaskRCNNConvUpsampleHead, build_mask_head, mask_rcnn_inference
from detlayers.models.roi_heads.res5_roi_heads import Res5ROIHeads
from detlayers.models.roi_heads.roi_heads import StandardROIHeads, build_roi_heads

__all__ = [
    "FastRCNNConvFCHead", "build_box_head", "FastRCNNOutputLayers", "fast_rcnn_inference",
    "MaskRCNNConvUpsampleHead", "build_mask_head", "mask_rcnn_inference", "StandardROIHeads", "build_roi_heads",
    "Res5ROIHeads", "CascadeROIHeads",
]
