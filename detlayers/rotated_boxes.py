"""Rotated-box geometry (``detectron2.layers.rotated_boxes``): corners, areas and IoU.

A rotated box is ``(x_center, y_center, width, height, angle_degrees)``; a positive angle turns the
box counter-clockwise as seen on screen (image y axis points down), i.e. its width axis is
``(cos a, -sin a)`` and its height axis ``(sin a, cos a)`` in image coordinates.

The IoU (:func:`pairwise_iou_rotated` and the NMS kernels) is detectron2's float32 value, clamped
to ``[0, 1]``, wherever that value is within ``SOUND_TOLERANCE`` (``1e-4``) of the exact IoU;
elsewhere (the same rectangle written as ``angle + 180`` or ``(h, w, angle + 90)``, nearly
identical, tiny or thin boxes, where detectron2 gives 1/3, values above 1 or below 0) it is the
exact IoU up to float32 rounding. It is 0 when either area ``w * h`` is below ``1e-14``. The
values are bit-identical in pure ``jax.numpy`` (here, any backend), in the C++ CPU kernel and in
the CUDA kernel (``custom_calls/rotated_iou.h``), so NMS decisions are identical everywhere.
Inputs of any real dtype are evaluated in float32. How it is computed:
``docs/design/rotated_iou.md``.

Not differentiable (neither is detectron2's op): differentiating with respect to the boxes raises
a ``TypeError`` at trace time; wrap them in ``jax.lax.stop_gradient`` when the IoU only drives
matching or suppression.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._checks import f32_at_or_above as _f32_at_or_above
from detlayers._checks import f32_at_or_below as _f32_at_or_below
from detlayers._numerics import round_product as _rounded

Array = jax.Array

__all__ = [
    "pairwise_iou_rotated",
    "rotated_iou_one_to_many",
    "rotated_iou_paired",
    "rotated_box_corners",
    "rotated_box_areas",
    "rotated_reach",
    "rotated_discs_apart",
    "SOUND_TOLERANCE",
]

DEFAULT_PAIRS_PER_CHUNK = 4096


# detectron2 turns degrees into radians with this truncated constant (in double precision); the
# difference from pi / 180 decides the tiny sin/cos residues near multiples of 90 degrees.
_REFERENCE_DEG_TO_RAD = 0.01745329251
# pi / 180 and the reference's deficit from it, each as an unevaluated float32 sum hi + lo.
_DEG_TO_RAD_HI = np.float32(np.pi / 180)
_DEG_TO_RAD_LO = np.float32(np.pi / 180 - float(_DEG_TO_RAD_HI))
_DEFICIT = np.pi / 180 - _REFERENCE_DEG_TO_RAD
_DEFICIT_HI = np.float32(_DEFICIT)
_DEFICIT_LO = np.float32(_DEFICIT - float(_DEFICIT_HI))
# sin / cos of whole degrees -50..50, as float32 hi + lo pairs (exact to ~2^-48).
_WHOLE_DEGREES = np.arange(-50, 51)
_SIN_TABLE = np.sin(np.radians(_WHOLE_DEGREES.astype(np.float64)))
_COS_TABLE = np.cos(np.radians(_WHOLE_DEGREES.astype(np.float64)))
_SIN_HI = _SIN_TABLE.astype(np.float32)
_SIN_LO = (_SIN_TABLE - _SIN_HI.astype(np.float64)).astype(np.float32)
_COS_HI = _COS_TABLE.astype(np.float32)
_COS_LO = (_COS_TABLE - _COS_HI.astype(np.float64)).astype(np.float32)


# The reference's double-precision comparisons, as equivalent float32 thresholds.
_PARALLEL_DET = _f32_at_or_below(1e-14)  # parallel iff |det| <= 1e-14
_PARAM_LOW = _f32_at_or_below(-1e-5)  # t > -1e-5
_PARAM_HIGH = _f32_at_or_above(1.0 + 1e-5)  # t < 1 + 1e-5
_INSIDE_LOW = _f32_at_or_below(-1e-5)  # projection > -1e-5
_INSIDE_SLACK = _f32_at_or_above(1e-5)  # projection - side_sq < 1e-5
_TURN_NEGATIVE = _f32_at_or_above(-1e-6)  # cross < -1e-6
_TURN_COLLINEAR = _f32_at_or_above(1e-6)  # |cross| < 1e-6
_DISTINCT_DIST_SQ = _f32_at_or_below(1e-8)  # dist_sq > 1e-8
_MIN_AREA = _f32_at_or_above(1e-14)  # area < 1e-14 gives IoU 0


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _as_boxes(boxes: Array, name: str, rank: int) -> Array:
    boxes = jnp.asarray(boxes)
    if not (jnp.issubdtype(boxes.dtype, jnp.floating) or jnp.issubdtype(boxes.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real (float or int) array, got dtype {boxes.dtype}")
    if boxes.ndim != rank or boxes.shape[-1] != 5:
        want = "[5]" if rank == 1 else "[N, 5]"
        raise ValueError(
            f"{name} must have shape {want} (x_center, y_center, width, height, angle_degrees), "
            f"got shape {boxes.shape}"
        )
    return boxes.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: Array) -> tuple[Array, Array]:
    """``a = hi + lo`` with at most 12 significant bits in each (Dekker)."""
    c = _rounded(np.float32(4097.0) * a)
    hi = c - (c - a)
    return hi, a - hi


def _two_product(a: Array, b: Array) -> tuple[Array, Array]:
    """``a * b = p + e`` exactly (Dekker; every partial product below is exact)."""
    p = _rounded(a * b)
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((_rounded(ah * bh) - p) + _rounded(ah * bl) + _rounded(al * bh)) + _rounded(al * bl)
    return p, e


def _cos_sin_degrees(angle: Array, *, truncated: bool = True) -> tuple[Array, Array]:
    """float32 cos and sin of ``angle * 0.01745329251`` (detectron2's radians, in double), or of
    ``angle * pi / 180`` when not ``truncated`` (exact at multiples of 90 degrees).

    detectron2 evaluates them in double precision and rounds to float32; without float64 we get
    the same float32 numbers (barring a ~1e-4 chance per value) by working in float32 pairs:
    the angle is reduced exactly to ``90 q + n + f`` degrees (quadrant ``q``, whole degrees
    ``|n| <= 45``, ``|f| <= 0.5``); ``psi = f pi/180 - angle * deficit`` (the deficit being
    ``pi/180 - 0.01745329251``) is formed as hi + lo; ``sin/cos(n + psi)`` come from a table of
    whole degrees and short Taylor series in ``psi``; the quadrant swaps and negates exactly.
    Per-box cost only.
    """
    reduced = jnp.fmod(angle, np.float32(360.0))
    quadrant = jnp.round(reduced / np.float32(90.0))
    remainder = reduced - quadrant * np.float32(90.0)  # exact, |remainder| <= 45 (+ rounding)
    whole = jnp.round(remainder)
    fraction = remainder - whole  # exact, |fraction| <= 0.5

    frac_rad, frac_err = _two_product(fraction, _DEG_TO_RAD_HI)
    frac_rest = frac_err + _rounded(fraction * _DEG_TO_RAD_LO)
    if truncated:
        deficit, deficit_err = _two_product(angle, _DEFICIT_HI)
        psi, psi_err = _two_sum(frac_rad, -deficit)
        deficit_rest = deficit_err + _rounded(angle * _DEFICIT_LO)
        psi_err = psi_err + (frac_rest - deficit_rest)
    else:
        psi, psi_err = frac_rad, frac_rest
    psi, psi_err = _two_sum(psi, psi_err)
    psi_sq = _rounded(psi * psi)
    # sin(psi) = psi + sin_tail;  cos(psi) = 1 - one_minus_cos   (|psi| < 0.009)
    psi_cubed = _rounded(psi_sq * psi)
    sin_tail = psi_err - _rounded(psi_cubed * (np.float32(1 / 6) - psi_sq / np.float32(120)))
    psi_fourth = _rounded(psi_sq * psi_sq)
    one_minus_cos = psi_sq * np.float32(0.5) + _rounded(psi * psi_err) - psi_fourth / np.float32(24)

    index = jnp.clip(whole.astype(jnp.int32) + 50, 0, len(_WHOLE_DEGREES) - 1)
    sin_hi, sin_lo = jnp.asarray(_SIN_HI)[index], jnp.asarray(_SIN_LO)[index]
    cos_hi, cos_lo = jnp.asarray(_COS_HI)[index], jnp.asarray(_COS_LO)[index]

    def rotate(base_hi, base_lo, other_hi, other_lo, sign):
        # base * cos(psi) + sign * other * sin(psi), with the two large terms summed exactly.
        lead, lead_err = _two_product(other_hi, psi)
        total, total_err = _two_sum(base_hi, sign * lead)
        small = (
            base_lo
            - _rounded(base_hi * one_minus_cos)
            + sign * (lead_err + _rounded(other_hi * sin_tail) + _rounded(other_lo * psi))
        )
        return total + (total_err + small)

    s = rotate(sin_hi, sin_lo, cos_hi, cos_lo, np.float32(1))
    c = rotate(cos_hi, cos_lo, sin_hi, sin_lo, np.float32(-1))
    q = jnp.mod(quadrant.astype(jnp.int32), 4)
    cos = jnp.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin = jnp.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return cos, sin


def _corners_xy(
    cx: Array, cy: Array, w: Array, h: Array, cos: Array, sin: Array
) -> tuple[Array, Array]:
    """Corners ``[4, ...]`` (x and y) in detectron2's order and rounding."""
    half_cos = cos * np.float32(0.5)
    half_sin = sin * np.float32(0.5)
    sin_h, cos_w = _rounded(half_sin * h), _rounded(half_cos * w)
    cos_h, sin_w = _rounded(half_cos * h), _rounded(half_sin * w)
    x0 = cx + sin_h + cos_w
    y0 = cy + cos_h - sin_w
    x1 = cx - sin_h + cos_w
    y1 = cy - cos_h - sin_w
    x2 = np.float32(2) * cx - x0
    y2 = np.float32(2) * cy - y0
    x3 = np.float32(2) * cx - x1
    y3 = np.float32(2) * cy - y1
    return jnp.stack([x0, x1, x2, x3]), jnp.stack([y0, y1, y2, y3])


def rotated_box_corners(boxes: Array) -> Array:
    """Corners of rotated boxes.

    Args:
      boxes: ``[..., 5]`` rotated boxes ``(xc, yc, w, h, angle_degrees)``.

    Returns:
      float32 ``[..., 4, 2]`` corners ``(x, y)``: centre ``+ (w/2) u + (h/2) v``, ``+ (w/2) u -
      (h/2) v``, then the two reflections through the centre, where ``u = (cos a, -sin a)`` and
      ``v = (sin a, cos a)`` (detectron2's order; counter-clockwise on screen for positive sizes).
    """
    boxes = jnp.asarray(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 5:
        raise ValueError(f"boxes must have shape [..., 5], got shape {boxes.shape}")
    boxes = boxes.astype(jnp.float32)
    cos, sin = _cos_sin_degrees(boxes[..., 4])
    xs, ys = _corners_xy(boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3], cos, sin)
    return jnp.moveaxis(jnp.stack([xs, ys], axis=-1), 0, -2)


def rotated_box_areas(boxes: Array) -> Array:
    """``width * height`` of rotated boxes ``[..., 5]`` as float32 ``[...]``."""
    boxes = jnp.asarray(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 5:
        raise ValueError(f"boxes must have shape [..., 5], got shape {boxes.shape}")
    boxes = boxes.astype(jnp.float32)
    return boxes[..., 2] * boxes[..., 3]


# --------------------------------------------------------------------------------------------
# intersection of two rectangles, all pairs at once (slot axis first: [24, P])
# --------------------------------------------------------------------------------------------
def _edges(x: Array, y: Array) -> tuple[Array, Array]:
    return jnp.roll(x, -1, axis=0) - x, jnp.roll(y, -1, axis=0) - y


def _cross(ax: Array, ay: Array, bx: Array, by: Array) -> Array:
    """``ax * by - bx * ay`` with both products rounded (no FMA), as the reference computes it."""
    return _rounded(ax * by) - _rounded(bx * ay)


def _dot(ax: Array, ay: Array, bx: Array, by: Array) -> Array:
    return _rounded(ax * bx) + _rounded(ay * by)


def _contained_corners(px, py, rx, ry, rex, rey) -> Array:
    """Mask ``[4, P]``: corner i of (px, py) is inside rectangle (rx, ry) with edges (rex, rey)."""
    side_ax, side_ay = rex[0], rey[0]  # rect[0] -> rect[1]
    side_bx, side_by = rex[3], rey[3]  # rect[3] -> rect[0]
    side_a_sq = _dot(side_ax, side_ay, side_ax, side_ay)
    side_b_sq = _dot(side_bx, side_by, side_bx, side_by)
    offx, offy = px - rx[0], py - ry[0]
    along_a = _dot(offx, offy, side_ax, side_ay)
    along_b = -_dot(offx, offy, side_bx, side_by)
    return (
        (along_a > _INSIDE_LOW)
        & (along_b > _INSIDE_LOW)
        & (along_a - side_a_sq < _INSIDE_SLACK)
        & (along_b - side_b_sq < _INSIDE_SLACK)
    )


def _candidates(x1, y1, x2, y2) -> tuple[Array, Array, Array]:
    """Candidate vertices ``[24, P]`` (x, y, valid) in detectron2's discovery order."""
    ex1, ey1 = _edges(x1, y1)
    ex2, ey2 = _edges(x2, y2)
    # [4 (edge of box 1), 4 (edge of box 2), P], flattened i-major like the reference's loops.
    e1x, e1y, p1x, p1y = ex1[:, None], ey1[:, None], x1[:, None], y1[:, None]
    e2x, e2y, p2x, p2y = ex2[None], ey2[None], x2[None], y2[None]
    det = _cross(e2x, e2y, e1x, e1y)
    crossing = jnp.abs(det) > _PARALLEL_DET
    safe_det = jnp.where(crossing, det, np.float32(1))
    bx, by = p2x - p1x, p2y - p1y
    s = _cross(e2x, e2y, bx, by) / safe_det  # parameter along the box-1 edge
    u = _cross(e1x, e1y, bx, by) / safe_det  # parameter along the box-2 edge
    crossing &= (s > _PARAM_LOW) & (s < _PARAM_HIGH) & (u > _PARAM_LOW) & (u < _PARAM_HIGH)
    cx = p1x + _rounded(e1x * s)
    cy = p1y + _rounded(e1y * s)
    num_pairs = x1.shape[1:]
    xs = jnp.concatenate([cx.reshape((16,) + num_pairs), x1, x2])
    ys = jnp.concatenate([cy.reshape((16,) + num_pairs), y1, y2])
    valid = jnp.concatenate(
        [
            crossing.reshape((16,) + num_pairs),
            _contained_corners(x1, y1, x2, y2, ex2, ey2),
            _contained_corners(x2, y2, x1, y1, ex1, ey1),
        ]
    )
    return jnp.where(valid, xs, 0), jnp.where(valid, ys, 0), valid


def _column(a: Array, i: Array) -> Array:
    return lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)


def _set_column(a: Array, value: Array, i: Array) -> Array:
    return lax.dynamic_update_index_in_dim(a, value, i, axis=0)


def _hull_area(xs: Array, ys: Array, valid: Array) -> Array:
    """Area ``[P]`` of the convex hull of the valid candidates (detectron2's Graham scan)."""
    slots = lax.broadcasted_iota(jnp.int32, valid.shape, 0)
    count = jnp.sum(valid, axis=0, dtype=jnp.int32)
    # Compact the valid candidates to the front, keeping their discovery order: slot k takes the
    # (k+1)-th valid candidate, the first slot whose running count of valid ones exceeds k.
    running = jnp.cumsum(valid, axis=0, dtype=jnp.int32)
    source = jnp.sum(running[None] <= slots[:, None], axis=1, dtype=jnp.int32)
    source = jnp.minimum(source, valid.shape[0] - 1)
    xs = jnp.take_along_axis(xs, source, axis=0)
    ys = jnp.take_along_axis(ys, source, axis=0)
    valid = slots < count
    big = np.float32(np.inf)

    # Pivot: lowest y, then lowest x, first occurrence.
    min_y = jnp.min(jnp.where(valid, ys, big), axis=0)
    at_min_y = valid & (ys == min_y)
    min_x = jnp.min(jnp.where(at_min_y, xs, big), axis=0)
    pivot = jnp.argmax(at_min_y & (xs == min_x), axis=0)
    rel_x = xs - jnp.take_along_axis(xs, pivot[None], axis=0)
    rel_y = ys - jnp.take_along_axis(ys, pivot[None], axis=0)
    # Swap the pivot (now (0, 0)) into slot 0.
    is_pivot = slots == pivot[None]
    rel_x = jnp.where(is_pivot, rel_x[:1], jnp.where(slots == 0, 0, rel_x))
    rel_y = jnp.where(is_pivot, rel_y[:1], jnp.where(slots == 0, 0, rel_y))
    dist = _dot(rel_x, rel_y, rel_x, rel_y)
    most = jnp.max(count)  # loops run only over slots some pair uses

    # Exchange sort of slots 1..count-1 by angle around the pivot (nearer first when collinear).
    def sort_outer(i, arrays):
        cur = tuple(_column(a, i) for a in arrays)

        def sort_inner(j, state):
            arrays, cur = state
            other = tuple(_column(a, j) for a in arrays)
            turn = _cross(cur[0], cur[1], other[0], other[1])
            swap = (j < count) & (
                (turn < _TURN_NEGATIVE) | ((jnp.abs(turn) < _TURN_COLLINEAR) & (cur[2] > other[2]))
            )
            arrays = tuple(
                _set_column(a, jnp.where(swap, c, o), j) for a, c, o in zip(arrays, cur, other)
            )
            cur = tuple(jnp.where(swap, o, c) for c, o in zip(cur, other))
            return arrays, cur

        arrays, cur = lax.fori_loop(i + 1, most, sort_inner, (arrays, cur))
        return tuple(_set_column(a, c, i) for a, c in zip(arrays, cur))

    rel_x, rel_y, dist = lax.fori_loop(1, most - 1, sort_outer, (rel_x, rel_y, dist))

    # The hull starts with the pivot and the first candidate distinct from it.
    distinct = valid & (slots >= 1) & (dist > _DISTINCT_DIST_SQ)
    has_second = jnp.any(distinct, axis=0)
    second = jnp.where(has_second, jnp.argmax(distinct, axis=0), 0)
    hull_x = jnp.where(slots == 1, jnp.take_along_axis(rel_x, second[None], axis=0), 0)
    hull_y = jnp.where(slots == 1, jnp.take_along_axis(rel_y, second[None], axis=0), 0)
    size = jnp.full_like(count, 2, jnp.int32)  # (varies like count under shard_map)

    def at(a: Array, index: Array) -> Array:
        return jnp.take_along_axis(a, jnp.maximum(index, 0)[None], axis=0)[0]

    def scan_step(i, state):
        hull_x, hull_y, size = state
        px, py = _column(rel_x, i), _column(rel_y, i)
        active = has_second & (i > second) & (i < count)

        def must_pop(size):
            base_x, base_y = at(hull_x, size - 2), at(hull_y, size - 2)
            to_new_x, to_new_y = px - base_x, py - base_y
            to_last_x, to_last_y = at(hull_x, size - 1) - base_x, at(hull_y, size - 1) - base_y
            # Products compared, not subtracted, as in the reference.
            return active & (size > 1) & (to_new_x * to_last_y >= to_last_x * to_new_y)

        def pop(state):
            size, popping = state
            size = size - popping.astype(jnp.int32)
            return size, must_pop(size)

        size, _ = lax.while_loop(lambda s: jnp.any(s[1]), pop, (size, must_pop(size)))
        push = active[None] & (slots == size[None])
        hull_x = jnp.where(push, px[None], hull_x)
        hull_y = jnp.where(push, py[None], hull_y)
        return hull_x, hull_y, size + active.astype(jnp.int32)

    hull_x, hull_y, size = lax.fori_loop(2, most, scan_step, (hull_x, hull_y, size))

    # Fan from the pivot (the origin), summed in slot order like the reference.
    terms = jnp.abs(_cross(hull_x[1:-1], hull_y[1:-1], hull_x[2:], hull_y[2:]))
    terms = jnp.where(slots[2:] < size, terms, 0)
    twice_area = lax.fori_loop(
        0,
        terms.shape[0],
        lambda i, acc: acc + _column(terms, i),
        jnp.zeros_like(count, jnp.float32),
    )
    return jnp.where(count > 2, twice_area / np.float32(2), 0)


def rotated_reach(boxes: Array) -> Array:
    """Reach ``[K]`` of float32 rotated boxes ``[K, 5]``: pairs whose centres are farther apart
    than the sum of their reaches have IoU exactly 0 and may skip the polygon computation.

    The one Python definition of the rule (``custom_calls/rotated_iou.h``'s ``rotated_reach`` is
    the one C++ definition, with the same float32 operations in the same order, so both skip the
    same pairs): the circumradius with 0.2 % slack, plus room for detectron2's ``1e-5``
    point-inside tolerance and the float32 rounding of large coordinates. A box with a zero side,
    or with a non-finite size or reach, gets ``inf`` (never skipped).
    """
    w, h = jnp.abs(boxes[:, 2]), jnp.abs(boxes[:, 3])
    min_side = jnp.minimum(w, h)
    radius = np.float32(0.5) * jnp.sqrt(_rounded(w * w) + _rounded(h * h))
    coord = jnp.abs(boxes[:, 0]) + jnp.abs(boxes[:, 1])
    safe_side = jnp.where(min_side > 0, min_side, np.float32(1))
    reach = (
        _rounded(radius * np.float32(1.002))
        + np.float32(2e-4) / safe_side
        + _rounded(np.float32(2e-5) * coord)
        + np.float32(1e-5)
    )
    return jnp.where((min_side > 0) & jnp.isfinite(reach), reach, np.float32(np.inf))


def rotated_discs_apart(
    x1: Array, y1: Array, reach1: Array, x2: Array, y2: Array, reach2: Array
) -> Array:
    """True where two boxes (centres and :func:`rotated_reach`, broadcast) are too far apart to
    overlap; their IoU is then exactly 0. False for an infinite reach or NaN."""
    dx, dy = x1 - x2, y1 - y2
    reach = reach1 + reach2
    return _rounded(dx * dx) + _rounded(dy * dy) > _rounded(reach * reach)


# Columns of the per-box table built by _prepare.
_X, _Y, _W, _H, _COS, _SIN, _AREA, _REACH, _COS_EXACT, _SIN_EXACT = range(10)


def _prepare(boxes: Array) -> Array:
    """Per-box quantities ``[K, 10]`` (trigonometry once per box): x, y, w, h, cos and sin of
    detectron2's radians, area, reach, and cos and sin of the exact radians."""
    x, y, w, h, angle = (boxes[:, k] for k in range(5))
    cos, sin = _cos_sin_degrees(angle)
    cos_exact, sin_exact = _cos_sin_degrees(angle, truncated=False)
    area = _rounded(w * h)
    reach = rotated_reach(boxes)
    return jnp.stack([x, y, w, h, cos, sin, area, reach, cos_exact, sin_exact], axis=1)


def _maybe_overlapping(prepared1: Array, prepared2: Array) -> Array:
    """``[N, M]`` mask of the pairs that may have a non-zero IoU (NaN boxes included)."""
    return ~rotated_discs_apart(
        prepared1[:, None, _X], prepared1[:, None, _Y], prepared1[:, None, _REACH],
        prepared2[None, :, _X], prepared2[None, :, _Y], prepared2[None, :, _REACH],
    )


def _detectron2_iou_of_pairs(b1: Array, b2: Array) -> Array:
    """detectron2's float32 IoU of prepared boxes ``b1[:, p]``, ``b2[:, p]`` (columns ``[10, P]``)."""
    # Shift to the midpoint of the two centres (sum rounded in float32, as the reference does).
    mid_x = (b1[_X] + b2[_X]) * np.float32(0.5)
    mid_y = (b1[_Y] + b2[_Y]) * np.float32(0.5)
    x1, y1 = _corners_xy(b1[_X] - mid_x, b1[_Y] - mid_y, b1[_W], b1[_H], b1[_COS], b1[_SIN])
    x2, y2 = _corners_xy(b2[_X] - mid_x, b2[_Y] - mid_y, b2[_W], b2[_H], b2[_COS], b2[_SIN])
    area1, area2 = b1[_AREA], b2[_AREA]
    inter = _hull_area(*_candidates(x1, y1, x2, y2))
    degenerate = (area1 < _MIN_AREA) | (area2 < _MIN_AREA)
    union = jnp.where(degenerate, np.float32(1), area1 + area2 - inter)
    return jnp.where(degenerate, np.float32(0), inter / union)


def _band_integral(px, py, qx, qy, half_w, half_h) -> Array:
    """Signed integral of ``clamp(y, -half_h, half_h) + half_h`` dx along the segment p -> q,
    restricted to ``|x| <= half_w`` (one edge's share of a polygon's area inside the box)."""
    zero, one = np.float32(0), np.float32(1)
    span_x = qx - px
    moving = span_x != zero
    safe_span_x = jnp.where(moving, span_x, one)
    xa = jnp.clip(px, -half_w, half_w)
    xb = jnp.clip(qx, -half_w, half_w)
    ta = (xa - px) / safe_span_x
    tb = (xb - px) / safe_span_x
    span_y = qy - py
    ya = py + _rounded(ta * span_y)
    yb = py + _rounded(tb * span_y)
    rise = yb - ya
    sloped = rise != zero
    safe_rise = jnp.where(sloped, rise, one)
    t_low = jnp.clip((-half_h - ya) / safe_rise, zero, one)
    t_high = jnp.clip((half_h - ya) / safe_rise, zero, one)
    t_enter = jnp.minimum(t_low, t_high)
    t_leave = jnp.maximum(t_low, t_high)
    inside = jnp.where(sloped, t_leave - t_enter, jnp.where(jnp.abs(ya) <= half_h, one, zero))
    above = jnp.where(
        rise > zero, one - t_leave, jnp.where(rise < zero, t_enter, jnp.where(ya > half_h, one, zero))
    )
    mean_inside = (jnp.clip(ya, -half_h, half_h) + jnp.clip(yb, -half_h, half_h)) * np.float32(
        0.5
    ) + half_h
    height = _rounded(inside * mean_inside) + _rounded(above * (half_h + half_h))
    return jnp.where(moving, _rounded((xb - xa) * height), zero)


def _exact_iou_of_pairs(b1: Array, b2: Array) -> Array:
    """IoU of prepared boxes ``b1[:, p]``, ``b2[:, p]`` (``[10, P]``) exact up to float32
    rounding: box 2's outline in box 1's frame, integrated against box 1's rectangle."""
    c1, s1, c2, s2 = b1[_COS_EXACT], b1[_SIN_EXACT], b2[_COS_EXACT], b2[_SIN_EXACT]
    dx, dy = b2[_X] - b1[_X], b2[_Y] - b1[_Y]
    # Box 2's centre and width axis in box 1's frame (width axis (c, -s), height axis (s, c)).
    cx = _rounded(dx * c1) - _rounded(dy * s1)
    cy = _rounded(dx * s1) + _rounded(dy * c1)
    ux = _rounded(c2 * c1) + _rounded(s2 * s1)
    uy = _rounded(c2 * s1) - _rounded(s2 * c1)
    half_w2, half_h2 = b2[_W] * np.float32(0.5), b2[_H] * np.float32(0.5)
    a, b = _rounded(half_w2 * ux), _rounded(half_w2 * uy)
    c, d = _rounded(half_h2 * uy), _rounded(half_h2 * ux)
    xs = (cx + (a - c), cx + (a + c), cx - (a - c), cx - (a + c))
    ys = (cy + (b + d), cy + (b - d), cy - (b + d), cy - (b - d))
    half_w1 = jnp.abs(b1[_W]) * np.float32(0.5)
    half_h1 = jnp.abs(b1[_H]) * np.float32(0.5)
    terms = [
        _band_integral(xs[k], ys[k], xs[(k + 1) % 4], ys[(k + 1) % 4], half_w1, half_h1)
        for k in range(4)
    ]
    area1, area2 = b1[_AREA], b2[_AREA]
    inter = jnp.minimum(jnp.abs(((terms[0] + terms[1]) + terms[2]) + terms[3]),
                        jnp.minimum(area1, area2))
    degenerate = (area1 < _MIN_AREA) | (area2 < _MIN_AREA)
    union = jnp.where(degenerate, np.float32(1), area1 + area2 - inter)
    return jnp.where(degenerate, np.float32(0), jnp.clip(inter / union, np.float32(0), np.float32(1)))


# detectron2's value (clamped to [0, 1]) is used when it lies within this distance of the exact IoU.
SOUND_TOLERANCE = 1e-4
_SOUND_TOLERANCE = np.float32(SOUND_TOLERANCE)


def _iou_of_pairs(prepared1: Array, prepared2: Array) -> Array:
    """IoU of pair ``p`` of prepared boxes (``[P, 10]`` each, see ``_prepare``); returns ``[P]``."""
    b1, b2 = prepared1.T, prepared2.T
    reference = _detectron2_iou_of_pairs(b1, b2)
    exact = _exact_iou_of_pairs(b1, b2)
    sound = jnp.abs(reference - exact) <= _SOUND_TOLERANCE
    return jnp.where(sound, jnp.clip(reference, np.float32(0), np.float32(1)), exact)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def pairwise_iou_rotated(
    boxes1: Array, boxes2: Array, *, pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK
) -> Array:
    """IoU of every rotated box in ``boxes1`` with every one in ``boxes2`` (detectron2's op).

    Args:
      boxes1: ``[N, 5]`` rotated boxes ``(x_center, y_center, width, height, angle_degrees)``.
      boxes2: ``[M, 5]`` rotated boxes.
      pairs_per_chunk: how many box pairs are evaluated at once (bounds scratch memory).
        Keyword-only, not in detectron2.

    Returns:
      float32 ``[N, M]`` in ``[0, 1]``; ``iou[i, j]`` is detectron2's ``pairwise_iou_rotated(boxes1,
      boxes2)[i, j]`` bit for bit (clamped to ``[0, 1]``) wherever that is within
      ``SOUND_TOLERANCE`` of the exact IoU, else the exact IoU up to float32 rounding (see the
      module docstring). Box ``i`` of ``boxes1`` is detectron2's first argument; the IoU is
      symmetric only up to rounding. Inputs of any real dtype are evaluated in float32. Empty
      ``N`` or ``M`` gives an empty ``[N, M]`` array. Works under ``jit`` and ``vmap``; scratch
      memory is bounded by ``pairs_per_chunk`` besides the ``O(N M)`` result.

    Raises:
      ValueError: a box array is not ``[K, 5]``, ``N * M >= 2**31``, or ``pairs_per_chunk < 1``.
      TypeError: a box array is not real-valued; or, under ``jax.grad``/``jvp``, the boxes are
        being differentiated (the op has no derivative, as in detectron2).
    """
    boxes1 = _as_boxes(boxes1, "boxes1", 2)
    boxes2 = _as_boxes(boxes2, "boxes2", 2)
    if not isinstance(pairs_per_chunk, (int, np.integer)) or pairs_per_chunk < 1:
        raise ValueError(f"pairs_per_chunk must be a positive int, got {pairs_per_chunk!r}")
    n, m = boxes1.shape[0], boxes2.shape[0]
    if n == 0 or m == 0:
        return jnp.zeros((n, m), jnp.float32)
    total = n * m
    if total >= 2**31:
        raise ValueError(f"pairwise_iou_rotated supports fewer than 2**31 pairs, got {n} x {m}")
    return _pairwise_matrix(boxes1, boxes2, int(pairs_per_chunk))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _pairwise_matrix(boxes1: Array, boxes2: Array, pairs_per_chunk: int) -> Array:
    """``[N, M]`` IoUs of float32 ``[N, 5]`` and ``[M, 5]`` boxes (N, M > 0)."""
    n, m = boxes1.shape[0], boxes2.shape[0]
    total = n * m
    boxes1, boxes2 = _prepare(boxes1), _prepare(boxes2)
    # Only pairs whose circles of reach meet are evaluated: they are gathered to the front and
    # processed `chunk` at a time in a loop whose trip count depends on their number, so far-apart
    # boxes (most pairs in a detection image) cost almost nothing.
    candidate = _maybe_overlapping(boxes1, boxes2).reshape(-1)
    num_candidates = jnp.sum(candidate, dtype=jnp.int32)
    chunk = min(pairs_per_chunk, total)
    padded = -(-total // chunk) * chunk
    (pair_ids,) = jnp.nonzero(candidate, size=padded, fill_value=0)
    pair_ids = pair_ids.astype(jnp.int32)
    lanes = jnp.arange(chunk, dtype=jnp.int32)

    def evaluate_chunk(c: Array, iou: Array) -> Array:
        ids = lax.dynamic_slice_in_dim(pair_ids, c * chunk, chunk)
        values = _iou_of_pairs(boxes1[ids // m], boxes2[ids % m])
        target = jnp.where(c * chunk + lanes < num_candidates, ids, total)  # total: dropped
        return iou.at[target].set(values, mode="drop")

    num_chunks = (num_candidates + chunk - 1) // chunk
    iou = lax.fori_loop(0, num_chunks, evaluate_chunk, jnp.zeros(total, jnp.float32))
    return iou.reshape(n, m)


@_pairwise_matrix.defjvp
def _pairwise_matrix_jvp(pairs_per_chunk, primals, tangents):
    # Only reached when the boxes are being differentiated; constant boxes are fine under grad.
    raise TypeError(_NOT_DIFFERENTIABLE)


_NOT_DIFFERENTIABLE = (
    "rotated-box IoU is not differentiable (neither is detectron2's op); wrap the boxes in "
    "jax.lax.stop_gradient if the IoU is only used for matching or suppression"
)


@jax.custom_jvp
def _paired_vector(boxes1: Array, boxes2: Array) -> Array:
    return _iou_of_pairs(_prepare(boxes1), _prepare(boxes2))


@_paired_vector.defjvp
def _paired_vector_jvp(primals, tangents):
    raise TypeError(_NOT_DIFFERENTIABLE)


def rotated_iou_paired(boxes1: Array, boxes2: Array) -> Array:
    """IoU of ``boxes1[p]`` with ``boxes2[p]`` for each row ``p``: float32 ``[P]``.

    The elementwise form for callers that choose the pairs themselves (e.g. NMS after a cheap
    distance test): every row is evaluated, in one shot, with no skipping of far-apart pairs and
    no chunking, so the caller bounds ``P`` (scratch is about 3 KB per pair). ``boxes1[p]`` is
    detectron2's first argument (the kept box in its NMS); values are bit-identical to
    :func:`pairwise_iou_rotated`'s.
    """
    boxes1 = _as_boxes(boxes1, "boxes1", 2)
    boxes2 = _as_boxes(boxes2, "boxes2", 2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must both be [P, 5], got shapes {boxes1.shape} and {boxes2.shape}"
        )
    if boxes1.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32)
    return _paired_vector(boxes1, boxes2)


def rotated_iou_one_to_many(
    box: Array, boxes: Array, *, pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK
) -> Array:
    """IoU of one rotated box ``box[5]`` with each of ``boxes[M, 5]``; float32 ``[M]``.

    ``box`` is detectron2's first argument, as in its rotated NMS (the kept box against the
    remaining ones); values as :func:`pairwise_iou_rotated`.
    Each call pays a fixed loop overhead; for suppression over many boxes, one
    :func:`pairwise_iou_rotated` matrix (cheap when few pairs overlap) is usually faster than a
    call per kept box.
    """
    box = _as_boxes(box, "box", 1)
    boxes = _as_boxes(boxes, "boxes", 2)
    return pairwise_iou_rotated(box[None], boxes, pairs_per_chunk=pairs_per_chunk)[0]
