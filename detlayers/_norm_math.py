"""The math of the normalization layers as pure functions (private; the public ones are
re-exported by :mod:`detlayers.batch_norm`).

Layout: channels on the last axis, batch first: ``[B, ..., C]`` (NHWC images ``[N, H, W, C]``).
Statistics are accumulated in float32 (float64 for float64 input); outputs have the input's dtype.

- batch statistics (:func:`batch_moments`), optionally over a named device axis and per-example
  ``mask``;
- normalization with given statistics (:func:`normalize`) and the training-mode normalization
  with its closed-form backward (:func:`train_normalize`);
- PyTorch's running-statistics update (:func:`update_running_stats`);
- ``group_norm`` and detectron2's ``channel_layer_norm``.
"""

# No ``from __future__ import annotations``: the NamedTuples' generated ``__new__`` lives in a
# namespace of its own, where string annotations such as "Array" cannot be resolved by the docs.
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from detlayers._numerics import accumulation_dtype as _compute_dtype
from detlayers._sharding import varying_axes as _varying_axes

Array = jax.Array

__all__ = [
    "STATS_MODES",
    "BatchMoments",
    "RunningStats",
    "TrainNormalized",
    "batch_moments",
    "channel_layer_norm",
    "group_norm",
    "normalize",
    "train_normalize",
    "update_running_stats",
]

# detectron2's NaiveSyncBatchNorm modes of combining devices (see batch_moments)
STATS_MODES = ("", "N")


class BatchMoments(NamedTuple):
    """Per-channel batch statistics, in float32 (float64 for float64 input)."""

    mean: Array
    """``[C]``, the mean over every axis but the last (0 when ``count == 0``)."""
    var: Array
    """``[C]``, the biased variance (0 when ``count == 0``)."""
    count: Array
    """``[]``, the number of (real) elements per channel on all devices, as a float."""


class RunningStats(NamedTuple):
    """Running statistics ``batch_stats/{mean, var}`` after one update, ``[C]`` each."""

    mean: Array
    var: Array


class TrainNormalized(NamedTuple):
    """What :func:`train_normalize` returns."""

    y: Array
    """The normalized input, ``x``'s shape and dtype."""
    moments: BatchMoments
    """The batch statistics ``y`` was normalized with (no gradient flows through them)."""


class _TrainMoments(NamedTuple):
    """:class:`BatchMoments` plus what the training forward and backward reuse."""

    moments: BatchMoments
    grad_count: Array
    """``[]``: the count that ``d mean / d x`` divides by for this device's real elements: the
    global ``count``, or with equal device weights (``stats_mode=""`` over an axis) the number of
    contributing devices times this device's real count."""
    centred: Array
    """``x - mean`` in the compute dtype, ``[B, ..., C]``."""


class _NormalizeResiduals(NamedTuple):
    """The residuals :func:`train_normalize`'s backward needs (each named as in the forward)."""

    scale: Array | None
    bias: Array | None
    mask: Array | None
    centred: Array
    inv_std: Array
    grad_count: Array


# --------------------------------------------------------------------------------------------
# batch statistics


def _masked_sum(a: Array, mask: Array | None) -> Array:
    """Per-channel sum of ``a`` ``[B, ..., C]`` over every axis but the last, over the rows where
    ``mask`` ``bool[B]`` is True (all rows when None).

    Each row is first summed on its own (``[B, C]``) and the row sums are then *selected* with
    ``where``, so a padded row holding NaN/inf contributes nothing (``0 * NaN`` would be NaN), and
    no ``[B, ..., C]`` temporary is built for the selection.
    """
    if mask is None:
        return jnp.sum(a, axis=tuple(range(a.ndim - 1)))
    row_sums = jnp.sum(a, axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a
    return jnp.sum(jnp.where(mask[:, None], row_sums, jnp.zeros((), a.dtype)), axis=0)


def _train_moments(x: Array, mask: Array | None, axis_name: Any, stats_mode: str) -> _TrainMoments:
    """The statistics of :func:`batch_moments`, the count the closed-form backward divides by, and
    ``x - mean`` in the compute dtype."""
    dtype = _compute_dtype(x.dtype)
    xf = x.astype(dtype)
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    if mask is None:
        count = jnp.asarray(x.shape[0] * per_row, dtype)
    else:
        count = jnp.sum(mask.astype(dtype)) * per_row
    # no gradient flows through the counts (integers in disguise)
    count = jax.lax.stop_gradient(count)
    total = _masked_sum(xf, mask)

    if axis_name is not None and stats_mode == "":
        # detectron2's stats_mode="": every device's mean and mean of squares weigh the same.
        # var = avg_d(E_d[x^2]) - mean^2 is evaluated as avg_d(var_d + (mean_d - mean)^2), the same
        # number without the cancellation of E[x^2] - E[x]^2.
        has_real = (count > 0).astype(dtype)
        local_mean = total / jnp.maximum(count, 1.0)
        local_centred = xf - local_mean
        local_var = _masked_sum(local_centred * local_centred, mask) / jnp.maximum(count, 1.0)
        packed = jax.lax.psum(
            jnp.concatenate([local_mean * has_real, jnp.stack([has_real, count])]), axis_name
        )
        devices = jax.lax.stop_gradient(packed[-2])
        global_count = jax.lax.stop_gradient(packed[-1])
        mean = packed[:-2] / jnp.maximum(devices, 1.0)
        spread = local_mean - mean
        var = jax.lax.psum(has_real * (local_var + spread * spread), axis_name) / jnp.maximum(
            devices, 1.0
        )
        # d mean / d x = 1 / (devices * local count) for this device's real elements
        return _TrainMoments(BatchMoments(mean, var, global_count), devices * count, xf - mean)

    if axis_name is not None:
        # one collective for the sums and the count
        packed = jax.lax.psum(jnp.concatenate([total, count[None]]), axis_name)
        total, count = packed[:-1], jax.lax.stop_gradient(packed[-1])
    safe_count = jnp.maximum(count, 1.0)
    mean = total / safe_count
    centred = xf - mean
    sq_total = _masked_sum(centred * centred, mask)
    if axis_name is not None:
        sq_total = jax.lax.psum(sq_total, axis_name)
    var = sq_total / safe_count
    return _TrainMoments(BatchMoments(mean, var, count), count, centred)


def batch_moments(
    x: Array,
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    stats_mode: str = "N",
) -> BatchMoments:
    """Per-channel mean and biased variance over every axis but the last, in float32.

    Args:
      x: ``[B, ..., C]`` (NHWC images: ``[N, H, W, C]``), any floating dtype.
      mask: optional ``bool[B]``; rows where it is False contribute nothing (their values may be
        anything, finite or not: each row is summed on its own and the padded rows' sums are
        dropped by selection, never multiplied by 0). Differentiating w.r.t. ``x`` needs finite
        padded rows (their zero cotangent meets their values in the chain rule).
      axis_name: optional named mapped axis (``pmap`` / ``shard_map`` / named ``vmap``) to reduce
        the statistics over.
      stats_mode: how devices are combined over ``axis_name`` (detectron2's
        ``NaiveSyncBatchNorm`` modes). ``"N"``: the sums are ``psum``-ed, so every device gets the
        exact statistics of all real examples on all devices (each element weighted once).
        ``""``: each device's mean and mean of squares (over its real elements) are averaged with
        equal weight, ``var = avg(E_d[x^2]) - avg(E_d[x])^2``; devices without a real element are
        left out of the average (detectron2 asserts there are none). Without ``axis_name`` both
        are the local statistics.

    Returns:
      ``BatchMoments(mean[C], var[C], count[])``: ``count`` is the number of (real) elements per
      channel on all devices, as float32. With ``count == 0`` mean and var are 0 (not NaN).

    Two passes (mean, then centred squares) rather than ``E[x^2] - E[x]^2``: the second costs one
    more ``C``-sized reduction but avoids cancellation when ``|mean| >> std``.
    """
    if stats_mode not in STATS_MODES:
        raise ValueError(f"batch_moments: stats_mode must be one of {STATS_MODES}, got {stats_mode!r}")
    return _train_moments(x, mask, axis_name, stats_mode).moments


# --------------------------------------------------------------------------------------------
# normalization


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None,
    bias: Array | None,
    eps: float,
) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last (channel) axis.

    ``mean``, ``var``, ``scale``, ``bias`` are ``[C]``; ``scale``/``bias`` may be None (no affine).
    Computed in float32 (float64 for float64 input) and returned in ``x.dtype``.
    """
    dtype = _compute_dtype(x.dtype)
    inv = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(eps, dtype))
    if scale is not None:
        inv = inv * scale.astype(dtype)
    y = (x.astype(dtype) - mean.astype(dtype)) * inv
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(x.dtype)


def _train_forward(
    x: Array, scale: Array | None, bias: Array | None, mask: Array | None, axis_name: Any, eps: float,
    stats_mode: str,
) -> tuple[TrainNormalized, _NormalizeResiduals]:
    """The training forward and the residuals of its backward (custom_vjp's ``fwd`` contract)."""
    # centred is the same buffer the statistics were computed from (count-weighted mode), so XLA
    # keeps one [B, ..., C] buffer for the statistics, the output and the backward pass
    stats = _train_moments(x, mask, axis_name, stats_mode)
    dtype = _compute_dtype(x.dtype)
    inv_std = jax.lax.rsqrt(stats.moments.var + jnp.asarray(eps, dtype))
    factor = inv_std if scale is None else inv_std * scale.astype(dtype)
    y = stats.centred * factor
    if bias is not None:
        y = y + bias.astype(dtype)
    residuals = _NormalizeResiduals(scale, bias, mask, stats.centred, inv_std, stats.grad_count)
    return TrainNormalized(y.astype(x.dtype), stats.moments), residuals


def _train_normalize_primal(x, scale, bias, mask, axis_name, eps, stats_mode) -> TrainNormalized:
    return _train_forward(x, scale, bias, mask, axis_name, eps, stats_mode)[0]


def _train_normalize_bwd(
    axis_name: Any, eps: float, stats_mode: str, residuals: _NormalizeResiduals, cotangent: TrainNormalized
) -> tuple[Array, Array | None, Array | None, None]:
    """Closed-form batch-norm backward; the cotangent of the moments is ignored (the caller only
    feeds ``stop_gradient``-ed moments to the running averages).

    With ``xhat = (x - mean) * inv_std``, ``gs = g * scale`` and ``n`` the global real count, real
    rows get ``dx = inv_std * (gs - sum(gs)/n - xhat * sum(gs * xhat)/n)``. The sums run over
    *every* row on every device (``psum``, the transpose of the forward ``psum``): padded rows'
    outputs depend on the statistics too, so their cotangents enter the real rows' gradients;
    padded rows themselves do not enter the statistics, so theirs is the direct path
    ``dx = gs * inv_std``. ``scale`` and ``bias`` get the local sums of ``g * xhat`` and ``g``.
    All of this is exactly what autodiff of the forward gives.

    With equal device weights (``stats_mode=""`` over an axis) the statistics' derivative w.r.t.
    one of this device's real elements is ``1 / (devices * local count)`` instead of ``1 / n``:
    the same formula with ``n`` replaced by that per-device count (``grad_count``).
    """
    del eps, stats_mode
    centred, inv_std = residuals.centred, residuals.inv_std
    scale, bias, mask = residuals.scale, residuals.bias, residuals.mask
    dtype = centred.dtype
    # the cotangent of y has y's dtype, which is x's
    g = cotangent.y.astype(dtype)
    # sums of g * centred, scaled by inv_std afterwards: no xhat temporary
    reduce_axes = tuple(range(g.ndim - 1))
    sum_g = jnp.sum(g, axis=reduce_axes)
    sum_gx = jnp.sum(g * centred, axis=reduce_axes) * inv_std
    global_sums = jnp.stack([sum_g, sum_gx])
    if axis_name is not None:
        global_sums = jax.lax.psum(global_sums, axis_name)
    mean_g, mean_gx = global_sums / jnp.maximum(residuals.grad_count, 1.0)
    factor = inv_std if scale is None else inv_std * scale.astype(dtype)
    correction = mean_g + centred * (inv_std * mean_gx)
    if mask is not None:
        rows = jnp.reshape(mask, (mask.shape[0],) + (1,) * (g.ndim - 1))
        correction = jnp.where(rows, correction, jnp.zeros((), dtype))
    dx = (g - correction) * factor
    d_scale = None if scale is None else sum_gx.astype(scale.dtype)
    d_bias = None if bias is None else sum_g.astype(bias.dtype)
    return dx.astype(cotangent.y.dtype), d_scale, d_bias, None


_train_normalize_vjp = jax.custom_vjp(_train_normalize_primal, nondiff_argnums=(4, 5, 6))
_train_normalize_vjp.defvjp(_train_forward, _train_normalize_bwd)


def train_normalize(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    axis_name: Any,
    eps: float,
    stats_mode: str = "N",
) -> TrainNormalized:
    """Training-mode batch norm: ``TrainNormalized(y, moments)`` with ``moments`` the statistics of
    :func:`batch_moments` (with ``mask``, ``axis_name``, ``stats_mode``) and ``y`` equal to
    ``normalize(x, moments.mean, moments.var, scale, bias, eps)``.

    Same values as composing those two functions, but the gradient w.r.t. ``x``, ``scale`` and
    ``bias`` is the closed-form batch-norm backward (two passes over ``x`` and the cotangent)
    instead of autodiff through the two-pass statistics. No gradient flows through the returned
    moments (they only feed the running averages). Reverse mode only (a ``custom_vjp``).
    """
    if axis_name is not None:
        # Under shard_map, replicated (device-invariant) scale/bias used with a device-varying x
        # are implicitly cast to varying by autodiff-able code; a custom VJP must see that cast
        # explicitly so its per-device parameter cotangents are summed over the axis (the cast's
        # transpose), as plain autodiff would do.
        scale, bias = (_as_varying_like(p, x, axis_name) for p in (scale, bias))
    out = _train_normalize_vjp(x, scale, bias, mask, axis_name, eps, stats_mode)
    return TrainNormalized(out.y, jax.lax.stop_gradient(out.moments))


def _as_varying_like(param: Array | None, x: Array, axis_name: Any) -> Array | None:
    """``param`` cast to vary over ``axis_name`` when ``x`` does and it does not (shard_map)."""
    if param is None:
        return None
    x_vma, p_vma = _varying_axes(x), _varying_axes(param)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    missing = tuple(n for n in names if n in x_vma and n not in p_vma)
    if not missing:
        return param
    return jax.lax.pcast(param, missing, to="varying")


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    count: Array,
    momentum: float,
    *,
    unbiased: bool = True,
) -> RunningStats:
    """PyTorch's update ``r += momentum * (batch - r)``, with the unbiased variance by default.

    ``var`` is the biased batch variance over ``count`` elements; with ``unbiased=True`` (PyTorch's
    ``BatchNorm2d`` / ``SyncBatchNorm``) the running variance receives ``var * count / (count -
    1)``, with ``unbiased=False`` (detectron2's ``NaiveSyncBatchNorm``) ``var`` itself. With
    ``count == 0`` nothing changes (as detectron2's ``stats_mode="N"`` does for an empty global
    batch); with ``count == 1`` (where PyTorch raises) the factor is taken as 1. Gradients never
    flow into running statistics. Returns ``RunningStats(mean, var)`` in the running dtypes.
    """
    mean = jax.lax.stop_gradient(mean).astype(running_mean.dtype)
    var = jax.lax.stop_gradient(var)
    count = jax.lax.stop_gradient(count).astype(var.dtype)
    if unbiased:
        var = var * (count / jnp.maximum(count - 1.0, 1.0))
    running_var_target = var.astype(running_var.dtype)
    step = jnp.where(count > 0, momentum, 0.0).astype(running_mean.dtype)
    return RunningStats(
        running_mean + step * (mean - running_mean), running_var + step * (running_var_target - running_var)
    )


# --------------------------------------------------------------------------------------------
# group and layer norm


def group_norm(
    x: Array,
    num_groups: int,
    scale: Array | None,
    bias: Array | None,
    eps: float = 1e-5,
) -> Array:
    """``torch.nn.functional.group_norm`` for channels-last input ``[N, ..., C]``.

    Channels are split into ``num_groups`` contiguous groups (channel ``c`` is in group
    ``c // (C // num_groups)``, as in PyTorch); each (example, group) is normalized over its
    channels and all positions with the biased variance, then ``scale``/``bias`` ``[C]`` apply.
    """
    n, c = x.shape[0], x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    xf = x.astype(dtype)
    grouped = jnp.reshape(xf, (n, -1, num_groups, c // num_groups))
    axes = (1, 3)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    centred = grouped - mean
    var = jnp.mean(centred * centred, axis=axes, keepdims=True)
    y = jnp.reshape(centred * jax.lax.rsqrt(var + jnp.asarray(eps, dtype)), xf.shape)
    if scale is not None:
        y = y * scale.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(x.dtype)


def channel_layer_norm(x: Array, scale: Array, bias: Array, eps: float = 1e-6) -> Array:
    """detectron2's ``LayerNorm``: normalize over the channel (last) axis at every position.

    Biased variance, ``(x - u) / sqrt(s + eps) * scale + bias`` with ``scale``/``bias`` ``[C]``.
    """
    dtype = _compute_dtype(x.dtype)
    xf = x.astype(dtype)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
    y = y * scale.astype(dtype) + bias.astype(dtype)
    return y.astype(x.dtype)
