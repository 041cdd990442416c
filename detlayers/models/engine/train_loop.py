"""The training state, the solver set-up and the loop (detectron2's ``DefaultTrainer`` /
``SimpleTrainer`` with its hooks: LR schedule, periodic checkpoints, metrics, NaN check).

The loop state is explicit: :class:`TrainState` holds the arrays and the number of iterations
done; iteration ``t`` reads the global batch ``t`` (:class:`detlayers.models.data.TrainingBatches`)
and draws its samplers' priorities from ``fold_in(rng, t)``, so a run resumed from a checkpoint
continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from detlayers._out_of_memory import out_of_memory_as
from detlayers.models.engine.step import make_train_step, replicate, shard_batch
from detlayers.models.solver import build_optimizer, lr_multipliers

__all__ = ["NonFiniteLossError", "TrainOutOfMemoryError", "TrainState", "frozen_prefixes", "build_solver",
           "init_variables", "create_variables", "init_state", "metrics_writer", "run_iterations"]

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


class NonFiniteLossError(FloatingPointError):
    """An iteration's loss was NaN or infinite; nothing of that iteration was applied or saved."""


class TrainOutOfMemoryError(MemoryError):
    """An iteration ran out of memory (XLA's ``RESOURCE_EXHAUSTED``); the message names the batch
    and the keys to lower."""


def _out_of_memory(cfg: Any, iteration: int, batch: dict[str, Any]) -> Callable[[str], TrainOutOfMemoryError]:
    def error(xla: str) -> TrainOutOfMemoryError:
        n, h, w = (int(v) for v in batch["images"].shape[:3])
        return TrainOutOfMemoryError(
            f"out of memory at iteration {iteration}: a global batch of {int(cfg.SOLVER.IMS_PER_BATCH)} images "
            f"(this process's {n} padded to {h}x{w}) does not fit; lower SOLVER.IMS_PER_BATCH, "
            f"INPUT.MIN_SIZE_TRAIN/INPUT.MAX_SIZE_TRAIN or the ground-truth count, or use more devices. "
            f"XLA said: {xla}")

    return error


@dataclasses.dataclass
class TrainState:
    """What a resumed run needs: the arrays and ``iteration``, the number of iterations done
    (the next one to run)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # iteration t draws its sampling priorities from fold_in(rng, t)
    iteration: int = 0

    def arrays(self) -> dict[str, Any]:
        """The checkpointed pytree (the key as its raw data)."""
        return dict(params=self.params, batch_stats=self.batch_stats, opt_state=self.opt_state,
                    rng=jax.random.key_data(self.rng))


def frozen_prefixes(cfg: Any, params: Any) -> list[tuple[str, ...]]:
    """The parameter paths ``MODEL.BACKBONE.FREEZE_AT`` freezes (detectron2's ``ResNet.freeze``):
    the stem for ``>= 1``, and ``res2`` ... ``res{k}`` for ``k >= 2``, under the ResNet (the
    FPN's ``bottom_up`` or the backbone itself)."""
    freeze_at = int(cfg.MODEL.BACKBONE.FREEZE_AT)
    if freeze_at <= 0:
        return []
    backbone = params.get("backbone", {})
    root = ("backbone", "bottom_up") if "bottom_up" in backbone else ("backbone",)
    names = ["stem"] + [f"res{k}" for k in range(2, min(freeze_at, 5) + 1)]
    return [root + (name,) for name in names]


def build_solver(cfg: Any, params: Any) -> optax.GradientTransformation:
    """detectron2's optimizer (:func:`detlayers.models.solver.build_optimizer`) with the frozen
    stages' parameters left untouched (no update, momentum or weight decay)."""
    from detlayers.freeze import prefix_trainable_mask

    prefixes = frozen_prefixes(cfg, params)
    trainable = prefix_trainable_mask(params, prefixes) if prefixes else None
    return build_optimizer(cfg, params, trainable=trainable)


def init_variables(cfg: Any, model: Any, seed: int) -> dict[str, Any]:
    """``MODEL.WEIGHTS`` (a detectron2 checkpoint of this whole model) or, when it is empty, the
    layers' own initialisation from ``seed`` (through :func:`create_variables`)."""
    from detlayers.models.checkpoint import example_inputs, load_detectron2_weights

    if cfg.MODEL.WEIGHTS:
        return load_detectron2_weights(model, cfg.MODEL.WEIGHTS)
    images = example_inputs()[0]
    # an "rbg" key: XLA compiles the per-parameter threefry key derivations of a whole detector's
    # init for tens of seconds on CPU, its RngBitGenerator draws in a few
    key = jax.random.key(seed, impl="rbg")
    try:
        variables = jax.jit(lambda k: model.init(k, images, method=create_variables))(key)
    except AttributeError:  # not the ResNet/FPN + RPN + StandardROIHeads layout: the full inference init
        variables = jax.jit(model.init)(key, *example_inputs())
    return jax.device_get(dict(variables))


def create_variables(module: Any, images: jax.Array) -> None:
    """Calls every parametrised part of a ``GeneralizedRCNN`` once (backbone, RPN head, box head
    and predictor, mask head), so ``init`` creates all its variables without compiling the
    inference (proposal selection, NMS, pooling, mask pasting) around them."""
    import jax.numpy as jnp

    features = module.backbone(images)
    rpn = module.proposal_generator
    rpn.rpn_head([features[name] for name in rpn.in_features])
    heads = module.roi_heads
    channels = int(features[heads.box_in_features[0]].shape[-1])
    size = heads.box_pooler.output_size
    heads.box_predictor(heads.box_head(jnp.zeros((1, size, size, channels), images.dtype)))
    if heads.mask_head is not None:
        size = heads.mask_pooler.output_size
        heads.mask_head(jnp.zeros((1, size, size, channels), images.dtype))


def init_state(cfg: Any, model: Any, seed: int) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh :class:`TrainState` (iteration 0) and the optimizer."""
    variables = init_variables(cfg, model, seed)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    optimizer = build_solver(cfg, params)
    loop_key = jax.random.fold_in(jax.random.key(seed), 1)
    # one compiled init (eagerly, every parameter's momentum buffer is its own small program)
    opt_state = jax.jit(optimizer.init)(params)
    return TrainState(params, batch_stats, opt_state, loop_key, 0), optimizer


def _non_finite_message(iteration: int, losses: dict[str, float]) -> str:
    listed = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
    return (f"Loss became infinite or NaN at iteration={iteration}: {listed}; nothing of this iteration was "
            "applied or saved (the newest checkpoint is the last good state: lower SOLVER.BASE_LR or check the "
            "data, then --resume)")


class _NoProgressBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgressBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True, mininterval=1.0)


def run_iterations(
    cfg: Any,
    model: Any,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batches: Iterator[tuple[int, dict[str, np.ndarray]]],
    mesh: Mesh,
    *,
    on_iteration: Callable[[TrainState, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Runs iterations ``state.iteration .. SOLVER.MAX_ITER - 1``; returns the final state.

    ``batches`` yields ``(iteration, this process's rows of the global batch)`` from
    ``state.iteration`` on. ``on_iteration(state, record)`` is called after each iteration with
    the new state and the metrics record (``iteration``, ``total_loss``, the losses, ``lr``,
    ``time``, ``data_time``). A NaN or infinite loss raises :class:`NonFiniteLossError` (one line
    naming the iteration and the losses) before ``on_iteration`` sees the iteration; one that runs
    out of memory raises :class:`TrainOutOfMemoryError` naming the batch and the keys to lower.
    """
    max_iter = int(cfg.SOLVER.MAX_ITER)
    lr = cfg.SOLVER.BASE_LR * lr_multipliers(cfg)
    step_fn = make_train_step(model, optimizer, mesh)
    params, batch_stats, opt_state, rng_data = replicate(
        (state.params, state.batch_stats, state.opt_state, jax.random.key_data(state.rng)), mesh)
    # a global (replicated) key: multi-process checkpoints cannot write a process-local array
    rng = jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(state.rng))
    bar = _progress_bar(max_iter, state.iteration, progress)
    iteration = state.iteration
    try:
        while iteration < max_iter:
            start = time.perf_counter()
            got, local = next(batches)
            if got != iteration:
                raise RuntimeError(f"training data out of step: got the batch of iteration {got} at {iteration}")
            batch = shard_batch(local, mesh)
            data_time = time.perf_counter() - start
            # blocked on before anything reads it: after XLA's allocation failure that read can hang
            with out_of_memory_as(_out_of_memory(cfg, iteration, local)):
                new = jax.block_until_ready(
                    step_fn(params, batch_stats, opt_state, batch, jax.random.fold_in(rng, iteration)))
            losses = {k: float(v) for k, v in jax.device_get(new[3]).items()}
            total = math.fsum(losses.values())
            if not all(math.isfinite(v) for v in losses.values()):
                raise NonFiniteLossError(_non_finite_message(iteration, losses))
            params, batch_stats, opt_state = new[:3]
            record = {"iteration": iteration, "total_loss": total, **losses, "lr": float(lr[iteration]),
                      "time": time.perf_counter() - start, "data_time": data_time}
            iteration += 1
            bar.update(1)
            bar.set_postfix({"total_loss": f"{total:.3f}", **{k[5:]: f"{v:.3f}" for k, v in losses.items()}},
                            refresh=False)
            if on_iteration is not None:
                on_iteration(TrainState(params, batch_stats, opt_state, rng, iteration), record)
    finally:
        bar.close()
    return TrainState(params, batch_stats, opt_state, rng, iteration)


def metrics_writer(path: str) -> Callable[[dict[str, Any]], None]:
    """Appends one JSON line per call to ``path`` (detectron2's ``metrics.json``)."""
    def write(record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")

    return write
