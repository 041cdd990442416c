"""detectron2's solver (``detectron2/solver/``) as optax: the learning-rate schedule of
``build_lr_scheduler`` and the SGD of ``build_optimizer``, both read from ``cfg.SOLVER``.

detectron2 keeps the solver beside ``modeling/`` (``detectron2/solver/``); here it lives in
``detlayers.models.solver`` because it reads the same config as the models.

Step convention. detectron2's trainer runs iteration ``t`` (0-based) with the learning rate its
``LRMultiplier`` gives after ``t`` scheduler steps, i.e. ``BASE_LR * multiplier(t / MAX_ITER)``;
optax's ``count`` of the ``t``-th update is also ``t``, so ``build_lr_schedule(cfg)(t)`` is the
learning rate detectron2 uses at iteration ``t``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detlayers.freeze import masked_optimizer

__all__ = ["build_lr_schedule", "lr_multipliers", "build_optimizer", "norm_param_mask", "clip_gradients"]

# fvcore's ParamScheduler.WHERE_EPSILON: the tolerance its schedulers add to the training
# progress before comparing it with interval ends (it decides on which step a boundary falls).
_WHERE_EPSILON = 1e-6
_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")
_WARMUP_METHODS = ("linear", "constant")


def _main_multiplier(solver: Any) -> Callable[[float], float]:
    """The schedule after warmup as a function of the progress ``where`` in [0, 1] (Python floats,
    the arithmetic of fvcore's ``MultiStepParamScheduler`` / ``CosineParamScheduler``)."""
    name = solver.LR_SCHEDULER_NAME
    max_iter = solver.MAX_ITER
    if name == "WarmupMultiStepLR":
        # detectron2 drops the STEPS beyond MAX_ITER (with a warning)
        milestones = [int(s) for s in solver.STEPS if s <= max_iter]
        if milestones != sorted(set(milestones)):
            raise ValueError(f"build_lr_schedule: SOLVER.STEPS must increase, got {tuple(solver.STEPS)}")
        values = [solver.GAMMA**k for k in range(len(milestones) + 1)]

        def multistep(where: float) -> float:
            # the iteration the progress falls in, then how many milestones are at or before it
            iteration = int((where + _WHERE_EPSILON) * max_iter)
            return values[bisect.bisect_right(milestones, iteration)]

        return multistep
    if name == "WarmupCosineLR":
        end = solver.BASE_LR_END / solver.BASE_LR
        if not 0.0 <= end <= 1.0:
            raise ValueError(
                f"build_lr_schedule: SOLVER.BASE_LR_END / BASE_LR must be in [0, 1], got "
                f"{solver.BASE_LR_END} / {solver.BASE_LR}")
        return lambda where: end + 0.5 * (1.0 - end) * (1.0 + math.cos(math.pi * where))
    raise ValueError(f"build_lr_schedule: SOLVER.LR_SCHEDULER_NAME {name!r} is not one of {_SCHEDULERS}")


def lr_multipliers(cfg: Any) -> np.ndarray:
    """``float64[MAX_ITER + 1]``: detectron2's learning-rate multiplier at iterations
    ``0..MAX_ITER`` (``WarmupParamScheduler`` around the schedule of ``SOLVER.LR_SCHEDULER_NAME``).

    Warmup covers the progress ``[0, min(WARMUP_ITERS / MAX_ITER, 1))``: ``linear`` goes from
    ``WARMUP_FACTOR * schedule(0)`` to ``schedule(warmup end)`` (``schedule(0)`` with
    ``RESCALE_INTERVAL``), ``constant`` stays at ``WARMUP_FACTOR * schedule(0)``; after it the
    schedule sees the global progress (or, with ``RESCALE_INTERVAL``, the progress within the
    rest of training).
    """
    solver = cfg.SOLVER
    max_iter = solver.MAX_ITER
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"build_lr_schedule: SOLVER.MAX_ITER must be a positive int, got {max_iter!r}")
    if solver.WARMUP_METHOD not in _WARMUP_METHODS:
        raise ValueError(
            f"build_lr_schedule: SOLVER.WARMUP_METHOD {solver.WARMUP_METHOD!r} is not one of {_WARMUP_METHODS}")
    main = _main_multiplier(solver)
    rescale = bool(solver.RESCALE_INTERVAL)
    warmup_length = min(solver.WARMUP_ITERS / max_iter, 1.0)
    start = solver.WARMUP_FACTOR * main(0.0)
    end = main(0.0) if rescale else main(warmup_length)

    def multiplier(where: float) -> float:
        if where + _WHERE_EPSILON <= warmup_length:  # still in the warmup interval
            if solver.WARMUP_METHOD == "constant":
                return start
            alpha = where / warmup_length
            return end * alpha + start * (1 - alpha)
        if rescale:
            return main((where - warmup_length) / (1 - warmup_length))
        return main(where)

    return np.array([multiplier(t / max_iter) for t in range(max_iter + 1)], dtype=np.float64)


def build_lr_schedule(cfg: Any) -> optax.Schedule:
    """detectron2's ``build_lr_scheduler(cfg, optimizer)`` as an optax schedule ``step -> lr``.

    ``SOLVER.LR_SCHEDULER_NAME`` ``WarmupMultiStepLR`` (``BASE_LR * GAMMA**k`` after the ``k``-th
    of ``STEPS``) or ``WarmupCosineLR`` (cosine from ``BASE_LR`` to ``BASE_LR_END`` over
    ``MAX_ITER``), with detectron2's warmup (``WARMUP_FACTOR``, ``WARMUP_ITERS``,
    ``WARMUP_METHOD``); see :func:`lr_multipliers`. ``step`` is the 0-based iteration (optax's
    update count); the value is ``float32`` and steps past ``MAX_ITER`` keep the value at
    ``MAX_ITER`` (detectron2 stops there). The values are a table computed once in float64 with
    detectron2's arithmetic, so the steps on which boundaries fall are detectron2's exactly.
    """
    table = jnp.asarray(cfg.SOLVER.BASE_LR * lr_multipliers(cfg), dtype=jnp.float32)
    last = table.shape[0] - 1

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        return table[jnp.clip(jnp.asarray(step, jnp.int32), 0, last)]

    return schedule


# --------------------------------------------------------------------------------------------
# parameter groups


def _names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as its names."""
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def norm_param_mask(params: Any) -> Any:
    """Bool tree over ``params``: True for the parameters of normalization layers.

    detectron2 recognises norm layers by their PyTorch class (BatchNorm, SyncBatchNorm,
    GroupNorm, InstanceNorm, LayerNorm); in a Flax parameter tree they are the modules whose
    parameters are ``scale``/``bias`` (every detlayers norm layer names its affine so, and no
    convolution or linear layer has a ``scale``). FrozenBatchNorm keeps its affine in
    ``batch_stats``, as detectron2 keeps it in buffers: it has no parameters.
    """
    def visit(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return False
        is_norm = "scale" in node and "kernel" not in node
        return {k: (is_norm if not isinstance(v, Mapping) else visit(v)) for k, v in node.items()}

    if not isinstance(params, Mapping):
        raise TypeError(f"norm_param_mask: params must be a dict of parameters, got {type(params).__name__}")
    return visit(params)


class _ParamHyper(NamedTuple):
    lr_factor: float
    weight_decay: float


def _param_hyperparameters(cfg: Any, norm_mask: Any) -> tuple[dict, dict]:
    """Per-parameter ``{path names: lr factor}``, ``{path names: weight decay}`` (looked up by path,
    so that they apply to the trees ``optax.multi_transform`` hands on, where frozen entries are
    masked out), detectron2's
    ``get_default_optimizer_params``: ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` on norm-layer
    parameters, then for every parameter named ``bias`` (norm layers' included) the learning
    rate times ``BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` when it is not None."""
    solver = cfg.SOLVER

    def hyper(path: tuple[str, ...], is_norm: bool) -> _ParamHyper:
        weight_decay = solver.WEIGHT_DECAY
        lr_factor = 1.0
        if is_norm and solver.WEIGHT_DECAY_NORM is not None:
            weight_decay = solver.WEIGHT_DECAY_NORM
        if path[-1] == "bias":
            lr_factor = solver.BIAS_LR_FACTOR
            if solver.WEIGHT_DECAY_BIAS is not None:
                weight_decay = solver.WEIGHT_DECAY_BIAS
        return _ParamHyper(float(lr_factor), float(weight_decay))

    leaves = jax.tree_util.tree_leaves_with_path(norm_mask)
    hypers = {_names(path): hyper(_names(path), bool(is_norm)) for path, is_norm in leaves}
    return {k: h.lr_factor for k, h in hypers.items()}, {k: h.weight_decay for k, h in hypers.items()}


# --------------------------------------------------------------------------------------------
# transformations


def clip_gradients(clip_type: str, clip_value: float, norm_type: float = 2.0) -> optax.GradientTransformation:
    """detectron2's ``SOLVER.CLIP_GRADIENTS``: each parameter's gradient clipped on its own.

    ``"value"``: ``torch.nn.utils.clip_grad_value_`` (each element into ``[-v, v]``).
    ``"norm"``: ``torch.nn.utils.clip_grad_norm_`` called per parameter, as detectron2's
    optimizer does: a gradient whose ``norm_type``-norm (``inf``: largest magnitude) exceeds
    ``clip_value`` is scaled by ``clip_value / (norm + 1e-6)``; the norm is the tensor's own, not
    the whole model's.
    """
    if clip_type == "value":
        def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
            del params
            return jax.tree.map(lambda g: jnp.clip(g, -clip_value, clip_value), updates), state
    elif clip_type == "norm":
        if norm_type <= 0:
            raise ValueError(f"clip_gradients: NORM_TYPE must be positive, got {norm_type}")

        def tensor_norm(g: jax.Array) -> jax.Array:
            magnitude = jnp.abs(g.astype(jnp.float32))
            if math.isinf(norm_type):
                return jnp.max(magnitude, initial=0.0)
            return jnp.sum(magnitude**norm_type) ** (1.0 / norm_type)

        def rescale(g: jax.Array, norm: jax.Array) -> jax.Array:
            return (g * jnp.minimum(clip_value / (norm + 1e-6), 1.0)).astype(g.dtype)

        def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
            del params
            norms = jax.tree.map(tensor_norm, updates)  # one norm per tensor, as detectron2 clips
            return jax.tree.map(rescale, updates, norms), state
    else:
        raise ValueError(f"clip_gradients: SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip_type!r} is not 'value' or 'norm'")

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _coupled_weight_decay(decays: dict[tuple[str, ...], float]) -> optax.GradientTransformation:
    """``g + weight_decay * p`` per parameter (torch SGD's ``weight_decay``: L2 added to the
    gradient before momentum, not decoupled)."""
    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        if params is None:
            raise ValueError("build_optimizer: weight decay needs the parameters: call tx.update(grads, state, params)")
        def decay(path: tuple, g: jax.Array, p: jax.Array) -> jax.Array:
            wd = decays[_names(path)]
            return g + wd * p if wd else g

        return jax.tree_util.tree_map_with_path(decay, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_by_lr(schedule: optax.Schedule, lr_factors: dict[tuple[str, ...], float]) -> optax.GradientTransformation:
    """``-lr(step) * factor`` per parameter, with the step counted here."""
    def init(params: Any) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates: Any, state: optax.ScaleByScheduleState, params: Any = None):
        del params
        lr = schedule(state.count)
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: (-lr * lr_factors[_names(path)]).astype(u.dtype) * u, updates)
        return scaled, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


def build_optimizer(
    cfg: Any, params: Any, *, trainable: Any = None, norm_mask: Any = None
) -> optax.GradientTransformation:
    """detectron2's ``build_optimizer(cfg, model)``: ``torch.optim.SGD`` with its parameter groups
    and gradient clipping, as one optax transformation for ``params``.

    Per update, for each trainable parameter ``p`` with gradient ``g`` (torch SGD's order):

    1. ``SOLVER.CLIP_GRADIENTS`` when ``ENABLED``: ``g`` clipped on its own
       (:func:`clip_gradients`, ``CLIP_TYPE`` ``value``/``norm``, ``CLIP_VALUE``, ``NORM_TYPE``);
    2. coupled weight decay ``g += wd * p``: ``wd`` is ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` for
       norm-layer parameters (``norm_mask``), and ``WEIGHT_DECAY_BIAS`` (when not None) for every
       parameter named ``bias``, norm layers' included, as ``get_default_optimizer_params`` sets;
    3. momentum ``buf = MOMENTUM * buf + g`` (zero-initialised, which equals torch's first-step
       ``buf = g``; no dampening), and ``g = g + MOMENTUM * buf`` with ``NESTEROV`` else ``buf``;
    4. ``p -= lr * g`` with ``lr = build_lr_schedule(cfg)(t)``, times ``BIAS_LR_FACTOR`` for
       parameters named ``bias``.

    Args:
      cfg: a detectron2 config (``detlayers.models.config.get_cfg()``); ``cfg.SOLVER`` is read.
      params: the parameter tree (``variables["params"]``): only its structure and names are used.
      trainable: optional bool tree over ``params``; False leaves a parameter untouched, with no
        momentum or weight decay (detectron2's ``requires_grad=False`` parameters are not given to
        the optimizer); e.g. :func:`detlayers.freeze.prefix_trainable_mask`.
      norm_mask: optional bool tree over ``params`` marking norm-layer parameters; by default
        :func:`norm_param_mask`.
    """
    solver = cfg.SOLVER
    if norm_mask is None:
        norm_mask = norm_param_mask(params)
    lr_factors, decays = _param_hyperparameters(cfg, norm_mask)
    parts = []
    clipping = solver.CLIP_GRADIENTS
    if clipping.ENABLED:
        parts.append(clip_gradients(clipping.CLIP_TYPE, float(clipping.CLIP_VALUE), float(clipping.NORM_TYPE)))
    parts.append(_coupled_weight_decay(decays))
    if solver.MOMENTUM:
        parts.append(optax.trace(decay=float(solver.MOMENTUM), nesterov=bool(solver.NESTEROV)))
    elif solver.NESTEROV:
        raise ValueError("build_optimizer: SOLVER.NESTEROV needs a positive SOLVER.MOMENTUM (as torch SGD)")
    parts.append(_scale_by_lr(build_lr_schedule(cfg), lr_factors))
    tx = optax.chain(*parts)
    if trainable is not None:
        tx = masked_optimizer(tx, trainable)
    return tx
