"""``build_proposal_generator`` (detectron2's ``proposal_generator/build.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detlayers.models.registry import PROPOSAL_GENERATOR_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec

__all__ = ["build_proposal_generator"]


def build_proposal_generator(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> Any:
    """The proposal generator ``MODEL.PROPOSAL_GENERATOR.NAME`` names, over the backbone outputs
    ``input_shape`` (``{name: ShapeSpec}``)."""
    return build_from_registry(PROPOSAL_GENERATOR_REGISTRY, cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg, input_shape)
