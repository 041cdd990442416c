"""detlayers.models' multi-level ROI pooler (detectron2's ``ROIPooler`` with ``ROIAlignV2``)
against a float64 derivation: the FPN level of each box (detectron2's ``assign_boxes_to_levels``,
canonical box size 224 at level 4) and the ROIAlign bins on that level's unpadded map, for boxes
up to the border of an image padded to a multiple of 32 (as detectron2 pads), where the last
samples of a small level lie past its last pixel centre and read what the pooler padded it with."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from helpers import roi_bins_reference

from detlayers.models.poolers import assign_boxes_to_levels, multilevel_roi_align

STRIDES = (4, 8, 16, 32)  # P2..P5
IMAGE_HW = (448, 512)  # multiples of 32, as detectron2 pads: level maps 112x128 ... 14x16


def _level_reference(boxes: np.ndarray) -> np.ndarray:
    """detectron2: floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to [2, 5], minus 2; float64."""
    b = boxes.astype(np.float64)
    sizes = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    level = np.floor(4 + np.log2(sizes / 224.0 + 1e-8))
    return np.clip(level, 2, 5).astype(np.int32) - 2


def test_levels_follow_the_canonical_box_size_224_at_level_4():
    # square boxes around each level boundary 224 * 2^k (and the clamps at both ends)
    sides = [s * f for s in (28, 56, 112, 224, 448, 896) for f in (0.95, 1.0, 1.05)] + [4.0, 2000.0]
    boxes = np.array([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides], np.float32)
    got = np.asarray(jax.jit(lambda b: assign_boxes_to_levels(b, 2, 5))(boxes))
    expected = _level_reference(boxes)
    np.testing.assert_array_equal(got, expected)
    assert set(expected) == {0, 1, 2, 3}  # every level is used


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_pooled_bins_match_roi_align_on_the_assigned_unpadded_level(sampling_ratio):
    rng = np.random.default_rng(0)
    height, width = IMAGE_HW
    features = [
        rng.normal(size=(2, math.ceil(height / s), math.ceil(width / s), 3)).astype(np.float32) for s in STRIDES
    ]
    # boxes of every level, many touching the right/bottom image border (clipped, as detectron2's
    # proposals are), where a padded level map must read like the unpadded one
    sides = np.array([30.0, 80.0, 150.0, 250.0, 300.0, 448.0, 40.0, 200.0])
    x2 = np.where(np.arange(8) % 2 == 0, width, rng.uniform(np.minimum(sides, width - 1), width))
    y2 = np.where(np.arange(8) % 3 == 0, height, rng.uniform(np.minimum(sides, height - 1), height))
    boxes = np.stack([np.maximum(x2 - sides, 0), np.maximum(y2 - sides, 0), x2, y2], 1)
    # quarter pixels: the float32 box sizes are exact, so the adaptive sample count
    # ceil(size / bins) is the same in float32 (the op) and float64 (the reference)
    boxes = (np.round(boxes * 4) / 4).astype(np.float32)
    boxes = np.stack([boxes, boxes[::-1]])  # [N=2, R=8, 4]
    valid = np.ones((2, 8), bool)
    valid[1, 5] = False
    pooled = jax.jit(
        lambda f, b, v: multilevel_roi_align(f, b, v, 5, STRIDES, sampling_ratio=sampling_ratio, aligned=True)
    )(features, boxes, valid)
    pooled = np.asarray(pooled).reshape(2, 8, 5, 5, 3)
    levels = _level_reference(boxes.reshape(-1, 4)).reshape(2, 8)
    assert len(set(levels.ravel())) == 4
    for n in range(2):
        for r in range(8):
            if not valid[n, r]:
                np.testing.assert_array_equal(pooled[n, r], 0.0)
                continue
            level, stride = levels[n, r], STRIDES[levels[n, r]]
            x1, y1, x2_, y2_ = boxes[n, r].astype(np.float64) / stride
            expected = roi_bins_reference(
                features[level][n].astype(np.float64), (5, 5), (y1 - 0.5, x1 - 0.5), (y2_ - y1, x2_ - x1),
                sampling_ratio,
            )
            np.testing.assert_allclose(pooled[n, r], expected, atol=2e-5, rtol=0, err_msg=f"image {n} box {r}")
