"""detectron2's mask head ``MaskRCNNConvUpsampleHead`` and ``mask_rcnn_inference``
(``modeling/roi_heads/mask_head.py``), NHWC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.registry import ROI_MASK_HEAD_REGISTRY, build_from_registry
from detlayers.models.roi_heads.box_head import conv3x3_relu_stack
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d, ConvTranspose2d

Array = jax.Array

__all__ = ["MaskRCNNConvUpsampleHead", "mask_rcnn_inference", "build_mask_head"]


@ROI_MASK_HEAD_REGISTRY.register()
class MaskRCNNConvUpsampleHead(nn.Module):
    """``mask_fcn{1..}`` 3x3 + ReLU (``conv_dims[:-1]``, ``conv_norm``), ``deconv`` 2x2/2 + ReLU
    (``conv_dims[-1]``), ``predictor`` 1x1: mask logits ``[M, 2S, 2S, num_classes]`` from pooled
    features ``[M, S, S, input_shape.channels]`` (``num_classes`` is 1 for class-agnostic masks).
    """

    input_shape: ShapeSpec
    num_classes: int
    conv_dims: Sequence[int]
    conv_norm: str = ""

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec) -> MaskRCNNConvUpsampleHead:
        """``MODEL.ROI_MASK_HEAD.{NUM_CONV, CONV_DIM, NORM, CLS_AGNOSTIC_MASK}``,
        ``MODEL.ROI_HEADS.NUM_CLASSES``."""
        head = cfg.MODEL.ROI_MASK_HEAD
        num_classes = 1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        return cls(input_shape=input_shape, num_classes=num_classes,
                   conv_dims=(head.CONV_DIM,) * (head.NUM_CONV + 1), conv_norm=head.NORM)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if not self.conv_dims:
            raise ValueError("MaskRCNNConvUpsampleHead: conv_dims needs at least the deconv width")
        x = conv3x3_relu_stack(x, self.input_shape.channels, self.conv_dims[:-1], self.conv_norm, "mask_fcn")
        channels = self.conv_dims[-2] if len(self.conv_dims) > 1 else self.input_shape.channels
        dim = self.conv_dims[-1]
        x = jax.nn.relu(ConvTranspose2d(channels, dim, 2, stride=2, name="deconv")(x))
        return Conv2d(dim, self.num_classes, 1, name="predictor")(x)


def mask_rcnn_inference(mask_logits: Array, classes: Array) -> Array:
    """detectron2's ``mask_rcnn_inference``: sigmoid of each instance's class channel.

    ``mask_logits [M, S, S, K]`` (K = 1: class agnostic), ``classes int[M]`` -> ``[M, S, S]``.
    """
    if mask_logits.shape[-1] == 1:
        picked = mask_logits[..., 0]
    else:
        index = jnp.clip(classes, 0, mask_logits.shape[-1] - 1)
        picked = jnp.take_along_axis(mask_logits, index[:, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked.astype(jnp.float32))


def build_mask_head(cfg: Any, input_shape: ShapeSpec) -> nn.Module:
    """The mask head ``MODEL.ROI_MASK_HEAD.NAME`` names (detectron2's ``build_mask_head``)."""
    return build_from_registry(ROI_MASK_HEAD_REGISTRY, cfg.MODEL.ROI_MASK_HEAD.NAME, cfg, input_shape)
