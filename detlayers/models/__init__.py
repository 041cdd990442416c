"""Reference detectron2 architectures built from detlayers layers (imported lazily).

``from detlayers.models import mask_rcnn_R_50_FPN_3x_config, Predictor`` ::

    predictor = Predictor(mask_rcnn_R_50_FPN_3x_config(), "model_final_f10217.pkl")
    out = predictor(image_bgr)   # pred_boxes, scores, pred_classes, pred_masks
"""

from __future__ import annotations

from detlayers._lazy import exports_by_name, lazy_exports

_EXPORTS = exports_by_name({
    "config": (
        "CfgNode", "Config", "get_cfg", "add_deeplab_config", "mask_rcnn_R_50_FPN_3x_config",
        "mask_rcnn_R_101_FPN_3x_config",
    ),
    "mask_rcnn": (
        "GeneralizedRCNN", "build_model", "Predictor", "load_detectron2_weights", "preprocess_image", "batch_images",
        "resize_shortest_edge_shape",
    ),
    "export": ("export_predictor", "load_exported"),
})

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
