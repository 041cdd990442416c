"""detectron2's box head ``FastRCNNConvFCHead`` (``modeling/roi_heads/box_head.py``), NHWC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.registry import ROI_BOX_HEAD_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d, Linear

Array = jax.Array

__all__ = ["FastRCNNConvFCHead", "build_box_head", "conv3x3_relu_stack"]


def conv3x3_relu_stack(x: Array, channels: int, conv_dims: Sequence[int], norm: str, prefix: str) -> Array:
    """3x3 ``Conv2d`` (``conv_dims[k]`` wide, ``norm``) + ReLU layers named ``{prefix}1``,
    ``{prefix}2``, ... (submodules of the calling compact method; biased only without a norm, as
    in detectron2's heads). ``x [M, S, S, channels]``."""
    for k, dim in enumerate(conv_dims):
        x = Conv2d(channels, dim, 3, padding=1, bias=not norm, norm=norm or None, activation=jax.nn.relu,
                   name=f"{prefix}{k + 1}")(x)
        channels = dim
    return x


@ROI_BOX_HEAD_REGISTRY.register()
class FastRCNNConvFCHead(nn.Module):
    """``conv{k}`` 3x3 + ReLU (``conv_dims``, ``conv_norm``), then flatten and ``fc{k}`` + ReLU
    (``fc_dims``). ``input_shape``: the pooled ROI features ``[M, S, S, C]`` (channels, height, width).

    ``__call__(x [M, S, S, C]) -> [M, fc_dims[-1]]`` (or the conv output when there is no fc).
    detectron2 flattens NCHW ``[C, S, S]``; the NHWC input is transposed first so that ``fc1``
    takes detectron2's weight unchanged.
    """

    input_shape: ShapeSpec
    conv_dims: Sequence[int] = ()
    fc_dims: Sequence[int] = (1024, 1024)
    conv_norm: str = ""

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec) -> FastRCNNConvFCHead:
        """``MODEL.ROI_BOX_HEAD.{NUM_CONV, CONV_DIM, NUM_FC, FC_DIM, NORM}``."""
        head = cfg.MODEL.ROI_BOX_HEAD
        return cls(input_shape=input_shape, conv_dims=(head.CONV_DIM,) * head.NUM_CONV,
                   fc_dims=(head.FC_DIM,) * head.NUM_FC, conv_norm=head.NORM)

    def output_shape(self) -> ShapeSpec:
        """``ShapeSpec(channels=fc_dims[-1])``, or the conv output's shape without fc layers."""
        if self.fc_dims:
            return ShapeSpec(channels=self.fc_dims[-1])
        channels = self.conv_dims[-1] if self.conv_dims else self.input_shape.channels
        return ShapeSpec(channels=channels, height=self.input_shape.height, width=self.input_shape.width)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = conv3x3_relu_stack(x, self.input_shape.channels, self.conv_dims, self.conv_norm, "conv")
        if self.fc_dims:
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
            features = x.shape[-1]
            for k, dim in enumerate(self.fc_dims):
                x = jax.nn.relu(Linear(features, dim, name=f"fc{k + 1}")(x))
                features = dim
        return x


def build_box_head(cfg: Any, input_shape: ShapeSpec) -> nn.Module:
    """The box head ``MODEL.ROI_BOX_HEAD.NAME`` names (detectron2's ``build_box_head``)."""
    return build_from_registry(ROI_BOX_HEAD_REGISTRY, cfg.MODEL.ROI_BOX_HEAD.NAME, cfg, input_shape)
