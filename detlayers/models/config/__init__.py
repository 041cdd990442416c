"""detectron2's config system for detlayers' models: ``CfgNode``, ``get_cfg()``, ``add_deeplab_config``
and model-zoo configs as functions.

::

    from detlayers.models.config import get_cfg

    cfg = get_cfg()                                   # detectron2's defaults, every key
    cfg.merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.5])   # in place
    cfg.INPUT.MIN_SIZE_TEST = 640                     # in place

``Config`` is the old name of ``CfgNode`` (kept as an alias).
"""

from __future__ import annotations

from detlayers.models.config.deeplab import add_deeplab_config
from detlayers.models.config.defaults import CONFIG_VERSION, get_cfg
from detlayers.models.config.node import BASE_KEY, CfgNode
from detlayers.models.config.zoo import (
    cascade_mask_rcnn_R_50_FPN_3x_config,
    deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config,
    deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config,
    faster_rcnn_R_50_C4_3x_config,
    faster_rcnn_R_50_DC5_3x_config,
    faster_rcnn_R_50_FPN_3x_config,
    mask_rcnn_R_50_FPN_3x_config,
    mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config,
    mask_rcnn_R_50_FPN_3x_gn_config,
    mask_rcnn_R_101_FPN_3x_config,
    panoptic_fpn_R_50_3x_config,
    retinanet_R_50_FPN_3x_config,
    rotated_faster_rcnn_R_50_FPN_3x_config,
)

__all__ = [
    "CfgNode",
    "Config",
    "get_cfg",
    "add_deeplab_config",
    "mask_rcnn_R_50_FPN_3x_config",
    "mask_rcnn_R_101_FPN_3x_config",
    "faster_rcnn_R_50_FPN_3x_config",
    "faster_rcnn_R_50_C4_3x_config",
    "faster_rcnn_R_50_DC5_3x_config",
    "retinanet_R_50_FPN_3x_config",
    "mask_rcnn_R_50_FPN_3x_gn_config",
    "mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config",
    "cascade_mask_rcnn_R_50_FPN_3x_config",
    "deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config",
    "deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config",
    "panoptic_fpn_R_50_3x_config",
    "rotated_faster_rcnn_R_50_FPN_3x_config",
    "BASE_KEY",
    "CONFIG_VERSION",
]

Config = CfgNode


def ROIBoxHeadConfig() -> CfgNode:  # noqa: N802 - the old class name, still a model-module default
    """``MODEL.ROI_BOX_HEAD`` of ``mask_rcnn_R_50_FPN_3x_config()``, frozen (the default of the
    box-head module's ``cfg`` field)."""
    node = mask_rcnn_R_50_FPN_3x_config().MODEL.ROI_BOX_HEAD
    node.freeze()
    return node


def ROIMaskHeadConfig() -> CfgNode:  # noqa: N802 - the old class name, still a model-module default
    """``MODEL.ROI_MASK_HEAD`` of ``mask_rcnn_R_50_FPN_3x_config()``, frozen (the default of the
    mask-head module's ``cfg`` field)."""
    node = mask_rcnn_R_50_FPN_3x_config().MODEL.ROI_MASK_HEAD
    node.freeze()
    return node
