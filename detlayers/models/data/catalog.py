"""Named datasets (detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` for COCO-format data):
``DATASETS.TRAIN`` names datasets registered here."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["register_coco_instances", "get_dataset_dicts", "get_metadata", "registered_datasets"]

_LOADERS: dict[str, Callable[[], list[dict]]] = {}
_METADATA: dict[str, dict[str, Any]] = {}


def register_coco_instances(name: str, metadata: dict[str, Any], json_file: str | os.PathLike,
                            image_root: str | os.PathLike) -> None:
    """detectron2's ``register_coco_instances``: ``name`` reads the COCO instances file
    ``json_file`` with images under ``image_root`` (lazily, when the dataset is first used).

    ``metadata`` is extra metadata (e.g. ``thing_classes``); ``json_file``, ``image_root`` and
    ``evaluator_type="coco"`` are added to it. Registering a name again with other files or
    metadata raises ``ValueError`` (as detectron2's catalog asserts); the identical registration
    again is a no-op.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_coco_instances: name must be a non-empty str, got {name!r}")
    if not isinstance(metadata, dict):
        raise TypeError(f"register_coco_instances: metadata must be a dict, got {type(metadata).__name__}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    entry = dict(metadata, json_file=json_file, image_root=image_root, evaluator_type="coco")
    if name in _LOADERS:
        if _METADATA[name] == entry:  # the same registration again (a script run twice): nothing to do
            return
        raise ValueError(f"register_coco_instances: dataset {name!r} is already registered with other files")

    def load() -> list[dict]:
        from detlayers.models.data.coco import load_coco_json

        return load_coco_json(json_file, image_root)

    _LOADERS[name] = load
    _METADATA[name] = entry


def registered_datasets() -> list[str]:
    """The registered names, in registration order."""
    return list(_LOADERS)


def get_dataset_dicts(name: str) -> list[dict]:
    """The records of dataset ``name`` (``DatasetCatalog.get``); ``KeyError`` lists the registered names."""
    if name not in _LOADERS:
        raise KeyError(f"dataset {name!r} is not registered (register_coco_instances); "
                       f"registered: {registered_datasets()}")
    return _LOADERS[name]()


def get_metadata(name: str) -> dict[str, Any]:
    """The metadata of dataset ``name`` (a copy)."""
    if name not in _METADATA:
        raise KeyError(f"dataset {name!r} is not registered; registered: {registered_datasets()}")
    return dict(_METADATA[name])


def unregister(name: str) -> None:
    """Forgets ``name`` (for tests and notebooks that register the same name again)."""
    _LOADERS.pop(name, None)
    _METADATA.pop(name, None)
