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
