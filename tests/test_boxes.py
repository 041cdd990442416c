"""``detlayers.boxes``: areas, pairwise overlaps, box regression, clipping, emptiness.

References, independent of the implementation:
  * float64 NumPy derivations of detectron2's / torchvision's formulas (values);
  * the same formulas evaluated step by step in float32 NumPy (IEEE operations one at a time, as
    PyTorch's CPU kernels evaluate them), for bitwise checks wherever no ``exp``/``log`` is
    involved (XLA's ``exp`` may differ from PyTorch's in the last bit).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detlayers as L
from detlayers.boxes import DEFAULT_SCALE_CLAMP

F32 = np.float32
RNG = np.random.default_rng(20)

# the functions under test, compiled (one compilation per input shape; eager mode is checked
# against them in test_jit_equals_eager_bit_for_bit)
box_area = jax.jit(L.box_area)
pairwise_intersection = jax.jit(L.pairwise_intersection)
box_iou = jax.jit(L.box_iou)
pairwise_iou = jax.jit(L.pairwise_iou)
pairwise_ioa = jax.jit(L.pairwise_ioa)
clip_boxes = jax.jit(L.clip_boxes)
nonempty = jax.jit(L.nonempty)
rotated_box_area = jax.jit(L.rotated_box_area)
clip_rotated_boxes = jax.jit(L.clip_rotated_boxes)
nonempty_rotated = jax.jit(L.nonempty_rotated)


def _axis_boxes(n: int, rng=RNG, lo: float = -50.0, hi: float = 500.0, min_size: float = 0.5,
                max_size: float = 300.0, empty_fraction: float = 0.0) -> np.ndarray:
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(min_size, max_size, (n, 2))
    wh[rng.uniform(size=n) < empty_fraction] = 0.0
    return np.concatenate([xy, xy + wh], axis=1).astype(F32)


def _rotated_boxes(n: int, rng=RNG, min_size: float = 0.5) -> np.ndarray:
    return np.stack([rng.uniform(-20, 400, n), rng.uniform(-20, 400, n), rng.uniform(min_size, 200, n),
                     rng.uniform(min_size, 200, n), rng.uniform(-400, 400, n)], axis=1).astype(F32)


def _close_to_scale(actual, expected, tolerance: float, scale) -> None:
    """``|actual - expected| <= tolerance * scale`` (``scale`` broadcasting, e.g. per row): float32
    rounding of a coordinate is relative to the box's magnitude, not to the coordinate's."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    error = np.abs(actual - expected) / (tolerance * np.asarray(scale, np.float64))
    worst = np.unravel_index(error.argmax(), error.shape)
    assert error.max() <= 1.0, f"error {error.max():.3g} x tolerance at {worst}"


def _same_bits(actual, expected) -> None:
    """Equal values (NaN equal to NaN) with equal signs of zero."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(np.signbit(actual), np.signbit(expected))


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def _pairwise_f64(b1: np.ndarray, b2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 intersection ``[N, M]``, union ``[N, M]`` and area of ``b2`` ``[M]``."""
    b1, b2 = b1.astype(np.float64), b2.astype(np.float64)
    w = np.clip(np.minimum(b1[:, None, 2], b2[None, :, 2]) - np.maximum(b1[:, None, 0], b2[None, :, 0]), 0, None)
    h = np.clip(np.minimum(b1[:, None, 3], b2[None, :, 3]) - np.maximum(b1[:, None, 1], b2[None, :, 1]), 0, None)
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    inter = w * h
    return inter, area1[:, None] + area2[None, :] - inter, area2


def _pairwise_f32(b1: np.ndarray, b2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same in float32, one rounding per operation, in detectron2's / torchvision's order."""
    lt = np.maximum(b1[:, None, :2], b2[None, :, :2])
    rb = np.minimum(b1[:, None, 2:], b2[None, :, 2:])
    wh = np.maximum(rb - lt, F32(0))
    inter = wh[..., 0] * wh[..., 1]
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    return inter, (area1[:, None] + area2[None, :]) - inter, area2


def _get_deltas_f64(src: np.ndarray, dst: np.ndarray, weights) -> np.ndarray:
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    sx, sy = src[:, 0] + sw / 2, src[:, 1] + sh / 2
    tx, ty = dst[:, 0] + tw / 2, dst[:, 1] + th / 2
    wx, wy, ww, wh = weights
    return np.stack([wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * np.log(tw / sw), wh * np.log(th / sh)], 1)


def _apply_deltas_f64(deltas: np.ndarray, boxes: np.ndarray, weights, clamp: float) -> np.ndarray:
    """``[N, K*4]`` decoded boxes in float64 from float32 inputs."""
    d = deltas.astype(np.float64).reshape(len(deltas), -1, 4) / np.asarray(weights, np.float64)
    b = boxes.astype(np.float64)
    w, h = (b[:, 2] - b[:, 0])[:, None], (b[:, 3] - b[:, 1])[:, None]
    cx, cy = b[:, 0, None] + w / 2 + d[..., 0] * w, b[:, 1, None] + h / 2 + d[..., 1] * h
    pw, ph = np.exp(np.minimum(d[..., 2], clamp)) * w, np.exp(np.minimum(d[..., 3], clamp)) * h
    return np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], -1).reshape(deltas.shape)


def _wrap_f64(angle: np.ndarray) -> np.ndarray:
    return np.mod(angle + 180.0, 360.0) - 180.0


def _rotated_get_deltas_f64(src: np.ndarray, dst: np.ndarray, weights) -> np.ndarray:
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    wx, wy, ww, wh, wa = weights
    return np.stack([wx * (dst[:, 0] - src[:, 0]) / src[:, 2], wy * (dst[:, 1] - src[:, 1]) / src[:, 3],
                     ww * np.log(dst[:, 2] / src[:, 2]), wh * np.log(dst[:, 3] / src[:, 3]),
                     wa * np.radians(_wrap_f64(dst[:, 4] - src[:, 4]))], 1)


def _rotated_apply_deltas_f64(deltas: np.ndarray, boxes: np.ndarray, weights, clamp: float) -> np.ndarray:
    d = deltas.astype(np.float64).reshape(len(deltas), -1, 5) / np.asarray(weights, np.float64)
    b = boxes.astype(np.float64)[:, None, :]
    return np.stack([d[..., 0] * b[..., 2] + b[..., 0], d[..., 1] * b[..., 3] + b[..., 1],
                     np.exp(np.minimum(d[..., 2], clamp)) * b[..., 2],
                     np.exp(np.minimum(d[..., 3], clamp)) * b[..., 3],
                     _wrap_f64(np.degrees(d[..., 4]) + b[..., 4])], -1).reshape(deltas.shape)


def _angle_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Degrees between two angles on the circle."""
    return np.abs(_wrap_f64(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


# --------------------------------------------------------------------------------------------
# areas and pairwise overlaps
# --------------------------------------------------------------------------------------------
PAIR1 = _axis_boxes(23, empty_fraction=0.2)
PAIR2 = np.concatenate([PAIR1[:4], _axis_boxes(15, empty_fraction=0.2)])  # shared and empty boxes
PAIR2[5] = [-10.0, -10.0, -10.0, -10.0]                                     # a point, far away


def test_box_area_matches_float64():
    boxes = _axis_boxes(30)
    b = boxes.astype(np.float64)
    np.testing.assert_allclose(box_area(boxes), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), rtol=1e-6)
    assert box_area(boxes.reshape(5, 6, 4)).shape == (5, 6)


def test_pairwise_overlaps_match_float64_and_float32_step_by_step():
    inter64, union64, area2_64 = _pairwise_f64(PAIR1, PAIR2)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou64 = np.where(inter64 > 0, inter64 / union64, 0.0)
        ioa64 = np.where(inter64 > 0, inter64 / area2_64[None, :], 0.0)
    np.testing.assert_allclose(pairwise_intersection(PAIR1, PAIR2), inter64, rtol=1e-6, atol=1e-2)
    np.testing.assert_allclose(pairwise_iou(PAIR1, PAIR2), iou64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pairwise_ioa(PAIR1, PAIR2), ioa64, rtol=1e-5, atol=1e-6)
    assert (np.diag(np.asarray(pairwise_iou(PAIR1[:4], PAIR2[:4]))) == np.where(
        box_area(PAIR1[:4]) > 0, 1.0, 0.0)).all()

    inter, union, area2 = _pairwise_f32(PAIR1, PAIR2)
    with np.errstate(invalid="ignore", divide="ignore"):
        _same_bits(pairwise_intersection(PAIR1, PAIR2), inter)
        _same_bits(box_iou(PAIR1, PAIR2), inter / union)
        _same_bits(pairwise_iou(PAIR1, PAIR2), np.where(inter > 0, inter / union, F32(0)))
        _same_bits(pairwise_ioa(PAIR1, PAIR2), np.where(inter > 0, inter / area2[None, :], F32(0)))


def test_empty_boxes_give_zero_iou_in_detectron2_and_nan_only_for_0_over_0_in_torchvision():
    boxes1 = np.array([[0, 0, 0, 0], [0, 0, 10, 10], [5, 5, 5, 9]], F32)        # empty, box, line
    boxes2 = np.array([[0, 0, 0, 0], [20, 20, 30, 30], [5, 5, 5, 9]], F32)      # empty, disjoint, line
    iou = np.asarray(pairwise_iou(boxes1, boxes2))
    np.testing.assert_array_equal(iou, np.zeros((3, 3)))
    np.testing.assert_array_equal(pairwise_ioa(boxes1, boxes2), np.zeros((3, 3)))
    tv = np.asarray(box_iou(boxes1, boxes2))
    # torchvision: 0 / 0 where both boxes are empty, 0 / positive elsewhere
    np.testing.assert_array_equal(np.isnan(tv), [[True, False, True], [False, False, False], [True, False, True]])
    np.testing.assert_array_equal(tv[~np.isnan(tv)], 0.0)
    # detectron2's guard also keeps the gradient finite at empty unions
    grad = jax.jit(jax.grad(lambda b: L.pairwise_iou(b, boxes2).sum() + L.pairwise_ioa(boxes2, b).sum()))(boxes1)
    assert np.isfinite(np.asarray(grad)).all()
    overlapping = np.array([[0, 0, 10, 10]], F32)
    grad = np.asarray(jax.jit(jax.grad(lambda b: L.pairwise_iou(b, overlapping + 5).sum()))(overlapping))
    # d(IoU)/d(x2) for [0,0,10,10] vs [5,5,15,15]: inter = 5*5, union = 175
    np.testing.assert_allclose(grad[0, 2], (5 * 175 - 25 * (10 - 5)) / 175**2, rtol=1e-5)


def test_pairwise_ops_take_broadcasting_leading_dimensions_and_vmap():
    b1 = _axis_boxes(2 * 5).reshape(2, 5, 4)
    b2 = _axis_boxes(3 * 4).reshape(3, 1, 4, 4)
    out = np.asarray(pairwise_iou(b1, b2))
    assert out.shape == (3, 2, 5, 4)
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(out[i, j], pairwise_iou(b1[j], b2[i, 0]))
    np.testing.assert_array_equal(jax.vmap(box_iou)(b1, b2[0, 0][None].repeat(2, 0)),
                                  box_iou(b1, b2[0, 0]))


# --------------------------------------------------------------------------------------------
# clipping and emptiness
# --------------------------------------------------------------------------------------------
def test_clip_boxes_clamps_each_coordinate_and_keeps_negative_zero_as_torch_clamp():
    boxes = _axis_boxes(40, lo=-200, hi=700)
    boxes[0] = [-0.0, -0.0, 0.0, 5.0]
    got = np.asarray(clip_boxes(boxes, 300, 400))
    want = np.stack([np.clip(boxes[:, 0], 0, 400), np.clip(boxes[:, 1], 0, 300),
                     np.clip(boxes[:, 2], 0, 400), np.clip(boxes[:, 3], 0, 300)], 1)
    np.testing.assert_array_equal(got, want)
    # torch.clamp(min=0) leaves -0.0 as it is (jnp.clip would give +0.0)
    np.testing.assert_array_equal(np.signbit(got[0]), [True, True, False, False])
    _same_bits(L.clip_boxes(boxes, 300, 400), got)


def test_clip_boxes_per_image_sizes_and_non_finite_input():
    boxes = _axis_boxes(2 * 6, lo=-100, hi=600).reshape(2, 6, 4)
    hw = np.array([[300, 200], [120, 500]], F32)
    got = np.asarray(jax.jit(L.clip_boxes)(boxes, hw[:, :1], hw[:, 1:]))
    for i, (h, w) in enumerate(hw):
        np.testing.assert_array_equal(got[i], clip_boxes(boxes[i], h, w))
    # detectron2 asserts finiteness: concrete input raises, traced input keeps the NaN
    bad = np.array([[0, 0, np.nan, 5]], F32)
    with pytest.raises(ValueError, match="infinite or NaN"):
        L.clip_boxes(bad, 10, 10)
    assert np.isnan(np.asarray(jax.jit(L.clip_boxes)(bad, 10, 10))[0, 2])


def test_nonempty_needs_both_sides_strictly_above_the_threshold():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 0], [0, 0, 0, 2], [1, 1, 3.5, 4], [1, 1, 3, 4],
                      [5, 5, 4, 9]], F32)
    np.testing.assert_array_equal(nonempty(boxes), [True, False, False, True, True, False])
    # a side equal to the threshold is empty
    np.testing.assert_array_equal(nonempty(boxes, 2.0), [False, False, False, True, False, False])
    rotated = np.array([[0, 0, 2, 2, 30], [0, 0, 2, 0, 0], [0, 0, 0, 3, 0], [0, 0, 3, 2.5, 90]], F32)
    np.testing.assert_array_equal(nonempty_rotated(rotated), [True, False, False, True])
    np.testing.assert_array_equal(nonempty_rotated(rotated, 2.0), [False, False, False, True])
    np.testing.assert_allclose(rotated_box_area(rotated), [4, 0, 0, 7.5])


def _clip_rotated_f32(boxes: np.ndarray, h: float, w: float, threshold: float) -> np.ndarray:
    """detectron2's ``RotatedBoxes.clip`` in float32 NumPy, one box at a time."""
    out = boxes.copy()
    out[:, 4] = np.remainder(boxes[:, 4] + F32(180), F32(360)) - F32(180)
    for row in out:
        if abs(row[4]) <= threshold:
            x1 = min(max(row[0] - row[2] / F32(2), F32(0)), F32(w))
            y1 = min(max(row[1] - row[3] / F32(2), F32(0)), F32(h))
            x2 = min(max(row[0] + row[2] / F32(2), F32(0)), F32(w))
            y2 = min(max(row[1] + row[3] / F32(2), F32(0)), F32(h))
            row[:4] = [(x1 + x2) / F32(2), (y1 + y2) / F32(2), min(row[2], x2 - x1), min(row[3], y2 - y1)]
    return out


def test_clip_rotated_boxes_clips_only_nearly_horizontal_boxes_and_wraps_every_angle():
    boxes = _rotated_boxes(60)
    boxes[:20, 4] = [0.0, 0.5, -1.0, 1.0, 1.5, -1.5, 359.5, -359.25, 180.0, -180.0, 540.5, 720.0,
                     -0.0, 179.0, 181.0, 0.999, -1.001, 360.0, 2.0, -2.0]
    got = np.asarray(clip_rotated_boxes(boxes, 300, 350))
    np.testing.assert_array_equal(got, _clip_rotated_f32(boxes, 300, 350, 1.0))
    assert (got[:, 4] >= -180).all() and (got[:, 4] < 180).all()
    clipped = np.abs(got[:, 4]) <= 1.0
    assert clipped.sum() >= 10 and (~clipped).sum() >= 10
    np.testing.assert_array_equal(got[~clipped, :4], boxes[~clipped, :4])
    wide = np.asarray(clip_rotated_boxes(boxes, 300, 350, clip_angle_threshold=5.0))
    np.testing.assert_array_equal(wide, _clip_rotated_f32(boxes, 300, 350, 5.0))


# --------------------------------------------------------------------------------------------
# Box2BoxTransform
# --------------------------------------------------------------------------------------------
def test_box2box_transform_hand_computed_example():
    transform = L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    src = np.array([[10.0, 10.0, 30.0, 50.0]], F32)
    dst = np.array([[12.0, 8.0, 36.0, 48.0]], F32)
    # centres (20, 30) -> (24, 28), sizes (20, 40) -> (24, 40)
    deltas = jax.jit(transform.get_deltas)(src, dst)
    np.testing.assert_allclose(deltas, [[10 * 4 / 20, 10 * -2 / 40, 5 * np.log(24 / 20), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(transform.apply_deltas)(deltas, src), dst, rtol=1e-6)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 2.0, 3.0, 4.0)])
def test_get_deltas_matches_float64(weights):
    src, dst = _axis_boxes(50), _axis_boxes(50)
    got = np.asarray(jax.jit(L.Box2BoxTransform(weights).get_deltas)(src, dst))
    np.testing.assert_allclose(got, _get_deltas_f64(src, dst, weights), rtol=2e-5, atol=2e-5)
    # dx, dy involve no log: detectron2's float32 operations bit for bit (the weight multiplies
    # the centre offset before the division by the source size)
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    dx = F32(weights[0]) * ((dst[:, 0] + F32(0.5) * tw) - (src[:, 0] + F32(0.5) * sw)) / sw
    dy = F32(weights[1]) * ((dst[:, 1] + F32(0.5) * th) - (src[:, 1] + F32(0.5) * sh)) / sh
    _same_bits(got[:, :2], np.stack([dx, dy], 1))
    # identical boxes: +0.0 everywhere, as detectron2's w * (t - s) / size
    _same_bits(jax.jit(L.Box2BoxTransform(weights).get_deltas)(src, src), np.zeros_like(src))


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 2.0, 3.0, 4.0)])
def test_apply_deltas_matches_float64_with_class_specific_deltas(weights):
    boxes = _axis_boxes(40)
    deltas = (RNG.standard_normal((40, 3 * 4)) * 2).astype(F32)
    got = np.asarray(jax.jit(L.Box2BoxTransform(weights).apply_deltas)(deltas, boxes))
    assert got.shape == (40, 12) and got.dtype == np.float32
    want = _apply_deltas_f64(deltas, boxes, weights, DEFAULT_SCALE_CLAMP)
    _close_to_scale(got, want, 3e-7, np.abs(want).max(axis=1, keepdims=True))


def test_apply_deltas_is_detectron2_float32_arithmetic_bit_for_bit():
    """With dw = dh = 0 (exp = 1 exactly) every operation is an IEEE float32 one: the result must
    be detectron2's bits (true divisions by the weights, no fused multiply-add)."""
    weights = (10.0, 10.0, 5.0, 5.0)
    boxes = _axis_boxes(300)
    deltas = (RNG.standard_normal((300, 4)) * 3).astype(F32)
    deltas[:, 2:] = 0.0
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + F32(0.5) * w, boxes[:, 1] + F32(0.5) * h
    pcx = (deltas[:, 0] / F32(10)) * w + cx
    pcy = (deltas[:, 1] / F32(10)) * h + cy
    want = np.stack([pcx - F32(0.5) * w, pcy - F32(0.5) * h, pcx + F32(0.5) * w, pcy + F32(0.5) * h], 1)
    transform = L.Box2BoxTransform(weights)
    _same_bits(transform.apply_deltas(deltas, boxes), want)
    _same_bits(jax.jit(transform.apply_deltas)(deltas, boxes), want)


@pytest.mark.parametrize("column", [2, 3], ids=["dw", "dh"])
def test_apply_deltas_clamps_dw_and_dh_separately(column):
    weights = (10.0, 10.0, 5.0, 5.0)
    boxes = np.array([[10, 20, 50, 40], [0, 0, 16, 16]], F32)
    deltas = np.array([[0.5, -0.3, 0.2, -0.4], [0.1, 0.2, -0.3, 0.25]], F32)
    deltas[:, column] = [30.0, 5.0 * DEFAULT_SCALE_CLAMP + 1e-3]   # both beyond the clamp
    got = np.asarray(jax.jit(L.Box2BoxTransform(weights).apply_deltas)(deltas, boxes))
    want = _apply_deltas_f64(deltas, boxes, weights, DEFAULT_SCALE_CLAMP)
    _close_to_scale(got, want, 3e-7, np.abs(want).max(axis=1, keepdims=True))
    side = (got[:, column] - got[:, column - 2]) / (boxes[:, column] - boxes[:, column - 2])
    np.testing.assert_allclose(side, 1000 / 16, rtol=1e-6)               # clamped at log(1000/16)
    other = 5 - column                                                    # the other size delta
    np.testing.assert_allclose(got[:, other] - got[:, other - 2],
                               np.exp(deltas[:, other] / 5.0) * (boxes[:, other] - boxes[:, other - 2]), rtol=1e-6)
    # a custom clamp
    small = np.asarray(jax.jit(L.Box2BoxTransform(weights, scale_clamp=1.0).apply_deltas)(deltas, boxes))
    np.testing.assert_allclose((small[:, column] - small[:, column - 2])
                               / (boxes[:, column] - boxes[:, column - 2]), math.e, rtol=1e-6)


def test_encode_decode_round_trip():
    transform = L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    # sizes within a factor 1000/16 of each other: no delta reaches the clamp
    src, dst = _axis_boxes(64, min_size=4.0), _axis_boxes(64, min_size=4.0)
    back = np.asarray(jax.jit(transform.apply_deltas)(jax.jit(transform.get_deltas)(src, dst), src))
    _close_to_scale(back, dst, 1e-6, np.abs(np.concatenate([src, dst], 1)).max(1, keepdims=True))
    rotated = L.Box2BoxTransformRotated((10.0, 10.0, 5.0, 5.0, 1.0))
    rsrc, rdst = _rotated_boxes(64, min_size=4.0), _rotated_boxes(64, min_size=4.0)
    rdst[:, 4] = _wrap_f64(rdst[:, 4])
    back = np.asarray(jax.jit(rotated.apply_deltas)(jax.jit(rotated.get_deltas)(rsrc, rdst), rsrc))
    _close_to_scale(back[:, :4], rdst[:, :4], 1e-6,
                    np.abs(np.concatenate([rsrc[:, :4], rdst[:, :4]], 1)).max(1, keepdims=True))
    assert _angle_distance(back[:, 4], rdst[:, 4]).max() < 1e-3


def test_apply_deltas_broadcasts_leading_dimensions_and_vmaps():
    transform = L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    boxes = _axis_boxes(2 * 7).reshape(2, 7, 4)
    deltas = RNG.standard_normal((2, 7, 8)).astype(F32)
    batched = np.asarray(jax.jit(transform.apply_deltas)(deltas, boxes))
    assert batched.shape == (2, 7, 8)
    for i in range(2):
        _same_bits(batched[i], jax.jit(transform.apply_deltas)(deltas[i], boxes[i]))
    _same_bits(jax.jit(jax.vmap(transform.apply_deltas))(deltas, boxes), batched)
    # one set of boxes for a stack of deltas
    assert jax.jit(transform.apply_deltas)(deltas, boxes[0]).shape == (2, 7, 8)
    _same_bits(jax.jit(jax.vmap(transform.get_deltas))(boxes, boxes[::-1]),
               jax.jit(transform.get_deltas)(boxes, boxes[::-1]))
    rotated = L.Box2BoxTransformRotated((10.0, 10.0, 5.0, 5.0, 2.0))
    rboxes, rdeltas = _rotated_boxes(14).reshape(2, 7, 5), RNG.standard_normal((2, 7, 10)).astype(F32)
    _same_bits(jax.jit(jax.vmap(rotated.apply_deltas))(rdeltas, rboxes),
               jax.jit(rotated.apply_deltas)(rdeltas, rboxes))


def test_apply_deltas_computes_in_float32_like_detectron2():
    transform = L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    boxes, deltas = _axis_boxes(8), RNG.standard_normal((8, 4)).astype(F32)
    half = jax.jit(transform.apply_deltas)(deltas.astype(np.float16), boxes.astype(np.float16))
    assert half.dtype == jnp.float32
    np.testing.assert_array_equal(half, jax.jit(transform.apply_deltas)(deltas.astype(np.float16).astype(F32),
                                                               boxes.astype(np.float16).astype(F32)))


def test_transforms_are_hashable_static_arguments_and_validate_weights():
    a, b = L.Box2BoxTransform([10, 10, 5, 5]), L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    assert a == b and hash(a) == hash(b) and a.weights == (10.0, 10.0, 5.0, 5.0)
    boxes, deltas = _axis_boxes(3), RNG.standard_normal((3, 4)).astype(F32)
    out = jax.jit(lambda t, d, x: t.apply_deltas(d, x), static_argnums=0)(a, deltas, boxes)
    _same_bits(out, a.apply_deltas(deltas, boxes))
    with pytest.raises(ValueError, match="weights must be 4 numbers"):
        L.Box2BoxTransform((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights must be 5 numbers"):
        L.Box2BoxTransformRotated((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="non-zero"):
        L.Box2BoxTransform((1.0, 0.0, 1.0, 1.0))


def test_get_deltas_refuses_concrete_source_boxes_of_non_positive_width():
    transform = L.Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    src = np.array([[0, 0, 10, 10], [5, 0, 5, 10]], F32)                  # second is 0 wide
    with pytest.raises(ValueError, match="width is not positive"):
        transform.get_deltas(src, src + 1)
    assert not np.isfinite(np.asarray(jax.jit(transform.get_deltas)(src, src + 1))[1]).all()
    rotated = L.Box2BoxTransformRotated((1.0, 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="width is not positive"):
        rotated.get_deltas(np.array([[0, 0, -1, 2, 0]], F32), np.ones((1, 5), F32))


# --------------------------------------------------------------------------------------------
# Box2BoxTransformRotated
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0, 1.0), (1.0, 2.0, 3.0, 4.0, 2.5)])
def test_rotated_get_deltas_matches_float64_and_wraps_the_angle_difference(weights):
    src, dst = _rotated_boxes(60), _rotated_boxes(60)
    src[0, 4], dst[0, 4] = 170.0, -170.0        # +20 degrees across the wrap
    src[1, 4], dst[1, 4] = -175.0, 175.0        # -10 degrees
    src[2, 4], dst[2, 4] = 0.0, 180.0           # -180, the closed end of [-180, 180)
    got = np.asarray(jax.jit(L.Box2BoxTransformRotated(weights).get_deltas)(src, dst))
    want = _rotated_get_deltas_f64(src, dst, weights)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[:3, 4], weights[4] * np.radians([20.0, -10.0, -180.0]), rtol=1e-6)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0, 1.0), (1.0, 2.0, 3.0, 4.0, 2.5)])
def test_rotated_apply_deltas_matches_float64_and_wraps_into_half_open_range(weights):
    boxes = _rotated_boxes(50)
    deltas = (RNG.standard_normal((50, 2 * 5)) * 2).astype(F32)
    deltas[:5, 4] = weights[4] * np.radians([200.0, -200.0, 540.0, 90.0, -30.0])
    deltas[5:8, 2] = 60.0                                                  # beyond the clamp
    got = np.asarray(jax.jit(L.Box2BoxTransformRotated(weights).apply_deltas)(deltas, boxes))
    want = _rotated_apply_deltas_f64(deltas, boxes, weights, DEFAULT_SCALE_CLAMP)
    g, w = got.reshape(50, 2, 5), want.reshape(50, 2, 5)
    _close_to_scale(g[..., :4], w[..., :4], 3e-7, np.abs(w[..., :4]).max(axis=-1, keepdims=True))
    assert (g[..., 4] >= -180).all() and (g[..., 4] < 180).all()
    assert _angle_distance(g[..., 4], w[..., 4]).max() < 1e-3
    np.testing.assert_allclose(g[5:8, 0, 2] / boxes[5:8, 2], 1000 / 16, rtol=1e-6)


def test_rotated_apply_deltas_angle_is_detectron2_float32_arithmetic_bit_for_bit():
    weights = (1.0, 1.0, 1.0, 1.0, 2.0)
    boxes = _rotated_boxes(300)
    deltas = (RNG.standard_normal((300, 5)) * 4).astype(F32)
    da = deltas[:, 4] / F32(2)
    angle = (da * F32(180)) / F32(math.pi) + boxes[:, 4]
    want = np.remainder(angle + F32(180), F32(360)) - F32(180)
    transform = L.Box2BoxTransformRotated(weights)
    np.testing.assert_array_equal(np.asarray(transform.apply_deltas(deltas, boxes))[:, 4], want)
    np.testing.assert_array_equal(np.asarray(jax.jit(transform.apply_deltas)(deltas, boxes))[:, 4], want)


# --------------------------------------------------------------------------------------------
# shapes, jit, bad input
# --------------------------------------------------------------------------------------------
AXIS_T = L.Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
ROT_T = L.Box2BoxTransformRotated((10.0, 10.0, 5.0, 5.0, 1.0))


def _calls(n: int, m: int) -> dict:
    """name -> (function, arguments) on n (and m) boxes."""
    rng = np.random.default_rng(n + m)
    a, b = _axis_boxes(n, rng, empty_fraction=0.2), _axis_boxes(m, rng)
    ra, rb = _rotated_boxes(n, rng), _rotated_boxes(n, rng)
    d4 = (rng.standard_normal((n, 8)) * 3).astype(F32)
    d5 = (rng.standard_normal((n, 10)) * 3).astype(F32)
    return {
        "box_area": (L.box_area, (a,), (n,)),
        "pairwise_intersection": (L.pairwise_intersection, (a, b), (n, m)),
        "box_iou": (L.box_iou, (a, b), (n, m)),
        "pairwise_iou": (L.pairwise_iou, (a, b), (n, m)),
        "pairwise_ioa": (L.pairwise_ioa, (a, b), (n, m)),
        "clip_boxes": (lambda x: L.clip_boxes(x, 200, 300), (a,), (n, 4)),
        "nonempty": (L.nonempty, (a,), (n,)),
        "get_deltas": (AXIS_T.get_deltas, (b[:n] if m >= n else a, a), (n, 4)),
        "apply_deltas": (AXIS_T.apply_deltas, (d4, a), (n, 8)),
        "rotated_get_deltas": (ROT_T.get_deltas, (ra, rb), (n, 5)),
        "rotated_apply_deltas": (ROT_T.apply_deltas, (d5, ra), (n, 10)),
        "rotated_box_area": (L.rotated_box_area, (ra,), (n,)),
        "clip_rotated_boxes": (lambda x: L.clip_rotated_boxes(x, 200, 300), (ra,), (n, 5)),
        "nonempty_rotated": (L.nonempty_rotated, (ra,), (n,)),
    }


@pytest.mark.parametrize("name", list(_calls(1, 1)))
def test_jit_equals_eager_bit_for_bit(name):
    fn, args, shape = _calls(40, 30)[name]
    if name == "get_deltas":   # positive source widths
        args = (_axis_boxes(40), _axis_boxes(40))
    eager = np.asarray(fn(*args))
    assert eager.shape == shape
    with np.errstate(invalid="ignore"):
        _same_bits(jax.jit(fn)(*args), eager)


@pytest.mark.parametrize("name", list(_calls(1, 1)))
def test_zero_boxes_give_empty_results_of_the_right_shape(name):
    fn, args, shape = _calls(0, 3)[name]
    assert fn(*args).shape == shape
    assert jax.jit(fn)(*args).shape == shape


def test_bad_shapes_and_dtypes_raise_naming_the_argument():
    boxes = np.zeros((3, 4), F32)
    with pytest.raises(ValueError, match=r"box_area: boxes must have shape \[\.\.\., 4\].*\(3, 5\)"):
        L.box_area(np.zeros((3, 5), F32))
    with pytest.raises(ValueError, match=r"pairwise_iou: boxes1 must have shape \[\.\.\., N, 4\]"):
        L.pairwise_iou(np.zeros(4, F32), boxes)
    with pytest.raises(ValueError, match=r"box_iou: the leading dimensions of boxes1 and boxes2"):
        L.box_iou(np.zeros((2, 3, 4), F32), np.zeros((3, 3, 4), F32))
    with pytest.raises(TypeError, match="pairwise_ioa: boxes2 must be a real"):
        L.pairwise_ioa(boxes, boxes.astype(np.complex64))
    with pytest.raises(ValueError, match=r"apply_deltas: deltas must have shape \[\.\.\., K\*4\]"):
        AXIS_T.apply_deltas(np.zeros((3, 6), F32), boxes)
    with pytest.raises(ValueError, match=r"apply_deltas: deltas must have shape \[\.\.\., K\*5\]"):
        ROT_T.apply_deltas(np.zeros((3, 8), F32), np.zeros((3, 5), F32))
    with pytest.raises(ValueError, match="leading dimensions of deltas and boxes"):
        AXIS_T.apply_deltas(np.zeros((3, 8), F32), np.zeros((2, 4), F32))
    with pytest.raises(ValueError, match=r"get_deltas: target_boxes must have shape \[\.\.\., 4\]"):
        AXIS_T.get_deltas(boxes + 1, np.zeros((3, 5), F32))
    with pytest.raises(ValueError, match=r"clip_rotated_boxes: boxes must have shape \[\.\.\., 5\]"):
        L.clip_rotated_boxes(boxes, 10, 10)
    with pytest.raises(ValueError, match="clip_boxes: the leading dimensions of boxes and height/width"):
        L.clip_boxes(boxes, np.ones(2, F32), 10)
