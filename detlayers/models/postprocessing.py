"""detectron2's ``detector_postprocess`` (``modeling/postprocessing.py``) on static-shape outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes, clip_rotated_boxes, nonempty, nonempty_rotated
from detlayers.mask_ops import paste_masks_in_image

Array = jax.Array

__all__ = ["detector_postprocess", "paste_instance_masks", "scale_rotated_boxes"]


def scale_rotated_boxes(boxes: Array, scale_x: Array | float, scale_y: Array | float) -> Array:
    """``RotatedBoxes.scale(scale_x, scale_y)``: rotated ``boxes [..., 5]`` ``(xc, yc, w, h,
    angle_degrees)`` under the axis scaling, a sheared box approximated by a rotated rectangle as
    detectron2 does: centre scaled, ``w *= sqrt((sx cos t)^2 + (sy sin t)^2)``,
    ``h *= sqrt((sx sin t)^2 + (sy cos t)^2)``, angle ``atan2(sx sin t, sy cos t)`` in degrees.
    ``scale_x``/``scale_y`` broadcast against ``boxes[..., 0]``."""
    theta = boxes[..., 4] * (math.pi / 180.0)
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([
        boxes[..., 0] * scale_x,
        boxes[..., 1] * scale_y,
        boxes[..., 2] * jnp.sqrt((scale_x * c) ** 2 + (scale_y * s) ** 2),
        boxes[..., 3] * jnp.sqrt((scale_x * s) ** 2 + (scale_y * c) ** 2),
        jnp.arctan2(scale_x * s, scale_y * c) * 180.0 / math.pi,
    ], axis=-1)


def detector_postprocess(
    det: Mapping[str, Array], image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int] | None
) -> dict[str, Array]:
    """Detections at the network's input size -> the original image size.

    ``det``: the ROI heads' ``boxes [N, D, 4]`` (or rotated ``[N, D, 5]``: scaled by
    :func:`scale_rotated_boxes`, clipped and tested as ``RotatedBoxes``), ``scores``, ``classes``, ``valid [N, D]`` and
    optionally ``mask_probs [N, D, M, M]``; ``image_hw``/``output_hw``: ``int32[N, 2]`` input and
    original sizes. Boxes are scaled by ``output / input`` size, clipped to the output size;
    instances whose box became empty are dropped (the survivors move to the front, keeping their
    order); masks are pasted into a ``canvas_hw`` canvas at threshold 0.5 (``None``: not pasted).
    Returns ``pred_boxes``, ``scores``, ``pred_classes`` (-1 in invalid slots), ``valid``,
    ``num_instances int32[N]`` and, with masks, ``mask_probs`` and ``pred_masks bool[N, D, H, W]``.
    """
    scale = output_hw.astype(jnp.float32) / image_hw.astype(jnp.float32)  # [N, (sy, sx)]
    if det["boxes"].shape[-1] == 5:
        boxes = scale_rotated_boxes(det["boxes"], scale[:, 1:2], scale[:, 0:1])
        boxes = clip_rotated_boxes(boxes, output_hw[:, 0:1], output_hw[:, 1:2])
        valid = det["valid"] & nonempty_rotated(boxes)
    else:
        boxes = det["boxes"] * jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=1)[:, None, :]
        boxes = clip_boxes(boxes, output_hw[:, 0:1], output_hw[:, 1:2])
        valid = det["valid"] & nonempty(boxes)
    # Move the surviving instances to the front, keeping their order.
    order = jnp.argsort(~valid, axis=1, stable=True)

    def take(x: Array) -> Array:
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    valid = take(valid)
    out = {
        "pred_boxes": jnp.where(valid[..., None], take(boxes), 0.0),
        "scores": jnp.where(valid, take(det["scores"]), 0.0),
        "pred_classes": jnp.where(valid, take(det["classes"]), -1),
        "valid": valid,
        "num_instances": jnp.sum(valid, axis=1, dtype=jnp.int32),
    }
    if "mask_probs" in det:
        probs = take(det["mask_probs"])
        out["mask_probs"] = probs
        if canvas_hw is not None:
            out["pred_masks"] = paste_instance_masks(probs, out["pred_boxes"], valid, canvas_hw)
    return out


def paste_instance_masks(mask_probs: Array, boxes: Array, valid: Array, canvas_hw: tuple[int, int]) -> Array:
    """detectron2's ``retry_if_cuda_oom(paste_masks_in_image)(masks, boxes, (h, w), threshold=0.5)``
    on static-shape slots: ``mask_probs [N, D, M, M]`` pasted into their ``boxes [N, D, 4]``
    (original-image pixels) on a ``canvas_hw`` canvas; ``bool[N, D, H, W]``, False in invalid slots.

    A pixel's value depends only on its box and its coordinates, so a canvas larger than the image
    holds the image's masks in its ``[:h, :w]`` corner (what :class:`detlayers.models.Predictor`
    relies on when it rounds the canvas up to a size bucket).
    """
    n, d = valid.shape
    pasted = paste_masks_in_image(
        mask_probs.reshape(n * d, *mask_probs.shape[2:]), boxes.reshape(n * d, 4),
        (int(canvas_hw[0]), int(canvas_hw[1])), 0.5,
    )
    return pasted.reshape(n, d, *pasted.shape[1:]) & valid[:, :, None, None]
