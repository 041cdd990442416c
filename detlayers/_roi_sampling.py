"""Shared machinery of the ROI pooling ops (``roi_align``, ``roi_align_rotated``).  Private.

Contract: argument checks, the per-ROI validity rule (batch index in ``[0, N)``, finite geometry),
the sampling grid (``sampling_ratio`` or the adaptive ``ceil(extent / bins)``, at most
``MAX_ADAPTIVE_GRID``), detectron2's sample positions and 1-D bilinear rule in float32 operation
order, and :func:`pool`, which sums weighted gathers of feature rows per output bin, with a
feature gradient equal to the reference backward.  How it is computed: docs/design/roi_align.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._checks import as_pair
from detlayers._numerics import accumulation_dtype as compute_dtype  # noqa: F401 (used as rs.compute_dtype)
from detlayers._numerics import divide
from detlayers._numerics import round_product as rounded

# Output bins per chunk of the adaptive loops (a chunk holds max(1, CHUNK_BINS // (PH*PW)) ROIs);
# the choice is explained in docs/design/roi_align.md.
CHUNK_BINS = 392
# Accelerators pay a kernel launch per loop step, so they use far fewer, wider chunks.
CHUNK_BINS_ACCELERATOR = 1 << 16

# Largest adaptive grid (samples per bin along one axis).  ``ceil(extent / bins)`` is honoured
# exactly up to this value, i.e. for ROIs up to ``MAX_ADAPTIVE_GRID * output_size`` feature pixels
# per axis; a larger extent (only a diverged box or an absurd ``spatial_scale`` reaches it) is
# sampled on a ``MAX_ADAPTIVE_GRID`` grid per bin instead, which bounds the work of any input.
MAX_ADAPTIVE_GRID = 512


def _chunk_bins() -> int:
    return CHUNK_BINS if jax.default_backend() == "cpu" else CHUNK_BINS_ACCELERATOR


def normalize_output_size(output_size: Any) -> tuple[int, int]:
    """``int`` or ``(PH, PW)`` -> ``(PH, PW)``, both positive Python ints."""
    size = as_pair(output_size, "output_size")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size


def check_sampling_ratio(sampling_ratio: Any) -> int:
    """Static samples per bin and axis; every value ``<= 0`` means adaptive and returns 0."""
    if not isinstance(sampling_ratio, (int, np.integer)) or isinstance(sampling_ratio, bool):
        raise TypeError(
            f"sampling_ratio must be a Python int (<= 0 = adaptive), got {sampling_ratio!r}"
        )
    return max(int(sampling_ratio), 0)


def concrete_value(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known at trace time, else ``None``.

    Call it on an argument as the caller passed it: under ``jit`` a closed-over constant is
    concrete, but any ``jnp`` operation applied to it inside the trace returns a tracer.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_spatial_scale(spatial_scale: Any) -> Any:
    """A Python number, or a scalar array (it only multiplies coordinates, so it may be traced)."""
    if isinstance(spatial_scale, (jax.Array, np.ndarray, np.generic)):
        if np.ndim(spatial_scale) != 0:
            raise ValueError(f"spatial_scale must be a scalar, got shape {np.shape(spatial_scale)}")
        return spatial_scale
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise TypeError(f"spatial_scale must be a number, got {spatial_scale!r}")
    return float(spatial_scale)


def check_inputs(name: str, features: Any, rois: Any, roi_cols: int) -> tuple[jax.Array, jax.Array]:
    features = jnp.asarray(features)
    rois = jnp.asarray(rois)
    if features.ndim != 4:
        raise ValueError(f"{name}: input must be NHWC with rank 4, got shape {features.shape}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(f"{name}: input must be floating point, got {features.dtype}")
    if rois.ndim != 2 or rois.shape[1] != roi_cols:
        raise ValueError(f"{name}: rois must have shape [R, {roi_cols}], got {rois.shape}")
    if not jnp.issubdtype(rois.dtype, jnp.floating):
        rois = rois.astype(jnp.float32)
    return features, rois


def check_arguments(name: str, features: Any, rois: Any, roi_cols: int, output_size: Any,
                    sampling_ratio: Any, spatial_scale: Any
                    ) -> tuple[np.ndarray | None, jax.Array, jax.Array, tuple[int, int], int, Any]:
    """The argument checks of both ROIAlign flavours, in order.

    Returns ``(concrete_rois, features, rois, (pooled_h, pooled_w), sampling_ratio, scale)``;
    ``concrete_rois`` is the ROIs' value when known at trace time (see :func:`concrete_value`).
    """
    concrete_rois = concrete_value(rois)
    features, rois = check_inputs(name, features, rois, roi_cols)
    pooled = normalize_output_size(output_size)
    sampling_ratio = check_sampling_ratio(sampling_ratio)
    scale = check_spatial_scale(spatial_scale)
    return concrete_rois, features, rois, pooled, sampling_ratio, scale


def empty_output(name: str, features: jax.Array, num_rois: int,
                 pooled: tuple[int, int]) -> jax.Array | None:
    """Zeros ``[R, PH, PW, C]`` when there is nothing to pool (no ROIs or no channels), else None;
    raises ``ValueError`` for an empty batch or feature map with ROIs to pool from it.
    """
    batch, height, width, channels = features.shape
    if num_rois == 0 or channels == 0:
        return jnp.zeros((num_rois, *pooled, channels), features.dtype)
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"{name}: input has an empty batch or map, shape {features.shape}")
    return None


def batch_index_and_validity(name: str, rois: jax.Array, batch: int,
                             concrete: np.ndarray | None) -> tuple[jax.Array, jax.Array]:
    """Batch index column as int32 (clamped into range) plus a mask of ROIs whose index names an
    image.  ``concrete`` (the ROIs' value when known at trace time) with an index outside
    ``[0, N)`` (or not an integer, or NaN) raises ``ValueError``; traced ROIs cannot be inspected,
    so such ROIs are masked out (they pool to zeros and receive no gradient).
    """
    if concrete is not None and concrete.shape[0]:
        values = concrete[:, 0].astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~((values >= 0) & (values < batch) & (values == np.floor(values)))
        if bad.any():
            raise ValueError(
                f"{name}: rois[:, 0] must hold batch indices in [0, {batch}) (input has N={batch});"
                f" got {values[bad][:5].tolist()} at rows {np.nonzero(bad)[0][:5].tolist()}"
            )
    column = rois[:, 0]
    # Compared as floats so that NaN (and values that would wrap in int32) are invalid.
    valid = (column >= 0) & (column < batch)
    index = jnp.where(valid, column, 0).astype(jnp.int32)
    return jnp.clip(index, 0, max(batch - 1, 0)), valid


def per_bin(roi_extent: jax.Array, bins: int) -> jax.Array:
    """``roi_extent / bins`` as the reference divides, also under ``jit`` (see :func:`divide`)."""
    return divide(roi_extent, jnp.asarray(bins, roi_extent.dtype))


def sample_grid(roi_extent: jax.Array, bins: int, sampling_ratio: int) -> jax.Array:
    """Samples per bin on one axis: ``sampling_ratio``, or ``ceil(extent / bins)`` clipped to
    ``[0, MAX_ADAPTIVE_GRID]`` (a non-finite extent gives 0)."""
    if sampling_ratio > 0:
        return jnp.full(roi_extent.shape, sampling_ratio, jnp.int32)
    grid = jnp.ceil(per_bin(roi_extent, bins))
    # Clip in floating point: converting inf or 1e30 to int32 is undefined or saturates.
    grid = jnp.where(jnp.isfinite(grid), jnp.clip(grid, 0, MAX_ADAPTIVE_GRID), 0)
    return grid.astype(jnp.int32)


def sample_coordinate(start: jax.Array, bin_size: jax.Array, grid: jax.Array, bin_index: Any,
                      k: Any) -> jax.Array:
    """Position of sample ``k`` of bin ``bin_index``, in detectron2's operation order.

    ``start + bin * bin_size + (k + 0.5) * bin_size / grid``, each operation rounded to the
    working dtype as in the reference, which matters at the ``-1`` / ``size`` validity edges, also
    under ``jit``: the product is kept from contracting into a multiply-add (:func:`rounded`) and
    the division by the grid (often a compile-time constant) from becoming a multiplication by a
    folded reciprocal (:func:`divide`).
    """
    dtype = start.dtype
    centre = jnp.asarray(k, dtype) + jnp.asarray(0.5, dtype)
    offset = divide(centre * bin_size, grid.astype(dtype))
    return (start + rounded(jnp.asarray(bin_index, dtype) * bin_size)) + offset


def bilinear_1d(y: jax.Array, length: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """1-D half of detectron2's bilinear rule: ``(low, high, w_low, w_high)`` for positions ``y``.

    A position below -1 or above ``length`` gets zero weights; one in ``[-1, 0]`` reads row 0; one
    at or past the last row reads the last row with weight 1.  Indices are always in range.
    """
    dtype = y.dtype
    valid = (y >= -1.0) & (y <= length)
    y = jnp.maximum(y, 0.0)
    low = jnp.floor(y).astype(jnp.int32)
    at_end = low >= length - 1
    low = jnp.clip(low, 0, length - 1)
    high = jnp.where(at_end, length - 1, low + 1)
    frac = jnp.where(at_end, jnp.zeros((), dtype), y - low.astype(dtype))
    w_low = jnp.where(valid, 1.0 - frac, 0.0)
    w_high = jnp.where(valid, frac, 0.0)
    return low, high, w_low, w_high


def axis_weights(start: jax.Array, bin_size: jax.Array, grid: jax.Array, bins: int, length: int,
                 max_grid: Any) -> jax.Array:
    """Dense separable sampling weights along one axis, ``[R, bins, length]``.

    ``W[r, p, h]`` is the weight the ``grid[r]`` samples of bin ``p`` put on pixel row ``h``,
    divided by the sample count (the sum over samples of :func:`bilinear_1d` weights).  Because
    the 2-D bilinear weight is the product of a row and a column weight and the validity test is
    per axis, a bin's average is exactly ``sum_{h,w} Wy[p, h] Wx[q, w] F[h, w]``.

    ``max_grid`` bounds the loop over samples (a traced value is fine: the loop is a while loop).
    """
    dtype = start.dtype
    rows = jnp.arange(length, dtype=jnp.int32)
    bin_ids = jnp.arange(bins, dtype=dtype)[None, :]

    def add_sample(k, acc):
        y = sample_coordinate(start[:, None], bin_size[:, None], grid[:, None], bin_ids, k)
        low, high, w_low, w_high = bilinear_1d(y, length)
        in_grid = k < grid[:, None]
        w_low = jnp.where(in_grid, w_low, 0.0)[..., None]
        w_high = jnp.where(in_grid, w_high, 0.0)[..., None]
        return (acc + jnp.where(rows == low[..., None], w_low, 0.0)
                + jnp.where(rows == high[..., None], w_high, 0.0))

    acc = jnp.zeros((start.shape[0], bins, length), dtype)
    if isinstance(max_grid, int):
        for k in range(max_grid):
            acc = add_sample(k, acc)
    else:
        acc = lax.fori_loop(0, max_grid, add_sample, acc)
    return acc / jnp.maximum(grid, 1).astype(dtype)[:, None, None]


def sample_taps(start: jax.Array, bin_size: jax.Array, bins: int, length: int,
                sampling_ratio: int) -> tuple[jax.Array, jax.Array]:
    """Taps of a fixed grid: two ``(row, weight / grid)`` pairs per sample, ``[R, bins, 2*s]``."""
    grid = jnp.full(start.shape, sampling_ratio, jnp.int32)
    bin_ids = jnp.arange(bins, dtype=start.dtype)[None, :]
    index, weight = [], []
    for k in range(sampling_ratio):
        y = sample_coordinate(start[:, None], bin_size[:, None], grid[:, None], bin_ids, k)
        low, high, w_low, w_high = bilinear_1d(y, length)
        index += [low, high]
        weight += [w_low / sampling_ratio, w_high / sampling_ratio]
    return jnp.stack(index, -1), jnp.stack(weight, -1)


def band_taps(weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Taps of dense weights ``[R, P, L]`` whose nonzeros form one band per bin.

    Returns ``index int32[R, P, L]`` (``lo + i``, clamped into range), ``weight [R, P, L]`` (the
    band's weights, zero past its end) and ``count int32[R]`` (the longest band of the ROI).
    Adaptive grids always give a band: their samples are at most one pixel apart.
    """
    length = weights.shape[-1]
    positions = jnp.arange(length, dtype=jnp.int32)
    nonzero = weights != 0
    any_nonzero = nonzero.any(-1)
    lo = jnp.argmax(nonzero, axis=-1).astype(jnp.int32)
    hi = length - 1 - jnp.argmax(nonzero[..., ::-1], axis=-1).astype(jnp.int32)
    size = jnp.where(any_nonzero, hi - lo + 1, 0)
    index = jnp.minimum(lo[..., None] + positions, length - 1)
    in_band = positions < size[..., None]
    weight = jnp.where(in_band, jnp.take_along_axis(weights, index, axis=-1), 0.0)
    return index, weight, size.max(-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Chunked loops with data-dependent trip counts.
# --------------------------------------------------------------------------------------------


def chunk_plan(key: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, int]:
    """Sort ROIs by ``key`` and pad to whole chunks.

    Returns ``order int32[R_pad]`` (positions into the ROI axis; padding repeats ROI 0 and must be
    masked by the caller through ``real``), ``real bool[R_pad]`` and the number of chunks.
    """
    num = key.shape[0]
    num_chunks = -(-num // chunk)
    padded = num_chunks * chunk
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    order = jnp.concatenate([order, jnp.zeros((padded - num,), jnp.int32)])
    real = jnp.arange(padded) < num
    return order, real, num_chunks


def to_chunks(x: jax.Array, order: jax.Array, num_chunks: int) -> jax.Array:
    taken = jnp.take(x, order, axis=0)
    return taken.reshape((num_chunks, -1) + x.shape[1:])


def from_chunks(y: jax.Array, order: jax.Array, num: int) -> jax.Array:
    """Inverse of ``to_chunks`` for per-ROI results ``[num_chunks, chunk, ...]``."""
    flat = y.reshape((-1,) + y.shape[2:])
    inverse = jnp.zeros((num,), jnp.int32).at[order[:num]].set(jnp.arange(num, dtype=jnp.int32))
    return jnp.take(flat, inverse, axis=0)


def gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for in-range indices (callers clamp), one contiguous row per index."""
    return table.at[index].get(mode="promise_in_bounds")


def weighted_gather_sum(table: jax.Array, taps: Iterable[tuple[jax.Array, jax.Array]],
                        acc: jax.Array | None = None) -> jax.Array:
    """``acc + sum(weight[..., None] * table[index])`` over ``(index, weight)`` pairs, in order."""
    for index, weight in taps:
        term = weight[..., None] * gather_rows(table, index)
        acc = term if acc is None else acc + term
    return acc


def scatter_add_rows(table: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
    return table.at[index].add(rows, mode="promise_in_bounds")


# --------------------------------------------------------------------------------------------
# The pooling engine shared by roi_align and roi_align_rotated.
# --------------------------------------------------------------------------------------------

# taps(chunk_params, i, j) -> [(index int32[S, PH, PW], weight [S, PH, PW]), ...]: the feature rows
# (of the flattened [N*H*W, C] table) and weights that step (i, j) of the loops adds to each bin.
TapsFn = Callable[
    [dict[str, jax.Array], jax.Array, jax.Array], Sequence[tuple[jax.Array, jax.Array]]
]


def _chunk_loops(taps: TapsFn, c: dict[str, jax.Array], trips_outer: jax.Array,
                 trips_inner: jax.Array, visit: Callable, carry: Any) -> Any:
    live = c["live"][:, None, None]

    def outer(i, carry):
        def inner(j, carry):
            for index, weight in taps(c, i, j):
                carry = visit(index, weight * live, carry)
            return carry

        return lax.fori_loop(0, trips_inner, inner, carry)

    return lax.fori_loop(0, trips_outer, outer, carry)


def _chunked(params: dict[str, jax.Array], trips_outer: jax.Array, trips_inner: jax.Array,
             live: jax.Array, pooled_bins: int, dtype: Any):
    num = trips_outer.shape[0]
    chunk = min(max(1, _chunk_bins() // pooled_bins), num)
    # Sorting by (outer, inner) count, not by their product, keeps chunks uniform in both loops
    # (chunk steps / needed steps on the CPU benchmark: ~1.7 instead of ~3).
    order, real, num_chunks = chunk_plan(trips_outer * (1 << 16) + trips_inner, chunk)
    chunks = {k: to_chunks(v, order, num_chunks) for k, v in params.items()}
    chunks["live"] = (to_chunks(live, order, num_chunks) & real.reshape(num_chunks, chunk))
    chunks["live"] = chunks["live"].astype(dtype)

    def chunk_max(t):
        return jnp.where(real, jnp.take(t, order), 0).reshape(num_chunks, chunk).max(-1)

    return chunks, chunk_max(trips_outer), chunk_max(trips_inner), order


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pool(taps: TapsFn, pooled: tuple[int, int], unrolled: Callable | None, table: jax.Array,
         params: dict[str, jax.Array], trips_outer: jax.Array, trips_inner: jax.Array,
         live: jax.Array) -> jax.Array:
    """``out[r, p, q, :]``: the sum over loop steps and taps of ``weight * table[index]``.

    ``params`` are per-ROI arrays (leading axis R) that ``taps`` reads; ROI ``r`` runs
    ``trips_outer[r] x trips_inner[r]`` loop steps; ``live[r]`` False zeroes a ROI.  ROIs are sorted
    by work and pooled in chunks (``CHUNK_BINS`` output bins) whose loops run to the chunk's
    largest counts, so every ROI gets its full grid with static shapes.  ``unrolled(table,
    params)``, when given, computes the same forward in one static fusion (fixed sampling ratios).
    The feature gradient replays the loops with scatter-adds (``table`` is the only differentiable
    input; the rest is geometry, treated as constant).
    """
    return _pool_fwd(taps, pooled, unrolled, table, params, trips_outer, trips_inner, live)[0]


def _pool_fwd(taps, pooled, unrolled, table, params, trips_outer, trips_inner, live):
    num = trips_outer.shape[0]
    chunks, chunk_outer, chunk_inner, order = _chunked(params, trips_outer, trips_inner, live,
                                                        pooled[0] * pooled[1], table.dtype)
    residuals = (table.shape, chunks, chunk_outer, chunk_inner, order)
    if unrolled is not None:
        out = unrolled(table, params)
        return jnp.where(live[:, None, None, None], out, 0.0), residuals

    def one_chunk(args):
        c, t_outer, t_inner = args
        acc = jnp.zeros((c["live"].shape[0],) + pooled + (table.shape[1],), table.dtype)

        def visit(index, weight, acc):
            return weighted_gather_sum(table, [(index, weight)], acc)

        return _chunk_loops(taps, c, t_outer, t_inner, visit, acc)

    out = lax.map(one_chunk, (chunks, chunk_outer, chunk_inner))
    return from_chunks(out, order, num), residuals


def _pool_bwd(taps, pooled, unrolled, residuals, grad):
    del pooled, unrolled
    table_shape, chunks, chunk_outer, chunk_inner, order = residuals
    grad_chunks = to_chunks(grad, order, chunk_outer.shape[0])

    def one_chunk(dtable, args):
        c, t_outer, t_inner, g = args

        def visit(index, weight, dtable):
            return scatter_add_rows(dtable, index, weight[..., None] * g)

        return _chunk_loops(taps, c, t_outer, t_inner, visit, dtable), None

    dtable, _ = lax.scan(one_chunk, jnp.zeros(table_shape, grad.dtype),
                         (chunks, chunk_outer, chunk_inner, grad_chunks))
    return dtable, None, None, None, None


pool.defvjp(_pool_fwd, _pool_bwd)
