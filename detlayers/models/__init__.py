"""Reference detectron2 architectures built from detlayers layers (imported lazily).

``from detlayers.models import mask_rcnn_R_50_FPN_3x_config, Predictor`` ::

    predictor = Predictor(mask_rcnn_R_50_FPN_3x_config(), "model_final_f10217.pkl")
    out = predictor(image_bgr)   # pred_boxes, scores, pred_classes, pred_masks
"""

from __future__ import annotations

from detlayers._lazy import lazy_exports

_EXPORTS = {
    "Config": "config",
    "mask_rcnn_R_50_FPN_3x_config": "config",
    "mask_rcnn_R_101_FPN_3x_config": "config",
    "GeneralizedRCNN": "mask_rcnn",
    "build_model": "mask_rcnn",
    "Predictor": "mask_rcnn",
    "load_detectron2_weights": "mask_rcnn",
    "preprocess_image": "mask_rcnn",
    "batch_images": "mask_rcnn",
    "resize_shortest_edge_shape": "mask_rcnn",
    "export_predictor": "export",
    "load_exported": "export",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
