"""detectron2's mask head ``MaskRCNNConvUpsampleHead``, ``mask_rcnn_inference`` and ``mask_rcnn_loss``
(``modeling/roi_heads/mask_head.py``), NHWC, with the mask targets of ``BitMasks.crop_and_resize``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.registry import ROI_MASK_HEAD_REGISTRY, build_from_registry
from detlayers.models.roi_heads.box_head import conv3x3_relu_stack
from detlayers.roi_align import roi_align
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d, ConvTranspose2d

Array = jax.Array

__all__ = ["MaskRCNNConvUpsampleHead", "mask_rcnn_inference", "mask_rcnn_loss", "crop_and_resize_masks",
           "build_mask_head"]


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


def crop_and_resize_masks(gt_masks: Array, image_hw: Array, boxes: Array, matches: Array, mask_size: int) -> Array:
    """detectron2's ``BitMasks.crop_and_resize``: each box's ground-truth bitmask cut out and
    resized to ``mask_size x mask_size`` by ROIAlign (aligned, adaptive sampling), then ``>= 0.5``.

    Args:
      gt_masks: ``[N, G, H, W]`` bitmasks (bool or 0/1) of each image's ground truth, at least as
        large as the image; image_hw: ``int32[N, 2]`` image sizes before padding.
      boxes: ``[N, R, 4]`` in image pixels; matches: ``int[N, R]`` the ground truth of each box.

    Returns ``bool[N, R, mask_size, mask_size]``. detectron2's masks have the image's size and its
    ROIAlign clamps samples past the last row/column to it; here the rows and columns past
    ``image_hw`` repeat the image's last ones, which gives the same values for boxes inside the image.
    """
    n, g, h, w = gt_masks.shape
    if boxes.ndim != 3 or boxes.shape[0] != n or matches.shape != boxes.shape[:2] or image_hw.shape != (n, 2):
        raise ValueError(f"crop_and_resize_masks: gt_masks [N, G, H, W] = {gt_masks.shape} needs boxes [N, R, 4], "
                         f"matches [N, R] and image_hw [N, 2], got {boxes.shape}, {matches.shape}, {image_hw.shape}")
    rows = jnp.minimum(jnp.arange(h)[None, :], image_hw[:, :1] - 1)  # [N, H]
    cols = jnp.minimum(jnp.arange(w)[None, :], image_hw[:, 1:] - 1)  # [N, W]
    masks = jnp.asarray(gt_masks, jnp.float32)
    masks = jnp.take_along_axis(masks, rows[:, None, :, None], axis=2)
    masks = jnp.take_along_axis(masks, cols[:, None, None, :], axis=3)
    r = boxes.shape[1]
    index = (jnp.arange(n)[:, None] * g + matches).reshape(-1).astype(jnp.float32)
    rois = jnp.concatenate([index[:, None], boxes.reshape(n * r, 4).astype(jnp.float32)], axis=1)
    out = roi_align(masks.reshape(n * g, h, w, 1), rois, mask_size, 1.0, 0, True)
    return (out[..., 0] >= 0.5).reshape(n, r, mask_size, mask_size)


def mask_rcnn_loss(mask_logits: Array, classes: Array, targets: Array, valid: Array) -> Array:
    """detectron2's ``mask_rcnn_loss``: binary cross-entropy with logits between each instance's
    class channel and its target, averaged over the pixels of the valid instances (0 without any).

    ``mask_logits [M, S, S, K]`` (K = 1: class agnostic), ``classes int[M]``, ``targets [M, S, S]``
    (0/1), ``valid bool[M]``.
    """
    m, size = mask_logits.shape[0], mask_logits.shape[1]
    if classes.shape != (m,) or valid.shape != (m,) or targets.shape != mask_logits.shape[:3]:
        raise ValueError(f"mask_rcnn_loss: mask_logits [M, S, S, K] = {mask_logits.shape} needs classes [M], "
                         f"valid [M] and targets [M, S, S], got {classes.shape}, {valid.shape}, {targets.shape}")
    if mask_logits.shape[-1] == 1:
        x = mask_logits[..., 0]
    else:
        index = jnp.clip(classes, 0, mask_logits.shape[-1] - 1)
        x = jnp.take_along_axis(mask_logits, index[:, None, None, None], axis=-1)[..., 0]
    x = x.astype(jnp.float32)
    y = jnp.asarray(targets, jnp.float32)
    bce = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32) * (size * size)
    return jnp.sum(jnp.where(valid[:, None, None], bce, 0.0)) / count


def build_mask_head(cfg: Any, input_shape: ShapeSpec) -> nn.Module:
    """The mask head ``MODEL.ROI_MASK_HEAD.NAME`` names (detectron2's ``build_mask_head``)."""
    return build_from_registry(ROI_MASK_HEAD_REGISTRY, cfg.MODEL.ROI_MASK_HEAD.NAME, cfg, input_shape)
