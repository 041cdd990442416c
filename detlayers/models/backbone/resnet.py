"""detectron2's ResNet backbone (``modeling/backbone/resnet.py``) in Flax, NHWC.

Module names equal detectron2's, so :func:`detlayers.load_torch_state_dict` maps a detectron2
state dict one to one: ``stem.conv1`` (+ ``.norm``), ``res2_0.conv1`` <-> ``res2.0.conv1``,
``res2_0.shortcut`` ... Deformable stages are not built (``DEFORM_ON_PER_STAGE`` must be all False).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax import lax

from detlayers.models.registry import BACKBONE_REGISTRY
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

__all__ = ["BasicStem", "BottleneckBlock", "BasicBlock", "ResNet", "build_resnet_backbone"]

Array = jax.Array

_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def max_pool_3x3_s2_p1(x: Array) -> Array:
    """``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)`` on NHWC (padding never wins)."""
    # a Python -inf init lets JAX recognise the max monoid (differentiable reduce_window_max)
    return lax.reduce_window(x, -np.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicStem(nn.Module):
    """``conv1`` 7x7/2 (no bias) + norm + ReLU, then 3x3/2 max pool with padding 1: stride 4."""

    in_channels: int = 3
    out_channels: int = 64
    norm: str = "FrozenBN"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Conv2d(self.in_channels, self.out_channels, 7, stride=2, padding=3, bias=False,
                   norm=self.norm, name="conv1")(x)
        return max_pool_3x3_s2_p1(jax.nn.relu(x))


class BottleneckBlock(nn.Module):
    """detectron2's ``BottleneckBlock``: 1x1 -> 3x3 -> 1x1 with a projection ``shortcut`` when
    the channel count changes. ``stride_in_1x1`` puts the stride on the first 1x1 conv (MSRA
    weights) instead of the 3x3."""

    in_channels: int
    out_channels: int
    bottleneck_channels: int
    stride: int = 1
    num_groups: int = 1
    norm: str = "FrozenBN"
    stride_in_1x1: bool = False
    dilation: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        if self.in_channels != self.out_channels:
            shortcut = Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=False,
                              norm=self.norm, name="shortcut")(x)
        else:
            shortcut = x
        out = Conv2d(self.in_channels, self.bottleneck_channels, 1, stride=stride_1x1, bias=False,
                     norm=self.norm, name="conv1")(x)
        out = jax.nn.relu(out)
        out = Conv2d(self.bottleneck_channels, self.bottleneck_channels, 3, stride=stride_3x3,
                     padding=self.dilation, dilation=self.dilation, groups=self.num_groups, bias=False,
                     norm=self.norm, name="conv2")(out)
        out = jax.nn.relu(out)
        out = Conv2d(self.bottleneck_channels, self.out_channels, 1, bias=False, norm=self.norm,
                     name="conv3")(out)
        return jax.nn.relu(out + shortcut)


class BasicBlock(nn.Module):
    """detectron2's ``BasicBlock`` (ResNet-18/34): two 3x3 convs and a projection shortcut."""

    in_channels: int
    out_channels: int
    stride: int = 1
    norm: str = "FrozenBN"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.in_channels != self.out_channels:
            shortcut = Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=False,
                              norm=self.norm, name="shortcut")(x)
        else:
            shortcut = x
        out = Conv2d(self.in_channels, self.out_channels, 3, stride=self.stride, padding=1, bias=False,
                     norm=self.norm, name="conv1")(x)
        out = jax.nn.relu(out)
        out = Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=False, norm=self.norm,
                     name="conv2")(out)
        return jax.nn.relu(out + shortcut)


class ResNet(nn.Module):
    """detectron2's ResNet (``build_resnet_backbone``): ``stem`` then stages ``res2`` ... ``res5``.

    ``__call__(x [N, H, W, in_channels]) -> {"res2": [N, H/4, W/4, C2], ..., "res5": ...}`` (the
    stages in ``out_features``; :meth:`output_shape` gives their channels and strides). Depth 18/34
    builds ``BasicBlock`` stages, 50/101/152 ``BottleneckBlock`` stages of ``num_groups x
    width_per_group`` bottleneck channels. ``freeze_at`` stops gradients as detectron2's
    ``freeze()`` does: 1 freezes the stem, ``k >= 2`` the stem and stages ``res2`` ... ``res{k}``
    (``lax.stop_gradient`` on their outputs; their parameters then get zero gradients).
    """

    depth: int = 50
    norm: str = "FrozenBN"
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    stride_in_1x1: bool = True
    res5_dilation: int = 1
    freeze_at: int = 0
    out_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    in_channels: int = 3

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec | None = None) -> ResNet:
        """``MODEL.RESNETS.*`` and ``MODEL.BACKBONE.FREEZE_AT``; ``input_shape.channels`` (default
        ``len(MODEL.PIXEL_MEAN)``) is the input's channel count."""
        resnets = cfg.MODEL.RESNETS
        if any(resnets.DEFORM_ON_PER_STAGE):
            raise ValueError("ResNet: MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported (all False)")
        if resnets.DEPTH not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet: MODEL.RESNETS.DEPTH must be one of {sorted(_BLOCKS_PER_STAGE)}, "
                             f"got {resnets.DEPTH}")
        if resnets.RES5_DILATION not in (1, 2):
            raise ValueError(f"ResNet: MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {resnets.RES5_DILATION}")
        in_channels = len(cfg.MODEL.PIXEL_MEAN) if input_shape is None else input_shape.channels
        return cls(
            depth=resnets.DEPTH, norm=resnets.NORM, num_groups=resnets.NUM_GROUPS,
            width_per_group=resnets.WIDTH_PER_GROUP, stem_out_channels=resnets.STEM_OUT_CHANNELS,
            res2_out_channels=resnets.RES2_OUT_CHANNELS, stride_in_1x1=resnets.STRIDE_IN_1X1,
            res5_dilation=resnets.RES5_DILATION, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            out_features=tuple(resnets.OUT_FEATURES), in_channels=in_channels,
        )

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the outputs (detectron2's ``output_shape()``)."""
        shapes = {"stem": ShapeSpec(channels=self.stem_out_channels, stride=4)}
        stride = 4
        for stage in range(2, 6):
            if not (stage == 5 and self.res5_dilation == 2) and stage > 2:
                stride *= 2
            shapes[f"res{stage}"] = ShapeSpec(channels=self.res2_out_channels * 2 ** (stage - 2), stride=stride)
        unknown = [name for name in self.out_features if name not in shapes]
        if unknown:
            raise ValueError(f"ResNet: out_features {unknown} are not among {list(shapes)}")
        return {name: shapes[name] for name in self.out_features}

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        if self.depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet: depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {self.depth}")
        if self.res5_dilation not in (1, 2):
            raise ValueError(f"ResNet: res5_dilation must be 1 or 2, got {self.res5_dilation}")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ResNet: input must be NHWC [N, H, W, {self.in_channels}], got shape {x.shape}")
        outputs = {}
        x = BasicStem(self.in_channels, self.stem_out_channels, self.norm, name="stem")(x)
        if self.freeze_at >= 1:
            x = lax.stop_gradient(x)
        if "stem" in self.out_features:
            outputs["stem"] = x
        in_channels = self.stem_out_channels
        out_channels = self.res2_out_channels
        bottleneck = self.num_groups * self.width_per_group
        last_stage = max(int(name[3:]) for name in self.out_features if name.startswith("res"))
        for stage_index, num_blocks in enumerate(_BLOCKS_PER_STAGE[self.depth]):
            stage = stage_index + 2
            if stage > last_stage:
                break
            dilation = self.res5_dilation if stage == 5 else 1
            first_stride = 1 if stage_index == 0 or (stage == 5 and dilation == 2) else 2
            if self.depth < 50:  # BasicBlock stages: RES2_OUT_CHANNELS (64 in detectron2) doubling
                out_channels = self.res2_out_channels * 2**stage_index
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                name = f"res{stage}_{block_index}"
                if self.depth >= 50:
                    x = BottleneckBlock(in_channels, out_channels, bottleneck, stride, self.num_groups,
                                        self.norm, self.stride_in_1x1, dilation, name=name)(x)
                else:
                    x = BasicBlock(in_channels, out_channels, stride, self.norm, name=name)(x)
                in_channels = out_channels
            if self.freeze_at >= stage:
                x = lax.stop_gradient(x)
            if f"res{stage}" in self.out_features:
                outputs[f"res{stage}"] = x
            out_channels *= 2
            bottleneck *= 2
        return outputs


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> ResNet:
    """detectron2's ``build_resnet_backbone``: :meth:`ResNet.from_config`."""
    return ResNet.from_config(cfg, input_shape)
