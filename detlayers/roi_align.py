"""ROIAlign on NHWC features: ``roi_align`` and the Flax module ``ROIAlign``.

detectron2's ``ROIAlign`` is ``torchvision.ops.roi_align``; this module computes the same numbers
(forward and feature gradient) for every setting, including the adaptive sampling grid
(``sampling_ratio <= 0``), with static shapes.  How: docs/design/roi_align.md.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from detlayers import _roi_sampling as rs

# Above this many (row tap x column tap) pairs per bin, a fixed sampling_ratio also uses the
# chunked loops instead of one unrolled fusion (compile time grows with the unrolled count).
_MAX_UNROLLED_TAPS = 64
# Column taps fused into one step of the adaptive loops (see docs/design/roi_align.md).
_COLUMN_UNROLL = 2


def roi_align(
    input: jax.Array,
    rois: jax.Array,
    output_size: int | tuple[int, int],
    spatial_scale: float | jax.Array = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> jax.Array:
    """Average-pools ``output_size`` bins of bilinear samples in each ROI (torchvision's
    ``roi_align``, which detectron2's ``roi_align`` is, with the same defaults).

    Args:
      input: features ``[N, H, W, C]`` (NHWC), any float dtype.  Half types are computed in float32
        and the result is cast back.
      rois: ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
      output_size: ``PH`` or ``(PH, PW)``.
      spatial_scale: multiplies the box coordinates (e.g. ``1/stride`` of the feature level); a
        Python float or a scalar array (it may be traced).
      sampling_ratio: samples per bin along each axis; any value ``<= 0`` (default -1) means
        adaptive, ``ceil(roi_size / output_size)`` per ROI and axis, exact up to
        ``MAX_ADAPTIVE_GRID = 512`` samples per bin and axis (ROIs up to ``512 * output_size``
        feature pixels); a larger ROI is sampled on a 512-per-bin grid along that axis.
      aligned: shift box corners by -0.5 pixel (detectron2's ``ROIAlign(aligned=True)``; default
        False as in torchvision).  When False, ROI width and height are clamped to at least 1.

    Returns:
      ``[R, PH, PW, C]`` in ``input.dtype``.  Bin ``(p, q)`` averages a ``gh x gw`` grid of samples
      at cell centres; samples with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` read 0 but still
      count in the average; empty grids (an empty ROI when aligned) give 0.  A reversed box
      (``x2 < x1`` when aligned) has a negative extent: with adaptive sampling its grid is empty
      (zeros; torchvision fails on such boxes), with a fixed ratio the samples walk backwards.
      A ROI whose scaled corners or extent are not finite (inf or NaN, e.g. from a diverged box
      head) pools to zeros and gets no gradient, in bounded time.

    Differentiable w.r.t. ``input`` (the gradient equals torchvision's backward); like
    torchvision, the box coordinates receive no gradient (they are treated as constants).

    A batch index outside ``[0, N)`` (or NaN) raises ``ValueError`` when ``rois`` is concrete
    (also a constant closed over by a jitted function); when traced it cannot be checked and such
    a ROI pools to zeros.
    """
    concrete_rois, features, rois, (pooled_h, pooled_w), sampling_ratio, scale = (
        rs.check_arguments("roi_align", input, rois, 5, output_size, sampling_ratio,
                           spatial_scale))
    if not isinstance(aligned, (bool, int)) or isinstance(aligned, jax.core.Tracer):
        raise TypeError(f"aligned must be a Python bool, got {aligned!r}")
    empty = rs.empty_output("roi_align", features, rois.shape[0], (pooled_h, pooled_w))
    if empty is not None:
        return empty
    batch, height, width, channels = features.shape
    num_rois = rois.shape[0]
    out_dtype = features.dtype

    dtype = rs.compute_dtype(out_dtype)
    boxes = lax.stop_gradient(rois).astype(dtype)
    batch_index, valid = rs.batch_index_and_validity("roi_align", boxes, batch, concrete_rois)

    offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
    scale_ = jnp.asarray(scale, dtype)
    x1 = rs.rounded(boxes[:, 1] * scale_) - offset
    y1 = rs.rounded(boxes[:, 2] * scale_) - offset
    x2 = rs.rounded(boxes[:, 3] * scale_) - offset
    y2 = rs.rounded(boxes[:, 4] * scale_) - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    valid &= jnp.isfinite(jnp.stack([x1, y1, roi_w, roi_h], -1)).all(-1)
    bin_h = rs.per_bin(roi_h, pooled_h)
    bin_w = rs.per_bin(roi_w, pooled_w)
    grid_h = jnp.where(valid, rs.sample_grid(roi_h, pooled_h, sampling_ratio), 0)
    grid_w = jnp.where(valid, rs.sample_grid(roi_w, pooled_w, sampling_ratio), 0)

    if sampling_ratio > 0:
        row, wy = rs.sample_taps(y1, bin_h, pooled_h, height, sampling_ratio)
        col, wx = rs.sample_taps(x1, bin_w, pooled_w, width, sampling_ratio)
        count_y = jnp.full((num_rois,), row.shape[-1], jnp.int32)
        count_x = jnp.full((num_rois,), col.shape[-1], jnp.int32)
    else:
        max_h, max_w = jnp.max(grid_h), jnp.max(grid_w)
        weight_y = rs.axis_weights(y1, bin_h, grid_h, pooled_h, height, max_h)
        weight_x = rs.axis_weights(x1, bin_w, grid_w, pooled_w, width, max_w)
        row, wy, count_y = rs.band_taps(weight_y)
        col, wx, count_x = rs.band_taps(weight_x)
    count_y = jnp.where(valid, count_y, 0)
    row_base = (batch_index[:, None, None] * height + row) * width
    # The inner loop visits column taps in blocks of _COLUMN_UNROLL; pad so blocks never overrun.
    pad = [(0, 0), (0, 0), (0, _COLUMN_UNROLL)]
    params = dict(row_base=row_base, wy=wy, col=jnp.pad(col, pad), wx=jnp.pad(wx, pad))
    column_blocks = (count_x + _COLUMN_UNROLL - 1) // _COLUMN_UNROLL

    table = features.astype(dtype).reshape(batch * height * width, channels)
    unrolled = None
    if sampling_ratio > 0 and row.shape[-1] * col.shape[-1] <= _MAX_UNROLLED_TAPS:
        unrolled = functools.partial(_pool_unrolled, taps_y=row.shape[-1], taps_x=col.shape[-1])
    out = rs.pool(_separable_taps, (pooled_h, pooled_w), unrolled, table, params, count_y,
                  column_blocks, valid)
    return out.astype(out_dtype)


def _separable_taps(c, i, block):
    """Row tap ``i`` times column taps ``block*U ... block*U+U-1`` of every bin of a chunk."""
    base = lax.dynamic_index_in_dim(c["row_base"], i, axis=2, keepdims=False)
    wy = lax.dynamic_index_in_dim(c["wy"], i, axis=2, keepdims=False)
    cols = lax.dynamic_slice_in_dim(c["col"], block * _COLUMN_UNROLL, _COLUMN_UNROLL, axis=2)
    wxs = lax.dynamic_slice_in_dim(c["wx"], block * _COLUMN_UNROLL, _COLUMN_UNROLL, axis=2)
    return [
        (base[:, :, None] + cols[:, None, :, u], wy[:, :, None] * wxs[:, None, :, u])
        for u in range(_COLUMN_UNROLL)
    ]


def _pool_unrolled(table, params, taps_y, taps_x):
    """Static tap counts (fixed sampling ratio): one fused sum of ``Ty * Tx`` gathers."""
    return rs.weighted_gather_sum(table, (
        (params["row_base"][:, :, None, i] + params["col"][:, None, :, j],
         params["wy"][:, :, None, i] * params["wx"][:, None, :, j])
        for i in range(taps_y) for j in range(taps_x)))


class ROIAlign(nn.Module):
    """Flax wrapper of :func:`roi_align` (detectron2's ``ROIAlign``, whose ``aligned`` defaults to
    True, unlike the function's), no parameters.

    ``__call__(input [N, H, W, C], rois [R, 5]) -> [R, PH, PW, C]``.
    """

    output_size: int | tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool = True

    @nn.compact
    def __call__(self, input: jax.Array, rois: jax.Array) -> jax.Array:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.aligned)
