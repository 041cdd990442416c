"""detectron2's ``ROIPooler`` (``modeling/poolers.py``): multi-level ROIAlign over an FPN, and
ROIAlignRotated for rotated boxes.

Static shapes: every image carries a fixed number of box slots with a ``valid`` mask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from detlayers.boxes import box_area
from detlayers.roi_align import roi_align
from detlayers.roi_align_rotated import roi_align_rotated

Array = jax.Array

__all__ = [
    "ROIPooler", "assign_boxes_to_levels", "multilevel_roi_align", "multilevel_roi_align_rotated", "POOLER_TYPES",
    "ROTATED_POOLER_TYPE",
]

# The pooler types built for axis-aligned boxes: ROIAlignV2 is ROIAlign with aligned=True
# (half-pixel offset).
POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}
# The pooler type of rotated boxes (x_center, y_center, width, height, angle_degrees).
ROTATED_POOLER_TYPE = "ROIAlignRotated"


def _level_of_size(sizes: Array, min_level: int, max_level: int, canonical_box_size: float,
                   canonical_level: int) -> Array:
    """FPN paper eq. 1 on box sizes ``sqrt(area)``: ``int32`` level minus ``min_level``."""
    level = jnp.floor(canonical_level + jnp.log2(sizes / canonical_box_size + 1e-8))
    level = jnp.clip(level, min_level, max_level)
    return level.astype(jnp.int32) - min_level


def assign_boxes_to_levels(
    boxes: Array, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Array:
    """detectron2's ``assign_boxes_to_levels`` (FPN paper eq. 1): ``int32[...]`` level minus ``min_level``."""
    return _level_of_size(jnp.sqrt(box_area(boxes)), min_level, max_level, canonical_box_size, canonical_level)


def _consecutive_levels(strides: Sequence[int], num_features: int, fn: str) -> list[int]:
    levels = [int(round(math.log2(s))) for s in strides]
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"{fn}: strides must be consecutive powers of 2, got {strides}")
    if num_features != len(strides):
        raise ValueError(f"{fn}: {num_features} feature maps but {len(strides)} strides")
    return levels


def multilevel_roi_align_rotated(
    features: Sequence[Array],
    boxes: Array,
    valid: Array,
    output_size: int,
    strides: Sequence[int],
    sampling_ratio: int = 0,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Array:
    """detectron2's ``ROIPooler`` with ``ROIAlignRotated``: ``[N*R, S, S, C]``.

    Args:
      features: per level ``[N, Hi, Wi, C]`` with strides ``strides`` (powers of 2, consecutive).
      boxes: ``[N, R, 5]`` rotated boxes ``(xc, yc, w, h, angle_degrees)`` in input-image pixels;
        valid: ``bool[N, R]`` (invalid slots pool to 0).
    Each ROI is pooled from the level of its size ``sqrt(w * h)`` (``RotatedBoxes.area``, FPN eq. 1).
    Rotated boxes may reach outside the image (detectron2 clips only nearly horizontal ones), and
    ROIAlignRotated reads zeros beyond a map's border, so the levels are not packed into one
    padded map as :func:`multilevel_roi_align` does: each level pools the ROIs assigned to it
    (the others get batch index -1, which pools nothing) and the results are summed.
    """
    levels = _consecutive_levels(strides, len(features), "multilevel_roi_align_rotated")
    n, r = boxes.shape[:2]
    flat = boxes.reshape(n * r, 5).astype(jnp.float32)
    flat_valid = valid.reshape(n * r)
    batch_index = jnp.repeat(jnp.arange(n, dtype=jnp.float32), r)
    if len(features) == 1:
        assigned = jnp.zeros((n * r,), jnp.int32)
    else:
        sizes = jnp.sqrt(flat[:, 2] * flat[:, 3])
        assigned = _level_of_size(sizes, levels[0], levels[-1], canonical_box_size, canonical_level)
    pooled = None
    for i, (feature, stride) in enumerate(zip(features, strides)):
        mine = flat_valid & (assigned == i)
        rois = jnp.concatenate([jnp.where(mine, batch_index, -1.0)[:, None], jnp.where(mine[:, None], flat, 0.0)],
                               axis=1)
        level = roi_align_rotated(feature, rois, output_size, 1.0 / stride, sampling_ratio)
        level = jnp.where(mine[:, None, None, None], level, 0.0)
        pooled = level if pooled is None else pooled + level
    return pooled


def multilevel_roi_align(
    features: Sequence[Array],
    boxes: Array,
    valid: Array,
    output_size: int,
    strides: Sequence[int],
    sampling_ratio: int = 0,
    aligned: bool = True,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Array:
    """detectron2's ``ROIPooler`` (``ROIAlignV2`` when ``aligned``): ``[N*R, S, S, C]``.

    Args:
      features: per level ``[N, Hi, Wi, C]`` with strides ``strides`` (powers of 2, consecutive).
      boxes: ``[N, R, 4]`` in input-image pixels; valid: ``bool[N, R]`` (invalid slots pool to 0).
    Each ROI is pooled from the level ``assign_boxes_to_levels`` picks. Boxes must lie inside the
    (unpadded) image, as detectron2's clipped proposals and detections do.
    """
    levels = _consecutive_levels(strides, len(features), "multilevel_roi_align")
    n, r = boxes.shape[:2]
    flat = boxes.reshape(n * r, 4).astype(jnp.float32)
    flat_valid = valid.reshape(n * r)
    batch_index = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    if len(features) == 1:
        assigned = jnp.zeros((n * r,), jnp.int32)
    else:
        assigned = assign_boxes_to_levels(flat, levels[0], levels[-1], canonical_box_size, canonical_level)
    # One ROIAlign over all levels (one compiled pooling loop instead of one per level): the levels
    # are stacked along the batch axis, each edge-padded to the largest map, and every box is
    # pre-scaled to its level (1/stride is a power of 2, so the product is the one ROIAlign forms).
    # Boxes clipped to the image only sample rows/columns up to ``size - 0.5``, where edge padding
    # and ROIAlign's border clamp read the same values.
    height = max(int(f.shape[1]) for f in features)
    width = max(int(f.shape[2]) for f in features)
    packed = jnp.concatenate(
        [jnp.pad(f, ((0, 0), (0, height - f.shape[1]), (0, width - f.shape[2]), (0, 0)), mode="edge")
         for f in features],
        axis=0,
    )
    scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)[assigned]
    rois = jnp.concatenate([(assigned * n + batch_index).astype(jnp.float32)[:, None], flat * scales[:, None]], axis=1)
    rois = jnp.where(flat_valid[:, None], rois, jnp.array([-1.0, 0.0, 0.0, 0.0, 0.0], jnp.float32))
    pooled = roi_align(packed, rois, output_size, 1.0, sampling_ratio, aligned)
    return jnp.where(flat_valid[:, None, None, None], pooled, 0.0)


@dataclasses.dataclass(frozen=True)
class ROIPooler:
    """``ROIPooler(output_size, scales, sampling_ratio, pooler_type)``: each box pooled to
    ``output_size x output_size`` from the level ``assign_boxes_to_levels`` picks.

    ``scales`` are ``1 / stride`` of the levels (detectron2's argument); ``pooler_type`` is
    ``"ROIAlignV2"`` (aligned) or ``"ROIAlign"``, or ``"ROIAlignRotated"`` for rotated boxes. No
    weights; immutable and hashable.

    ``pooler(features [N, Hi, Wi, C] per level, boxes [N, R, 4 or 5], valid bool[N, R])`` returns
    ``[N*R, S, S, C]`` (invalid slots are 0), see :func:`multilevel_roi_align` and
    :func:`multilevel_roi_align_rotated`.
    """

    output_size: int
    scales: tuple[float, ...]
    sampling_ratio: int = 0
    pooler_type: str = "ROIAlignV2"
    canonical_box_size: float = 224.0
    canonical_level: int = 4

    def __post_init__(self) -> None:
        if self.pooler_type not in POOLER_TYPES and self.pooler_type != ROTATED_POOLER_TYPE:
            raise ValueError(f"ROIPooler: pooler_type {self.pooler_type!r} is not supported "
                             f"(only {sorted([*POOLER_TYPES, ROTATED_POOLER_TYPE])})")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(int(round(1.0 / s)) for s in self.scales)

    def __call__(self, features: Sequence[Array], boxes: Array, valid: Array) -> Array:
        if self.pooler_type == ROTATED_POOLER_TYPE:
            if boxes.shape[-1] != 5:
                raise ValueError(f"ROIPooler: ROIAlignRotated pools rotated boxes [N, R, 5], got {boxes.shape}")
            return multilevel_roi_align_rotated(
                features, boxes, valid, self.output_size, self.strides, self.sampling_ratio,
                self.canonical_box_size, self.canonical_level,
            )
        return multilevel_roi_align(
            features, boxes, valid, self.output_size, self.strides, self.sampling_ratio,
            POOLER_TYPES[self.pooler_type], self.canonical_box_size, self.canonical_level,
        )
