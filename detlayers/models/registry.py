"""Registries of the model parts, keyed by detectron2's registered names.

Each registry maps a name that a config key selects (``cfg.MODEL.META_ARCHITECTURE``,
``cfg.MODEL.BACKBONE.NAME``, ...) to the class (or, for backbones, the builder function) that
detectron2 registers under that name. The builders (:func:`detlayers.models.build_model` and the
``build_*`` functions of each subpackage) look the name up here, so a user can register a new
part with ``@ROI_BOX_HEAD_REGISTRY.register()`` and select it from the config.

Conventions (detectron2's ``@configurable`` idea, made explicit):

* Modules take plain fields (sizes, thresholds, submodules), never the config.
* Every registered class has ONE classmethod ``from_config(cfg, input_shape=...)`` that reads the
  config (attribute access only, ``cfg.MODEL.RPN.NMS_THRESH``), checks the values the module
  cannot honour (a ``ValueError`` naming the key) and returns the constructed module.
* ``input_shape`` is what detectron2 passes: a :class:`detlayers.ShapeSpec` for a backbone's
  input or a head's pooled input, ``{feature name: ShapeSpec}`` for a proposal generator or ROI
  heads, a list of ShapeSpec (one per level) for an RPN head or anchor generator.
* ``BACKBONE_REGISTRY`` holds builder functions ``fn(cfg, input_shape) -> backbone`` (as
  detectron2's ``build_resnet_fpn_backbone``), the others hold classes.

The built-in parts register themselves when their modules are imported; every registry imports
them on first lookup, so importing this module stays cheap (no Flax).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = [
    "Registry",
    "UnknownNameError",
    "META_ARCH_REGISTRY",
    "BACKBONE_REGISTRY",
    "PROPOSAL_GENERATOR_REGISTRY",
    "ANCHOR_GENERATOR_REGISTRY",
    "RPN_HEAD_REGISTRY",
    "ROI_HEADS_REGISTRY",
    "ROI_BOX_HEAD_REGISTRY",
    "ROI_MASK_HEAD_REGISTRY",
    "SEM_SEG_HEADS_REGISTRY",
]

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has. A ``KeyError`` as detectron2's ``Registry.get`` raises, and a
    ``ValueError`` as any other config value the models cannot honour."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class Registry:
    """``{name: class or builder}`` for one kind of model part (detectron2's ``fvcore`` Registry).

    Args:
      name: the registry's name, e.g. ``"ROI_HEADS"``.
      config_key: the config key whose value is looked up here (for error messages).
      builtin_modules: modules that register the built-in entries; imported on first lookup.
    """

    def __init__(self, name: str, config_key: str, builtin_modules: tuple[str, ...] = ()) -> None:
        self.name = name
        self.config_key = config_key
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Any] = {}

    def _load_builtins(self) -> None:
        for module in self._builtin_modules:
            importlib.import_module(module)

    def register(self, obj: T | None = None, *, name: str | None = None) -> Any:
        """Registers ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator
        (``@REGISTRY.register()``). A name registered twice is an error."""

        def add(item: T) -> T:
            key = name or item.__name__
            if key in self._entries and self._entries[key] is not item:
                raise ValueError(f"{self.name} registry: {key!r} is already registered")
            self._entries[key] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        """The entry registered under ``name``.

        Raises:
          UnknownNameError (a KeyError and a ValueError): no such entry; the message names the
          config key and lists the known names.
        """
        self._load_builtins()
        if name not in self._entries:
            raise UnknownNameError(
                f"{self.config_key} {name!r} is not in the {self.name} registry "
                f"(known: {sorted(self._entries)})"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self._load_builtins()
        return iter(sorted(self._entries.items()))

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {self.config_key!r})"


_MODELS = "detlayers.models."

META_ARCH_REGISTRY = Registry(
    "META_ARCH", "MODEL.META_ARCHITECTURE",
    (_MODELS + "meta_arch.rcnn", _MODELS + "meta_arch.retinanet", _MODELS + "meta_arch.panoptic_fpn",
     _MODELS + "meta_arch.semantic_seg"),
)
BACKBONE_REGISTRY = Registry(
    "BACKBONE", "MODEL.BACKBONE.NAME",
    (_MODELS + "backbone.resnet", _MODELS + "backbone.fpn", _MODELS + "deeplab.resnet"),
)
PROPOSAL_GENERATOR_REGISTRY = Registry(
    "PROPOSAL_GENERATOR", "MODEL.PROPOSAL_GENERATOR.NAME",
    (_MODELS + "proposal_generator.rpn", _MODELS + "proposal_generator.rrpn"),
)
ANCHOR_GENERATOR_REGISTRY = Registry(
    "ANCHOR_GENERATOR", "MODEL.ANCHOR_GENERATOR.NAME", (_MODELS + "anchor_generator",)
)
RPN_HEAD_REGISTRY = Registry("RPN_HEAD", "MODEL.RPN.HEAD_NAME", (_MODELS + "proposal_generator.rpn",))
ROI_HEADS_REGISTRY = Registry(
    "ROI_HEADS", "MODEL.ROI_HEADS.NAME",
    (_MODELS + "roi_heads.roi_heads", _MODELS + "roi_heads.res5_roi_heads", _MODELS + "roi_heads.cascade_rcnn",
     _MODELS + "roi_heads.rotated_fast_rcnn"),
)
ROI_BOX_HEAD_REGISTRY = Registry("ROI_BOX_HEAD", "MODEL.ROI_BOX_HEAD.NAME", (_MODELS + "roi_heads.box_head",))
ROI_MASK_HEAD_REGISTRY = Registry(
    "ROI_MASK_HEAD", "MODEL.ROI_MASK_HEAD.NAME", (_MODELS + "roi_heads.mask_head",)
)
SEM_SEG_HEADS_REGISTRY = Registry(
    "SEM_SEG_HEADS", "MODEL.SEM_SEG_HEAD.NAME", (_MODELS + "meta_arch.semantic_seg", _MODELS + "deeplab.semantic_seg")
)

ALL_REGISTRIES: tuple[Registry, ...] = (
    META_ARCH_REGISTRY, BACKBONE_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ANCHOR_GENERATOR_REGISTRY,
    RPN_HEAD_REGISTRY, ROI_HEADS_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY, SEM_SEG_HEADS_REGISTRY,
)


def load_builtin_parts() -> None:
    """Imports every module that registers a built-in part (e.g. before patching their globals)."""
    for registry in ALL_REGISTRIES:
        registry._load_builtins()


def build_from_registry(registry: Registry, name: str, cfg: Any, *args: Any) -> Any:
    """``registry.get(name).from_config(cfg, *args)`` (or ``registry.get(name)(cfg, *args)`` for a
    builder function, as the backbone registry holds)."""
    entry: Callable[..., Any] = registry.get(name)
    from_config = getattr(entry, "from_config", None)
    return from_config(cfg, *args) if from_config is not None else entry(cfg, *args)
