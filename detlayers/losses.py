"""Losses of ``detectron2.layers``: the box regression losses Distance-IoU and Complete-IoU
(``detectron2.layers.losses``) and the classification loss ``cross_entropy``
(``detectron2.layers.wrappers``).

DIoU/CIoU: Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box
Regression" (https://arxiv.org/abs/1911.08287). Boxes are ``(x1, y1, x2, y2)`` on the last axis.
``cross_entropy`` takes logits with the class axis last (NHWC for dense predictions).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["ciou_loss", "cross_entropy", "diou_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def _check(boxes1: Array, boxes2: Array, reduction: str, fn: str) -> tuple[Array, Array, jnp.dtype]:
    """Validates the arguments; returns both boxes in the compute dtype (float32, or float64 for
    float64 input) and the dtype the loss is returned in (the boxes' promoted dtype)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # Read before any jnp operation: under jit, a closed-over constant is concrete but whatever
    # jnp derives from it inside the trace is a tracer.
    concrete1 = None if isinstance(boxes1, jax.core.Tracer) else np.asarray(boxes1)
    boxes1, boxes2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
    for arg, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.ndim < 1 or boxes.shape[-1] != 4:
            raise ValueError(
                f"{fn}: {arg} must have shape (N, 4) or (4,) (x1, y1, x2, y2 last), "
                f"got {tuple(boxes.shape)}"
            )
    try:
        jnp.broadcast_shapes(boxes1.shape, boxes2.shape)
    except ValueError:
        raise ValueError(
            f"{fn}: boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} do not broadcast"
        ) from None
    # detectron2 asserts x2 >= x1 and y2 >= y1 on boxes1; that needs concrete values, so the
    # check runs only outside jit (under a trace it would need a host round trip).
    if concrete1 is not None:
        if (concrete1[..., 2] < concrete1[..., 0]).any():
            raise ValueError(f"{fn}: bad box in boxes1: x1 larger than x2")
        if (concrete1[..., 3] < concrete1[..., 1]).any():
            raise ValueError(f"{fn}: bad box in boxes1: y1 larger than y2")
    out_dtype = jnp.result_type(boxes1, boxes2)
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    return boxes1.astype(dtype), boxes2.astype(dtype), out_dtype


def _iou_and_centre_penalty(b1: Array, b2: Array, eps: float) -> tuple[Array, Array]:
    """IoU (with ``eps`` in the union) and DIoU's ``centre_distance^2 / enclosing_diagonal^2``."""
    x1, y1, x2, y2 = (b1[..., i] for i in range(4))
    x1g, y1g, x2g, y2g = (b2[..., i] for i in range(4))

    inter_w = jnp.minimum(x2, x2g) - jnp.maximum(x1, x1g)
    inter_h = jnp.minimum(y2, y2g) - jnp.maximum(y1, y1g)
    overlaps = (inter_w > 0) & (inter_h > 0)
    # where() rather than clamping: no gradient flows through a non-overlap, as in detectron2
    intersection = jnp.where(overlaps, inter_w * inter_h, 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection + eps
    iou = intersection / union

    enclose_w = jnp.maximum(x2, x2g) - jnp.minimum(x1, x1g)
    enclose_h = jnp.maximum(y2, y2g) - jnp.minimum(y1, y1g)
    diagonal_sq = enclose_w**2 + enclose_h**2 + eps
    centre_dx = (x2 + x1) / 2 - (x1g + x2g) / 2
    centre_dy = (y2 + y1) / 2 - (y1g + y2g) / 2
    return iou, (centre_dx**2 + centre_dy**2) / diagonal_sq


def _reduce(loss: Array, reduction: str, out_dtype) -> Array:
    if reduction == "mean":
        # detectron2 returns 0 * sum (a 0 that keeps the graph) for empty input, not NaN
        loss = jnp.mean(loss) if loss.size > 0 else jnp.sum(loss) * 0.0
    elif reduction == "sum":
        loss = jnp.sum(loss)
    return loss.astype(out_dtype)


def diou_loss(boxes1: Array, boxes2: Array, reduction: str = "none", eps: float = 1e-7) -> Array:
    """Distance-IoU loss ``1 - IoU + d^2 / c^2``, as ``detectron2.layers.diou_loss``.

    Args:
      boxes1, boxes2: ``[..., 4]`` boxes ``(x1, y1, x2, y2)`` (typically ``[N, 4]`` or ``[4]``),
        broadcast against each other; ``boxes1`` are the predictions.
      reduction: ``"none"`` (per-box ``[...]``), ``"mean"`` (0 for empty input) or ``"sum"``.
      eps: added to the union and to the squared enclosing diagonal.

    Returns:
      The loss, computed in float32 (float64 for float64 input) and returned in the boxes' dtype
      (bfloat16/float16 boxes give a loss of that dtype, as in PyTorch).

    ``d`` is the distance between box centres and ``c`` the diagonal of the smallest enclosing box.
    Boxes with ``x1 > x2`` or ``y1 > y2`` in ``boxes1`` raise ``ValueError`` when the values are
    concrete (detectron2 asserts); under ``jit`` they are not checked.
    """
    b1, b2, out_dtype = _check(boxes1, boxes2, reduction, "diou_loss")
    iou, centre_penalty = _iou_and_centre_penalty(b1, b2, eps)
    return _reduce(1.0 - iou + centre_penalty, reduction, out_dtype)


def ciou_loss(boxes1: Array, boxes2: Array, reduction: str = "none", eps: float = 1e-7) -> Array:
    """Complete-IoU loss ``1 - IoU + d^2 / c^2 + alpha * v``, as ``detectron2.layers.ciou_loss``.

    Same arguments and return as :func:`diou_loss`. ``v = 4 / pi^2 * (atan(w_gt / h_gt) -
    atan(w / h))^2`` measures aspect-ratio mismatch and ``alpha = v / (1 - IoU + v + eps)`` is a
    constant for differentiation (``stop_gradient``, detectron2's ``torch.no_grad``). As in
    detectron2 a box of zero width *and* height gives ``0 / 0`` in ``v`` and thus NaN.
    """
    b1, b2, out_dtype = _check(boxes1, boxes2, reduction, "ciou_loss")
    iou, centre_penalty = _iou_and_centre_penalty(b1, b2, eps)
    w_pred, h_pred = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w_gt, h_gt = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    v = (4.0 / math.pi**2) * (jnp.arctan(w_gt / h_gt) - jnp.arctan(w_pred / h_pred)) ** 2
    alpha = jax.lax.stop_gradient(v / (1.0 - iou + v + eps))
    return _reduce(1.0 - iou + centre_penalty + alpha * v, reduction, out_dtype)


def cross_entropy(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    weight: Array | None = None,
    ignore_index: int = -100,
) -> Array:
    """``torch.nn.functional.cross_entropy`` with integer targets, class axis **last**.

    Args:
      input: logits ``[..., C]`` (``[N, C]`` or NHWC ``[N, H, W, C]``).
      target: int class indices of shape ``input.shape[:-1]``; ``ignore_index`` entries are skipped.
      reduction: ``"none"`` (per-element loss, 0 at ignored entries), ``"sum"`` or ``"mean"``
        (sum divided by the summed ``weight`` of the non-ignored targets, like PyTorch).
      weight: optional per-class weights ``[C]``.
    Returns:
      the loss in float32 (or ``input.dtype`` if wider). As in detectron2's wrapper, an empty
      ``target`` with ``reduction="mean"`` gives 0 (connected to ``input`` for gradients) instead of
      NaN.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if input.ndim < 1 or tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"cross_entropy: target shape {target.shape} must equal input shape {input.shape} without "
            "its last (class) axis"
        )
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype {target.dtype}")
    if target.size == 0 and reduction == "mean":
        return input.sum() * 0.0
    logits = input.astype(jnp.promote_types(input.dtype, jnp.float32))
    valid = target != ignore_index
    safe_target = jnp.where(valid, target, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
    w = jnp.ones_like(picked) if weight is None else jnp.asarray(weight, logits.dtype)[safe_target]
    w = jnp.where(valid, w, 0.0)
    losses = -picked * w
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / w.sum()
