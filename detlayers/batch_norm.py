"""Normalization layers of ``detectron2.layers.batch_norm`` for Flax linen, channels last (NHWC).

Layers:

- :class:`BatchNorm2d` -- ``torch.nn.BatchNorm2d`` semantics (batch statistics in training, running
  statistics updated with the unbiased variance, running statistics in eval).
- :class:`FrozenBatchNorm2d` -- fixed affine batch norm; identity when fresh.
- :class:`NaiveSyncBatchNorm` -- batch norm whose training statistics are reduced over a named
  device axis (``pmap`` / ``shard_map`` / named ``vmap``), with a per-example ``mask`` for padded
  per-device batches.
- :class:`GroupNorm` -- ``torch.nn.GroupNorm`` (what ``get_norm("GN", C)`` builds).
- :class:`LayerNorm` -- detectron2's channel LayerNorm (normalizes over channels at each position).
- :class:`CycleBatchNormList` -- one set of batch statistics per call position in a cycle, shared
  affine.
- :func:`get_norm` -- detectron2's name -> layer factory.

Every layer takes ``x`` with channels on the last axis: ``[N, H, W, C]`` for images, but any rank
>= 2 with the batch first and channels last works (``[N, C]``, ``[N, L, C]``, ...). Every
``__call__`` takes ``train: bool = False``.  Statistics are accumulated in float32 (or float64 when
the input is float64), and the output has the input's dtype, so bfloat16 / float16 inputs are fine.

Variables follow Flax names: ``params/{scale, bias}`` and ``batch_stats/{mean, var}`` (float32).
Running statistics change only when ``train=True`` *and* the ``batch_stats`` collection is mutable
(``module.apply(v, x, train=True, mutable=["batch_stats"])``) and never during ``init``.

The math lives in pure functions (:func:`batch_moments`, :func:`normalize`,
:func:`update_running_stats`, :func:`group_norm`, :func:`channel_layer_norm`); the modules are thin
wrappers over them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers._numerics import accumulation_dtype as _compute_dtype
from detlayers._sharding import varying_axes as _varying_axes

Array = jax.Array

__all__ = [
    "BatchNorm2d",
    "CycleBatchNormList",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "LayerNorm",
    "NaiveSyncBatchNorm",
    "batch_moments",
    "channel_layer_norm",
    "get_norm",
    "group_norm",
    "normalize",
    "update_running_stats",
]

STATS_MODES = ("", "N")


# --------------------------------------------------------------------------------------------
# pure functions


def _check_input(x: Array, num_features: int, layer: str) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{layer}: input x must have rank >= 2 with channels last (e.g. NHWC [N,H,W,C]); "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != num_features:
        raise ValueError(
            f"{layer}: input x has {x.shape[-1]} channels on its last axis (shape "
            f"{tuple(x.shape)}) but num_features={num_features}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{layer}: input x must be floating point, got dtype {x.dtype}")


def _check_mask(mask: Array, x: Array, layer: str) -> None:
    mask_shape = tuple(jnp.shape(mask))
    if mask_shape != (x.shape[0],):
        raise ValueError(
            f"{layer}: mask must have shape (batch,) = ({x.shape[0]},) for input x of shape "
            f"{tuple(x.shape)}; got mask shape {mask_shape}"
        )
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"{layer}: mask must be a bool array, got dtype {jnp.result_type(mask)}")


def _axis_is_bound(axis_name: Any) -> bool:
    """Whether ``axis_name`` names a mapped axis (pmap, shard_map, named vmap) at this trace.

    JAX raises ``NameError("unbound axis name: ...")`` for collectives over an unknown axis; asking
    for its size is the cheapest such query and costs nothing at run time.
    """
    if axis_name is None:
        return False
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        return False
    return True


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


def batch_moments(
    x: Array,
    *,
    mask: Array | None = None,
    axis_name: Any = None,
) -> tuple[Array, Array, Array]:
    """Per-channel mean and biased variance over every axis but the last, in float32.

    Args:
      x: ``[B, ..., C]`` (NHWC images: ``[N, H, W, C]``), any floating dtype.
      mask: optional ``bool[B]``; rows where it is False contribute nothing (their values may be
        anything, finite or not: each row is summed on its own and the padded rows' sums are
        dropped by selection, never multiplied by 0). Differentiating w.r.t. ``x`` needs finite
        padded rows (their zero cotangent meets their values in the chain rule).
      axis_name: optional named mapped axis (``pmap`` / ``shard_map`` / named ``vmap``); the sums
        are ``psum``-ed over it so every device gets the statistics of all real examples on all
        devices, each element weighted once.

    Returns:
      ``(mean[C], var[C], count[])``: ``count`` is the number of (real) elements per channel that
      entered the statistics, as float32. With ``count == 0`` mean and var are 0 (not NaN).

    Two passes (mean, then centred squares) rather than ``E[x^2] - E[x]^2``: the second costs one
    more ``C``-sized reduction but avoids cancellation when ``|mean| >> std``.
    """
    dtype = _compute_dtype(x.dtype)
    xf = x.astype(dtype)
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    if mask is None:
        count = jnp.asarray(x.shape[0] * per_row, dtype)
    else:
        count = jnp.sum(mask.astype(dtype)) * per_row

    total = _masked_sum(xf, mask)
    if axis_name is not None:
        # one collective for the sums and the count
        packed = jax.lax.psum(jnp.concatenate([total, count[None]]), axis_name)
        total, count = packed[:-1], packed[-1]
    # no gradient flows through the count (an integer in disguise)
    count = jax.lax.stop_gradient(count)
    safe_count = jnp.maximum(count, 1.0)
    mean = total / safe_count

    centred = xf - mean
    sq_total = _masked_sum(centred * centred, mask)
    if axis_name is not None:
        sq_total = jax.lax.psum(sq_total, axis_name)
    var = sq_total / safe_count
    return mean, var, count


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


def _train_forward(x, scale, bias, mask, axis_name, eps):
    mean, var, count = batch_moments(x, mask=mask, axis_name=axis_name)
    dtype = _compute_dtype(x.dtype)
    inv_std = jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
    factor = inv_std if scale is None else inv_std * scale.astype(dtype)
    # the same expression as batch_moments' centred values, so XLA keeps one [B, ..., C] buffer
    # for the statistics, the output and the backward pass
    centred = x.astype(dtype) - mean
    y = centred * factor
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(x.dtype), (mean, var, count), (x, scale, bias, mask, centred, inv_std, count)


def _train_normalize_fwd(x, scale, bias, mask, axis_name, eps):
    y, stats, residuals = _train_forward(x, scale, bias, mask, axis_name, eps)
    return (y, stats), residuals


def _train_normalize_bwd(axis_name, eps, residuals, cotangents):
    """Closed-form batch-norm backward; the cotangents of the statistics are ignored (the caller
    only feeds ``stop_gradient``-ed statistics to the running averages).

    With ``xhat = (x - mean) * inv_std``, ``gs = g * scale`` and ``n`` the global real count, real
    rows get ``dx = inv_std * (gs - sum(gs)/n - xhat * sum(gs * xhat)/n)``. The sums run over
    *every* row on every device (``psum``, the transpose of the forward ``psum``): padded rows'
    outputs depend on the statistics too, so their cotangents enter the real rows' gradients;
    padded rows themselves do not enter the statistics, so theirs is the direct path
    ``dx = gs * inv_std``. ``scale`` and ``bias`` get the local sums of ``g * xhat`` and ``g``.
    All of this is exactly what autodiff of the forward gives.
    """
    del eps
    x, scale, bias, mask, centred, inv_std, count = residuals
    dtype = _compute_dtype(x.dtype)
    g = cotangents[0].astype(dtype)
    # sums of g * centred, scaled by inv_std afterwards: no xhat temporary
    reduce_axes = tuple(range(x.ndim - 1))
    sum_g = jnp.sum(g, axis=reduce_axes)
    sum_gx = jnp.sum(g * centred, axis=reduce_axes) * inv_std
    global_sums = jnp.stack([sum_g, sum_gx])
    if axis_name is not None:
        global_sums = jax.lax.psum(global_sums, axis_name)
    mean_g, mean_gx = global_sums / jnp.maximum(count, 1.0)
    factor = inv_std if scale is None else inv_std * scale.astype(dtype)
    correction = mean_g + centred * (inv_std * mean_gx)
    if mask is not None:
        rows = jnp.reshape(mask, (mask.shape[0],) + (1,) * (x.ndim - 1))
        correction = jnp.where(rows, correction, jnp.zeros((), dtype))
    dx = (g - correction) * factor
    d_scale = None if scale is None else sum_gx.astype(scale.dtype)
    d_bias = None if bias is None else sum_g.astype(bias.dtype)
    return dx.astype(x.dtype), d_scale, d_bias, None


def _train_normalize_primal(x, scale, bias, mask, axis_name, eps):
    return _train_forward(x, scale, bias, mask, axis_name, eps)[:2]


_train_normalize_vjp = jax.custom_vjp(_train_normalize_primal, nondiff_argnums=(4, 5))
_train_normalize_vjp.defvjp(_train_normalize_fwd, _train_normalize_bwd)


def _train_normalize(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    axis_name: Any,
    eps: float,
) -> tuple[Array, tuple[Array, Array, Array]]:
    """Training-mode batch norm: ``(y, (mean, var, count))`` with ``y`` as
    ``normalize(x, mean, var, scale, bias, eps)`` and the statistics of :func:`batch_moments`.

    Same values as composing those two functions, but the gradient w.r.t. ``x``, ``scale`` and
    ``bias`` is the closed-form batch-norm backward (two passes over ``x`` and the cotangent)
    instead of autodiff through the two-pass statistics. No gradient flows through the returned
    statistics (they only feed the running averages).
    """
    if axis_name is not None:
        # Under shard_map, replicated (device-invariant) scale/bias used with a device-varying x
        # are implicitly cast to varying by autodiff-able code; a custom VJP must see that cast
        # explicitly so its per-device parameter cotangents are summed over the axis (the cast's
        # transpose), as plain autodiff would do.
        scale, bias = (_as_varying_like(p, x, axis_name) for p in (scale, bias))
    y, stats = _train_normalize_vjp(x, scale, bias, mask, axis_name, eps)
    return y, jax.lax.stop_gradient(stats)


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
) -> tuple[Array, Array]:
    """PyTorch's update ``r += momentum * (batch - r)``, with the unbiased variance.

    ``var`` is the biased batch variance over ``count`` elements; the running variance receives
    ``var * count / (count - 1)``. With ``count == 0`` nothing changes (as detectron2's
    ``stats_mode="N"`` does for an empty global batch); with ``count == 1`` (where PyTorch raises)
    the factor is taken as 1. Gradients never flow into running statistics.
    """
    mean = jax.lax.stop_gradient(mean).astype(running_mean.dtype)
    var = jax.lax.stop_gradient(var)
    count = jax.lax.stop_gradient(count).astype(var.dtype)
    unbiased = (var * (count / jnp.maximum(count - 1.0, 1.0))).astype(running_var.dtype)
    step = jnp.where(count > 0, momentum, 0.0).astype(running_mean.dtype)
    return running_mean + step * (mean - running_mean), running_var + step * (
        unbiased - running_var
    )


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


# --------------------------------------------------------------------------------------------
# modules


def _affine_params(module: nn.Module, channels: int) -> tuple[Array, Array]:
    """The learned affine of a norm layer: ``params/{scale, bias}`` ``float32[channels]``,
    initialised to 1 and 0 (PyTorch's ``weight``/``bias``). Call inside a compact method."""
    scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return scale, bias


class _BatchNormBase(nn.Module):
    """Shared variables and train/eval logic of BatchNorm2d and NaiveSyncBatchNorm.

    Subclasses declare the fields ``num_features``, ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` (each in its own positional order, PyTorch's / detectron2's).
    """

    def _forward(self, x: Array, *, train: bool, mask: Array | None, axis_name: Any, layer: str) -> Array:
        num_features, eps = self.num_features, self.eps
        _check_input(x, num_features, layer)
        scale, bias = _affine_params(self, num_features) if self.affine else (None, None)
        running = None
        if self.track_running_stats:
            running_mean = self.variable(
                "batch_stats", "mean", lambda: jnp.zeros((num_features,), jnp.float32)
            )
            running_var = self.variable(
                "batch_stats", "var", lambda: jnp.ones((num_features,), jnp.float32)
            )
            running = (running_mean, running_var)

        if running is not None and not train:
            return normalize(x, running[0].value, running[1].value, scale, bias, eps)

        if x.size == 0:
            # empty batch: nothing to normalize and no statistics to learn from
            return x
        y, (mean, var, count) = _train_normalize(x, scale, bias, mask, axis_name, eps)
        # (train is True here whenever running statistics exist: eval returned above)
        if running is not None and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            new_mean, new_var = update_running_stats(
                running[0].value, running[1].value, mean, var, count, self.momentum
            )
            running[0].value = new_mean
            running[1].value = new_var
        return y


class BatchNorm2d(_BatchNormBase):
    """``torch.nn.BatchNorm2d`` (detectron2's ``layers.BatchNorm2d``) for channels-last input.

    ``__call__(x, train=False)`` with ``x`` ``[N, H, W, C]`` (or any ``[N, ..., C]``), returns the
    same shape and dtype.

    - ``train=True``: normalize with the biased batch variance over all axes but the last; when the
      ``batch_stats`` collection is mutable (and not during ``init``) update
      ``mean += momentum * (batch_mean - mean)`` and likewise ``var`` with the *unbiased* batch
      variance, as PyTorch does. With ``batch_stats`` immutable the batch statistics are used and
      nothing is written.
    - ``train=False``: normalize with the running ``mean``/``var``.
    - ``affine=False``: no ``params``. ``track_running_stats=False``: no ``batch_stats``; batch
      statistics in train and eval (PyTorch's behaviour).
    - ``momentum=None`` (PyTorch's cumulative average) is not supported: it needs a batch counter.

    Empty batches return the empty input unchanged and leave the statistics alone. A training
    batch with a single value per channel raises ``ValueError`` (PyTorch raises too).

    Training-mode gradients use the closed-form batch-norm backward (a ``custom_vjp``, same values
    as autodiff, about half the memory passes): ``grad`` (also nested) works, forward-mode
    ``jvp``/``jacfwd`` through a training step does not.
    """

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    track_running_stats: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.momentum is None:
            raise ValueError("BatchNorm2d: momentum=None (cumulative average) is not supported")
        uses_batch = train or not self.track_running_stats
        if uses_batch and x.ndim >= 2 and x.size // max(x.shape[-1], 1) == 1:
            raise ValueError(
                f"BatchNorm2d: expected more than 1 value per channel when using batch statistics, "
                f"got input x of shape {tuple(x.shape)}"
            )
        return self._forward(x, train=train, mask=None, axis_name=None, layer="BatchNorm2d")


class NaiveSyncBatchNorm(_BatchNormBase):
    """Synchronized batch norm (detectron2's ``NaiveSyncBatchNorm``) over a named device axis.

    ``__call__(x, train=False, *, mask=None)``; ``x`` is the per-device ``[B, H, W, C]`` block and
    ``mask`` an optional ``bool[B]`` marking its real examples (SPMD shards share one shape, so a
    short per-device batch is padded; padded rows are excluded from the statistics but their
    outputs are still computed). Padded rows may hold anything for the forward statistics (their
    per-row sums are dropped by selection, never multiplied by 0); keep them finite when
    differentiating, since their (masked-out) outputs still enter the backward pass as
    ``0 * value``. The training gradient is a closed-form batch-norm backward (a ``custom_vjp``
    with the same values as autodiff), so reverse mode (``grad``, also nested) works but forward
    mode (``jvp``/``jacfwd``) through a training step does not.

    In training, per-channel sums and real-element counts are ``psum``-ed over ``axis_name``, so
    the normalization uses the mean and biased variance of *all real examples on all devices*: the
    result, its gradients (``psum``'s transpose is handled by JAX) and the running-stat update equal
    a single-device :class:`BatchNorm2d` over the concatenated real examples. Running statistics
    take the global unbiased variance (PyTorch's ``SyncBatchNorm`` / ``BatchNorm2d`` rule;
    detectron2's naive module writes the biased one, a detail it documents as approximate anyway).

    ``stats_mode``:

    - ``""`` (detectron2's default) weights every device equally. Under SPMD every device has the
      same ``[B, H, W]``, so equal device weights are the same as weighting by element count; with
      a ``mask`` the real counts differ and equal device weights would no longer be the statistics
      of the real examples, so we weight by real counts (exact) here too.
    - ``"N"`` weights each device by its number of real examples; a device with no real example
      contributes nothing (no NaN).

    Both modes therefore compute the same, exact statistics; ``stats_mode`` is validated and kept
    so detectron2 configs (``naiveSyncBN`` / ``naiveSyncBN_N``) map one-to-one. In both modes a
    step whose *global* real count is 0 leaves the running statistics unchanged (detectron2's
    ``"N"`` rule; its ``""`` mode would fail there).

    Axis detection: when ``axis_name`` is not bound in the current trace (no ``pmap`` /
    ``shard_map`` / named ``vmap`` over it; JAX raises ``NameError`` when its size is queried) the
    layer uses local statistics, like detectron2 with world size 1. ``train=False`` always uses the
    local running statistics (no communication).
    """

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    stats_mode: str = ""
    axis_name: Any = "batch"
    affine: bool = True
    track_running_stats: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False, *, mask: Array | None = None) -> Array:
        if self.stats_mode not in STATS_MODES:
            raise ValueError(
                f"NaiveSyncBatchNorm: stats_mode must be one of {STATS_MODES}, "
                f"got {self.stats_mode!r}"
            )
        if mask is not None:
            _check_input(x, self.num_features, "NaiveSyncBatchNorm")
            _check_mask(mask, x, "NaiveSyncBatchNorm")
        axis_name = self.axis_name if _axis_is_bound(self.axis_name) else None
        return self._forward(x, train=train, mask=mask, axis_name=axis_name, layer="NaiveSyncBatchNorm")


class FrozenBatchNorm2d(nn.Module):
    """detectron2's ``FrozenBatchNorm2d``: ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

    All four arrays (``scale``, ``bias``, ``mean``, ``var``, each ``float32[C]``) live in the
    ``batch_stats`` collection -- nothing trains them and nothing updates them (``train`` is
    accepted and ignored). Fresh values are ``scale=1, bias=0, mean=0, var=1-eps`` (detectron2's
    choice) so that a fresh layer is exactly the identity: ``1 / sqrt((1 - eps) + eps) == 1``.
    ``x`` is ``[N, H, W, C]`` or any ``[..., C]``; the output has ``x``'s dtype.
    """

    num_features: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train  # frozen: identical in train and eval
        _check_input(x, self.num_features, "FrozenBatchNorm2d")
        c = self.num_features
        scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32))
        bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32))
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((c,), jnp.float32) - jnp.float32(self.eps)
        )
        return normalize(x, mean.value, var.value, scale.value, bias.value, self.eps)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True)``, channels last.

    ``get_norm("GN", C)`` builds ``GroupNorm(32, C)``. ``x`` is ``[N, H, W, C]`` (or any
    ``[N, ..., C]``); ``params/{scale, bias}`` are ``float32[C]``. ``num_channels`` must be
    divisible by ``num_groups``. ``train`` is accepted and ignored (no state).
    """

    num_groups: int
    num_channels: int
    eps: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        if self.num_groups <= 0 or self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"GroupNorm: num_channels={self.num_channels} must be divisible by "
                f"num_groups={self.num_groups}"
            )
        _check_input(x, self.num_channels, "GroupNorm")
        scale, bias = _affine_params(self, self.num_channels) if self.affine else (None, None)
        return group_norm(x, self.num_groups, scale, bias, self.eps)


class LayerNorm(nn.Module):
    """detectron2's channel ``LayerNorm`` (ConvNeXt style): normalizes over channels per position.

    detectron2 normalizes axis 1 of NCHW; here the channel axis is the last one, so ``x`` is
    ``[N, H, W, C]`` (or any ``[..., C]``). ``params/{scale, bias}`` are ``float32[C]``, biased
    variance, default ``eps=1e-6``. ``train`` is accepted and ignored.
    """

    normalized_shape: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        c = self.normalized_shape
        if x.ndim < 1 or x.shape[-1] != c:
            raise ValueError(
                f"LayerNorm: input x must have normalized_shape={c} channels on its last axis, "
                f"got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"LayerNorm: input x must be floating point, got dtype {x.dtype}")
        scale, bias = _affine_params(self, c)
        return channel_layer_norm(x, scale, bias, self.eps)


class CycleBatchNormList(nn.Module):
    """detectron2's ``CycleBatchNormList``: per-position batch statistics, shared affine.

    ``length`` batch norms without affine (submodules ``bn_0`` ... ``bn_{length-1}``, each with its
    own ``batch_stats/{mean, var}``) and, when ``affine``, one shared ``params/{scale, bias}``.
    ``bn_class`` builds each one as ``bn_class(num_features, eps=..., momentum=...,
    affine=False, track_running_stats=..., name=...)`` (:class:`BatchNorm2d` or
    :class:`NaiveSyncBatchNorm`).

    ``__call__(x, train=False, *, index=None)``. Cycle position (detectron2 keeps a Python counter
    ``_pos`` on the module): ``index`` (a static int) picks the position explicitly; when it is
    None the position is the number of earlier calls of this module *within the current*
    ``init``/``apply`` modulo ``length`` (Flax rebinds modules at every ``apply``, so the counter
    starts at 0 each time). detectron2 requires calling the module a multiple of ``length`` times
    per forward for the same reason; then both counters agree. ``init`` creates the statistics of
    every position at the first call, so a later ``apply`` may use any position.
    """

    length: int
    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    track_running_stats: bool = True
    bn_class: Callable[..., nn.Module] = BatchNorm2d

    @nn.compact
    def __call__(self, x: Array, train: bool = False, *, index: int | None = None) -> Array:
        if self.length <= 0:
            raise ValueError(f"CycleBatchNormList: length must be positive, got {self.length}")
        if index is None:
            index = getattr(self, "_cycle_calls", 0) % self.length
            # a plain Python counter on this bound instance (fresh at every init/apply)
            object.__setattr__(self, "_cycle_calls", getattr(self, "_cycle_calls", 0) + 1)
        if not isinstance(index, int) or not 0 <= index < self.length:
            raise ValueError(
                f"CycleBatchNormList: index must be a static int in [0, {self.length}), got {index!r}"
            )
        bns = [
            self.bn_class(
                self.num_features,
                eps=self.eps,
                momentum=self.momentum,
                affine=False,
                track_running_stats=self.track_running_stats,
                name=f"bn_{k}",
            )
            for k in range(self.length)
        ]
        if self.is_initializing():
            for k, bn in enumerate(bns):
                if k != index:
                    bn(x, train=False)
        y = bns[index](x, train=train)
        if not self.affine:
            return y
        scale, bias = _affine_params(self, self.num_features)
        dtype = _compute_dtype(y.dtype)
        return (y.astype(dtype) * scale.astype(dtype) + bias.astype(dtype)).astype(y.dtype)


# --------------------------------------------------------------------------------------------
# factory


def _group_norm_32(channels: int, *, name: str | None = None) -> GroupNorm:
    return GroupNorm(32, channels, name=name)


def _naive_sync_bn_n(channels: int, *, name: str | None = None) -> NaiveSyncBatchNorm:
    return NaiveSyncBatchNorm(channels, stats_mode="N", name=name)


_NORMS: dict[str, Callable[..., nn.Module]] = {
    "BN": BatchNorm2d,
    # detectron2 maps SyncBN / nnSyncBN to torch.nn.SyncBatchNorm; in JAX the cross-device batch
    # norm is ours, and it is exact for unequal (masked) per-device batches.
    "SyncBN": NaiveSyncBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": _group_norm_32,
    "nnSyncBN": NaiveSyncBatchNorm,
    "naiveSyncBN": NaiveSyncBatchNorm,
    "naiveSyncBN_N": _naive_sync_bn_n,
    "LN": LayerNorm,
}


def _accepts_name(fn: Callable[..., Any]) -> bool:
    if isinstance(fn, type) and issubclass(fn, nn.Module):
        return True
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "name" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def get_norm(
    norm: str | Callable[..., nn.Module] | None,
    out_channels: int,
    *,
    name: str | None = None,
) -> nn.Module | None:
    """detectron2's ``get_norm``: a normalization layer for ``out_channels`` channels, or None.

    Args:
      norm: ``None`` or ``""`` (no norm); one of ``"BN"`` (:class:`BatchNorm2d`), ``"SyncBN"``,
        ``"nnSyncBN"``, ``"naiveSyncBN"`` (all :class:`NaiveSyncBatchNorm` over axis ``"batch"``:
        detectron2 uses ``torch.nn.SyncBatchNorm`` for the first two, whose JAX counterpart is this
        layer), ``"naiveSyncBN_N"`` (``stats_mode="N"``), ``"FrozenBN"``
        (:class:`FrozenBatchNorm2d`), ``"GN"`` (:class:`GroupNorm` with 32 groups, eps 1e-5),
        ``"LN"`` (:class:`LayerNorm`); or a callable taking the channel count and returning a
        Flax module.
      out_channels: number of channels (the last axis of the input).
      name: Flax name for the created module (``Conv2d`` passes ``"norm"``). Built-in layers and
        callables that accept a ``name`` keyword (Flax module classes, ``functools.partial`` of
        them, functions with a ``name`` parameter) get it directly; otherwise the returned module
        is re-created under ``name`` with ``module.copy(name=name)``.

    Raises:
      ValueError: unknown norm name (the message lists the known ones).
      TypeError: ``norm`` is neither None, a string nor a callable.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        if not norm:
            return None
        if norm not in _NORMS:
            raise ValueError(f"get_norm: unknown norm {norm!r}; known names: {sorted(_NORMS)}")
        return _NORMS[norm](out_channels, name=name)
    if not callable(norm):
        raise TypeError(f"get_norm: norm must be None, a string or a callable, got {type(norm)}")
    if name is not None and _accepts_name(norm):
        return norm(out_channels, name=name)
    module = norm(out_channels)
    if name is not None and isinstance(module, nn.Module) and module.name != name:
        module = module.copy(name=name)
    return module
