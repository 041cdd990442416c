"""Box arithmetic of detectron2's detectors: anchors, ``Box2BoxTransform`` decoding, clipping.

Boxes are ``(x1, y1, x2, y2)`` float32 in input-image pixels, as detectron2's ``Boxes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# detectron2's _DEFAULT_SCALE_CLAMP: no predicted width/height grows by more than 1000/16.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """``DefaultAnchorGenerator.generate_cell_anchors``: ``float32[len(sizes)*len(ratios), 4]``
    centred at 0, computed in float64 (Python floats) and then cast, as detectron2 does."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(anchors, np.float64).astype(np.float32)


def grid_anchors(
    grid_hw: tuple[int, int], stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float], offset: float = 0.0
) -> np.ndarray:
    """detectron2's anchors of one feature map: ``float32[H*W*A, 4]`` ordered (y, x, anchor).

    Shifts are ``arange(offset*stride, W*stride, stride)`` in float32, added to the float32 cell
    anchors (``DefaultAnchorGenerator._grid_anchors``).
    """
    height, width = grid_hw
    base = cell_anchors(sizes, aspect_ratios)
    shift_x = np.arange(offset * stride, width * stride, step=stride, dtype=np.float32)[:width]
    shift_y = np.arange(offset * stride, height * stride, step=stride, dtype=np.float32)[:height]
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = np.stack([sx, sy, sx, sy], axis=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4).astype(np.float32)


def apply_deltas(
    deltas: Array, boxes: Array, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP
) -> Array:
    """``Box2BoxTransform.apply_deltas``: ``deltas [..., K*4]`` applied to ``boxes [..., 4]``.

    Returns ``[..., K*4]`` float32 with detectron2's arithmetic (centre/size form, ``dw``/``dh``
    divided by their weights and clamped at ``scale_clamp`` before ``exp``).
    """
    deltas = deltas.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = (float(w) for w in weights)
    d = deltas.reshape(*deltas.shape[:-1], -1, 4)
    dx = d[..., 0] / wx
    dy = d[..., 1] / wy
    dw = jnp.minimum(d[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(d[..., 3] / wh, scale_clamp)
    pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
    pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
    pred_w = jnp.exp(dw) * widths[..., None]
    pred_h = jnp.exp(dh) * heights[..., None]
    out = jnp.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        axis=-1,
    )
    return out.reshape(deltas.shape)


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
