"""``build_model`` (detectron2's ``modeling/meta_arch/build.py``)."""

from __future__ import annotations

from typing import Any

from detlayers.models.registry import META_ARCH_REGISTRY, build_from_registry

__all__ = ["build_model"]


def build_model(cfg: Any) -> Any:
    """The unbound Flax module of the meta-architecture ``cfg.MODEL.META_ARCHITECTURE`` names, built
    by its ``from_config(cfg)`` (detectron2's ``build_model``, inference only).

    Raises ``TypeError`` when ``cfg`` is not a config; an unknown registered name or a config value
    the model cannot honour raises ``ValueError`` naming the key.
    """
    if not hasattr(cfg, "MODEL"):
        raise TypeError(f"build_model: cfg must be a detlayers.models config, got {type(cfg).__name__}")
    return build_from_registry(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, cfg)
