"""Training checkpoints with ``orbax-checkpoint``: periodic, rotated, resumable, multi-process.

A checkpoint is a step directory ``<dir>/<step>/`` with two items: ``state`` (a pytree of arrays:
params, batch_stats, optimizer state, RNG key data) and ``meta`` (JSON: step, data position, the
run's configuration).  Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves only a temporary directory that
:meth:`TrainCheckpointer.latest_step` never reports; it is never loaded.  In multi-process runs
every process calls :meth:`TrainCheckpointer.save` and :meth:`TrainCheckpointer.restore` (orbax
coordinates them); arrays that are replicated over a global mesh are written once.

Errors: a checkpoint that cannot be read (corrupt files) or does not fit the model being trained
(other shapes, dtypes or tree structure) raises :class:`CheckpointError` naming its path: a
resumed run never silently starts from scratch.
"""

from __future__ import annotations

import os
from typing import Any

import jax


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names its path."""


class TrainCheckpointer:
    """Saves every ``every`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories live (created if missing).
      every: save interval in steps; ``save(step, ...)`` is a no-op unless ``step % every == 0``
        or ``force=True``.
      keep: how many complete checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 3):
        import orbax.checkpoint as ocp

        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory,
            # synchronous: the training step donates its input buffers, so an array must be
            # fully written before the next step may reuse its memory
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        """Newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Writes ``state`` and ``meta`` for ``step`` when it is due; returns whether it saved."""
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        ocp = self._ocp
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        return True

    def wait(self) -> None:
        """Blocks until pending writes are complete (saves are synchronous; kept for safety)."""
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Loads ``(state, meta)`` of ``step`` (default: newest) shaped like ``template``.

        ``template`` is a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the structure,
        shapes, dtypes and shardings the run uses now.
        """
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        path = self.step_path(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types; all mean "this one can't be used"
            raise CheckpointError(
                f"checkpoint {path} cannot be restored into this model: "
                f"{type(err).__name__}: {err}") from err
        _check_matches(abstract, restored.state, path)
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_matches(abstract: Any, restored: Any, path: str) -> None:
    want = jax.tree.structure(abstract)
    got = jax.tree.structure(restored)
    if want != got:
        raise CheckpointError(f"checkpoint {path} has tree {got}, the model expects {want}")
    for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract),
                           jax.tree.leaves(restored)):
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise CheckpointError(
                f"checkpoint {path}: {jax.tree_util.keystr(key)} is {b.dtype}{list(b.shape)}, "
                f"the model expects {a.dtype}{list(a.shape)}")
