"""Training checkpoints with ``orbax-checkpoint``: periodic, rotated, resumable, multi-process.

A checkpoint is a step directory ``<dir>/<step>/`` with two items: ``state`` (a pytree of arrays:
params, batch_stats, optimizer state, RNG key data) and ``meta`` (JSON: step, data position, the
run's configuration).  Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves only a temporary directory that
:meth:`TrainCheckpointer.latest_step` never reports; it is never loaded.  In multi-process runs
every process calls :meth:`TrainCheckpointer.save` and :meth:`TrainCheckpointer.restore` (orbax
coordinates them); arrays that are replicated over a global mesh are written once.

Integrity: :meth:`TrainCheckpointer.save` records a SHA-256 digest of every leaf's bytes (with its
dtype and shape) in ``meta`` and refuses to write a non-finite floating-point leaf (a diverged
state must not replace a good checkpoint); :meth:`TrainCheckpointer.restore` recomputes the digests
and checks that ``meta["step"]`` names the step directory it was read from. A checkpoint written
without digests (before they were recorded) restores unverified.

Errors: a checkpoint that cannot be read (corrupt files), whose arrays differ from what was saved
(a digest mismatch), or that does not fit the model being trained (other shapes, dtypes or tree
structure) raises :class:`CheckpointError` naming its path (and the leaf): a resumed run never
silently starts from scratch or from damaged values.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np

DIGESTS_KEY = "leaf_sha256"  # meta entry: {leaf path: hex digest} written by save()


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names its path."""


class TrainCheckpointer:
    """Saves every ``every`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories live (created if missing).
      every: save interval in steps; ``save(step, ...)`` is a no-op unless ``step % every == 0``
        or ``force=True``.
      keep: how many complete checkpoints to keep (>= 1).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 3):
        import orbax.checkpoint as ocp

        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            # orbax's max_to_keep=0 would delete every checkpoint as soon as it is written
            raise ValueError(f"checkpoints to keep must be an int >= 1, got {keep!r}")
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
        digests = {}
        for key, leaf in jax.tree_util.tree_leaves_with_path(state):
            host = _host_value(leaf)
            if host is None:
                continue
            name = jax.tree_util.keystr(key)
            if np.issubdtype(host.dtype, np.inexact) and not np.isfinite(host).all():
                raise CheckpointError(
                    f"refusing to save checkpoint {self.step_path(step)}: {name} holds NaN or inf "
                    "(the training state diverged); the previous checkpoints are kept")
            digests[name] = _digest(host)
        ocp = self._ocp
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(meta, **{DIGESTS_KEY: digests}))), force=True)
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
        meta = dict(restored.meta)
        if "step" in meta and meta["step"] != step:
            raise CheckpointError(
                f"checkpoint {path}: meta says step {meta['step']!r}, its directory says step {step}")
        _check_digests(restored.state, meta.pop(DIGESTS_KEY, None), path)
        return restored.state, meta

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


def _host_value(leaf: Any) -> np.ndarray | None:
    """The leaf's full value on this host, or None for an array sharded over other processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            return None
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def _digest(value: np.ndarray) -> str:
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _check_digests(state: Any, digests: Any, path: str) -> None:
    if digests is None:  # written before digests were recorded
        return
    if not isinstance(digests, dict):
        raise CheckpointError(f"checkpoint {path}: meta[{DIGESTS_KEY!r}] is not a dict")
    for key, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = jax.tree_util.keystr(key)
        host = _host_value(leaf)
        if host is None or name not in digests:
            continue
        if _digest(host) != digests[name]:
            raise CheckpointError(
                f"checkpoint {path}: {name} differs from what was saved (SHA-256 mismatch): its "
                "files were changed or damaged after writing")
