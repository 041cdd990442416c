"""The demo's run bookkeeping: orbax checkpoints, ``--resume``, the loss log, saved parameters.

Kept apart from the training loop (:mod:`detlayers.demo.train`), which only offers an
``on_step(state, metrics)`` hook and accepts a starting :class:`detlayers.demo.train.TrainState`.

What a checkpoint holds (see :class:`detlayers.demo.train_checkpoints.TrainCheckpointer`): the arrays
``params``, ``batch_stats``, ``opt_state`` and ``rng`` (the base key's raw data), and the JSON
``meta`` ``{"step", "data_position", "config"}``.  ``config`` records what makes two runs the same
run (seed, image size, devices, global batch, learning rate, steps); resuming with another
configuration is refused with an error naming the checkpoint, never silently started afresh.

Multi-process runs: every process calls :func:`open_checkpointer`, the ``on_step`` hook,
:func:`restore_state` and :func:`finish` (orbax synchronizes them and writes replicated arrays
once); only process 0 writes the loss log and the ``--save-params`` file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from detlayers.demo.arg_types import positive_int
from detlayers.demo.train_checkpoints import CheckpointError, TrainCheckpointer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the checkpoint / resume / record flags to the demo's CLI."""
    group = parser.add_argument_group("checkpoints and records")
    group.add_argument("--checkpoint-dir", default=None,
                       help="save orbax checkpoints here (on a file system every process sees); "
                            "none when left out")
    group.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="K",
                       help="save every K steps, K >= 1 (and always after the last step)")
    group.add_argument("--keep-checkpoints", type=positive_int, default=3,
                       help="how many of the newest complete checkpoints to keep (>= 1; 0 is "
                            "refused: it would delete every checkpoint)")
    group.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in --checkpoint-dir "
                            "(an error if there is none or it does not fit this run)")
    group.add_argument("--loss-log", default=None, metavar="FILE",
                       help="append one JSON line per step with the step's losses (process 0)")
    group.add_argument("--save-params", default=None, metavar="FILE.npz",
                       help="write the final params, batch_stats and optimizer state (process 0)")


def run_config(args: argparse.Namespace, num_devices: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run."""
    return dict(seed=args.seed, image_size=args.image_size, devices=num_devices,
                global_batch=args.batch_size * num_devices, learning_rate=args.lr,
                steps=args.steps)


def open_checkpointer(args: argparse.Namespace) -> TrainCheckpointer | None:
    """The run's checkpointer (None without ``--checkpoint-dir``); checks the flags fit together.

    It holds the directory's lock until closed
    (:meth:`detlayers.demo.train_checkpoints.TrainCheckpointer.close`, which
    :func:`finish` calls): a second run on the same directory is refused naming the first.
    A fresh run (no ``--resume``) refuses a directory that already holds checkpoints, so two
    runs never mix their steps in one rotation.
    """
    if args.checkpoint_dir is None:
        if args.resume:
            raise SystemExit("--resume needs --checkpoint-dir")
        return None
    import jax

    # one lock per run: process 0 holds it for every process of a multi-process run
    ckpt = TrainCheckpointer(args.checkpoint_dir, every=args.checkpoint_every,
                             keep=args.keep_checkpoints, lock=jax.process_index() == 0)
    if not args.resume and ckpt.latest_step() is not None:
        newest = ckpt.latest_step()
        ckpt.close()
        raise CheckpointError(
            f"{ckpt.directory} already holds checkpoints (newest: step {newest}); "
            "pass --resume to continue that run, or choose an empty directory")
    return ckpt


def _tree(state) -> dict[str, Any]:
    import jax

    return dict(params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state,
                rng=jax.random.key_data(state.rng))


def restore_state(ckpt: TrainCheckpointer, model, train_config, mesh, config: dict[str, Any]):
    """The newest intact checkpoint as a ``TrainState`` for ``model`` trained with ``train_config``.

    The expected tree, shapes and dtypes come from a fresh state (traced, not computed); arrays
    come back replicated over ``mesh``, as the training step keeps them.  Raises
    :class:`detlayers.demo.train_checkpoints.CheckpointError` naming the checkpoint when it cannot be
    read, does not fit the model, or was written by a run with another configuration.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from detlayers.demo.train import TrainState, make_optimizer
    from detlayers.models.checkpoint import example_inputs
    from detlayers.models.engine.train_loop import create_variables

    # the tree, shapes and dtypes of a fresh state, traced (no initialisation is computed)
    def fresh_tree():
        variables = model.init(jax.random.key(0), example_inputs()[0], method=create_variables)
        params = variables["params"]
        optimizer = make_optimizer(train_config, params, mesh.size)
        return dict(params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(0)))

    shapes = jax.eval_shape(fresh_tree)
    replicated = NamedSharding(mesh, PartitionSpec())
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
    tree, meta = ckpt.restore(template)  # the newest intact checkpoint (damaged ones set aside)
    path = ckpt.step_path(ckpt.restored_step)
    saved = meta.get("config")
    if saved != config:
        saved = saved if isinstance(saved, dict) else {}
        diff = {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
                if saved.get(k) != config.get(k)}
        raise CheckpointError(
            f"checkpoint {path} was written by another run configuration; "
            f"differences (checkpoint, now): {diff}")
    for key in ("step", "data_position"):
        if not isinstance(meta.get(key), int):
            raise CheckpointError(f"checkpoint {path}: meta has no integer {key!r}: {meta}")
    rng = jax.random.wrap_key_data(tree["rng"])  # the default key type, as init_state makes it
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"], rng,
                      step=meta["step"], data_position=meta["data_position"])


def local_view(state, mesh):
    """``(state, mesh)`` for work this process does alone (evaluation on process 0).

    Single-process: unchanged.  Multi-process: a mesh of this process's devices and host copies
    of ``params``/``batch_stats`` (replicated, so every process already holds them whole).
    """
    import jax
    from jax.sharding import Mesh

    from detlayers.demo.train import TrainState

    if jax.process_count() == 1:
        return state, mesh
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    local = Mesh(np.asarray(mine), mesh.axis_names)
    host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)),
                        (state.params, state.batch_stats))
    return TrainState(host[0], host[1], None, None, state.step, state.data_position), local


def _meta(state, config: dict[str, Any]) -> dict[str, Any]:
    return dict(step=int(state.step), data_position=int(state.data_position), config=config)


def make_on_step(ckpt: TrainCheckpointer | None, config: dict[str, Any],
                 loss_log: str | None, is_main: bool) -> Callable[[Any, dict], None] | None:
    """The training loop's ``on_step``: periodic checkpoints and the per-step loss log."""
    if ckpt is None and loss_log is None:
        return None
    log_file = open(loss_log, "a") if (loss_log and is_main) else None  # noqa: SIM115

    def on_step(state, metrics: dict) -> None:
        if log_file is not None:
            # losses are replicated, so every process can read them without communication
            record = {"step": int(state.step)}
            record.update({k: float(np.asarray(v)) for k, v in sorted(metrics.items())})
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if ckpt is not None:
            ckpt.save(int(state.step), _tree(state), _meta(state, config))

    return on_step


def finish(ckpt: TrainCheckpointer | None, state, config: dict[str, Any],
           save_params: str | None, is_main: bool) -> None:
    """Saves the final checkpoint (every process) and the ``--save-params`` file (process 0)."""
    if ckpt is not None:
        ckpt.save(int(state.step), _tree(state), _meta(state, config), force=True)
        ckpt.close()
    if save_params and is_main:
        save_state_npz(save_params, state)


def save_state_npz(path: str, state) -> None:
    """``params``/``batch_stats``/``opt_state`` leaves as a flat ``.npz`` keyed by tree path."""
    import jax

    flat = {}
    for key, leaf in jax.tree_util.tree_leaves_with_path(_tree(state)):
        flat[jax.tree_util.keystr(key)] = np.asarray(leaf)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, step=np.int64(state.step), data_position=np.int64(state.data_position), **flat)
