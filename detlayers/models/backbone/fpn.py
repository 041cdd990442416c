"""detectron2's FPN (``modeling/backbone/fpn.py``) in Flax, NHWC: top-down pathway, lateral and
output convs, and the top blocks ``LastLevelMaxPool`` (P6 from P5) and ``LastLevelP6P7`` (P6, P7
from C5 or P5, RetinaNet's).

Submodules ``bottom_up``, ``fpn_lateral{s}``, ``fpn_output{s}`` and ``top_block.p6``/``p7``: the
state-dict names of detectron2's ``build_resnet_fpn_backbone`` /
``build_retinanet_resnet_fpn_backbone``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from detlayers.interpolate import interpolate
from detlayers.models.backbone.resnet import build_resnet_backbone
from detlayers.models.registry import BACKBONE_REGISTRY
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = [
    "FPN", "LastLevelMaxPool", "LastLevelP6P7", "build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone",
]


class LastLevelMaxPool(nn.Module):
    """detectron2's ``LastLevelMaxPool``: P6 = ``F.max_pool2d(P5, kernel_size=1, stride=2)``."""

    in_feature: str = "p5"

    @property
    def num_levels(self) -> int:
        return 1

    def __call__(self, x: Array) -> list[Array]:
        return [x[:, ::2, ::2, :]]


class LastLevelP6P7(nn.Module):
    """detectron2's ``LastLevelP6P7``: ``p6`` 3x3/2 conv of ``in_feature`` (C5 ``"res5"`` or P5
    ``"p5"``), ``p7`` 3x3/2 conv of ``relu(P6)``."""

    in_channels: int
    out_channels: int
    in_feature: str = "res5"

    @property
    def num_levels(self) -> int:
        return 2

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        p6 = Conv2d(self.in_channels, self.out_channels, 3, stride=2, padding=1, name="p6")(x)
        p7 = Conv2d(self.out_channels, self.out_channels, 3, stride=2, padding=1, name="p7")(jax.nn.relu(p6))
        return [p6, p7]


class FPN(nn.Module):
    """detectron2's ``FPN`` over ``bottom_up`` (a module with ``output_shape()``, e.g. ResNet).

    Fields: ``in_features`` (bottom-up outputs, increasing stride, consecutive powers of 2),
    ``out_channels``, ``norm`` (``""``: biased convs, otherwise that norm without bias),
    ``top_block`` (``LastLevelMaxPool``/``LastLevelP6P7``/None), ``fuse_type`` (``"sum"``/``"avg"``).

    ``__call__(x [N, H, W, C], train=False) -> {"p2": [N, H/4, W/4, out_channels], ...}``:
    ``p{log2 stride}`` for each input feature, then the top block's levels; ``train`` goes to
    the lateral and output norms and to ``bottom_up`` (called as ``bottom_up(x, train=True)`` in
    training, ``bottom_up(x)`` otherwise). H and W must be multiples of the largest input stride
    (:attr:`size_divisibility`, 32 for res5) so that every 2x nearest upsample meets its lateral
    map, as detectron2's ``ImageList`` padding guarantees.
    """

    bottom_up: nn.Module
    in_features: Sequence[str]
    out_channels: int
    norm: str = ""
    top_block: nn.Module | None = None
    fuse_type: str = "sum"

    def _in_strides(self) -> list[int]:
        shapes = self.bottom_up.output_shape()
        missing = [name for name in self.in_features if name not in shapes]
        if missing:
            raise ValueError(f"FPN: in_features {missing} are not outputs of the bottom-up network {list(shapes)}")
        strides = [int(shapes[name].stride) for name in self.in_features]
        for previous, stride in zip(strides, strides[1:]):
            if stride != 2 * previous:
                raise ValueError(f"FPN: the strides of in_features {list(self.in_features)} must double from one "
                                 f"to the next, got {strides}")
        return strides

    @property
    def size_divisibility(self) -> int:
        return self._in_strides()[-1]

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{"p2": ShapeSpec(out_channels, stride=4), ...}`` including the top block's levels."""
        stages = [int(math.log2(s)) for s in self._in_strides()]
        if self.top_block is not None:
            stages += [stages[-1] + k + 1 for k in range(self.top_block.num_levels)]
        return {f"p{s}": ShapeSpec(channels=self.out_channels, stride=2**s) for s in stages}

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        if self.fuse_type not in ("sum", "avg"):
            raise ValueError(f"FPN: fuse_type must be 'sum' or 'avg', got {self.fuse_type!r}")
        divisor = self.size_divisibility
        if x.shape[1] % divisor or x.shape[2] % divisor:
            raise ValueError(f"FPN: input height and width must be multiples of {divisor}, got shape {x.shape}")
        # a bottom-up network without a train argument still serves inference
        features = self.bottom_up(x, train=True) if train else self.bottom_up(x)
        in_shapes = self.bottom_up.output_shape()
        stages = [int(math.log2(s)) for s in self._in_strides()]
        use_bias = self.norm == ""
        laterals, output_convs = {}, {}
        for name, s in zip(self.in_features, stages):
            laterals[s] = Conv2d(in_shapes[name].channels, self.out_channels, 1, bias=use_bias,
                                 norm=self.norm or None, name=f"fpn_lateral{s}")
            output_convs[s] = Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=use_bias,
                                     norm=self.norm or None, name=f"fpn_output{s}")
        by_stage = dict(zip(stages, self.in_features))
        results = {}
        top = stages[-1]
        prev = laterals[top](features[by_stage[top]], train=train)
        results[f"p{top}"] = output_convs[top](prev, train=train)
        for s in reversed(stages[:-1]):
            top_down = interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = laterals[s](features[by_stage[s]], train=train) + top_down
            if self.fuse_type == "avg":
                prev = prev / 2
            results[f"p{s}"] = output_convs[s](prev, train=train)
        if self.top_block is not None:
            source = self.top_block.in_feature
            if source in features:
                top_input = features[source]
            elif source in results:
                top_input = results[source]
            else:
                raise ValueError(f"FPN: top_block.in_feature {source!r} is neither a bottom-up output "
                                 f"{list(features)} nor an FPN output {list(results)}")
            for k, level in enumerate(self.top_block(top_input)):
                results[f"p{top + k + 1}"] = level
        return {k: results[k] for k in sorted(results, key=lambda n: int(n[1:]))}


def _check_fpn_config(cfg: Any) -> None:
    if cfg.MODEL.RESNETS.RES5_DILATION != 1:
        raise ValueError("FPN: MODEL.RESNETS.RES5_DILATION must be 1 (the FPN levels need stride 32 for res5)")


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> FPN:
    """detectron2's ``build_resnet_fpn_backbone``: ResNet, ``MODEL.FPN.*``, ``LastLevelMaxPool``."""
    _check_fpn_config(cfg)
    fpn = cfg.MODEL.FPN
    return FPN(bottom_up=build_resnet_backbone(cfg, input_shape), in_features=tuple(fpn.IN_FEATURES),
               out_channels=fpn.OUT_CHANNELS, norm=fpn.NORM, top_block=LastLevelMaxPool(), fuse_type=fpn.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> FPN:
    """detectron2's ``build_retinanet_resnet_fpn_backbone``: ResNet, ``MODEL.FPN.*``,
    ``LastLevelP6P7`` from C5 (``res5``)."""
    _check_fpn_config(cfg)
    fpn = cfg.MODEL.FPN
    bottom_up = build_resnet_backbone(cfg, input_shape)
    shapes = bottom_up.output_shape()
    if "res5" not in shapes:
        raise ValueError("build_retinanet_resnet_fpn_backbone: MODEL.RESNETS.OUT_FEATURES must include 'res5'")
    top_block = LastLevelP6P7(shapes["res5"].channels, fpn.OUT_CHANNELS)
    return FPN(bottom_up=bottom_up, in_features=tuple(fpn.IN_FEATURES), out_channels=fpn.OUT_CHANNELS,
               norm=fpn.NORM, top_block=top_block, fuse_type=fpn.FUSE_TYPE)
