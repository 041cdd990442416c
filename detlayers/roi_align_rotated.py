"""ROIAlign for rotated boxes on NHWC features: ``roi_align_rotated`` and ``ROIAlignRotated``.

Same numbers as detectron2's ``ROIAlignRotated`` (forward and feature gradient), including the
adaptive sampling grid (``sampling_ratio <= 0``), with static shapes.  How:
docs/design/roi_align.md.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detlayers import _roi_sampling as rs

# A fixed sampling ratio up to this value is pooled as one static fusion of 4*s*s gathers.
_MAX_UNROLLED_RATIO = 4


def roi_align_rotated(
    input: jax.Array,
    rois: jax.Array,
    output_size: int | tuple[int, int],
    spatial_scale: float | jax.Array,
    sampling_ratio: int,
) -> jax.Array:
    """Pools ``output_size`` bins of bilinear samples inside rotated boxes (detectron2's kernel).

    Args:
      input: features ``[N, H, W, C]`` (NHWC), any float dtype; half types are computed in float32
        and the result is cast back.
      rois: ``[R, 6]`` rows ``(batch_index, x_center, y_center, width, height, angle_degrees)`` in
        input-image pixels; a positive angle turns the box counter-clockwise on screen.
      output_size: ``PH`` or ``(PH, PW)``.
      spatial_scale: multiplies centre and size (``1/stride`` of the feature level); a Python
        float or a scalar array (it may be traced).
      sampling_ratio: samples per bin along each box axis; any value ``<= 0`` means adaptive,
        ``ceil(size * spatial_scale / output_size)`` per ROI and axis, exact up to
        ``MAX_ADAPTIVE_GRID = 512`` samples per bin and axis (boxes up to ``512 * output_size``
        feature pixels); a larger box is sampled on a 512-per-bin grid along that axis.

    Returns:
      ``[R, PH, PW, C]`` in ``input.dtype``.  The centre is shifted by -0.5 after scaling (always
      "aligned"); width and height are scaled, not clamped, so a zero-size box pools to zeros.
      Local point ``(yy, xx)`` maps to ``y = yy cos t - xx sin t + yc``,
      ``x = yy sin t + xx cos t + xc``.
      Samples with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` read 0 but count in the average.
      A box whose scaled centre, size or angle is not finite (inf or NaN, e.g. from a diverged box
      head) pools to zeros and gets no gradient, in bounded time.

    Differentiable w.r.t. ``input`` (equal to detectron2's backward); the boxes get no gradient.

    Boxes with negative width or height raise ``ValueError`` when ``rois`` is concrete (detectron2
    asserts; a constant closed over by a jitted function is concrete too); traced ones cannot be
    checked and pool to zeros.  Likewise a batch index outside ``[0, N)`` (or NaN) raises when
    concrete and pools to zeros when traced.
    """
    concrete_rois, features, rois, (pooled_h, pooled_w), sampling_ratio, scale = (
        rs.check_arguments("roi_align_rotated", input, rois, 6, output_size, sampling_ratio,
                           spatial_scale))
    empty = rs.empty_output("roi_align_rotated", features, rois.shape[0], (pooled_h, pooled_w))
    if empty is not None:
        return empty
    batch, height, width, channels = features.shape
    out_dtype = features.dtype
    if concrete_rois is not None:
        negative = (concrete_rois[:, 3:5] < 0).any(-1)
        if negative.any():
            bad = np.nonzero(negative)[0]
            raise ValueError(
                "roi_align_rotated: rois must have non-negative width and height (columns 3, 4);"
                f" rows {bad[:5].tolist()} do not"
            )

    dtype = rs.compute_dtype(out_dtype)
    boxes = jax.lax.stop_gradient(rois).astype(dtype)
    batch_index, valid = rs.batch_index_and_validity("roi_align_rotated", boxes, batch,
                                                     concrete_rois)

    scale_ = jnp.asarray(scale, dtype)
    roi_h = boxes[:, 4] * scale_
    roi_w = boxes[:, 3] * scale_
    theta = boxes[:, 5] * jnp.asarray(math.pi / 180.0, dtype)
    center_y = rs.rounded(boxes[:, 2] * scale_) - 0.5
    center_x = rs.rounded(boxes[:, 1] * scale_) - 0.5
    valid &= jnp.isfinite(jnp.stack([center_y, center_x, roi_h, roi_w, theta], -1)).all(-1)
    valid &= (roi_h >= 0) & (roi_w >= 0)
    grid_h = jnp.where(valid, rs.sample_grid(roi_h, pooled_h, sampling_ratio), 0)
    grid_w = jnp.where(valid, rs.sample_grid(roi_w, pooled_w, sampling_ratio), 0)
    count = jnp.maximum(grid_h * grid_w, 1).astype(dtype)
    params = dict(
        center_y=center_y,
        center_x=center_x,
        start_h=-roi_h / 2.0,
        start_w=-roi_w / 2.0,
        bin_h=rs.per_bin(roi_h, pooled_h),
        bin_w=rs.per_bin(roi_w, pooled_w),
        grid_h=grid_h,
        grid_w=grid_w,
        cos=jnp.cos(theta),
        sin=jnp.sin(theta),
        inv_count=1.0 / count,
        base=batch_index * (height * width),
    )
    taps = functools.partial(_rotated_taps, pooled=(pooled_h, pooled_w), size=(height, width))
    unrolled = None
    if 0 < sampling_ratio <= _MAX_UNROLLED_RATIO:
        unrolled = functools.partial(_pool_unrolled, taps=taps, ratio=sampling_ratio)
    table = features.astype(dtype).reshape(batch * height * width, channels)
    out = rs.pool(taps, (pooled_h, pooled_w), unrolled, table, params, grid_h, grid_w, valid)
    return out.astype(out_dtype)


def _rotated_taps(c, iy, ix, pooled, size):
    """The four bilinear neighbours of sample ``(iy, ix)`` of every bin, as (index, weight)."""
    pooled_h, pooled_w = pooled
    height, width = size
    dtype = c["bin_h"].dtype
    ph = jnp.arange(pooled_h, dtype=dtype)[None, :, None]
    pw = jnp.arange(pooled_w, dtype=dtype)[None, None, :]

    def per_roi(name):
        return c[name][:, None, None]

    yy = rs.sample_coordinate(per_roi("start_h"), per_roi("bin_h"), per_roi("grid_h"), ph, iy)
    xx = rs.sample_coordinate(per_roi("start_w"), per_roi("bin_w"), per_roi("grid_w"), pw, ix)
    cos, sin = per_roi("cos"), per_roi("sin")
    y = (rs.rounded(yy * cos) - rs.rounded(xx * sin)) + per_roi("center_y")
    x = (rs.rounded(yy * sin) + rs.rounded(xx * cos)) + per_roi("center_x")
    y_low, y_high, wy_low, wy_high = rs.bilinear_1d(y, height)
    x_low, x_high, wx_low, wx_high = rs.bilinear_1d(x, width)
    in_grid = (iy < per_roi("grid_h")) & (ix < per_roi("grid_w"))
    scale = jnp.where(in_grid, per_roi("inv_count"), 0.0)
    base = per_roi("base")
    row_low = base + y_low * width
    row_high = base + y_high * width
    return [
        (row_low + x_low, wy_low * wx_low * scale),
        (row_low + x_high, wy_low * wx_high * scale),
        (row_high + x_low, wy_high * wx_low * scale),
        (row_high + x_high, wy_high * wx_high * scale),
    ]


def _pool_unrolled(table, params, taps, ratio):
    """Static sampling ratio: one fused sum over every sample's four bilinear neighbours."""
    return rs.weighted_gather_sum(
        table, (tap for iy in range(ratio) for ix in range(ratio) for tap in taps(params, iy, ix)))


class ROIAlignRotated(nn.Module):
    """Flax wrapper of :func:`roi_align_rotated` (detectron2's ``ROIAlignRotated``), no parameters.

    ``__call__(input [N, H, W, C], rois [R, 6]) -> [R, PH, PW, C]``.
    """

    output_size: int | tuple[int, int]
    spatial_scale: float
    sampling_ratio: int

    @nn.compact
    def __call__(self, input: jax.Array, rois: jax.Array) -> jax.Array:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale,
                                 self.sampling_ratio)
