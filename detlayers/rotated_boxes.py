"""Rotated-box geometry (``detectron2.layers.rotated_boxes``): corners, areas and exact IoU.

A rotated box is ``(x_center, y_center, width, height, angle_degrees)``; a positive angle turns the
box counter-clockwise as seen on screen (image y axis points down), i.e. its width axis is
``(cos a, -sin a)`` and its height axis ``(sin a, cos a)`` in image coordinates.

:func:`pairwise_iou_rotated` reproduces detectron2's ``pairwise_iou_rotated`` step for step, in pure
``jax.numpy`` (no custom call), so it runs on every backend, under ``jit`` and ``vmap``. The same
algorithm, written for C++ and CUDA, is ``custom_calls/rotated_iou.h`` (used by the NMS kernels).

1. Both boxes are moved so that the midpoint of their centres is the origin, which keeps corner
   coordinates small for boxes far from the image origin (large coordinates lose no precision).
2. The IoU is 0 when either area ``w * h`` is below ``1e-14``.
3. Candidate vertices of the intersection polygon are collected in a fixed order: the 16 crossings
   of an edge of box 1 with an edge of box 2 (edge parameters accepted up to ``1e-5`` outside
   ``[0, 1]``; parallel edges, ``|det| <= 1e-14``, skipped), then the corners of box 1 inside box 2,
   then the corners of box 2 inside box 1 (projection test with an absolute slack of ``1e-5``).
   The slack is deliberate: near-identical boxes must not lose a vertex, so their IoU is ~1.
4. Their convex hull is built by a Graham scan around the lowest (then leftmost) candidate, with
   detectron2's exchange sort on the cross product (collinear within ``1e-6``: nearer first) and
   its pop rule; the area is the fan sum of ``|triangle|`` areas.

Every step works on all pairs at once: candidates live in fixed 24-slot arrays with a validity
mask (compacted to the front, in discovery order, so the sort sees exactly detectron2's
sequence), the sort and the scan are ``lax`` loops over slot indices shared by all pairs, and the
stack pointer of the scan is per pair.

Precision: the computation is float32 whatever the input dtype (bfloat16/float16/float64/int
inputs are cast), as detectron2's kernel is; the result is float32. The float32 arithmetic is made
to round exactly like detectron2's compiled C++ so results are bit-identical to it (and to
``rotated_iou.h``), which keeps NMS decisions identical across backends:

* products are rounded before they are added (XLA would otherwise fuse them into FMAs);
* where detectron2 compares a float with a double constant, the float32 comparison uses that
  constant rounded in the direction that gives the identical decision;
* ``cos``/``sin`` of ``angle * 0.01745329251`` (detectron2's truncated pi/180, evaluated in double
  there) are computed in float32 pairs and round to the same float32 values (all but ~1 in 10^5
  angles; the other ones differ by one ulp).

Measured: bit-identical to detectron2's CPU op on every fixture case (about 20,000 pairs, tiny to
huge boxes, see ``tests/test_rotated_iou.py``) and on 180,000 further random pairs. Float64
inputs are not evaluated in float64 (detectron2 does not either).

Cost and memory: a cheap ``[N, M]`` test first drops the pairs whose centres are too far apart
to produce any candidate vertex (their IoU is exactly 0 in detectron2 too). The remaining pairs
are gathered to the front and evaluated ``pairs_per_chunk`` (default 4096) at a time in a loop
whose trip count is their number divided by the chunk, so scratch memory is a few MB whatever
``N`` and ``M`` are, besides ``O(N M)`` for the mask, the pair list and the result
(``N = M = 2000``: about 50 MB). On one CPU core this is ~10x faster than detectron2's CPU op on
typical detection layouts (few overlapping pairs) and ~1-2x slower when nearly all pairs overlap.

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


def _cos_sin_degrees(angle: Array) -> tuple[Array, Array]:
    """float32 cos and sin of ``angle * 0.01745329251`` (detectron2's radians, in double).

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
    deficit, deficit_err = _two_product(angle, _DEFICIT_HI)
    psi, psi_err = _two_sum(frac_rad, -deficit)
    frac_rest = frac_err + _rounded(fraction * _DEG_TO_RAD_LO)
    deficit_rest = deficit_err + _rounded(angle * _DEFICIT_LO)
    psi_err = psi_err + (frac_rest - deficit_rest)
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
    size = jnp.full(count.shape, 2, jnp.int32)

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
        jnp.zeros(count.shape, jnp.float32),
    )
    return jnp.where(count > 2, twice_area / np.float32(2), 0)


def _prepare(boxes: Array) -> Array:
    """Per-box quantities ``[K, 8]``: x, y, w, h, cos, sin, area, reach (trigonometry once per box).

    ``reach`` bounds how far from its centre a box can contribute a candidate vertex: its
    half-diagonal, plus the distance by which the slack of the point-inside test (``1e-5`` on
    dot products, i.e. ``1e-5 / side`` in length) widens each side, plus a 0.1% safety margin
    for rounding. Two boxes whose centres are farther apart than the sum of their reaches have
    no candidate at all, so detectron2's IoU is exactly 0 for them.
    """
    x, y, w, h, angle = (boxes[:, k] for k in range(5))
    cos, sin = _cos_sin_degrees(angle)
    area = _rounded(w * h)
    half_diagonal = np.float32(0.5) * jnp.sqrt(w * w + h * h)
    slack = np.float32(1e-5) / jnp.abs(w) + np.float32(1e-5) / jnp.abs(h)  # inf for a 0 side
    reach = half_diagonal * np.float32(1.001) + slack
    return jnp.stack([x, y, w, h, cos, sin, area, reach], axis=1)


def _maybe_overlapping(prepared1: Array, prepared2: Array) -> Array:
    """``[N, M]`` mask of the pairs that may have a non-zero IoU (NaN boxes included)."""
    dx = prepared1[:, None, 0] - prepared2[None, :, 0]
    dy = prepared1[:, None, 1] - prepared2[None, :, 1]
    reach = prepared1[:, None, 7] + prepared2[None, :, 7]
    return ~(dx * dx + dy * dy > reach * reach)


def _iou_of_pairs(prepared1: Array, prepared2: Array) -> Array:
    """IoU of pair ``p`` of prepared boxes (``[P, 8]`` each, see ``_prepare``); returns ``[P]``."""
    b1, b2 = prepared1.T, prepared2.T
    # Shift to the midpoint of the two centres (sum rounded in float32, as the reference does).
    mid_x = (b1[0] + b2[0]) * np.float32(0.5)
    mid_y = (b1[1] + b2[1]) * np.float32(0.5)
    x1, y1 = _corners_xy(b1[0] - mid_x, b1[1] - mid_y, b1[2], b1[3], b1[4], b1[5])
    x2, y2 = _corners_xy(b2[0] - mid_x, b2[1] - mid_y, b2[2], b2[3], b2[4], b2[5])
    area1, area2 = b1[6], b2[6]
    inter = _hull_area(*_candidates(x1, y1, x2, y2))
    degenerate = (area1 < _MIN_AREA) | (area2 < _MIN_AREA)
    union = jnp.where(degenerate, np.float32(1), area1 + area2 - inter)
    return jnp.where(degenerate, np.float32(0), inter / union)


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
      pairs_per_chunk: how many box pairs are evaluated at once (bounds scratch memory; see the
        module docstring). Keyword-only, not in detectron2.

    Returns:
      float32 ``[N, M]``; ``iou[i, j]`` is detectron2's ``pairwise_iou_rotated(boxes1,
      boxes2)[i, j]``, bit for bit (box ``i`` of ``boxes1`` is the reference's first argument;
      the IoU is symmetric only up to rounding). Inputs of any real dtype are evaluated in
      float32. Empty ``N`` or ``M`` gives an empty ``[N, M]`` array. Works under ``jit`` and
      ``vmap``.

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
    :func:`pairwise_iou_rotated`.
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

    ``box`` is the reference's first argument, as in detectron2's rotated NMS (the kept box
    against the remaining ones), so the result is bit-compatible with what that NMS compares.
    Each call pays a fixed loop overhead; for suppression over many boxes, one
    :func:`pairwise_iou_rotated` matrix (cheap when few pairs overlap) is usually faster than a
    call per kept box.
    """
    box = _as_boxes(box, "box", 1)
    boxes = _as_boxes(boxes, "boxes", 2)
    return pairwise_iou_rotated(box[None], boxes, pairs_per_chunk=pairs_per_chunk)[0]
