"""Every op that takes boxes or ROIs works under ``jit`` with its box argument traced *and* closed
over as a constant (NumPy array or concrete ``jax.Array``), with the eager result in both cases.

A closed-over constant is concrete at trace time, but any ``jnp`` operation applied to it inside
the trace returns a tracer: a concrete-value check (``np.asarray``, ``bool``, ``float``) on such a
derived array fails with ``TracerArrayConversionError`` / ``TracerBoolConversionError``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detlayers as L

RNG = np.random.default_rng(2024)
FEATURES = RNG.standard_normal((2, 9, 11, 3)).astype(np.float32)


def _axis_boxes(n: int) -> np.ndarray:
    corners = RNG.uniform(0, 30, (n, 4))
    return np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                           np.maximum(corners[:, :2], corners[:, 2:]) + 1], 1).astype(np.float32)


def _rotated_boxes(n: int) -> np.ndarray:
    return np.stack([RNG.uniform(5, 25, n), RNG.uniform(5, 25, n), RNG.uniform(2, 12, n),
                     RNG.uniform(2, 12, n), RNG.uniform(-180, 180, n)], 1).astype(np.float32)


AXIS = _axis_boxes(12)
ROTATED = _rotated_boxes(12)
SCORES = RNG.uniform(0, 1, 12).astype(np.float32)
CLASSES = RNG.integers(0, 3, 12).astype(np.int32)
ROIS = np.concatenate([RNG.integers(0, 2, (6, 1)), _axis_boxes(6)], 1).astype(np.float32)
ROTATED_ROIS = np.concatenate([RNG.integers(0, 2, (6, 1)), _rotated_boxes(6)], 1).astype(np.float32)
MASKS = RNG.uniform(0, 1, (4, 7, 7)).astype(np.float32)
MASK_BOXES = np.asarray([[1, 2, 20, 15], [-3, 4, 8, 30], [10.5, 0.5, 31, 9], [0, 0, 32, 24]],
                        np.float32)
PRED = np.asarray([[1, 2, 9, 8], [0, 0, 4, 5], [3, 3, 10, 12]], np.float32)
TARGET = np.asarray([[2, 2, 8, 9], [1, 0, 5, 5], [0, 4, 9, 11]], np.float32)

# name -> (op taking the box argument first, box argument, other arguments (traced))
CASES: dict[str, tuple[Callable, np.ndarray, tuple]] = {
    "nms": (lambda b, s: L.nms(b, s, 0.5), AXIS, (SCORES,)),
    "batched_nms": (lambda b, s, c: L.batched_nms(b, s, c, 0.5), AXIS, (SCORES, CLASSES)),
    "nms_rotated": (lambda b, s: L.nms_rotated(b, s, 0.3), ROTATED, (SCORES,)),
    "batched_nms_rotated": (lambda b, s, c: L.batched_nms_rotated(b, s, c, 0.3), ROTATED,
                            (SCORES, CLASSES)),
    "pairwise_iou_rotated": (lambda b, other: L.pairwise_iou_rotated(b, other), ROTATED,
                             (ROTATED[::-1].copy(),)),
    "roi_align": (lambda r, f: L.roi_align(f, r, (3, 2), 0.5, 0, True), ROIS, (FEATURES,)),
    "roi_align(ratio=2)": (lambda r, f: L.roi_align(f, r, (3, 2), 0.5, 2), ROIS, (FEATURES,)),
    "ROIAlign": (lambda r, f: L.ROIAlign((3, 2), 0.5, 0).apply({}, f, r), ROIS, (FEATURES,)),
    "roi_align_rotated": (lambda r, f: L.roi_align_rotated(f, r, (3, 2), 0.5, 0), ROTATED_ROIS,
                          (FEATURES,)),
    "ROIAlignRotated": (lambda r, f: L.ROIAlignRotated((3, 2), 0.5, 0).apply({}, f, r),
                        ROTATED_ROIS, (FEATURES,)),
    "paste_masks_in_image": (lambda b, m: L.paste_masks_in_image(m, b, (24, 32)), MASK_BOXES,
                             (MASKS,)),
    "pairwise_iou": (lambda b, other: L.pairwise_iou(b, other), AXIS, (AXIS[::-1].copy(),)),
    "clip_boxes": (lambda b, hw: L.clip_boxes(b, hw[0], hw[1]), AXIS, (np.float32([20, 25]),)),
    "Box2BoxTransform.get_deltas": (lambda b, t: L.Box2BoxTransform((10, 10, 5, 5)).get_deltas(b, t),
                                    AXIS, (AXIS[::-1].copy(),)),
    "Box2BoxTransform.apply_deltas": (lambda b, d: L.Box2BoxTransform((10, 10, 5, 5)).apply_deltas(d, b),
                                      AXIS, (RNG.standard_normal((12, 8)).astype(np.float32),)),
    "Box2BoxTransformRotated.get_deltas": (
        lambda b, t: L.Box2BoxTransformRotated((10, 10, 5, 5, 1)).get_deltas(b, t), ROTATED,
        (ROTATED[::-1].copy(),)),
    "clip_rotated_boxes": (lambda b, hw: L.clip_rotated_boxes(b, hw[0], hw[1]), ROTATED,
                           (np.float32([20, 25]),)),
    "diou_loss": (lambda b, t: L.diou_loss(b, t), PRED, (TARGET,)),
    "ciou_loss": (lambda b, t: L.ciou_loss(b, t), PRED, (TARGET,)),
}


def _leaves(result) -> list[np.ndarray]:
    """Every array of a result (an array, or a pytree such as NMSResult), as NumPy."""
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(result)]


def _assert_same(actual, expected, what: str) -> None:
    actual, expected = _leaves(actual), _leaves(expected)
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, what
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_op_under_jit_with_boxes_traced_and_closed_over(name):
    op, boxes, others = CASES[name]
    eager = op(jnp.asarray(boxes), *others)
    assert any(leaf.size for leaf in _leaves(eager)), "the eager result must not be empty"

    traced = jax.jit(op)(boxes, *others)
    _assert_same(traced, eager, f"{name}: boxes traced")

    as_numpy = jax.jit(lambda *rest: op(boxes, *rest))(*others)
    _assert_same(as_numpy, eager, f"{name}: boxes closed over (NumPy)")

    as_jax = jnp.asarray(boxes)
    as_array = jax.jit(lambda *rest: op(as_jax, *rest))(*others)
    _assert_same(as_array, eager, f"{name}: boxes closed over (jax.Array)")
