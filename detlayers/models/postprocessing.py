"""detectron2's ``detector_postprocess`` (``modeling/postprocessing.py``) on static-shape outputs."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes, nonempty
from detlayers.mask_ops import paste_masks_in_image

Array = jax.Array

__all__ = ["detector_postprocess", "paste_instance_masks"]


def detector_postprocess(
    det: Mapping[str, Array], image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int] | None
) -> dict[str, Array]:
    """Detections at the network's input size -> the original image size.

    ``det``: the ROI heads' ``boxes [N, D, 4]``, ``scores``, ``classes``, ``valid [N, D]`` and
    optionally ``mask_probs [N, D, M, M]``; ``image_hw``/``output_hw``: ``int32[N, 2]`` input and
    original sizes. Boxes are scaled by ``output / input`` size, clipped to the output size;
    instances whose box became empty are dropped (the survivors move to the front, keeping their
    order); masks are pasted into a ``canvas_hw`` canvas at threshold 0.5 (``None``: not pasted).
    Returns ``pred_boxes``, ``scores``, ``pred_classes`` (-1 in invalid slots), ``valid``,
    ``num_instances int32[N]`` and, with masks, ``mask_probs`` and ``pred_masks bool[N, D, H, W]``.
    """
    scale = output_hw.astype(jnp.float32) / image_hw.astype(jnp.float32)  # [N, (sy, sx)]
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
