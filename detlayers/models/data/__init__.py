"""Training data, laid out as detectron2's ``data/``: ``catalog`` (registered datasets,
``register_coco_instances``), ``coco`` (a COCO-format json read with pycocotools),
``transforms`` (``ResizeShortestEdge``, ``RandomFlip``) and ``loader`` (the mapper, the training
order and batches padded to a few static shapes)."""

from __future__ import annotations

from detlayers._lazy import exports_by_name, lazy_exports

_EXPORTS = exports_by_name({
    "catalog": ("register_coco_instances", "get_dataset_dicts", "get_metadata", "registered_datasets"),
    "coco": ("load_coco_json",),
    "transforms": ("ResizeShortestEdge", "RandomFlip"),
    "loader": ("DatasetMapper", "TrainingBatches", "build_training_batches"),
})

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
