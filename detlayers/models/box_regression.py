"""detectron2's ``modeling/box_regression.py``: the box transforms of :mod:`detlayers.boxes` and the
smooth-L1 box loss.

``Box2BoxTransform`` (``(dx, dy, dw, dh)`` deltas of ``(x1, y1, x2, y2)`` boxes) and
``Box2BoxTransformRotated`` (``(dx, dy, dw, dh, da)`` of ``(xc, yc, w, h, angle)`` boxes), with
detectron2's scale clamp, live in the public box module; the models import them from here, where
detectron2 keeps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from detlayers.boxes import DEFAULT_SCALE_CLAMP, Box2BoxTransform, Box2BoxTransformRotated

Array = jax.Array

__all__ = ["Box2BoxTransform", "Box2BoxTransformRotated", "DEFAULT_SCALE_CLAMP", "smooth_l1_loss"]


def smooth_l1_loss(input: Array, target: Array, beta: float) -> Array:
    """fvcore's ``smooth_l1_loss`` (detectron2's ``"smooth_l1"`` box loss), elementwise:
    ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``; ``beta < 1e-5`` is L1."""
    diff = jnp.abs(jnp.asarray(input, jnp.float32) - jnp.asarray(target, jnp.float32))
    if beta < 1e-5:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
