"""detectron2's ``Box2BoxTransform`` (``modeling/box_regression.py``): box deltas <-> boxes.

Boxes are ``(x1, y1, x2, y2)``; deltas are ``(dx, dy, dw, dh)`` in detectron2's parametrisation
(centre offsets relative to the box size, log size ratios), each multiplied by its weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Box2BoxTransform", "DEFAULT_SCALE_CLAMP", "smooth_l1_loss"]

# detectron2's _DEFAULT_SCALE_CLAMP: no predicted width/height grows by more than 1000/16.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: Array) -> tuple[Array, Array, Array, Array]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


@dataclasses.dataclass(frozen=True)
class Box2BoxTransform:
    """``Box2BoxTransform(weights, scale_clamp)``: ``weights`` ``(wx, wy, ww, wh)`` scale the
    deltas; ``dw``/``dh`` are clamped at ``scale_clamp`` before ``exp`` when decoding.

    Immutable and hashable (a field of a Flax module, a static ``jit`` argument).
    """

    weights: tuple[float, float, float, float]
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def __post_init__(self) -> None:
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != 4:
            raise ValueError(f"Box2BoxTransform: weights must have 4 entries, got {self.weights}")
        object.__setattr__(self, "weights", weights)

    def get_deltas(self, src_boxes: Array, target_boxes: Array) -> Array:
        """The deltas that turn ``src_boxes [..., 4]`` into ``target_boxes [..., 4]``: ``[..., 4]``
        float32 (``src`` must have positive widths and heights)."""
        src_x, src_y, src_w, src_h = _centre_size(jnp.asarray(src_boxes, jnp.float32))
        tgt_x, tgt_y, tgt_w, tgt_h = _centre_size(jnp.asarray(target_boxes, jnp.float32))
        wx, wy, ww, wh = self.weights
        return jnp.stack(
            [wx * (tgt_x - src_x) / src_w, wy * (tgt_y - src_y) / src_h,
             ww * jnp.log(tgt_w / src_w), wh * jnp.log(tgt_h / src_h)],
            axis=-1,
        )

    def apply_deltas(self, deltas: Array, boxes: Array) -> Array:
        """``deltas [..., K*4]`` applied to ``boxes [..., 4]``: ``[..., K*4]`` float32.

        detectron2's arithmetic: centre/size form, ``dw``/``dh`` divided by their weights and
        clamped at ``scale_clamp`` before ``exp``.
        """
        deltas = jnp.asarray(deltas, jnp.float32)
        ctr_x, ctr_y, widths, heights = _centre_size(jnp.asarray(boxes, jnp.float32))
        wx, wy, ww, wh = self.weights
        d = deltas.reshape(*deltas.shape[:-1], -1, 4)
        dx = d[..., 0] / wx
        dy = d[..., 1] / wy
        dw = jnp.minimum(d[..., 2] / ww, self.scale_clamp)
        dh = jnp.minimum(d[..., 3] / wh, self.scale_clamp)
        pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
        pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
        pred_w = jnp.exp(dw) * widths[..., None]
        pred_h = jnp.exp(dh) * heights[..., None]
        out = jnp.stack(
            [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
             pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
            axis=-1,
        )
        return out.reshape(deltas.shape)


def smooth_l1_loss(input: Array, target: Array, beta: float) -> Array:
    """fvcore's ``smooth_l1_loss`` (detectron2's ``"smooth_l1"`` box loss), elementwise:
    ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``; ``beta < 1e-5`` is L1."""
    diff = jnp.abs(jnp.asarray(input, jnp.float32) - jnp.asarray(target, jnp.float32))
    if beta < 1e-5:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
