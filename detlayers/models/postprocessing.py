"""detectron2's ``detector_postprocess`` and ``sem_seg_postprocess`` (``modeling/postprocessing.py``)
on static-shape outputs."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes, nonempty
from detlayers.mask_ops import paste_masks_in_image

Array = jax.Array

__all__ = ["detector_postprocess", "paste_instance_masks", "sem_seg_postprocess"]


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


def _bilinear_taps(in_size: Array, out_size: Array, length: int) -> tuple[Array, Array]:
    """PyTorch's ``F.interpolate(size=out_size, mode="bilinear", align_corners=False)`` taps along
    one axis with traced sizes ``int32[N]``: source indices ``int32[N, length, 2]`` and weights
    ``float32[N, length, 2]`` for output positions ``0..length-1`` (those past ``out_size`` are
    computed the same way and meaningless). The arithmetic is PyTorch's CPU kernel's in float32:
    ``scale = in / out``, ``src = max(scale * (dst + 0.5) - 0.5, 0)``, index ``floor(src)`` capped
    at ``in - 1``, the second tap one further unless at the border (``out == in`` gives a copy)."""
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)  # [N]
    dst = jnp.arange(length, dtype=jnp.float32)
    real = jnp.maximum(scale[:, None] * (dst[None, :] + 0.5) - 0.5, 0.0)
    last = (in_size - 1)[:, None]
    i0 = jnp.minimum(jnp.floor(real).astype(jnp.int32), last)
    w1 = jnp.clip(real - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = jnp.where(i0 < last, i0 + 1, i0)
    return jnp.stack([i0, i1], -1), jnp.stack([1.0 - w1, w1], -1)


def _resample(x: Array, axis: int, index: Array, weight: Array) -> Array:
    """``y[n, ..., o, ...] = sum_k weight[n, o, k] * x[n, ..., index[n, o, k], ...]`` along ``axis``
    (1 or 2) of ``x [N, H, W, C]``, with per-image taps."""
    n, length = index.shape[:2]
    shape = [n, 1, 1, 1]
    shape[axis] = length * 2
    gathered = jnp.take_along_axis(x, index.reshape(shape), axis=axis)
    gathered = gathered.reshape(x.shape[:axis] + (length, 2) + x.shape[axis + 1:])
    wshape = [n, 1, 1, 1, 1]
    wshape[axis], wshape[axis + 1] = length, 2
    return jnp.sum(gathered * weight.reshape(wshape), axis=axis + 1)


def sem_seg_postprocess(logits: Array, image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int]) -> Array:
    """detectron2's ``sem_seg_postprocess`` for a batch: each image's logits cropped to its input
    size ``image_hw`` and resized bilinearly (``align_corners=False``) to its original size
    ``output_hw``, on a static ``canvas_hw`` canvas.

    Args:
      logits: ``[N, Hp, Wp, C]`` at the padded input size (the semantic head's output).
      image_hw: ``int32[N, 2]`` input sizes before padding (at most ``(Hp, Wp)``).
      output_hw: ``int32[N, 2]`` original sizes (at most ``canvas_hw``).
      canvas_hw: static ``(H, W)``.

    Returns ``float32[N, H, W, C]``: image ``i``'s result in ``[:h_i, :w_i]`` (what detectron2
    returns as ``[C, h_i, w_i]``), values past it meaningless. The sizes are traced, so a batch of
    images of different sizes needs one compile; the source positions and weights follow PyTorch's
    CPU kernel in float32 (W first, then H, as ``detlayers.interpolate`` sums).
    """
    if logits.ndim != 4 or image_hw.shape != (logits.shape[0], 2) or output_hw.shape != image_hw.shape:
        raise ValueError(f"sem_seg_postprocess: logits [N, Hp, Wp, C] = {logits.shape} needs image_hw and "
                         f"output_hw [N, 2], got {image_hw.shape} and {output_hw.shape}")
    height, width = int(canvas_hw[0]), int(canvas_hw[1])
    x = logits.astype(jnp.float32)
    x = _resample(x, 2, *_bilinear_taps(image_hw[:, 1], output_hw[:, 1], width))
    return _resample(x, 1, *_bilinear_taps(image_hw[:, 0], output_hw[:, 0], height))
