"""Training checkpoints with ``orbax-checkpoint``: periodic, rotated, resumable, multi-process.

A checkpoint is a step directory ``<dir>/<step>/`` with two items: ``state`` (a pytree of arrays:
params, batch_stats, optimizer state, RNG key data) and ``meta`` (JSON: step, data position, the
run's configuration).  Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves only a temporary directory that
:meth:`TrainCheckpointer.latest_step` never reports; it is never loaded.  In multi-process runs
every process calls :meth:`TrainCheckpointer.save` and :meth:`TrainCheckpointer.restore` (orbax
coordinates them); arrays that are replicated over a global mesh are written once.

One run at a time: the checkpointer holds an exclusive lock on the directory (see
:mod:`detlayers.demo.checkpoint_lock`) from construction until :meth:`TrainCheckpointer.close`; a
second run on the same directory gets a :class:`CheckpointError` naming the holder (pid, host,
start time). A lock left by a killed run is taken over with one warning line.

Integrity: :meth:`TrainCheckpointer.save` records a SHA-256 digest of every leaf's bytes (with its
dtype and shape) and one of the whole ``meta`` (every field, including those digests) in
``meta``, and refuses to write a non-finite floating-point leaf (a diverged state must not
replace a good checkpoint). :meth:`TrainCheckpointer.restore` checks, in order: that the stored
tree, shapes and dtypes fit the template (before reading any array), that orbax can read it, the
meta digest (a changed ``data_position`` would silently resume another run), that
``meta["step"]`` names the step directory it was read from, and every leaf digest.

Errors: a checkpoint that does not fit the model being trained (other tree structure, shapes or
dtypes), or that carries no digests (written by an older detlayers), raises
:class:`CheckpointError` naming its path. A *damaged* one (unreadable files, a digest mismatch, a
step that differs from its directory) raises :class:`DamagedCheckpointError` naming its path and
the leaf or field. Restoring the newest checkpoint (``step=None``) falls back instead: damaged
newer steps are moved aside to ``<dir>/<step>.damaged`` (never deleted; orbax then no longer
counts them in its rotation) and the newest intact one is restored, with ONE warning line on
stderr naming what was set aside and why. A resumed run never silently starts from scratch or
from damaged values. Orbax's own noise from a failed read (abandoned asynchronous reads reporting
"Event loop is closed" or "Exception ignored" tracebacks, possibly at interpreter exit) is
contained: the error is reported once, as above.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import traceback
from typing import Any

import jax
import numpy as np

from detlayers.demo.checkpoint_lock import DirectoryInUseError, DirectoryLock

DIGESTS_KEY = "leaf_sha256"  # meta entry: {leaf path: hex digest} written by save()
META_DIGEST_KEY = "meta_sha256"  # meta entry: digest of every other meta field (digests included)
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (or the directory is in use); the message names its path."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are unreadable or differ from what was written."""


class TrainCheckpointer:
    """Saves every ``every`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories live (created if missing).
      every: save interval in steps; ``save(step, ...)`` is a no-op unless ``step % every == 0``
        or ``force=True``.
      keep: how many complete checkpoints to keep (>= 1).
      lock: hold the directory's lock (default).  In a multi-process run exactly one process
        (process 0) takes it; the others pass False.

    Raises :class:`CheckpointError` naming the holder when another run holds the directory.
    Use it as a context manager, or call :meth:`close`: that finishes pending writes, closes
    orbax's manager and releases the lock.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 3, lock: bool = True):
        import orbax.checkpoint as ocp

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint interval must be an int >= 1, got {every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            # orbax's max_to_keep=0 would delete every checkpoint as soon as it is written
            raise ValueError(f"checkpoints to keep must be an int >= 1, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        self.restored_step: int | None = None  # the step the last restore() read
        self._ocp = ocp
        self._lock = None
        self._manager = None
        if lock:
            try:
                self._lock = DirectoryLock.acquire(self.directory)
            except DirectoryInUseError as err:
                raise CheckpointError(str(err)) from None
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                # synchronous: the training step donates its input buffers, so an array must be
                # fully written before the next step may reuse its memory
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=False),
                # named up front, so a fresh manager can read a step's metadata before restoring
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            )
        except BaseException:
            self._release_lock()
            raise

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """Newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Writes ``state`` and ``meta`` for ``step`` when it is due; returns whether it saved.

        ``meta`` must be JSON data (str keys); the digests are added to what is written.
        """
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        for key in (DIGESTS_KEY, META_DIGEST_KEY):
            if key in meta:
                raise ValueError(f"save: meta key {key!r} is reserved for the checkpoint's digests")
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
        written = dict(meta, **{DIGESTS_KEY: digests})
        written[META_DIGEST_KEY] = _meta_digest(written)
        ocp = self._ocp
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(written)), force=True)
        return True

    def wait(self) -> None:
        """Blocks until pending writes are complete (saves are synchronous; kept for safety)."""
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Loads ``(state, meta)`` of ``step`` (default: the newest intact one) shaped like ``template``.

        ``template`` is a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the structure,
        shapes, dtypes and shardings the run uses now. ``meta`` comes back without the digests;
        :attr:`restored_step` tells which step was read. With ``step=None`` damaged newer
        checkpoints are set aside with one warning line (module docstring); with an explicit
        ``step`` a damaged one raises :class:`DamagedCheckpointError`.
        """
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
        if step is not None:
            result = self._restore_step(abstract, step)
            self.restored_step = step
            return result
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        damaged: list[tuple[int, DamagedCheckpointError]] = []
        for candidate in steps:
            try:
                result = self._restore_step(abstract, candidate)
            except DamagedCheckpointError as err:
                damaged.append((candidate, err))
                continue
            if damaged:
                self._set_aside(damaged, candidate)
            self.restored_step = candidate
            return result
        raise DamagedCheckpointError(
            f"every checkpoint in {self.directory} is damaged, none was changed: "
            + "; ".join(str(err) for _, err in damaged))

    def _restore_step(self, abstract: Any, step: int) -> tuple[Any, dict]:
        ocp = self._ocp
        path = self.step_path(step)
        _filter_orbax_leftovers()
        _check_fits(self._stored_arrays(step, path), abstract, path)
        failure = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types; all mean "these files can't be read"
            failure = _first_line(err)  # not chained: its traceback keeps the abandoned reads alive
        if failure is not None:
            _finalize_abandoned_reads()
            raise DamagedCheckpointError(f"checkpoint {path} cannot be read: {failure}")
        _check_matches(abstract, restored.state, path)
        meta = _checked_meta(restored.meta, path)
        if "step" in meta and meta["step"] != step:
            raise DamagedCheckpointError(
                f"checkpoint {path}: meta says step {meta['step']!r}, its directory says step {step}")
        _check_digests(restored.state, meta.pop(DIGESTS_KEY), path)
        return restored.state, meta

    def _stored_arrays(self, step: int, path: str) -> dict[tuple[str, ...], tuple[tuple, str]]:
        """``{path tokens: (shape, dtype)}`` of the arrays orbax recorded for ``step``."""
        failure = None
        try:
            tree = self._manager.item_metadata(step)["state"]
            if tree is None:
                raise FileNotFoundError("orbax found no metadata of the item 'state'")
            tree = getattr(tree, "tree", tree)
            stored = {_tokens(key): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
                      for key, leaf in jax.tree_util.tree_leaves_with_path(tree)}
        except Exception as err:  # unreadable or missing metadata files
            failure = _first_line(err)
        if failure is not None:
            _finalize_abandoned_reads()
            raise DamagedCheckpointError(f"checkpoint {path} cannot be read (its array metadata): {failure}")
        return stored

    def _set_aside(self, damaged: list[tuple[int, DamagedCheckpointError]], good: int) -> None:
        """Renames the damaged step directories out of orbax's rotation; one warning line."""
        moved = []
        if jax.process_index() == 0:
            for step, _ in damaged:
                target = _free_name(self.step_path(step) + DAMAGED_SUFFIX)
                os.rename(self.step_path(step), target)
                moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("detlayers checkpoint fallback")
        self._manager.reload()
        names = ", ".join(moved) or ", ".join(f"{self.step_path(s)}{DAMAGED_SUFFIX}" for s, _ in damaged)
        reasons = "; ".join(str(err) for _, err in damaged)
        print(f"warning: resuming from {self.step_path(good)}, the newest intact checkpoint: set aside "
              f"{names}: {reasons}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finishes pending writes, closes orbax's manager and releases the lock (idempotent)."""
        try:
            if self._manager is not None:
                manager, self._manager = self._manager, None
                manager.wait_until_finished()
                manager.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


def _first_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` cut to its first line (orbax appends pages of TensorStore specs)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(err).__name__}: {text}"


def _free_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _tokens(key_path: tuple) -> tuple[str, ...]:
    """A tree path as plain names: dict keys, sequence indices and attribute names alike
    (orbax stores named tuples as dicts and tuples as lists)."""
    out = []
    for entry in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
        else:
            out.append(str(entry))
    return tuple(out)


def _check_fits(stored: dict, abstract: Any, path: str) -> None:
    """The stored arrays against the template, before orbax reads (and casts) any of them."""
    wanted = {_tokens(key): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
              for key, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
        def show(keys):
            return ", ".join("/".join(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: "
            + "; ".join(part for part in (
                f"{len(missing)} arrays the model needs are not in it ({show(missing)})" if missing else "",
                f"{len(extra)} arrays in it the model does not have ({show(extra)})" if extra else "")
                if part))
    for key in sorted(wanted):
        if stored[key] != wanted[key]:
            (got_shape, got_dtype), (want_shape, want_dtype) = stored[key], wanted[key]
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {'/'.join(key)} is "
                f"{got_dtype}{list(got_shape)}, the model expects {want_dtype}{list(want_shape)}")


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


def _meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta`` without its own digest, as canonical JSON (what orbax writes back)."""
    fields = {k: v for k, v in meta.items() if k != META_DIGEST_KEY}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _checked_meta(meta: Any, path: str) -> dict:
    """``meta`` after its digest check (every field, the leaf digests included)."""
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"checkpoint {path}: meta is a {type(meta).__name__}, not a dict")
    meta = dict(meta)
    recorded = meta.pop(META_DIGEST_KEY, None)
    if recorded is None or DIGESTS_KEY not in meta:
        raise CheckpointError(
            f"checkpoint {path} carries no integrity digests (written by an older detlayers, or its "
            f"meta lost them), so its values cannot be verified; start a new run in another directory")
    if _meta_digest(meta) != recorded:
        raise DamagedCheckpointError(
            f"checkpoint {path}: its meta (step, data_position, config or the array digests) differs "
            "from what was saved (SHA-256 mismatch): changed or damaged after writing")
    if not isinstance(meta[DIGESTS_KEY], dict):
        raise DamagedCheckpointError(f"checkpoint {path}: meta[{DIGESTS_KEY!r}] is not a dict")
    return meta


def _check_digests(state: Any, digests: dict, path: str) -> None:
    for key, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = jax.tree_util.keystr(key)
        host = _host_value(leaf)
        if host is None:
            continue
        if name not in digests:
            raise DamagedCheckpointError(f"checkpoint {path}: no digest recorded for {name}")
        if _digest(host) != digests[name]:
            raise DamagedCheckpointError(
                f"checkpoint {path}: {name} differs from what was saved (SHA-256 mismatch): its "
                "files were changed or damaged after writing")


# ---------------------------------------------------------------------------------------------
# containing orbax's noise after a failed read
# ---------------------------------------------------------------------------------------------
def _is_orbax_leftover(unraisable: Any) -> bool:
    """Reports of reads orbax abandoned when another one failed: TensorStore callbacks that find
    orbax's event loop closed, and orbax coroutines that raise when finalized."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        return "call_soon_threadsafe" in frames
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _filter_orbax_leftovers() -> None:
    """Installs (once) an unraisable-exception hook that drops orbax's leftovers and passes
    everything else to the hook it replaces.

    After a failed read orbax abandons its other reads: TensorStore threads then report into the
    closed event loop, during the failing call and later, and the unfinished coroutines are printed
    at interpreter exit -- hundreds of lines for one damaged checkpoint. The failure itself is
    reported once, as a :class:`DamagedCheckpointError`.
    """
    if not getattr(sys.unraisablehook, "_detlayers_orbax_filter", False):
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            if not _is_orbax_leftover(unraisable):
                previous(unraisable)

        hook._detlayers_orbax_filter = True
        sys.unraisablehook = hook


def _finalize_abandoned_reads() -> None:
    """After a failed orbax read (its exception no longer referenced): finalize now, under the
    filter, what would otherwise be finalized (and printed) at interpreter exit."""
    gc.collect()
