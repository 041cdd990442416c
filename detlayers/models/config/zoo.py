"""detectron2 model-zoo configs as functions (no YAML file needed): the config that
``get_cfg().merge_from_file("configs/COCO-InstanceSegmentation/mask_rcnn_R_*_FPN_3x.yaml")`` gives."""

from __future__ import annotations

import pathlib
from typing import Any

from detlayers.models.config.defaults import get_cfg
from detlayers.models.config.node import CfgNode

__all__ = [
    "mask_rcnn_R_50_FPN_3x_config", "mask_rcnn_R_101_FPN_3x_config", "faster_rcnn_R_50_FPN_3x_config",
    "retinanet_R_50_FPN_3x_config", "mask_rcnn_R_50_FPN_3x_gn_config", "mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config",
    "faster_rcnn_R_50_C4_3x_config", "faster_rcnn_R_50_DC5_3x_config", "cascade_mask_rcnn_R_50_FPN_3x_config",
    "deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config", "deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config",
    "panoptic_fpn_R_50_3x_config",
    "rotated_faster_rcnn_R_50_FPN_3x_config", "ROTATED_FASTER_RCNN_YAML",
]


def _coco_3x_schedule(base_lr: float) -> dict[str, Any]:
    """The training part every ``Base-*.yaml`` shares: COCO 2017, 16 images a batch, LR steps at
    60k and 80k of 90k iterations (the ``*_3x`` files then stretch it), multi-scale training sizes."""
    return {
        "DATASETS": {"TRAIN": ("coco_2017_train",), "TEST": ("coco_2017_val",)},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": base_lr, "STEPS": (60000, 80000), "MAX_ITER": 90000},
        "INPUT": {"MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800)},
        "VERSION": 2,
    }


def _two_fc_box_head_four_conv_mask_head() -> dict[str, Any]:
    """``Base-RCNN-FPN.yaml``'s and ``Base-RCNN-DilatedC5.yaml``'s heads: 2 FC layers on 7x7, 4 convs
    on 14x14."""
    return {
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "POOLER_RESOLUTION": 14},
    }


def _base_rcnn_fpn() -> dict[str, Any]:
    """``configs/Base-RCNN-FPN.yaml``: ResNet-FPN on res2-res5, RPN on P2-P6 (1000 proposals a
    level before NMS and 1000 after at test time), 2-FC box head on 7x7 ROIAlignV2, 4-conv mask
    head on 14x14, COCO 2017, 16 images a batch."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
            "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
            "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
            "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
            "RPN": {
                "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
                "PRE_NMS_TOPK_TRAIN": 2000,
                "PRE_NMS_TOPK_TEST": 1000,
                "POST_NMS_TOPK_TRAIN": 1000,
                "POST_NMS_TOPK_TEST": 1000,
            },
            "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
            **_two_fc_box_head_four_conv_mask_head(),
        },
        **_coco_3x_schedule(base_lr=0.02),
    }


def _base_retinanet() -> dict[str, Any]:
    """``configs/Base-RetinaNet.yaml``: ``RetinaNet`` on ResNet res3-res5 with FPN P3-P5 and
    ``LastLevelP6P7`` from C5, three octave scales of anchors a level (written as the YAML computes
    them, ``x * 2**(1.0/3)``, so the floats are detectron2's bit for bit), base LR 0.01."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "RetinaNet",
            "BACKBONE": {"NAME": "build_retinanet_resnet_fpn_backbone"},
            "RESNETS": {"OUT_FEATURES": ["res3", "res4", "res5"]},
            "ANCHOR_GENERATOR": {
                "SIZES": [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
            },
            "FPN": {"IN_FEATURES": ["res3", "res4", "res5"]},
            "RETINANET": {"IOU_THRESHOLDS": [0.4, 0.5], "IOU_LABELS": [0, -1, 1], "SMOOTH_L1_LOSS_BETA": 0.0},
        },
        **_coco_3x_schedule(base_lr=0.01),
    }


def _base_rcnn_c4() -> dict[str, Any]:
    """``configs/Base-RCNN-C4.yaml``: ResNet up to res4 (``get_cfg``'s ``OUT_FEATURES``), RPN on res4
    (6000 proposals before NMS and 1000 after at test time), ``Res5ROIHeads`` on res4."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "RPN": {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
            "ROI_HEADS": {"NAME": "Res5ROIHeads"},
        },
        **_coco_3x_schedule(base_lr=0.02),
    }


def _base_rcnn_dilated_c5() -> dict[str, Any]:
    """``configs/Base-RCNN-DilatedC5.yaml``: ResNet with a dilated res5 (stride 16), RPN on res5
    (6000 / 1000 proposals at test time), ``StandardROIHeads`` on res5 with the 2-FC box head on
    7x7 (and a 4-conv mask head on 14x14)."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "RESNETS": {"OUT_FEATURES": ["res5"], "RES5_DILATION": 2},
            "RPN": {"IN_FEATURES": ["res5"], "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
            "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["res5"]},
            **_two_fc_box_head_four_conv_mask_head(),
        },
        **_coco_3x_schedule(base_lr=0.02),
    }


def _zoo_3x(base: dict[str, Any], depth: int, **model: Any) -> CfgNode:
    cfg = get_cfg()
    cfg.merge_from_other_cfg(CfgNode(base))
    cfg.merge_from_other_cfg(CfgNode({
        "MODEL": {"WEIGHTS": f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl", **model,
                  "RESNETS": {"DEPTH": depth}},
        # The 3x schedule: 270k iterations, steps at 210k and 250k.
        "SOLVER": {"STEPS": (210000, 250000), "MAX_ITER": 270000},
    }))
    return cfg


def _mask_rcnn_fpn_3x(depth: int) -> CfgNode:
    return _zoo_3x(_base_rcnn_fpn(), depth, MASK_ON=True)


def mask_rcnn_R_50_FPN_3x_config() -> CfgNode:
    """``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` over ``Base-RCNN-FPN.yaml`` on
    ``get_cfg()``: every key, training ones included; a new mutable config each call.

    At inference: FrozenBN ResNet-50 with ``STRIDE_IN_1X1``, MSRA pixel mean in BGR with std 1,
    test size 800/1333, score threshold 0.05, NMS 0.5, 100 detections per image.
    """
    return _mask_rcnn_fpn_3x(50)


def mask_rcnn_R_101_FPN_3x_config() -> CfgNode:
    """``COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml`` (as the R-50 one, ``DEPTH: 101``)."""
    return _mask_rcnn_fpn_3x(101)


def faster_rcnn_R_50_FPN_3x_config() -> CfgNode:
    """``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml``: Base-RCNN-FPN without masks, ResNet-50."""
    return _zoo_3x(_base_rcnn_fpn(), 50, MASK_ON=False)


def faster_rcnn_R_50_C4_3x_config() -> CfgNode:
    """``COCO-Detection/faster_rcnn_R_50_C4_3x.yaml``: ``Base-RCNN-C4.yaml`` with ResNet-50 and no
    masks: RPN on res4 (15 anchors a cell), ``Res5ROIHeads`` (14x14 ROIAlignV2 on res4, res5 per
    region, average pool, ``FastRCNNOutputLayers``)."""
    return _zoo_3x(_base_rcnn_c4(), 50, MASK_ON=False)


def faster_rcnn_R_50_DC5_3x_config() -> CfgNode:
    """``COCO-Detection/faster_rcnn_R_50_DC5_3x.yaml``: ``Base-RCNN-DilatedC5.yaml`` with ResNet-50
    and no masks: res5 dilated 2 (stride 16), RPN and ``StandardROIHeads`` on res5."""
    return _zoo_3x(_base_rcnn_dilated_c5(), 50, MASK_ON=False)


def retinanet_R_50_FPN_3x_config() -> CfgNode:
    """``COCO-Detection/retinanet_R_50_FPN_3x.yaml``: ``Base-RetinaNet.yaml`` with ResNet-50 (4-conv
    towers, score threshold 0.05, 1000 candidates a level, NMS 0.5, 100 detections per image)."""
    return _zoo_3x(_base_retinanet(), 50)


def mask_rcnn_R_50_FPN_3x_gn_config() -> CfgNode:
    """``Misc/mask_rcnn_R_50_FPN_3x_gn.yaml``: GroupNorm (32 groups) in the ResNet-50 (stride on
    the 3x3 conv), the FPN, a box head of four 3x3 convs and one fc, and the mask head."""
    cfg = _mask_rcnn_fpn_3x(50)
    cfg.merge_from_other_cfg(CfgNode({"MODEL": {
        "WEIGHTS": "catalog://ImageNetPretrained/FAIR/R-50-GN",
        "RESNETS": {"NORM": "GN", "STRIDE_IN_1X1": False},
        "FPN": {"NORM": "GN"},
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_CONV": 4, "NUM_FC": 1, "NORM": "GN"},
        "ROI_MASK_HEAD": {"NORM": "GN"},
    }}))
    return cfg


def mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config() -> CfgNode:
    """``Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml``: deformable 3x3 convs (unmodulated, one
    offset group) in every block of res3, res4 and res5."""
    cfg = _mask_rcnn_fpn_3x(50)
    cfg.merge_from_other_cfg(CfgNode({"MODEL": {
        "RESNETS": {"DEFORM_ON_PER_STAGE": [False, True, True, True], "DEFORM_MODULATED": False},
    }}))
    return cfg


def cascade_mask_rcnn_R_50_FPN_3x_config() -> CfgNode:
    """``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``: Mask R-CNN R50-FPN with ``CascadeROIHeads``
    (three box stages of ``MODEL.ROI_BOX_CASCADE_HEAD``, class-agnostic box regression) and 2000
    proposals an image in training."""
    cfg = _mask_rcnn_fpn_3x(50)
    cfg.merge_from_other_cfg(CfgNode({"MODEL": {
        "ROI_HEADS": {"NAME": "CascadeROIHeads"},
        "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
        "RPN": {"POST_NMS_TOPK_TRAIN": 2000},
    }}))
    return cfg


def _deeplab_os16_semantic() -> CfgNode:
    """``Base-DeepLabV3-OS16-Semantic.yaml`` over ``Base-RCNN-DilatedC5.yaml``, on ``get_cfg()`` with
    :func:`detlayers.models.config.add_deeplab_config`'s keys: ``SemanticSegmentor``, no frozen
    stage, ``DeepLabV3Head`` on res5 (ASPP 256 channels, dilations 6/12/18, dropout 0.1; 19
    Cityscapes classes; hard pixel mining), Cityscapes crops of 512x1024, test size 1024/2048."""
    from detlayers.models.config.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    cfg.merge_from_other_cfg(CfgNode(_base_rcnn_dilated_c5()))
    cfg.merge_from_other_cfg(CfgNode({
        "MODEL": {
            "META_ARCHITECTURE": "SemanticSegmentor",
            "BACKBONE": {"FREEZE_AT": 0},
            "SEM_SEG_HEAD": {
                "NAME": "DeepLabV3Head", "IN_FEATURES": ["res5"], "ASPP_CHANNELS": 256, "ASPP_DILATIONS": [6, 12, 18],
                "ASPP_DROPOUT": 0.1, "CONVS_DIM": 256, "COMMON_STRIDE": 16, "NUM_CLASSES": 19,
                "LOSS_TYPE": "hard_pixel_mining",
            },
        },
        "DATASETS": {"TRAIN": ("cityscapes_fine_sem_seg_train",), "TEST": ("cityscapes_fine_sem_seg_val",)},
        "SOLVER": {"BASE_LR": 0.01, "MAX_ITER": 90000, "LR_SCHEDULER_NAME": "WarmupPolyLR", "IMS_PER_BATCH": 16},
        "INPUT": {
            "MIN_SIZE_TRAIN": (512, 768, 1024, 1280, 1536, 1792, 2048), "MIN_SIZE_TRAIN_SAMPLING": "choice",
            "MIN_SIZE_TEST": 1024, "MAX_SIZE_TRAIN": 4096, "MAX_SIZE_TEST": 2048,
            "CROP": {"ENABLED": True, "TYPE": "absolute", "SIZE": (512, 1024), "SINGLE_CATEGORY_MAX_AREA": 1.0},
        },
        "DATALOADER": {"NUM_WORKERS": 10},
    }))
    return cfg


def _deeplab_r103(head: dict[str, Any], out_features: dict[str, Any]) -> dict[str, Any]:
    """What both R-103 files set: the DeepLab backbone (ResNet-101, three-conv stem of 128, SyncBN,
    stride on the 3x3 conv, multi-grid 1/2/4), SyncBN in the head, ImageNet mean/std in RGB."""
    return {
        "MODEL": {
            "WEIGHTS": "detectron2://DeepLab/R-103.pkl",
            "PIXEL_MEAN": [123.675, 116.280, 103.530], "PIXEL_STD": [58.395, 57.120, 57.375],
            "BACKBONE": {"NAME": "build_resnet_deeplab_backbone"},
            "RESNETS": {
                "DEPTH": 101, "NORM": "SyncBN", **out_features, "RES5_MULTI_GRID": [1, 2, 4],
                "STEM_TYPE": "deeplab", "STEM_OUT_CHANNELS": 128, "STRIDE_IN_1X1": False,
            },
            "SEM_SEG_HEAD": {**head, "NORM": "SyncBN"},
        },
        "INPUT": {"FORMAT": "RGB"},
    }


def deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config() -> CfgNode:
    """``projects/DeepLab/configs/Cityscapes-SemanticSegmentation/deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16.yaml``:
    ``SemanticSegmentor`` with ``build_resnet_deeplab_backbone`` (R-103: ResNet-101 with the
    three-conv DeepLab stem of 128 channels, SyncBN, stride on the 3x3 conv, res5 dilated 2 with
    multi-grid 1, 2, 4: output stride 16) and ``DeepLabV3PlusHead`` (ASPP 256 channels, dilations
    6/12/18, pooling window ``INPUT.CROP.SIZE / 16`` = 32x64; decoder on res2 projected to 48
    channels; 19 Cityscapes classes), RGB input with ImageNet mean/std, test size 1024/2048."""
    cfg = _deeplab_os16_semantic()
    cfg.merge_from_other_cfg(CfgNode(_deeplab_r103(
        {"NAME": "DeepLabV3PlusHead", "IN_FEATURES": ["res2", "res5"], "PROJECT_FEATURES": ["res2"],
         "PROJECT_CHANNELS": [48], "COMMON_STRIDE": 4},
        {"OUT_FEATURES": ["res2", "res5"]},
    )))
    return cfg


def deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config() -> CfgNode:
    """``projects/DeepLab/configs/Cityscapes-SemanticSegmentation/deeplab_v3_R_103_os16_mg124_poly_90k_bs16.yaml``:
    the R-103 backbone of :func:`deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config` (res5 only)
    with ``DeepLabV3Head`` (the ASPP on res5, pooling window ``INPUT.CROP.SIZE / COMMON_STRIDE``,
    then the predictor; logits upsampled by 16)."""
    cfg = _deeplab_os16_semantic()
    cfg.merge_from_other_cfg(CfgNode(_deeplab_r103({"NAME": "DeepLabV3Head"}, {})))
    return cfg


def panoptic_fpn_R_50_3x_config() -> CfgNode:
    """``COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml`` over ``Base-Panoptic-FPN.yaml``:
    Mask R-CNN R50-FPN as ``PanopticFPN`` with the ``SemSegFPNHead`` (54 classes on P2-P5, 128-wide
    GN convs to stride 4), the panoptic-separated COCO datasets, semantic loss weight 0.5."""
    cfg = _mask_rcnn_fpn_3x(50)
    cfg.merge_from_other_cfg(CfgNode({
        "MODEL": {"META_ARCHITECTURE": "PanopticFPN", "SEM_SEG_HEAD": {"LOSS_WEIGHT": 0.5}},
        "DATASETS": {"TRAIN": ("coco_2017_train_panoptic_separated",),
                     "TEST": ("coco_2017_val_panoptic_separated",)},
        "DATALOADER": {"FILTER_EMPTY_ANNOTATIONS": False},
    }))
    return cfg


# The committed YAML of the rotated model (detectron2 has no zoo file for it).
ROTATED_FASTER_RCNN_YAML = pathlib.Path(__file__).with_name("rotated_faster_rcnn_R_50_FPN_3x.yaml")


def rotated_faster_rcnn_R_50_FPN_3x_config() -> CfgNode:
    """``rotated_faster_rcnn_R_50_FPN_3x.yaml`` (:data:`ROTATED_FASTER_RCNN_YAML`, next to this
    module): ``faster_rcnn_R_50_FPN_3x.yaml`` with detectron2's rotated parts as its own rotated
    tests set them: ``RRPN`` over ``RotatedAnchorGenerator`` (sizes 32-512, ratios 0.5/1/2, angles
    -90..90 every 30 degrees: 21 anchors a cell; deltas weighted ``(1, 1, 1, 1, 1)``) and
    ``RROIHeads`` (7x7 ``ROIAlignRotated``, 2-fc box head, deltas weighted ``(10, 10, 5, 5, 1)``)."""
    cfg = faster_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_other_cfg(CfgNode({"MODEL": {
        "PROPOSAL_GENERATOR": {"NAME": "RRPN"},
        "ANCHOR_GENERATOR": {"NAME": "RotatedAnchorGenerator", "ANGLES": [[-90, -60, -30, 0, 30, 60, 90]]},
        "RPN": {"BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0, 1.0)},
        "ROI_HEADS": {"NAME": "RROIHeads"},
        "ROI_BOX_HEAD": {"POOLER_TYPE": "ROIAlignRotated", "BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0, 1.0)},
    }}))
    return cfg
