"""Data-parallel training of the demo's Mask R-CNN with the models trainer's step.

The step is :func:`detlayers.models.engine.step.make_train_step`, the one ``python -m
detlayers.models.train`` runs: ``(params, batch_stats, opt_state, batch, key) -> (params,
batch_stats, opt_state, losses)``, jitted over a ``shard_map`` of the device mesh (axis
``"batch"``): every device computes detectron2's loss dict on its slice of the batch, ``SyncBN``
normalises with the statistics of the whole global batch, gradients are averaged with
``jax.lax.pmean``, and detectron2's SGD (:func:`solver_cfg`) updates every replica alike.

The loop state is explicit - :class:`TrainState` holds the arrays, ``step`` and
``data_position`` (the index of the next training example) are plain ints - so a run can be
checkpointed and resumed exactly: step ``s`` always sees the examples ``s * global_batch ...``
and draws its sampling priorities from ``fold_in(rng, s)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
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
from detlayers.demo.model import model_batch, model_images
from detlayers.models.engine.step import make_train_step
from detlayers.models.engine.train_loop import build_solver, init_variables


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
    """The solver settings.  ``global_batch = batch_per_device * number of devices``; they become
    detectron2's ``SOLVER`` keys in :func:`solver_cfg`."""

    steps: int = 400
    batch_per_device: int = 4
    learning_rate: float = 0.04
    warmup_steps: int = 50
    seed: int = 0


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs: arrays (a pytree) plus the two loop counters."""

    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array          # base key; step s draws its sampling priorities from fold_in(rng, s)
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


def solver_cfg(config: TrainConfig, num_devices: int, cfg: Any = None) -> Any:
    """``cfg`` (default: the demo's model config, :func:`detlayers.demo.model.demo_cfg`) with
    detectron2's ``SOLVER`` set from ``config``: SGD with momentum 0.9 and weight decay 1e-4 at
    ``BASE_LR = learning_rate``, a linear warmup over ``warmup_steps`` from 0.001x, and the
    learning rate divided by 10 for the last fifth of the ``steps`` (``WarmupMultiStepLR``)."""
    from detlayers.demo.model import demo_cfg

    cfg = (cfg if cfg is not None else demo_cfg()).clone()
    cfg.merge_from_list([
        "SOLVER.IMS_PER_BATCH", config.batch_per_device * num_devices,
        "SOLVER.BASE_LR", config.learning_rate,
        "SOLVER.MAX_ITER", config.steps,
        "SOLVER.STEPS", [max(1, (4 * config.steps) // 5)],
        "SOLVER.WARMUP_ITERS", config.warmup_steps,
        "SOLVER.WARMUP_FACTOR", 0.001,
    ])
    return cfg


def make_optimizer(config: TrainConfig, params: Any, num_devices: int = 1) -> optax.GradientTransformation:
    """detectron2's solver for ``config`` (:func:`detlayers.models.engine.train_loop.build_solver`)."""
    return build_solver(solver_cfg(config, num_devices), params)


def init_state(model: Any, config: TrainConfig, num_devices: int = 1) -> TrainState:
    """Fresh variables (the layers' own initialisation, the same on every process: they depend
    only on ``config.seed``) and the solver's initial state."""
    variables = init_variables(solver_cfg(config, num_devices), model, config.seed)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    optimizer = make_optimizer(config, params, num_devices)
    loop_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return TrainState(params, batch_stats, jax.jit(optimizer.init)(params), loop_key)


def make_predict(model: Any, mesh: Mesh, canvas_hw: tuple[int, int]) -> Callable[..., dict]:
    """Jitted inference ``(variables, images, image_hw) -> detections`` of the ``GeneralizedRCNN``
    ``model``, images sharded over the mesh, masks pasted into a ``canvas_hw`` canvas."""

    def per_device(variables, images, image_hw):
        out = model.apply(variables, images, image_hw, image_hw, canvas_hw=canvas_hw)
        return {k: out[k] for k in ("pred_boxes", "scores", "pred_classes", "valid", "pred_masks")}

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                                 out_specs=P(AXIS), check_vma=False))


def batches(data_config: shapes.ShapesConfig, seed: int, position: int, global_batch: int,
            process_index: int = 0, process_count: int = 1,
            prefetch: int = 4) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Endless ``(position, local batch)`` pairs from ``position`` on, made in a background thread;
    the batches are the training call's arrays (:func:`detlayers.demo.model.model_batch`)."""
    return prefetched(lambda pos: model_batch(shapes.train_batch(data_config, seed, pos, global_batch,
                                                                 process_index, process_count)),
                      position, stride=global_batch, depth=prefetch, failure="making a training batch failed")


def train(model: Any, data_config: shapes.ShapesConfig, config: TrainConfig,
          mesh: Mesh, state: TrainState | None = None, *, progress: bool = True,
          on_step: Callable[[TrainState, dict[str, float]], None] | None = None) -> TrainState:
    """Runs the loop from ``state`` (or a fresh one) up to ``config.steps``; returns the state.

    ``model`` is the demo's ``GeneralizedRCNN`` (:func:`detlayers.demo.model.build_detector`).
    ``on_step(state, metrics)`` is called after every step (e.g. to save a checkpoint);
    ``metrics`` is the step's losses (detectron2's ``loss_rpn_cls`` ... ``loss_mask``, averaged
    over devices) and their sum ``total``, as floats.

    A step whose loss is NaN or infinite raises :class:`NonFiniteLossError` before ``on_step``
    sees it, so the last checkpoint written stays the last good one.  (Reading the losses each
    step waits for the step to finish; the next step's batch is made meanwhile.)  A step that runs
    out of memory raises :class:`DemoOutOfMemoryError` (each step is blocked on before anything
    reads its outputs: that read can hang after XLA's allocation failure).
    """
    if state is None:
        state = init_state(model, config, mesh.size)
    optimizer = make_optimizer(config, state.params, mesh.size)
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
    try:
        for step in range(state.step, config.steps):
            position, local_batch = next(stream)
            batch = shard_batch(local_batch, mesh)
            with out_of_memory_as(_training_out_of_memory(step + 1, config, mesh.size,
                                                          data_config.image_size)):
                # blocks here: reading the outputs of a step that ran out of memory can hang
                params, batch_stats, opt_state, losses = jax.block_until_ready(step_fn(
                    params, batch_stats, opt_state, batch, jax.random.fold_in(rng, step)))
            metrics = {k: float(v) for k, v in sorted(jax.device_get(losses).items())}
            metrics["total"] = math.fsum(metrics.values())
            if not all(math.isfinite(v) for v in metrics.values()):
                raise NonFiniteLossError(
                    f"training stopped at step {step + 1}: the loss is not finite ({metrics}); "
                    "nothing of this step was saved, so the newest checkpoint (if any) is the "
                    "last good state: lower the learning rate or check the data, then --resume")
            bar.update(1)
            if on_step is not None:
                on_step(TrainState(params, batch_stats, opt_state, rng, step + 1,
                                   position + global_batch), metrics)
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in metrics.items()
                                 if k in ("total", "loss_cls", "loss_mask")}, refresh=False)
    finally:
        stream.close()
        bar.close()
    steps_done = max(config.steps, state.step)
    return TrainState(params, batch_stats, opt_state, rng, steps_done,
                      state.data_position + (steps_done - state.step) * global_batch)


def detect(model: Any, state: TrainState, examples: list[shapes.Example],
           mesh: Mesh, batch_per_device: int = 16) -> list[Detections]:
    """Runs inference over ``examples`` (padded to whole sharded batches); unpadded detections
    with masks pasted into the image."""
    size = int(examples[0].image.shape[0])
    predict = make_predict(model, mesh, (size, size))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    chunk = batch_per_device * mesh.size
    sharding = NamedSharding(mesh, P(AXIS))
    results: list[Detections] = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        images = np.zeros((chunk, size, size, 3), np.float32)
        images[:len(part)] = np.stack([e.image for e in part])
        inputs, image_hw = model_images(images)
        with out_of_memory_as(lambda xla: DemoOutOfMemoryError(
                f"out of memory in evaluation: {chunk} images of {size}x{size} a batch "
                f"({batch_per_device} per device on {mesh.size} device(s)) do not fit; lower "
                f"--image-size (now {size}). XLA said: {xla}")):
            out = jax.device_get(jax.block_until_ready(predict(
                variables, jax.device_put(inputs, sharding), jax.device_put(image_hw, sharding))))
        for i in range(len(part)):
            keep = out["valid"][i]
            results.append(Detections(boxes=out["pred_boxes"][i][keep], scores=out["scores"][i][keep],
                                      classes=out["pred_classes"][i][keep],
                                      masks=out["pred_masks"][i][keep]))
    return results
