"""detectron2's ``detector_postprocess`` and ``sem_seg_postprocess`` (``modeling/postprocessing.py``) on
static-shape outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes, clip_rotated_boxes, nonempty, nonempty_rotated
from detlayers.mask_ops import paste_masks_in_image

Array = jax.Array

__all__ = ["detector_postprocess", "paste_instance_masks", "scale_rotated_boxes", "sem_seg_postprocess"]


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


def _bilinear_taps(in_size: Array, out_size: Array, length: int) -> tuple[Array, Array, Array, Array]:
    """PyTorch's bilinear source taps (``align_corners=False``, scale ``in / out`` in float32)
    for ``length`` output positions, with traced ``in_size``/``out_size``: ``(i0, i1, w0, w1)``."""
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    dst = jnp.arange(length, dtype=jnp.float32)
    real = jnp.maximum(scale * (dst + jnp.float32(0.5)) - jnp.float32(0.5), jnp.float32(0))
    i0 = jnp.minimum(jnp.floor(real).astype(jnp.int32), in_size - 1)
    w1 = jnp.clip(real - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = jnp.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, 1.0 - w1, w1


def _resize_one(logits: Array, image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int]) -> Array:
    """One image: ``logits [Hp, Wp, C]`` cropped to ``image_hw`` and resized to ``output_hw`` on a
    ``canvas_hw`` canvas (zero outside)."""
    # a crop beyond the map keeps the whole map, as slicing does (a head whose output is smaller
    # than its input, COMMON_STRIDE below the decoder's stride)
    crop_h = jnp.minimum(image_hw[0], logits.shape[0])
    crop_w = jnp.minimum(image_hw[1], logits.shape[1])
    r0, r1, rw0, rw1 = _bilinear_taps(crop_h, output_hw[0], canvas_hw[0])
    c0, c1, cw0, cw1 = _bilinear_taps(crop_w, output_hw[1], canvas_hw[1])
    # along W first, then H, as PyTorch's kernel sums h0 * (w0 * x00 + w1 * x01) + h1 * (...)
    cols = logits[:, c0] * cw0[None, :, None] + logits[:, c1] * cw1[None, :, None]
    out = cols[r0] * rw0[:, None, None] + cols[r1] * rw1[:, None, None]
    inside = (jnp.arange(canvas_hw[0])[:, None] < output_hw[0]) & (jnp.arange(canvas_hw[1])[None, :] < output_hw[1])
    return jnp.where(inside[:, :, None], out, 0.0).astype(logits.dtype)


def sem_seg_postprocess(logits: Array, image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int]) -> Array:
    """detectron2's ``sem_seg_postprocess`` on a padded batch: per image, the logits of its input
    region ``[:h, :w]`` resized (bilinear, ``align_corners=False``) to its original size.

    ``logits``: ``float[N, Hp, Wp, C]`` at the padded input size; ``image_hw``/``output_hw``:
    ``int32[N, 2]`` input and original sizes (traced: one compile serves every size);
    ``canvas_hw``: static ``(H, W)`` at least every ``output_hw``. Returns ``[N, H, W, C]``: image
    ``i``'s logits in ``[:oh_i, :ow_i]``, zero elsewhere.
    """
    if logits.ndim != 4:
        raise ValueError(f"sem_seg_postprocess: logits must be [N, H, W, C], got shape {logits.shape}")
    n = logits.shape[0]
    for name, value in (("image_hw", image_hw), ("output_hw", output_hw)):
        if tuple(value.shape) != (n, 2):
            raise ValueError(f"sem_seg_postprocess: {name} must be [N, 2] = [{n}, 2], got shape {value.shape}")
    canvas = (int(canvas_hw[0]), int(canvas_hw[1]))
    return jax.vmap(lambda x, i, o: _resize_one(x, i, o, canvas))(
        logits, image_hw.astype(jnp.int32), output_hw.astype(jnp.int32))
