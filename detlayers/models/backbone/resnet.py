"""detectron2's ResNet backbone (``modeling/backbone/resnet.py``) in Flax, NHWC.

Module names equal detectron2's, so :func:`detlayers.load_torch_state_dict` maps a detectron2
state dict one to one: ``stem.conv1`` (+ ``.norm``), ``res2_0.conv1`` <-> ``res2.0.conv1``,
``res2_0.shortcut`` ... Stages with ``DEFORM_ON_PER_STAGE`` build ``DeformBottleneckBlock`` (its
``conv2_offset`` and deformable ``conv2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax import lax

from detlayers.deform_conv import DeformConv, ModulatedDeformConv
from detlayers.models.registry import BACKBONE_REGISTRY
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

__all__ = [
    "BasicStem", "DeepLabStem", "BottleneckBlock", "DeformBottleneckBlock", "BasicBlock", "ResNet",
    "build_resnet_backbone",
]

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
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = Conv2d(self.in_channels, self.out_channels, 7, stride=2, padding=3, bias=False,
                   norm=self.norm, name="conv1")(x, train=train)
        return max_pool_3x3_s2_p1(jax.nn.relu(x))


class DeepLabStem(nn.Module):
    """DeepLab's stem (``projects/DeepLab``'s ``DeepLabStem``): three 3x3 convs (no bias) with
    norm + ReLU, ``conv1`` stride 2 to ``out_channels // 2``, ``conv2`` keeping that width,
    ``conv3`` to ``out_channels``, then the 3x3/2 max pool with padding 1: stride 4, as
    :class:`BasicStem`."""

    in_channels: int = 3
    out_channels: int = 128
    norm: str = "BN"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        half = self.out_channels // 2
        for name, c_in, c_out, stride in (("conv1", self.in_channels, half, 2), ("conv2", half, half, 1),
                                          ("conv3", half, self.out_channels, 1)):
            x = jax.nn.relu(Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, norm=self.norm,
                                   name=name)(x, train=train))
        return max_pool_3x3_s2_p1(x)


STEM_TYPES = ("basic", "deeplab")


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
    def __call__(self, x: Array, train: bool = False) -> Array:
        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        if self.in_channels != self.out_channels:
            shortcut = Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=False,
                              norm=self.norm, name="shortcut")(x, train=train)
        else:
            shortcut = x
        out = Conv2d(self.in_channels, self.bottleneck_channels, 1, stride=stride_1x1, bias=False,
                     norm=self.norm, name="conv1")(x, train=train)
        out = jax.nn.relu(out)
        out = jax.nn.relu(self._conv2(out, stride_3x3, train))
        out = Conv2d(self.bottleneck_channels, self.out_channels, 1, bias=False, norm=self.norm,
                     name="conv3")(out, train=train)
        return jax.nn.relu(out + shortcut)

    def _conv2(self, out: Array, stride: int, train: bool) -> Array:
        """The 3x3 ``conv2`` (with the norm, before the ReLU); subclasses change only this."""
        return Conv2d(self.bottleneck_channels, self.bottleneck_channels, 3, stride=stride,
                      padding=self.dilation, dilation=self.dilation, groups=self.num_groups, bias=False,
                      norm=self.norm, name="conv2")(out, train=train)


def split_offset_mask(offset_mask: Array, deform_num_groups: int) -> tuple[Array, Array]:
    """detectron2's modulated ``conv2_offset`` output ``[N, H, W, 27 * dg]`` -> (offset
    ``[N, H, W, 18 * dg]``, mask ``[N, H, W, 9 * dg]``): the first two thirds, kept in their
    channel order (detectron2 splits them into its "x" and "y" thirds and concatenates them back
    unchanged, so they are the ``(y, x)``-interleaved offsets the kernel reads), and the sigmoid of
    the last third."""
    taps = 9 * deform_num_groups
    offset = offset_mask[..., :2 * taps]
    return offset, jax.nn.sigmoid(offset_mask[..., 2 * taps:])


class DeformBottleneckBlock(BottleneckBlock):
    """detectron2's ``DeformBottleneckBlock``: :class:`BottleneckBlock` whose 3x3 ``conv2`` is a
    deformable convolution (``DeformConv``, or ``ModulatedDeformConv`` when ``deform_modulated``;
    no bias, ``norm``) sampling at offsets from ``conv2_offset``, a biased 3x3 conv (same stride
    and dilation) on ``conv1``'s output giving ``18 * deform_num_groups`` offset channels, or
    ``27 * deform_num_groups`` with the modulation mask (see ``split_offset_mask`` in this module). Offset
    channels are in detectron2's order, which detlayers' deformable convolutions take as is."""

    deform_modulated: bool = False
    deform_num_groups: int = 1

    def _conv2(self, out: Array, stride: int, train: bool) -> Array:
        offset_channels = (27 if self.deform_modulated else 18) * self.deform_num_groups
        offset_mask = Conv2d(self.bottleneck_channels, offset_channels, 3, stride=stride,
                             padding=self.dilation, dilation=self.dilation, name="conv2_offset")(out)
        geometry = dict(stride=stride, padding=self.dilation, dilation=self.dilation, groups=self.num_groups,
                        deformable_groups=self.deform_num_groups, bias=False, norm=self.norm, name="conv2")
        if self.deform_modulated:
            offset, mask = split_offset_mask(offset_mask, self.deform_num_groups)
            return ModulatedDeformConv(self.bottleneck_channels, self.bottleneck_channels, 3, **geometry)(
                out, offset, mask, train=train)
        return DeformConv(self.bottleneck_channels, self.bottleneck_channels, 3, **geometry)(
            out, offset_mask, train=train)


class BasicBlock(nn.Module):
    """detectron2's ``BasicBlock`` (ResNet-18/34): two 3x3 convs and a projection shortcut."""

    in_channels: int
    out_channels: int
    stride: int = 1
    norm: str = "FrozenBN"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.in_channels != self.out_channels:
            shortcut = Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=False,
                              norm=self.norm, name="shortcut")(x, train=train)
        else:
            shortcut = x
        out = Conv2d(self.in_channels, self.out_channels, 3, stride=self.stride, padding=1, bias=False,
                     norm=self.norm, name="conv1")(x, train=train)
        out = jax.nn.relu(out)
        out = Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=False, norm=self.norm,
                     name="conv2")(out, train=train)
        return jax.nn.relu(out + shortcut)


class ResNet(nn.Module):
    """detectron2's ResNet (``build_resnet_backbone``): ``stem`` then stages ``res2`` ... ``res5``.

    ``__call__(x [N, H, W, in_channels], train=False) -> {"res2": [N, H/4, W/4, C2], ..., "res5":
    ...}`` (the stages in ``out_features``; :meth:`output_shape` gives their channels and strides).
    ``train`` is handed to every norm: ``BN``/``SyncBN`` normalise with batch statistics (and update
    their running statistics when ``batch_stats`` is mutable); FrozenBN and GN ignore it, and so do
    the frozen stages (``freeze_at``), which keep normalising with their running statistics as
    detectron2's ``freeze()`` turns their norms into FrozenBatchNorm. Depth 18/34 builds
    ``BasicBlock`` stages, 50/101/152 ``BottleneckBlock`` stages of ``num_groups x width_per_group``
    bottleneck channels. A dilated stage (``res4_dilation``, ``res5_dilation`` above 1) keeps its
    input's stride; ``res5_multi_grid`` multiplies the dilation of each res5 block; ``stem_type``
    "deeplab" is :class:`DeepLabStem` (these three are what DeepLab's
    ``build_resnet_deeplab_backbone`` sets; the plain builder allows ``res5_dilation`` 1 or 2).
    ``freeze_at`` stops gradients as detectron2's ``freeze()`` does: 1 freezes the stem, ``k >= 2``
    the stem and stages ``res2`` ... ``res{k}`` (``lax.stop_gradient`` on their outputs; their
    parameters then get zero gradients).
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
    deform_on_per_stage: Sequence[bool] = (False, False, False, False)
    deform_modulated: bool = False
    deform_num_groups: int = 1
    # DeepLab's backbone (``build_resnet_deeplab_backbone``): its stem, a dilated res4 and the
    # res5 "multi-grid" (block i of res5 dilated ``res5_dilation * res5_multi_grid[i]``; None: every
    # block ``res5_dilation``, as the plain ResNet).
    stem_type: str = "basic"
    res4_dilation: int = 1
    res5_multi_grid: Sequence[int] | None = None

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec | None = None) -> ResNet:
        """``MODEL.RESNETS.*`` and ``MODEL.BACKBONE.FREEZE_AT``; ``input_shape.channels`` (default
        ``len(MODEL.PIXEL_MEAN)``) is the input's channel count."""
        resnets = cfg.MODEL.RESNETS
        deform = tuple(bool(v) for v in resnets.DEFORM_ON_PER_STAGE)
        if len(deform) != 4:
            raise ValueError(f"ResNet: MODEL.RESNETS.DEFORM_ON_PER_STAGE needs 4 entries (res2..res5), got {deform}")
        if any(deform) and resnets.DEPTH < 50:
            raise ValueError("ResNet: MODEL.RESNETS.DEFORM_ON_PER_STAGE is unsupported for R18/R34 (as in detectron2)")
        if isinstance(resnets.DEFORM_NUM_GROUPS, bool) or resnets.DEFORM_NUM_GROUPS < 1:
            raise ValueError(f"ResNet: MODEL.RESNETS.DEFORM_NUM_GROUPS must be a positive int, "
                             f"got {resnets.DEFORM_NUM_GROUPS}")
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
            out_features=tuple(resnets.OUT_FEATURES), in_channels=in_channels, deform_on_per_stage=deform,
            deform_modulated=bool(resnets.DEFORM_MODULATED), deform_num_groups=int(resnets.DEFORM_NUM_GROUPS),
        )

    @property
    def size_divisibility(self) -> int:
        """0, detectron2's ``Backbone.size_divisibility`` of a plain ResNet: a batch is padded to
        its largest image only (an FPN asks for multiples of 32)."""
        return 0

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the outputs (detectron2's ``output_shape()``)."""
        shapes = {"stem": ShapeSpec(channels=self.stem_out_channels, stride=4)}
        stride = 4
        for stage in range(2, 6):
            if stage > 2 and self._stage_dilation(stage) == 1:  # a dilated stage keeps its input's stride
                stride *= 2
            shapes[f"res{stage}"] = ShapeSpec(channels=self.res2_out_channels * 2 ** (stage - 2), stride=stride)
        unknown = [name for name in self.out_features if name not in shapes]
        if unknown:
            raise ValueError(f"ResNet: out_features {unknown} are not among {list(shapes)}")
        return {name: shapes[name] for name in self.out_features}

    def _stage_dilation(self, stage: int) -> int:
        """The dilation of stage ``res{stage}`` (before the res5 multi-grid)."""
        return {4: self.res4_dilation, 5: self.res5_dilation}.get(stage, 1)

    def _block_dilation(self, stage: int, block_index: int) -> int:
        """The 3x3 conv's dilation in block ``block_index`` of ``res{stage}``."""
        dilation = self._stage_dilation(stage)
        if stage == 5 and self.res5_multi_grid is not None:
            return dilation * int(self.res5_multi_grid[block_index])
        return dilation

    def _check_fields(self) -> None:
        if self.depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet: depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {self.depth}")
        if self.res5_dilation not in (1, 2, 4):
            raise ValueError(f"ResNet: res5_dilation must be 1, 2 or 4, got {self.res5_dilation}")
        if self.res4_dilation not in (1, 2):
            raise ValueError(f"ResNet: res4_dilation must be 1 or 2, got {self.res4_dilation}")
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"ResNet: stem_type must be one of {STEM_TYPES}, got {self.stem_type!r}")
        res5_blocks = _BLOCKS_PER_STAGE[self.depth][3]
        if self.res5_multi_grid is not None and len(self.res5_multi_grid) != res5_blocks:
            raise ValueError(f"ResNet: res5_multi_grid needs one entry per res5 block ({res5_blocks}), "
                             f"got {tuple(self.res5_multi_grid)}")

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        self._check_fields()
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ResNet: input must be NHWC [N, H, W, {self.in_channels}], got shape {x.shape}")
        outputs = {}
        # frozen stages normalise with running statistics, as detectron2's freeze() makes their
        # norms FrozenBatchNorm: their batch statistics neither normalise nor update anything
        stem = DeepLabStem if self.stem_type == "deeplab" else BasicStem
        x = stem(self.in_channels, self.stem_out_channels, self.norm, name="stem")(x, train and self.freeze_at < 1)
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
            first_stride = 1 if stage_index == 0 or self._stage_dilation(stage) > 1 else 2
            if self.depth < 50:  # BasicBlock stages: RES2_OUT_CHANNELS (64 in detectron2) doubling
                out_channels = self.res2_out_channels * 2**stage_index
            stage_trains = train and self.freeze_at < stage
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                dilation = self._block_dilation(stage, block_index)
                name = f"res{stage}_{block_index}"
                if self.depth >= 50 and self.deform_on_per_stage[stage_index]:
                    x = DeformBottleneckBlock(in_channels, out_channels, bottleneck, stride, self.num_groups,
                                              self.norm, self.stride_in_1x1, dilation, self.deform_modulated,
                                              self.deform_num_groups, name=name)(x, stage_trains)
                elif self.depth >= 50:
                    x = BottleneckBlock(in_channels, out_channels, bottleneck, stride, self.num_groups,
                                        self.norm, self.stride_in_1x1, dilation, name=name)(x, stage_trains)
                else:
                    x = BasicBlock(in_channels, out_channels, stride, self.norm, name=name)(x, stage_trains)
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
