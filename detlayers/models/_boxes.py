"""The ``Boxes`` methods the models use (detectron2's ``structures/boxes.py``), on arrays.

Boxes are ``(x1, y1, x2, y2)`` float32 in input-image pixels, as detectron2's ``Boxes``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def clip_boxes(boxes: Array, height: Array, width: Array) -> Array:
    """``Boxes.clip((h, w))``: x into ``[0, w]``, y into ``[0, h]``. ``height``/``width`` broadcast
    against ``boxes[..., 0]``."""
    w = jnp.asarray(width, jnp.float32)
    h = jnp.asarray(height, jnp.float32)
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty(boxes: Array, threshold: float = 0.0) -> Array:
    """``Boxes.nonempty(threshold)``: width and height both ``> threshold``."""
    return (boxes[..., 2] - boxes[..., 0] > threshold) & (boxes[..., 3] - boxes[..., 1] > threshold)


def box_area(boxes: Array) -> Array:
    """``Boxes.area()``: ``(x2 - x1) * (y2 - y1)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: Array, boxes2: Array) -> Array:
    """detectron2's ``pairwise_iou``: ``[M, 4] x [N, 4] -> float32[M, N]``; 0 where boxes do not
    overlap (so empty boxes never divide by zero)."""
    b1 = jnp.asarray(boxes1, jnp.float32)
    b2 = jnp.asarray(boxes2, jnp.float32)
    width = jnp.clip(jnp.minimum(b1[:, None, 2], b2[None, :, 2]) - jnp.maximum(b1[:, None, 0], b2[None, :, 0]), 0.0)
    height = jnp.clip(jnp.minimum(b1[:, None, 3], b2[None, :, 3]) - jnp.maximum(b1[:, None, 1], b2[None, :, 1]), 0.0)
    inter = width * height
    union = box_area(b1)[:, None] + box_area(b2)[None, :] - inter
    return jnp.where(inter > 0, inter / jnp.where(inter > 0, union, 1.0), 0.0)
