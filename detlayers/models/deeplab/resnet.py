"""detectron2's DeepLab backbone (``projects/DeepLab/deeplab/resnet.py``,
``build_resnet_deeplab_backbone``): the ResNet of :mod:`detlayers.models.backbone.resnet` with
DeepLab's three-conv stem, a dilated res4 and the res5 multi-grid."""

from __future__ import annotations

from typing import Any

from detlayers.models.backbone.resnet import STEM_TYPES, ResNet
from detlayers.models.registry import BACKBONE_REGISTRY
from detlayers.shape_spec import ShapeSpec

__all__ = ["build_resnet_deeplab_backbone"]


@BACKBONE_REGISTRY.register()
def build_resnet_deeplab_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> ResNet:
    """detectron2's ``build_resnet_deeplab_backbone``:
    :meth:`detlayers.models.backbone.resnet.ResNet.from_config` plus
    ``MODEL.RESNETS.STEM_TYPE`` (``"basic"``: one 7x7 conv; ``"deeplab"``: three 3x3 convs),
    ``RES4_DILATION`` (1 or 2), ``RES5_DILATION`` (1, 2 or 4; 4 when res4 is dilated) and
    ``RES5_MULTI_GRID`` (res5 block ``i`` dilated ``RES5_DILATION * RES5_MULTI_GRID[i]``).
    The keys exist once :func:`detlayers.models.config.add_deeplab_config` has added them."""
    resnets = cfg.MODEL.RESNETS
    for key in ("STEM_TYPE", "RES4_DILATION", "RES5_MULTI_GRID"):
        if key not in resnets:
            raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.{key} is missing "
                             "(call add_deeplab_config(cfg) before merging a DeepLab config)")
    if resnets.STEM_TYPE not in STEM_TYPES:
        raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.STEM_TYPE must be one of {STEM_TYPES}, "
                         f"got {resnets.STEM_TYPE!r}")
    if resnets.RES4_DILATION not in (1, 2):
        raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.RES4_DILATION must be 1 or 2, "
                         f"got {resnets.RES4_DILATION}")
    if resnets.RES5_DILATION not in (1, 2, 4):
        raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.RES5_DILATION must be 1, 2 or 4, "
                         f"got {resnets.RES5_DILATION}")
    if resnets.RES4_DILATION == 2 and resnets.RES5_DILATION != 4:
        raise ValueError("build_resnet_deeplab_backbone: MODEL.RESNETS.RES5_DILATION must be 4 when "
                         f"RES4_DILATION is 2, got {resnets.RES5_DILATION}")
    if resnets.DEPTH < 50:
        raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.DEPTH must be 50, 101 or 152 "
                         f"(bottleneck blocks), got {resnets.DEPTH}")
    multi_grid = tuple(int(v) for v in resnets.RES5_MULTI_GRID)
    if len(multi_grid) != 3 or min(multi_grid) < 1:
        raise ValueError(f"build_resnet_deeplab_backbone: MODEL.RESNETS.RES5_MULTI_GRID needs 3 positive "
                         f"entries (one per res5 block), got {list(resnets.RES5_MULTI_GRID)}")
    # ResNet.from_config checks the shared keys; it allows RES5_DILATION 1 or 2 only (detectron2's
    # plain ResNet), so it reads a copy with 1 and the dilation is set afterwards.
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.RES5_DILATION = 1
    return ResNet.from_config(plain, input_shape).clone(
        stem_type=resnets.STEM_TYPE, res4_dilation=int(resnets.RES4_DILATION),
        res5_dilation=int(resnets.RES5_DILATION), res5_multi_grid=multi_grid,
    )
