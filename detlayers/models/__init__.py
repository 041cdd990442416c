"""Reference detectron2 architectures built from detlayers layers (imported lazily).

Laid out as detectron2's ``modeling/``: ``backbone/`` (ResNet, FPN), ``proposal_generator/`` (RPN),
``roi_heads/`` (StandardROIHeads and its box and mask heads, CascadeROIHeads), ``meta_arch/``
(GeneralizedRCNN, RetinaNet, PanopticFPN, SemanticSegmentor and the ``SemSegFPNHead`` semantic head,
``build_model``), ``deeplab/`` (detectron2's ``projects/DeepLab``: its backbone and the DeepLabV3+ /
V3 heads), ``poolers``, ``anchor_generator``, ``box_regression``, ``postprocessing``, ``checkpoint``
(detectron2 weights in and out) and ``predictor``, plus
``solver`` (detectron2's ``solver/``: learning-rate schedule and SGD, as optax), ``data``
(detectron2's ``data/``: COCO-format datasets, augmentation, static-shape batches), ``engine`` (the
data-parallel training step and loop) and ``train`` (the CLI ``python -m detlayers.models.train``);
parts are looked up by detectron2's registered names in the registries of
:mod:`detlayers.models.registry`.

``from detlayers.models import mask_rcnn_R_50_FPN_3x_config, Predictor`` ::

    predictor = Predictor(mask_rcnn_R_50_FPN_3x_config(), "model_final_f10217.pkl")
    out = predictor(image_bgr)   # pred_boxes, scores, pred_classes, pred_masks
"""

from __future__ import annotations

from detlayers._lazy import exports_by_name, lazy_exports

_EXPORTS = exports_by_name({
    "config": (
        "CfgNode", "Config", "get_cfg", "add_deeplab_config", "mask_rcnn_R_50_FPN_3x_config",
        "mask_rcnn_R_101_FPN_3x_config", "faster_rcnn_R_50_FPN_3x_config", "retinanet_R_50_FPN_3x_config",
        "panoptic_fpn_R_50_3x_config",
    ),
    "meta_arch.rcnn": ("GeneralizedRCNN",),
    "meta_arch.retinanet": ("RetinaNet",),
    "meta_arch.panoptic_fpn": ("PanopticFPN",),
    "meta_arch.semantic_seg": ("SemanticSegmentor", "SemSegFPNHead"),
    "meta_arch.build": ("build_model",),
    "checkpoint": ("load_detectron2_weights", "save_detectron2_weights"),
    "predictor": ("Predictor", "PredictorOutOfMemoryError", "preprocess_image", "batch_images",
                  "resize_shortest_edge_shape"),
    "export": ("export_predictor", "load_exported"),
    "registry": (
        "META_ARCH_REGISTRY", "BACKBONE_REGISTRY", "PROPOSAL_GENERATOR_REGISTRY", "ANCHOR_GENERATOR_REGISTRY",
        "RPN_HEAD_REGISTRY", "ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY", "ROI_MASK_HEAD_REGISTRY",
        "SEM_SEG_HEADS_REGISTRY",
    ),
})

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
