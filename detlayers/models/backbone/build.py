"""``build_backbone``: the backbone ``MODEL.BACKBONE.NAME`` names (detectron2's ``backbone/build.py``)."""

from __future__ import annotations

from typing import Any

from detlayers.models.registry import BACKBONE_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec

__all__ = ["build_backbone"]


def build_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> Any:
    """``BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape)``; ``input_shape``
    defaults to ``ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))``. The backbone has
    ``output_shape() -> {name: ShapeSpec}``."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return build_from_registry(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, cfg, input_shape)
