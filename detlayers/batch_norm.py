"""Normalization layers of ``detectron2.layers.batch_norm`` for Flax linen, channels last (NHWC).

Layers:

- :class:`BatchNorm2d` -- ``torch.nn.BatchNorm2d`` semantics (batch statistics in training, running
  statistics updated with the unbiased variance, running statistics in eval).
- :class:`FrozenBatchNorm2d` -- fixed affine batch norm; identity when fresh.
- :class:`NaiveSyncBatchNorm` -- detectron2's synchronized batch norm: training statistics
  reduced over a named device axis (``pmap`` / ``shard_map`` / named ``vmap``) with detectron2's
  device weighting (``stats_mode``) and running-statistics rule, with a per-example ``mask`` for
  padded per-device batches.
- :class:`SyncBatchNorm` -- ``torch.nn.SyncBatchNorm`` (``get_norm("SyncBN")``): the exact
  statistics of all real examples on all devices, PyTorch's running-statistics rule.
- :class:`GroupNorm` -- ``torch.nn.GroupNorm`` (what ``get_norm("GN", C)`` builds).
- :class:`LayerNorm` -- detectron2's channel LayerNorm (normalizes over channels at each position).
- :class:`CycleBatchNormList` -- one set of batch statistics per call position in a cycle, shared
  affine.
- :func:`get_norm` -- detectron2's name -> layer factory.

Every layer takes ``x`` with channels on the last axis: ``[N, H, W, C]`` for images, but any rank
>= 2 with the batch first and channels last works (``[N, C]``, ``[N, L, C]``, ...). Every
``__call__`` takes ``train: bool = False``.  Statistics are accumulated in float32 (or float64 when
the input is float64), and the output has the input's dtype, so bfloat16 / float16 inputs are fine.

The batch norms take PyTorch's positional arguments ``(num_features, eps, momentum, affine,
track_running_stats)``; their extras (``stats_mode``, ``axis_name``) are keyword-only, as
detectron2's ``NaiveSyncBatchNorm(*args, stats_mode="", **kwargs)`` has them.

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
import numpy as np
from flax.linen import kw_only_dataclasses

from detlayers._jax_internals import bound_axis_names as _bound_axis_names
from detlayers._norm_math import (
    STATS_MODES,
    BatchMoments,
    RunningStats,
    batch_moments,
    channel_layer_norm,
    group_norm,
    normalize,
    train_normalize,
    update_running_stats,
)
from detlayers._numerics import accumulation_dtype as _compute_dtype
from detlayers._sharding import axis_is_bound as _axis_is_bound

Array = jax.Array

__all__ = [
    "BatchMoments",
    "BatchNorm2d",
    "CycleBatchNormList",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "LayerNorm",
    "NaiveSyncBatchNorm",
    "RunningStats",
    "SyncBatchNorm",
    "batch_moments",
    "channel_layer_norm",
    "get_norm",
    "group_norm",
    "normalize",
    "update_running_stats",
]


# --------------------------------------------------------------------------------------------
# argument checks and the sync axis


def _keyword_only(default: Any) -> Any:
    """A module field that can only be passed by keyword.

    Flax's dataclass transform keeps its own ``parent``/``name`` fields positional (moved last), so
    the standard ``dataclasses.field(kw_only=True)`` would let a fourth extra positional argument
    land in ``parent``; Flax's ``kw_only_dataclasses.field`` makes its ``__init__`` raise
    ``TypeError`` for a positional argument past the non-keyword-only fields instead.
    """
    return kw_only_dataclasses.field(default=default, kw_only=True)


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


def _sync_axis(axis_name: Any, layer: str) -> Any:
    """The axis to reduce training statistics over: ``axis_name`` when it is bound, None (local
    statistics, world size 1) when no mapped axis is bound at all or ``axis_name`` is None.

    Raises ``ValueError`` inside mapped axes that do not include ``axis_name``: synchronised batch
    norm silently falling back to per-device statistics there would train a different model.
    """
    if axis_name is None:
        return None
    if _axis_is_bound(axis_name):
        return axis_name
    bound = _bound_axis_names()  # None: this JAX cannot list them (the check is skipped)
    if bound:
        raise ValueError(
            f"{layer}: training inside mapped axes {bound} (pmap / shard_map / named vmap) that do "
            f"not include this layer's axis_name={axis_name!r}; pass axis_name= one of them (e.g. "
            f"get_norm('SyncBN', C, axis_name={bound[0]!r})), or axis_name=None for per-device "
            f"statistics"
        )
    return None


# --------------------------------------------------------------------------------------------
# modules


def _affine_params(module: nn.Module, channels: int) -> tuple[Array, Array]:
    """The learned affine of a norm layer: ``params/{scale, bias}`` ``float32[channels]``,
    initialised to 1 and 0 (PyTorch's ``weight``/``bias``). Call inside a compact method."""
    scale = module.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return scale, bias


class _BatchNormBase(nn.Module):
    """Fields and train/eval logic shared by :class:`BatchNorm2d`, :class:`SyncBatchNorm` and
    :class:`NaiveSyncBatchNorm`.

    The positional fields are PyTorch's ``BatchNorm2d`` arguments, in its order (detectron2's
    ``NaiveSyncBatchNorm`` subclasses it and keeps them); subclasses add keyword-only ones.
    """

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    track_running_stats: bool = True

    def _forward(
        self,
        x: Array,
        *,
        train: bool,
        mask: Array | None,
        axis_name: Any,
        layer: str,
        stats_mode: str = "N",
        unbiased_running_var: bool = True,
    ) -> Array:
        """Normalize ``x`` ``[B, ..., C]``: running statistics in eval, batch statistics (reduced
        over ``axis_name`` with ``stats_mode``, real rows per ``mask``) in training or without
        running statistics; updates them when ``batch_stats`` is mutable. Call inside a compact
        method. ``axis_name`` is the layer's sync axis, possibly unbound: resolved (or refused) by
        ``_sync_axis`` only when batch statistics are used."""
        if self.momentum is None:
            raise ValueError(f"{layer}: momentum=None (cumulative average) is not supported")
        for field in ("affine", "track_running_stats"):
            value = getattr(self, field)
            if not isinstance(value, (bool, np.bool_)):
                # e.g. an extra passed in a PyTorch argument's place
                raise TypeError(
                    f"{layer}: {field} must be a bool, got {value!r}; the positional arguments are "
                    f"PyTorch's (num_features, eps, momentum, affine, track_running_stats), and "
                    f"extras such as stats_mode and axis_name are keyword-only"
                )
        num_features, eps = self.num_features, self.eps
        _check_input(x, num_features, layer)
        scale, bias = _affine_params(self, num_features) if self.affine else (None, None)
        if self.track_running_stats:
            running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((num_features,), jnp.float32))
            running_var = self.variable("batch_stats", "var", lambda: jnp.ones((num_features,), jnp.float32))
            if not train:
                return normalize(x, running_mean.value, running_var.value, scale, bias, eps)

        axis_name = _sync_axis(axis_name, layer)
        if x.size == 0:
            # empty batch: nothing to normalize and no statistics to learn from
            return x
        out = train_normalize(x, scale, bias, mask, axis_name, eps, stats_mode)
        # (train is True here whenever running statistics exist: eval returned above)
        if self.track_running_stats and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            updated = update_running_stats(
                running_mean.value, running_var.value, out.moments.mean, out.moments.var, out.moments.count,
                self.momentum, unbiased=unbiased_running_var,
            )
            running_mean.value = updated.mean
            running_var.value = updated.var
        return out.y


class BatchNorm2d(_BatchNormBase):
    """``torch.nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True)`` (detectron2's ``layers.BatchNorm2d``) for channels-last input.

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

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        uses_batch = train or not self.track_running_stats
        if uses_batch and x.ndim >= 2 and x.size // max(x.shape[-1], 1) == 1:
            raise ValueError(
                f"BatchNorm2d: expected more than 1 value per channel when using batch statistics, "
                f"got input x of shape {tuple(x.shape)}"
            )
        return self._forward(x, train=train, mask=None, axis_name=None, layer="BatchNorm2d")


class SyncBatchNorm(_BatchNormBase):
    """``torch.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, *, axis_name="batch")`` (what detectron2's ``get_norm("SyncBN")`` /
    ``"nnSyncBN"`` build) over a named device axis.

    ``__call__(x, train=False, *, mask=None)``; ``x`` is the per-device ``[B, H, W, C]`` block and
    ``mask`` an optional ``bool[B]`` marking its real examples (SPMD shards share one shape, so a
    short per-device batch is padded). In training, per-channel sums and real-element counts are
    ``psum``-ed over ``axis_name``: the normalization uses the mean and biased variance of *all
    real examples on all devices*, and the running statistics take their unbiased variance, so the
    output, its gradients and the running-stat update equal one :class:`BatchNorm2d` over the
    concatenated real examples (PyTorch's ``SyncBatchNorm`` weights each device by its count the
    same way). A device without real examples contributes nothing; a step whose *global* real
    count is 0 leaves the running statistics unchanged.

    Padded rows may hold anything for the forward statistics; keep them finite when
    differentiating. The training gradient is a closed-form batch-norm backward (a ``custom_vjp``
    with autodiff's values): reverse mode works, forward mode through a training step does not.

    Axis rule: the statistics are reduced over ``axis_name`` (keyword-only; PyTorch's
    ``process_group``) when it is bound (``pmap`` / ``shard_map`` / named ``vmap``); outside any
    mapped axis the layer uses local statistics, like PyTorch with world size 1; inside mapped axes
    that do not include ``axis_name`` a training call raises ``ValueError`` naming the bound axes
    and ``axis_name`` (never silently local). ``axis_name=None`` always means per-device
    statistics. ``train=False`` uses the local running statistics (no communication).
    """

    axis_name: Any = _keyword_only("batch")

    @nn.compact
    def __call__(self, x: Array, train: bool = False, *, mask: Array | None = None) -> Array:
        if mask is not None:
            _check_input(x, self.num_features, "SyncBatchNorm")
            _check_mask(mask, x, "SyncBatchNorm")
        return self._forward(x, train=train, mask=mask, axis_name=self.axis_name, layer="SyncBatchNorm")


class NaiveSyncBatchNorm(_BatchNormBase):
    """detectron2's ``NaiveSyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, *, stats_mode="", axis_name="batch")`` over a named device axis,
    with its numbers.

    The positional arguments are ``torch.nn.BatchNorm2d``'s (detectron2's layer subclasses it);
    ``stats_mode`` and ``axis_name`` are keyword-only (passing them positionally raises
    ``TypeError``).

    ``__call__(x, train=False, *, mask=None)``; ``x`` is the per-device ``[B, H, W, C]`` block and
    ``mask`` an optional ``bool[B]`` marking its real examples (SPMD shards share one shape, so a
    short per-device batch is padded; padded rows are excluded from the statistics but their
    outputs are still computed). Padded rows may hold anything for the forward statistics (their
    per-row sums are dropped by selection, never multiplied by 0); keep them finite when
    differentiating, since their (masked-out) outputs still enter the backward pass as
    ``0 * value``. The training gradient is a closed-form batch-norm backward (a ``custom_vjp``
    with the same values as autodiff of detectron2's formula), so reverse mode (``grad``, also
    nested) works but forward mode (``jvp``/``jacfwd``) through a training step does not.

    ``stats_mode`` (detectron2's):

    - ``""`` (default): each device's mean ``E_d[x]`` and mean of squares ``E_d[x^2]`` over its
      real elements are averaged over the devices with *equal* weight, ``var = avg(E_d[x^2]) -
      avg(E_d[x])^2``. These are the statistics of all real examples only when every device has
      the same number of them; with a ``mask`` that makes the real counts differ they are not (as
      in detectron2 when per-device batch sizes differ). detectron2 asserts that every device has
      at least one example; here a device without real examples is left out of the average (a row
      in the README's differences table), and a step with none anywhere leaves the running
      statistics unchanged.
    - ``"N"``: each device is weighted by its number of real examples, which gives the exact
      statistics of all real examples on all devices; a device with none contributes nothing and
      a step whose global real count is 0 leaves the running statistics unchanged.

    Running statistics follow detectron2's rule for this layer in both modes:
    ``running += momentum * (batch - running)`` with the *biased* batch variance (not PyTorch's
    unbiased one; :class:`SyncBatchNorm` has ``torch.nn.SyncBatchNorm``'s rule).

    Axis rule: :class:`SyncBatchNorm`'s (outside any mapped axis the statistics are local, like
    detectron2 with world size 1).
    """

    stats_mode: str = _keyword_only("")
    axis_name: Any = _keyword_only("batch")

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
        return self._forward(
            x,
            train=train,
            mask=mask,
            axis_name=self.axis_name,
            layer="NaiveSyncBatchNorm",
            stats_mode=self.stats_mode,
            unbiased_running_var=False,
        )


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
        if self.num_channels <= 0:
            raise ValueError(f"GroupNorm: num_channels must be positive, got {self.num_channels}")
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
    if channels <= 0:
        raise ValueError(f"get_norm('GN', out_channels): out_channels must be positive, got {channels}")
    if channels % 32:
        raise ValueError(
            f"get_norm('GN', out_channels): GroupNorm with 32 groups needs out_channels divisible "
            f"by 32, got {channels}"
        )
    return GroupNorm(32, channels, name=name)


def _naive_sync_bn_n(channels: int, *, name: str | None = None, **kwargs: Any) -> NaiveSyncBatchNorm:
    return NaiveSyncBatchNorm(channels, stats_mode="N", name=name, **kwargs)


_NORMS: dict[str, Callable[..., nn.Module]] = {
    "BN": BatchNorm2d,
    # detectron2 maps SyncBN / nnSyncBN to torch.nn.SyncBatchNorm
    "SyncBN": SyncBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": _group_norm_32,
    "nnSyncBN": SyncBatchNorm,
    "naiveSyncBN": NaiveSyncBatchNorm,
    "naiveSyncBN_N": _naive_sync_bn_n,
    "LN": LayerNorm,
}
# the names whose layers synchronise over a device axis (and take get_norm's axis_name)
_SYNC_NORMS = ("SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")


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
    axis_name: Any = "batch",
) -> nn.Module | None:
    """detectron2's ``get_norm``: a normalization layer for ``out_channels`` channels, or None.

    Args:
      norm: ``None`` or ``""`` (no norm); one of ``"BN"`` (:class:`BatchNorm2d`), ``"SyncBN"`` and
        ``"nnSyncBN"`` (:class:`SyncBatchNorm`, as detectron2 builds ``torch.nn.SyncBatchNorm``),
        ``"naiveSyncBN"`` (:class:`NaiveSyncBatchNorm`), ``"naiveSyncBN_N"`` (the same with
        ``stats_mode="N"``), ``"FrozenBN"`` (:class:`FrozenBatchNorm2d`), ``"GN"``
        (:class:`GroupNorm` with 32 groups, eps 1e-5; ``out_channels`` must be a positive multiple
        of 32), ``"LN"`` (:class:`LayerNorm`); or a callable taking the channel count and
        returning a Flax module.
      out_channels: number of channels (the last axis of the input).
      axis_name: the mapped device axis the sync norms (``SyncBN``, ``nnSyncBN``, ``naiveSyncBN``,
        ``naiveSyncBN_N``) reduce their statistics over (the ``pmap`` ``axis_name`` or
        ``shard_map`` mesh axis of the data-parallel batch; default ``"batch"``). Ignored by the
        other names and by callables, so config-driven code may always pass it.
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
        if norm in _SYNC_NORMS:
            return _NORMS[norm](out_channels, name=name, axis_name=axis_name)
        return _NORMS[norm](out_channels, name=name)
    if not callable(norm):
        raise TypeError(f"get_norm: norm must be None, a string or a callable, got {type(norm)}")
    if name is not None and _accepts_name(norm):
        return norm(out_channels, name=name)
    module = norm(out_channels)
    if name is not None and isinstance(module, nn.Module) and module.name != name:
        module = module.copy(name=name)
    return module
