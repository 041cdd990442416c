"""``add_deeplab_config(cfg)``: the keys detectron2's DeepLab project (``projects/DeepLab``) adds
to ``get_cfg()`` before its YAML files (DeepLabV3 / DeepLabV3+) can be merged."""

from __future__ import annotations

from typing import Any

from detlayers.models.config.node import CfgNode

__all__ = ["add_deeplab_config"]

# (dotted key, default) in the order the project adds them; each key is set (added or replaced).
_DEEPLAB_KEYS: tuple[tuple[str, Any], ...] = (
    # Random crops are retried until no single class covers more than this fraction of the crop.
    ("INPUT.CROP.SINGLE_CATEGORY_MAX_AREA", 1.0),
    # The "WarmupPolyLR" schedule.
    ("SOLVER.POLY_LR_POWER", 0.9),
    ("SOLVER.POLY_LR_CONSTANT_ENDING", 0.0),
    # "cross_entropy" or "hard_pixel_mining".
    ("MODEL.SEM_SEG_HEAD.LOSS_TYPE", "hard_pixel_mining"),
    # The DeepLabV3+ decoder's low-level features and their projection widths.
    ("MODEL.SEM_SEG_HEAD.PROJECT_FEATURES", ["res2"]),
    ("MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [48]),
    ("MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 256),
    ("MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", [6, 12, 18]),
    ("MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", 0.1),
    ("MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV", False),
    ("MODEL.RESNETS.RES4_DILATION", 1),
    ("MODEL.RESNETS.RES5_MULTI_GRID", [1, 2, 4]),
    # "basic" (one 7x7 conv) or "deeplab" (three 3x3 convs).
    ("MODEL.RESNETS.STEM_TYPE", "deeplab"),
)


def add_deeplab_config(cfg: CfgNode) -> None:
    """Add (in place) the DeepLab keys to a ``get_cfg()`` config, as detectron2's
    ``deeplab.add_deeplab_config`` does; call it before ``merge_from_file`` of a DeepLab YAML."""
    if not isinstance(cfg, CfgNode):
        raise TypeError(f"add_deeplab_config: cfg must be a CfgNode (get_cfg()), got {type(cfg).__name__}")
    for key, value in _DEEPLAB_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node.get(part), CfgNode):
                raise KeyError(f"add_deeplab_config: cfg has no node {part!r} on the way to {key} (use get_cfg())")
            node = node[part]
        setattr(node, leaf, value)
