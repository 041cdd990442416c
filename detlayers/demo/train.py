"""Data-parallel training of the shapes detector with ``shard_map`` over a device mesh.

The step is a pure function ``(params, batch_stats, opt_state, batch, rng) -> (params,
batch_stats, opt_state, metrics)``: every device runs the model on its slice of the batch (axis
name ``"batch"``), ``NaiveSyncBatchNorm`` averages its statistics over that axis, and gradients
are averaged with ``jax.lax.pmean``.  The loop state is explicit - :class:`TrainState` holds the
arrays, ``step`` and ``data_position`` (the index of the next training example) are plain ints -
so a run can be checkpointed and resumed exactly: step ``s`` always sees the examples
``s * global_batch ...`` and the random key ``fold_in(rng, s)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from detlayers import _data_parallel as data_parallel
from detlayers._data_parallel import AXIS, shard_batch
from detlayers._out_of_memory import out_of_memory_as
from detlayers._prefetch import prefetched
from detlayers.demo import data as shapes
from detlayers.demo.evaluate import Detections
from detlayers.demo.model import ShapesDetector


class NonFiniteLossError(RuntimeError):
    """Training stopped because a step's loss was NaN or infinite (nothing of that step is saved)."""


class DemoOutOfMemoryError(MemoryError):
    """A training step or the evaluation ran out of memory (XLA's ``RESOURCE_EXHAUSTED``); the
    message names the batch, the image size and the flags to lower."""


class _NoProgressBar:
    """Stands in for tqdm when progress is off, so tqdm is only imported when a bar is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoProgressBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.  ``global_batch = batch_per_device * number of devices``."""

    steps: int = 500
    batch_per_device: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    grad_clip: float = 5.0
    seed: int = 0


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs: arrays (a pytree) plus the two loop counters."""

    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array          # base key; step s uses fold_in(rng, s)
    step: int = 0
    data_position: int = 0  # index of the next training example (global, over all processes)

    def arrays(self) -> dict[str, Any]:
        return dict(params=self.params, batch_stats=self.batch_stats, opt_state=self.opt_state,
                    rng=self.rng)


def _training_out_of_memory(step: int, config: TrainConfig, num_devices: int,
                            image_size: int) -> Callable[[str], DemoOutOfMemoryError]:
    """The error of training step ``step`` (1-based) running out of memory, from XLA's message."""

    def error(xla: str) -> DemoOutOfMemoryError:
        per_device = config.batch_per_device
        return DemoOutOfMemoryError(
            f"out of memory in training step {step}: {per_device * num_devices} images of "
            f"{image_size}x{image_size} a step ({per_device} per device on {num_devices} device(s)) "
            f"do not fit; lower --batch-size (now {per_device}) or --image-size (now {image_size}). "
            f"XLA said: {xla}")

    return error


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over the first ``num_devices`` devices (default: all;
    in a multi-process run every process's, so ``num_devices`` counts global devices); out of
    range, a ``ValueError`` naming the demo's ``--devices``."""
    return data_parallel.make_mesh(num_devices, argument="--devices")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1),
        end_value=0.02 * config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(schedule))


def init_state(model: ShapesDetector, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
    """Fresh parameters (the same on every process: they depend only on ``seed``)."""
    init_key, loop_key = jax.random.split(jax.random.key(seed))
    size = model.config.image_size
    variables = jax.jit(model.init)(init_key, jnp.zeros((1, size, size, 3), jnp.float32))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(params, batch_stats, optimizer.init(params), loop_key)


def make_train_step(model: ShapesDetector, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> Callable[..., tuple[Any, Any, Any, dict[str, jax.Array]]]:
    """The jitted, data-parallel step ``(params, batch_stats, opt_state, batch, rng) -> ...``.

    ``batch`` arrays are sharded along their first axis over ``"batch"``; everything else is
    replicated.  Returns the new params, batch_stats and opt_state and the mean losses.
    """

    def per_device(params, batch_stats, opt_state, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))

        def loss_fn(params):
            losses, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, batch, rng, train=True,
                method=ShapesDetector.losses, mutable=["batch_stats"])
            return sum(losses.values()), (losses, updates["batch_stats"])

        grads, (losses, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, AXIS)
        # statistics are already synchronized by NaiveSyncBatchNorm; pmean is a no-op on values
        # and tells shard_map the result is replicated
        new_batch_stats = jax.lax.pmean(new_batch_stats, AXIS)
        losses = jax.lax.pmean(losses, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses["total"] = sum(losses.values())
        return params, new_batch_stats, opt_state, losses

    step = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(P(), P(), P(), P(AXIS), P()),
                         out_specs=(P(), P(), P(), P()), check_vma=False)
    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_predict(model: ShapesDetector, mesh: Mesh) -> Callable[[Any, jax.Array], dict]:
    """Jitted inference ``(variables, images) -> detections``, images sharded over the mesh."""

    def per_device(variables, images):
        return model.apply(variables, images, method=ShapesDetector.predict)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=P(AXIS), check_vma=False))


def batches(data_config: shapes.ShapesConfig, seed: int, position: int, global_batch: int,
            process_index: int = 0, process_count: int = 1,
            prefetch: int = 4) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Endless ``(position, local batch)`` pairs from ``position`` on, made in a background thread."""
    return prefetched(lambda pos: shapes.train_batch(data_config, seed, pos, global_batch, process_index,
                                                     process_count),
                      position, stride=global_batch, depth=prefetch, failure="making a training batch failed")


def train(model: ShapesDetector, data_config: shapes.ShapesConfig, config: TrainConfig,
          mesh: Mesh, state: TrainState | None = None, *, progress: bool = True,
          on_step: Callable[[TrainState, dict[str, float]], None] | None = None) -> TrainState:
    """Runs the loop from ``state`` (or a fresh one) up to ``config.steps``; returns the state.

    ``on_step(state, metrics)`` is called after every step (e.g. to save a checkpoint);
    ``metrics`` is the step's losses as a dict of 0-d device arrays.

    A step whose total loss is NaN or infinite raises :class:`NonFiniteLossError` before
    ``on_step`` sees it, so the last checkpoint written stays the last good one.  (Reading the
    loss each step waits for the step to finish; the next step's batch is made meanwhile.)
    A step that runs out of memory raises :class:`DemoOutOfMemoryError` (each step is blocked on
    before anything reads its outputs: that read can hang after XLA's allocation failure).
    """
    optimizer = make_optimizer(config)
    if state is None:
        state = init_state(model, optimizer, config.seed)
    step_fn = make_train_step(model, optimizer, mesh)
    global_batch = config.batch_per_device * mesh.size
    process_count = jax.process_count()
    if mesh.size % process_count:
        raise ValueError(f"{mesh.size} devices do not split over {process_count} processes")
    replicated = NamedSharding(mesh, P())
    # through host memory, the key as its raw data: in a multi-process run device_put onto a
    # global sharding takes host arrays (jax 0.10.2 builds malformed arrays from device ones)
    params, batch_stats, opt_state, rng_data = jax.device_put(jax.device_get(
        (state.params, state.batch_stats, state.opt_state, jax.random.key_data(state.rng))),
        replicated)
    rng = jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(state.rng))
    bar = _progress_bar(config.steps, state.step, progress)
    stream = batches(data_config, config.seed, state.data_position, global_batch,
                     jax.process_index(), process_count)
    step = state.step
    try:
        for step in range(state.step, config.steps):
            position, local_batch = next(stream)
            batch = shard_batch(local_batch, mesh)
            with out_of_memory_as(_training_out_of_memory(step + 1, config, mesh.size,
                                                          int(local_batch["image"].shape[1]))):
                # blocks here: reading the outputs of a step that ran out of memory can hang
                params, batch_stats, opt_state, metrics = jax.block_until_ready(step_fn(
                    params, batch_stats, opt_state, batch, jax.random.fold_in(rng, step)))
            total = float(metrics["total"])
            if not np.isfinite(total):
                losses = {k: float(v) for k, v in sorted(metrics.items())}
                raise NonFiniteLossError(
                    f"training stopped at step {step + 1}: the loss is not finite ({losses}); "
                    "nothing of this step was saved, so the newest checkpoint (if any) is the "
                    "last good state: lower the learning rate or check the data, then --resume")
            bar.update(1)
            if on_step is not None:
                on_step(TrainState(params, batch_stats, opt_state, rng, step + 1,
                                   position + global_batch), metrics)
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items()
                                 if k in ("total", "cls", "mask")}, refresh=False)
    finally:
        stream.close()
        bar.close()
    steps_done = max(config.steps, state.step)
    return TrainState(params, batch_stats, opt_state, rng, steps_done,
                      state.data_position + (steps_done - state.step) * global_batch)


def detect(model: ShapesDetector, state: TrainState, examples: list[shapes.Example],
           mesh: Mesh, batch_per_device: int = 16) -> list[Detections]:
    """Runs inference over ``examples`` (padded to whole sharded batches); unpadded detections."""
    predict = make_predict(model, mesh)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    chunk = batch_per_device * mesh.size
    results: list[Detections] = []
    size = model.config.image_size
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        images = np.zeros((chunk, size, size, 3), np.float32)
        images[:len(part)] = np.stack([e.image for e in part])
        with out_of_memory_as(lambda xla: DemoOutOfMemoryError(
                f"out of memory in evaluation: {chunk} images of {size}x{size} a batch "
                f"({batch_per_device} per device on {mesh.size} device(s)) do not fit; lower "
                f"--image-size (now {size}). XLA said: {xla}")):
            out = jax.device_get(jax.block_until_ready(predict(variables, jax.device_put(
                images, NamedSharding(mesh, P(AXIS))))))
        for i in range(len(part)):
            keep = out["valid"][i]
            results.append(Detections(boxes=out["boxes"][i][keep], scores=out["scores"][i][keep],
                                      classes=out["classes"][i][keep],
                                      masks=out["masks"][i][keep]))
    return results
