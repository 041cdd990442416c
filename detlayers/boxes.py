"""Box arithmetic: areas, pairwise overlaps, R-CNN box regression, clipping and emptiness.

The functions of detectron2's ``structures.boxes`` / ``structures.rotated_boxes`` (``Boxes.area``,
``Boxes.clip``, ``Boxes.nonempty``, ``pairwise_intersection``, ``pairwise_iou``, ``pairwise_ioa``
and their ``RotatedBoxes`` counterparts), its ``modeling.box_regression.Box2BoxTransform`` and
``Box2BoxTransformRotated``, and torchvision's ``box_area`` / ``box_iou``, on plain arrays:

* axis-aligned boxes are ``[..., 4]`` rows ``(x1, y1, x2, y2)``; rotated boxes are ``[..., 5]``
  rows ``(x_center, y_center, width, height, angle_degrees)``;
* every function takes leading batch dimensions (pairwise ones take ``[..., N, 4]`` and
  ``[..., M, 4]`` with broadcasting leading dimensions and return ``[..., N, M]``), works under
  ``jit`` and ``vmap``, and checks shapes at trace time (``ValueError``/``TypeError`` naming the
  argument and the shape);
* zero boxes give correctly shaped empty results.

Numbers. The float32 operations are detectron2's (and torchvision's), in the same order, so the
results are its bits on CPU wherever no ``exp``/``log`` is involved (XLA's may differ from
PyTorch's in the last bit): true divisions by the regression weights (XLA would otherwise multiply
by a rounded reciprocal), the same clamps (comparisons, so ``-0.0`` and NaN pass through as in
``torch.clamp``), no product fused into a later add. Eager mode and ``jit`` give the same bits.

Dtypes. Except in :class:`Box2BoxTransform`'s ``apply_deltas`` (always float32, as detectron2),
boxes are evaluated in their dtype promoted to at least float32: integer and float16/bfloat16
boxes give float32 results (torchvision upcasts half precision the same way), float64 boxes (with
``jax_enable_x64``) float64.

Where detectron2 asserts on values (``Boxes.clip`` on a non-finite coordinate, ``get_deltas`` on a
source box whose width is not positive), the same inputs raise ``ValueError`` here when they are
concrete (eager mode, or closed over by a jitted function); when traced they are not checked and
give what the arithmetic gives (NaN or inf coordinates; ``clip_boxes`` keeps a NaN).

Which IoU. :func:`pairwise_iou` is detectron2's (what its matchers use): 0 wherever the
intersection is empty, so two empty boxes (or one) give 0. :func:`box_iou` is torchvision's
``inter / union`` without that guard: 0 for disjoint boxes of positive area, NaN for two empty
boxes at the same place (``0 / 0``). Use :func:`pairwise_iou` for matching and anything that must
stay finite.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detlayers._numerics import round_product as _rounded

Array = jax.Array

__all__ = [
    "DEFAULT_SCALE_CLAMP",
    "box_area",
    "pairwise_intersection",
    "box_iou",
    "pairwise_iou",
    "pairwise_ioa",
    "clip_boxes",
    "nonempty",
    "Box2BoxTransform",
    "Box2BoxTransformRotated",
    "rotated_box_area",
    "clip_rotated_boxes",
    "nonempty_rotated",
]

# detectron2's _DEFAULT_SCALE_CLAMP: dw and dh are clamped so that no box grows by more than the
# factor that turns a 16-pixel anchor into a 1000-pixel box.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

_AXIS_LAYOUT = "(x1, y1, x2, y2)"
_ROTATED_LAYOUT = "(x_center, y_center, width, height, angle_degrees)"


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _as_boxes(boxes: Array, name: str, fn: str, box_dim: int, *, pairwise: bool = False) -> Array:
    """``boxes`` as an array after checking it is real and shaped ``[..., box_dim]`` (at least
    ``[N, box_dim]`` for a pairwise op)."""
    boxes = jnp.asarray(boxes)
    if not (jnp.issubdtype(boxes.dtype, jnp.floating) or jnp.issubdtype(boxes.dtype, jnp.integer)):
        raise TypeError(f"{fn}: {name} must be a real (float or int) array, got dtype {boxes.dtype}")
    layout = _AXIS_LAYOUT if box_dim == 4 else _ROTATED_LAYOUT
    min_rank = 2 if pairwise else 1
    if boxes.ndim < min_rank or boxes.shape[-1] != box_dim:
        want = f"[..., N, {box_dim}]" if pairwise else f"[..., {box_dim}]"
        raise ValueError(f"{fn}: {name} must have shape {want} {layout}, got shape {boxes.shape}")
    return boxes


def _broadcast_leading(shape1: tuple[int, ...], shape2: tuple[int, ...], names: str, fn: str,
                       shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return jnp.broadcast_shapes(shape1, shape2)
    except ValueError:
        raise ValueError(
            f"{fn}: the leading dimensions of {names} do not broadcast (shapes {shapes[0]} and "
            f"{shapes[1]})"
        ) from None


def _compute_dtype(*arrays: Array) -> jnp.dtype:
    """float32, or float64 for float64 input: the dtype boxes are evaluated in."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _concrete(x: Array) -> np.ndarray | None:
    """``x``'s values when they are known at trace time (not a tracer), else None. Must be called
    on the argument itself: anything jnp derives from it inside a trace is a tracer."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


# --------------------------------------------------------------------------------------------
# torch's clamp and minimum, element by element (signed zeros and NaN as PyTorch's CPU kernels)
# --------------------------------------------------------------------------------------------
def _clamp(x: Array, low: Array | float | None = None, high: Array | float | None = None) -> Array:
    """``torch.clamp(x, min=low, max=high)``: a bound replaces ``x`` only where ``x`` is strictly
    beyond it, so ``-0.0`` stays ``-0.0`` under ``min=0`` and NaN stays NaN (``jnp.clip`` gives
    ``+0.0``)."""
    if low is not None:
        x = jnp.where(x < low, jnp.asarray(low, x.dtype), x)
    if high is not None:
        x = jnp.where(x > high, jnp.asarray(high, x.dtype), x)
    return x


def _torch_minimum(a: Array, b: Array) -> Array:
    """``torch.min(a, b)``: NaN if either is NaN, else ``b`` where ``b < a``, else ``a``."""
    return jnp.where(jnp.isnan(b) | (b < a), b, a)


def _over(x: Array, divisor: float) -> Array:
    """``x / divisor`` rounded once, as PyTorch divides on CPU.

    XLA turns a division by a constant or by a broadcast scalar into a multiplication by its
    rounded reciprocal (``x * 0.1`` for ``x / 10``: off by an ulp for about one value in six). A
    divisor that depends on ``x`` (``divisor``, or NaN where ``x`` is NaN: the quotient is NaN
    either way) is neither, also under ``vmap``, so the true division stays.
    """
    return x / jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), jnp.asarray(divisor, x.dtype))


def _wrap_degrees(angle: Array) -> Array:
    """detectron2's ``(angle + 180.0) % 360.0 - 180.0`` (Python's modulo: the sign of 360), into
    ``[-180, 180)``; an angle just below -180 can round to ``180`` as in detectron2."""
    return jnp.remainder(angle + 180.0, 360.0) - 180.0


# --------------------------------------------------------------------------------------------
# axis-aligned boxes
# --------------------------------------------------------------------------------------------
def _widths_heights(boxes: Array) -> tuple[Array, Array]:
    return boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]


def _area(boxes: Array) -> Array:
    widths, heights = _widths_heights(boxes)
    return _rounded(widths * heights)


def box_area(boxes: Array) -> Array:
    """Areas ``(x2 - x1) * (y2 - y1)`` of ``boxes [..., 4]`` -> ``[...]`` (torchvision's
    ``box_area``, detectron2's ``Boxes.area``). Inverted boxes give negative areas, as there."""
    boxes = _as_boxes(boxes, "boxes", "box_area", 4)
    return _area(boxes.astype(_compute_dtype(boxes)))


def _pair_up(boxes1: Array, boxes2: Array, fn: str) -> tuple[Array, Array]:
    """Checked ``[..., N, 4]`` and ``[..., M, 4]`` boxes in their common compute dtype."""
    b1 = _as_boxes(boxes1, "boxes1", fn, 4, pairwise=True)
    b2 = _as_boxes(boxes2, "boxes2", fn, 4, pairwise=True)
    _broadcast_leading(b1.shape[:-2], b2.shape[:-2], "boxes1 and boxes2", fn, (b1.shape, b2.shape))
    dtype = _compute_dtype(b1, b2)
    return b1.astype(dtype), b2.astype(dtype)


def _intersection(b1: Array, b2: Array) -> Array:
    """``[..., N, M]`` intersection areas: overlap width and height clamped at 0, multiplied."""
    low = jnp.maximum(b1[..., :, None, :2], b2[..., None, :, :2])
    high = jnp.minimum(b1[..., :, None, 2:], b2[..., None, :, 2:])
    overlap = _clamp(high - low, low=0.0)
    return _rounded(overlap[..., 0] * overlap[..., 1])


def _union(b1: Array, b2: Array, intersection: Array) -> Array:
    return (_area(b1)[..., :, None] + _area(b2)[..., None, :]) - intersection


def pairwise_intersection(boxes1: Array, boxes2: Array) -> Array:
    """Intersection areas of every pair: ``boxes1 [..., N, 4]``, ``boxes2 [..., M, 4]`` ->
    ``[..., N, M]`` (detectron2's ``pairwise_intersection``; 0 for disjoint boxes)."""
    b1, b2 = _pair_up(boxes1, boxes2, "pairwise_intersection")
    return _intersection(b1, b2)


def box_iou(boxes1: Array, boxes2: Array) -> Array:
    """torchvision's ``box_iou``: ``intersection / union`` of every pair, ``[..., N, 4]`` x
    ``[..., M, 4]`` -> ``[..., N, M]``.

    No guard against an empty union: two empty boxes at the same place give ``0 / 0 = NaN``, as in
    torchvision. detectron2's :func:`pairwise_iou` gives 0 there (and wherever the intersection is
    empty) and is what its matchers use.
    """
    b1, b2 = _pair_up(boxes1, boxes2, "box_iou")
    intersection = _intersection(b1, b2)
    return intersection / _union(b1, b2, intersection)


def pairwise_iou(boxes1: Array, boxes2: Array) -> Array:
    """detectron2's ``pairwise_iou``: intersection over union of every pair, ``[..., N, 4]`` x
    ``[..., M, 4]`` -> ``[..., N, M]``, and exactly 0 wherever the intersection is not positive
    (so empty boxes never give NaN). Its gradient is finite there too."""
    b1, b2 = _pair_up(boxes1, boxes2, "pairwise_iou")
    intersection = _intersection(b1, b2)
    overlaps = intersection > 0
    # the division runs on a safe denominator so that no NaN reaches the gradient of where()
    union = jnp.where(overlaps, _union(b1, b2, intersection), 1.0)
    return jnp.where(overlaps, intersection / union, 0.0)


def pairwise_ioa(boxes1: Array, boxes2: Array) -> Array:
    """detectron2's ``pairwise_ioa``: intersection over the area of the ``boxes2`` box, ``[..., N,
    4]`` x ``[..., M, 4]`` -> ``[..., N, M]``, 0 wherever the intersection is not positive."""
    b1, b2 = _pair_up(boxes1, boxes2, "pairwise_ioa")
    intersection = _intersection(b1, b2)
    overlaps = intersection > 0
    area2 = jnp.where(overlaps, jnp.broadcast_to(_area(b2)[..., None, :], overlaps.shape), 1.0)
    return jnp.where(overlaps, intersection / area2, 0.0)


def clip_boxes(boxes: Array, height: Array | float, width: Array | float) -> Array:
    """detectron2's ``Boxes.clip((height, width))``, returning the clipped boxes.

    Args:
      boxes: ``[..., 4]`` boxes ``(x1, y1, x2, y2)``.
      height, width: the image size; numbers or arrays broadcasting against ``boxes[..., 0]``
        (e.g. ``[B, 1]`` per-image sizes for ``[B, R, 4]`` boxes).

    Returns:
      ``[..., 4]`` with x coordinates clamped into ``[0, width]`` and y into ``[0, height]``
      (``-0.0`` and NaN pass through, as ``torch.clamp``). Concrete boxes with an infinite or NaN
      coordinate raise ``ValueError`` (detectron2 asserts); traced ones are not checked.
    """
    concrete = _concrete(boxes)
    boxes = _as_boxes(boxes, "boxes", "clip_boxes", 4)
    if concrete is not None and not np.isfinite(concrete).all():
        raise ValueError("clip_boxes: boxes contain an infinite or NaN coordinate")
    boxes = boxes.astype(_compute_dtype(boxes))
    w = jnp.asarray(width, boxes.dtype)
    h = jnp.asarray(height, boxes.dtype)
    size_shape = jnp.broadcast_shapes(w.shape, h.shape)
    _broadcast_leading(boxes.shape[:-1], size_shape, "boxes and height/width", "clip_boxes",
                       (boxes.shape, size_shape))
    return jnp.stack(
        [_clamp(boxes[..., 0], 0.0, w), _clamp(boxes[..., 1], 0.0, h),
         _clamp(boxes[..., 2], 0.0, w), _clamp(boxes[..., 3], 0.0, h)],
        axis=-1,
    )


def nonempty(boxes: Array, threshold: float | Array = 0.0) -> Array:
    """detectron2's ``Boxes.nonempty``: ``bool[...]``, True where the width and the height of
    ``boxes [..., 4]`` are both strictly greater than ``threshold``."""
    boxes = _as_boxes(boxes, "boxes", "nonempty", 4)
    widths, heights = _widths_heights(boxes.astype(_compute_dtype(boxes)))
    return (widths > threshold) & (heights > threshold)


# --------------------------------------------------------------------------------------------
# box regression
# --------------------------------------------------------------------------------------------
def _check_weights(weights: Sequence[float], count: int, owner: str) -> tuple[float, ...]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)) \
            or len(weights) != count:
        raise ValueError(f"{owner}: weights must be {count} numbers, got {weights!r}")
    values = tuple(float(w) for w in weights)
    if any(w == 0 or not math.isfinite(w) for w in values):
        raise ValueError(f"{owner}: weights must be finite and non-zero (deltas are divided by "
                         f"them), got {values}")
    return values


def _check_src_widths(concrete_src: np.ndarray | None, width_column: int | None, owner: str) -> None:
    """detectron2's assertion that every source box has a positive width, on concrete input."""
    if concrete_src is None or concrete_src.size == 0:
        return
    if width_column is None:  # axis-aligned: x2 - x1
        widths = concrete_src[..., 2] - concrete_src[..., 0]
    else:
        widths = concrete_src[..., width_column]
    if not (widths > 0).all():
        raise ValueError(f"{owner}.get_deltas: src_boxes has a box whose width is not positive "
                         "(detectron2: 'Input boxes are not valid')")


def _as_deltas(deltas: Array, per_box: int, fn: str) -> Array:
    """``deltas`` as an array after checking it is real and shaped ``[..., K*per_box]`` (``per_box``
    deltas for each of ``K`` classes)."""
    deltas = jnp.asarray(deltas)
    if not (jnp.issubdtype(deltas.dtype, jnp.floating) or jnp.issubdtype(deltas.dtype, jnp.integer)):
        raise TypeError(f"{fn}: deltas must be a real (float or int) array, got dtype {deltas.dtype}")
    if deltas.ndim < 1 or deltas.shape[-1] % per_box:
        raise ValueError(f"{fn}: deltas must have shape [..., K*{per_box}] ({per_box} deltas for "
                         f"each of K classes), got shape {deltas.shape}")
    return deltas


def _clamp_scale(d: Array, scale_clamp: float) -> Array:
    """``torch.clamp(d, max=scale_clamp)`` in ``d``'s dtype."""
    return _clamp(d, high=np.asarray(scale_clamp, d.dtype))


@dataclasses.dataclass(frozen=True)
class Box2BoxTransform:
    """detectron2's R-CNN box transform: deltas ``(dx, dy, dw, dh)`` between axis-aligned boxes.

    A delta moves a box's centre by ``(dx * width, dy * height)`` and scales its size by
    ``(exp(dw), exp(dh))``; each delta is multiplied by its weight when encoding and divided by
    it when decoding. Frozen and hashable, so it can be a static argument or a Flax module field.

    Attributes:
      weights: ``(wx, wy, ww, wh)``, e.g. ``(10, 10, 5, 5)`` for Fast R-CNN heads and
        ``(1, 1, 1, 1)`` for the RPN.
      scale_clamp: ``dw`` and ``dh`` (after dividing by their weights) are clamped to at most this
        before ``exp`` when decoding (``log(1000 / 16)`` by default, as detectron2).
    """

    weights: tuple[float, float, float, float]
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _check_weights(self.weights, 4, "Box2BoxTransform"))
        object.__setattr__(self, "scale_clamp", float(self.scale_clamp))

    def get_deltas(self, src_boxes: Array, target_boxes: Array) -> Array:
        """Deltas that take ``src_boxes`` to ``target_boxes`` (encoding).

        Args:
          src_boxes: ``[..., 4]`` source boxes (e.g. proposals or anchors).
          target_boxes: ``[..., 4]`` targets (e.g. ground truth), leading dimensions broadcasting
            against ``src_boxes``'.

        Returns:
          ``[..., 4]`` deltas ``(wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * log(tw / sw),
          wh * log(th / sh))`` of the centres ``(sx, sy)``, ``(tx, ty)`` and sizes. Concrete source
          boxes of non-positive width raise ``ValueError`` (detectron2 asserts); traced ones give
          inf or NaN.
        """
        concrete_src = _concrete(src_boxes)
        src = _as_boxes(src_boxes, "src_boxes", "Box2BoxTransform.get_deltas", 4)
        target = _as_boxes(target_boxes, "target_boxes", "Box2BoxTransform.get_deltas", 4)
        _broadcast_leading(src.shape[:-1], target.shape[:-1], "src_boxes and target_boxes",
                           "Box2BoxTransform.get_deltas", (src.shape, target.shape))
        _check_src_widths(concrete_src, None, "Box2BoxTransform")
        dtype = _compute_dtype(src, target)
        src, target = src.astype(dtype), target.astype(dtype)

        src_widths, src_heights = _widths_heights(src)
        src_ctr_x = src[..., 0] + 0.5 * src_widths
        src_ctr_y = src[..., 1] + 0.5 * src_heights
        target_widths, target_heights = _widths_heights(target)
        target_ctr_x = target[..., 0] + 0.5 * target_widths
        target_ctr_y = target[..., 1] + 0.5 * target_heights

        wx, wy, ww, wh = self.weights
        # detectron2's order: the weight multiplies before the division
        dx = wx * (target_ctr_x - src_ctr_x) / src_widths
        dy = wy * (target_ctr_y - src_ctr_y) / src_heights
        dw = ww * jnp.log(target_widths / src_widths)
        dh = wh * jnp.log(target_heights / src_heights)
        return jnp.stack([dx, dy, dw, dh], axis=-1)

    def apply_deltas(self, deltas: Array, boxes: Array) -> Array:
        """Applies ``deltas [..., K*4]`` to ``boxes [..., 4]`` (decoding), in float32.

        Args:
          deltas: ``K >= 1`` class-specific deltas per box, ``(dx, dy, dw, dh)`` for class ``k`` at
            ``[..., 4k:4k+4]`` (detectron2's ``[R, K*4]`` layout).
          boxes: the boxes they apply to; leading dimensions broadcast against ``deltas``'.

        Returns:
          float32 ``[..., K*4]`` boxes ``(x1, y1, x2, y2)``: centre ``(dx / wx * w + cx, dy / wy *
          h + cy)``, size ``(exp(min(dw / ww, scale_clamp)) * w, exp(min(dh / wh, scale_clamp)) *
          h)``. Both inputs are cast to float32 first, whatever their dtype (as detectron2).
        """
        fn = "Box2BoxTransform.apply_deltas"
        deltas = _as_deltas(deltas, 4, fn)
        boxes = _as_boxes(boxes, "boxes", fn, 4)
        lead = _broadcast_leading(deltas.shape[:-1], boxes.shape[:-1], "deltas and boxes", fn,
                                  (deltas.shape, boxes.shape))
        deltas, boxes = deltas.astype(jnp.float32), boxes.astype(jnp.float32)

        widths, heights = _widths_heights(boxes)
        ctr_x = (boxes[..., 0] + 0.5 * widths)[..., None]
        ctr_y = (boxes[..., 1] + 0.5 * heights)[..., None]
        widths, heights = widths[..., None], heights[..., None]

        wx, wy, ww, wh = self.weights
        d = deltas.reshape(*deltas.shape[:-1], deltas.shape[-1] // 4, 4)  # [..., K, 4]
        dx = _over(d[..., 0], wx)
        dy = _over(d[..., 1], wy)
        dw = _clamp_scale(_over(d[..., 2], ww), self.scale_clamp)
        dh = _clamp_scale(_over(d[..., 3], wh), self.scale_clamp)

        pred_ctr_x = _rounded(dx * widths) + ctr_x
        pred_ctr_y = _rounded(dy * heights) + ctr_y
        pred_w = _rounded(jnp.exp(dw) * widths)
        pred_h = _rounded(jnp.exp(dh) * heights)
        pred = jnp.stack(
            [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
             pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
            axis=-1,
        )
        return pred.reshape(*lead, deltas.shape[-1])


@dataclasses.dataclass(frozen=True)
class Box2BoxTransformRotated:
    """detectron2's Rotated R-CNN box transform: deltas ``(dx, dy, dw, dh, da)`` between rotated
    boxes ``(xc, yc, w, h, angle_degrees)``.

    As :class:`Box2BoxTransform` for the centre and size; the angle delta ``da`` is in radians
    (times its weight) while box angles are in degrees, and both encoding and decoding wrap angles
    into ``[-180, 180)``. Frozen and hashable.

    Attributes:
      weights: ``(wx, wy, ww, wh, wa)``.
      scale_clamp: upper clamp of ``dw`` and ``dh`` before ``exp`` when decoding.
    """

    weights: tuple[float, float, float, float, float]
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _check_weights(self.weights, 5, "Box2BoxTransformRotated"))
        object.__setattr__(self, "scale_clamp", float(self.scale_clamp))

    def get_deltas(self, src_boxes: Array, target_boxes: Array) -> Array:
        """Deltas that take ``src_boxes [..., 5]`` to ``target_boxes [..., 5]`` -> ``[..., 5]``.

        ``dx, dy, dw, dh`` as :meth:`Box2BoxTransform.get_deltas` (from centres and sizes read
        directly off the boxes); ``da = wa * pi / 180 * wrap(target_angle - src_angle)`` with the
        difference wrapped into ``[-180, 180)`` degrees (``wa * pi / 180`` evaluated in double
        precision, as detectron2). Concrete source boxes of non-positive width raise ``ValueError``.
        """
        fn = "Box2BoxTransformRotated.get_deltas"
        concrete_src = _concrete(src_boxes)
        src = _as_boxes(src_boxes, "src_boxes", fn, 5)
        target = _as_boxes(target_boxes, "target_boxes", fn, 5)
        _broadcast_leading(src.shape[:-1], target.shape[:-1], "src_boxes and target_boxes", fn,
                           (src.shape, target.shape))
        _check_src_widths(concrete_src, 2, "Box2BoxTransformRotated")
        dtype = _compute_dtype(src, target)
        src, target = src.astype(dtype), target.astype(dtype)

        wx, wy, ww, wh, wa = self.weights
        dx = wx * (target[..., 0] - src[..., 0]) / src[..., 2]
        dy = wy * (target[..., 1] - src[..., 1]) / src[..., 3]
        dw = ww * jnp.log(target[..., 2] / src[..., 2])
        dh = wh * jnp.log(target[..., 3] / src[..., 3])
        da = _wrap_degrees(target[..., 4] - src[..., 4]) * np.asarray(wa * math.pi / 180.0, dtype)
        return jnp.stack([dx, dy, dw, dh, da], axis=-1)

    def apply_deltas(self, deltas: Array, boxes: Array) -> Array:
        """Applies ``deltas [..., K*5]`` to rotated ``boxes [..., 5]`` -> ``[..., K*5]``.

        Centre ``(dx / wx * w + xc, dy / wy * h + yc)``, size ``(exp(min(dw / ww, clamp)) * w,
        exp(min(dh / wh, clamp)) * h)``, angle ``(da / wa) * 180 / pi + angle`` wrapped into
        ``[-180, 180)``. Evaluated in the deltas' dtype promoted to at least float32 (detectron2
        casts the boxes to the deltas' dtype).
        """
        fn = "Box2BoxTransformRotated.apply_deltas"
        deltas = _as_deltas(deltas, 5, fn)
        boxes = _as_boxes(boxes, "boxes", fn, 5)
        lead = _broadcast_leading(deltas.shape[:-1], boxes.shape[:-1], "deltas and boxes", fn,
                                  (deltas.shape, boxes.shape))
        dtype = _compute_dtype(deltas)
        deltas, boxes = deltas.astype(dtype), boxes.astype(dtype)

        ctr_x, ctr_y, widths, heights, angles = (boxes[..., i, None] for i in range(5))
        wx, wy, ww, wh, wa = self.weights
        d = deltas.reshape(*deltas.shape[:-1], deltas.shape[-1] // 5, 5)  # [..., K, 5]
        dx = _over(d[..., 0], wx)
        dy = _over(d[..., 1], wy)
        dw = _clamp_scale(_over(d[..., 2], ww), self.scale_clamp)
        dh = _clamp_scale(_over(d[..., 3], wh), self.scale_clamp)
        da = _over(d[..., 4], wa)

        pred_x = _rounded(dx * widths) + ctr_x
        pred_y = _rounded(dy * heights) + ctr_y
        pred_w = jnp.exp(dw) * widths
        pred_h = jnp.exp(dh) * heights
        # detectron2's da * 180.0 / math.pi, step by step
        pred_angle = _wrap_degrees(_over(da * 180.0, math.pi) + angles)
        pred = jnp.stack([pred_x, pred_y, pred_w, pred_h, pred_angle], axis=-1)
        return pred.reshape(*lead, deltas.shape[-1])


# --------------------------------------------------------------------------------------------
# rotated boxes
# --------------------------------------------------------------------------------------------
def rotated_box_area(boxes: Array) -> Array:
    """Areas ``width * height`` of rotated ``boxes [..., 5]`` -> ``[...]`` (``RotatedBoxes.area``)."""
    boxes = _as_boxes(boxes, "boxes", "rotated_box_area", 5)
    boxes = boxes.astype(_compute_dtype(boxes))
    return boxes[..., 2] * boxes[..., 3]


def clip_rotated_boxes(boxes: Array, height: Array | float, width: Array | float,
                       clip_angle_threshold: float = 1.0) -> Array:
    """detectron2's ``RotatedBoxes.clip((height, width), clip_angle_threshold)``, returning the
    clipped boxes.

    Args:
      boxes: ``[..., 5]`` rotated boxes ``(xc, yc, w, h, angle_degrees)``.
      height, width: the image size; numbers or arrays broadcasting against ``boxes[..., 0]``.
      clip_angle_threshold: boxes whose wrapped angle is within this many degrees of 0 are
        clipped as axis-aligned boxes; the others are left as they are (there is no unique way to
        clip a rotated box into the image).

    Returns:
      ``[..., 5]``: every angle wrapped into ``[-180, 180)``; for the nearly horizontal boxes the
      corners ``xc -+ w / 2``, ``yc -+ h / 2`` clamped into ``[0, width]`` / ``[0, height]``, the
      centre recomputed from them and the size ``min(old size, clamped extent)`` (never grown by
      rounding).
    """
    fn = "clip_rotated_boxes"
    boxes = _as_boxes(boxes, "boxes", fn, 5)
    boxes = boxes.astype(_compute_dtype(boxes))
    w = jnp.asarray(width, boxes.dtype)
    h = jnp.asarray(height, boxes.dtype)
    size_shape = jnp.broadcast_shapes(w.shape, h.shape)
    _broadcast_leading(boxes.shape[:-1], size_shape, "boxes and height/width", fn,
                       (boxes.shape, size_shape))

    ctr_x, ctr_y, widths, heights = (boxes[..., i] for i in range(4))
    angles = _wrap_degrees(boxes[..., 4])
    x1 = _clamp(ctr_x - widths / 2.0, 0.0, w)
    y1 = _clamp(ctr_y - heights / 2.0, 0.0, h)
    x2 = _clamp(ctr_x + widths / 2.0, 0.0, w)
    y2 = _clamp(ctr_y + heights / 2.0, 0.0, h)
    clipped = jnp.stack(
        [(x1 + x2) / 2.0, (y1 + y2) / 2.0, _torch_minimum(widths, x2 - x1),
         _torch_minimum(heights, y2 - y1)],
        axis=-1,
    )
    horizontal = jnp.abs(angles) <= clip_angle_threshold
    centre_and_size = jnp.where(horizontal[..., None], clipped, boxes[..., :4])
    return jnp.concatenate([centre_and_size, angles[..., None]], axis=-1)


def nonempty_rotated(boxes: Array, threshold: float | Array = 0.0) -> Array:
    """``RotatedBoxes.nonempty``: ``bool[...]``, True where the width and the height of rotated
    ``boxes [..., 5]`` are both strictly greater than ``threshold``."""
    boxes = _as_boxes(boxes, "boxes", "nonempty_rotated", 5)
    boxes = boxes.astype(_compute_dtype(boxes))
    return (boxes[..., 2] > threshold) & (boxes[..., 3] > threshold)
