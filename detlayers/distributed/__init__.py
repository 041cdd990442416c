"""Multi-process (multi-host) set-up through JAX's own runtime, ``jax.distributed``.

detlayers has no engine of its own: every collective (``psum``/``pmean`` in
:class:`detlayers.batch_norm.NaiveSyncBatchNorm`, gradient averaging in the demo) is an ordinary
JAX collective over a named axis, and JAX's multi-controller runtime makes that axis span the
devices of every process.  This module only decides *how* to call
``jax.distributed.initialize`` and slices global batches per process.

Sources of the settings, first match wins:

1. explicit arguments (the demo's ``--coordinator HOST:PORT --num-processes N --process-id I``);
2. ``DETLAYERS_COORDINATOR`` / ``DETLAYERS_NUM_PROCESSES`` / ``DETLAYERS_PROCESS_ID`` (set by
   ``python -m detlayers.distributed.launch``);
3. a cluster JAX detects by itself (SLURM, Open MPI, Kubernetes/GKE, TPU pods...):
   ``jax.distributed.initialize()`` with no arguments, when ``auto=True``;
4. otherwise a single process: nothing to initialize.

On CPU the cross-process collectives need gloo (``jax_cpu_collectives_implementation``), which is
switched on before initializing.  Call :func:`initialize` before any other JAX work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                    "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the (possibly single-process) runtime."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--coordinator``, ``--num-processes`` and ``--process-id`` to a CLI."""
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, default=None,
                       help="processes in the job (one per host; the launcher sets it)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index in [0, num-processes)")


def _resolve(coordinator, num_processes, process_id):
    env = os.environ
    coordinator = coordinator or env.get("DETLAYERS_COORDINATOR")
    if num_processes is None and env.get("DETLAYERS_NUM_PROCESSES"):
        num_processes = int(env["DETLAYERS_NUM_PROCESSES"])
    if process_id is None and env.get("DETLAYERS_PROCESS_ID"):
        process_id = int(env["DETLAYERS_PROCESS_ID"])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "multi-process set-up needs coordinator, num_processes and process_id together; got "
            f"coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    return coordinator, num_processes, process_id


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = True,
    initialization_timeout: int = 120,
) -> ProcessInfo:
    """Joins the multi-process runtime when one is configured; returns this process's place.

    Idempotent: a second call (or a call after the caller initialized JAX itself) only reports.
    """
    import jax

    coordinator, num_processes, process_id = _resolve(coordinator, num_processes, process_id)
    wants_cluster = auto and any(marker in os.environ for marker in _CLUSTER_MARKERS)
    already = jax.distributed.is_initialized()
    if not already and (coordinator is not None or wants_cluster):
        if coordinator is None or num_processes is None or num_processes > 1:
            # gloo must be chosen before the CPU backend starts; harmless on GPU/TPU
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if coordinator is not None:
            jax.distributed.initialize(coordinator, num_processes, process_id,
                                       initialization_timeout=initialization_timeout)
        else:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count())


def process_slice(global_size: int, info: ProcessInfo) -> slice:
    """This process's contiguous share of ``global_size`` items, split by local device count.

    Every process owns ``local_device_count`` devices and each device an equal share, so the
    global batch must divide by the global device count; the result does not depend on how the
    devices are split among processes (process ``i`` gets the rows of its devices, in order).
    """
    if global_size % info.global_device_count:
        raise ValueError(
            f"global batch size {global_size} must be divisible by the global device count "
            f"{info.global_device_count}")
    per_device = global_size // info.global_device_count
    first_device = _first_global_device_index(info)
    start = first_device * per_device
    return slice(start, start + per_device * info.local_device_count)


def _first_global_device_index(info: ProcessInfo) -> int:
    import jax

    local = {d.id for d in jax.local_devices()}
    ordered = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return next(i for i, d in enumerate(ordered) if d.id in local)


def check_process_blocks(devices) -> None:
    """Raises unless ``devices`` (a mesh's, in order) are whole per-process blocks in process order.

    Each process makes only its own share of a global batch - process ``p`` of ``n`` the ``p``-th
    contiguous block (:func:`detlayers.demo.data.train_batch`) - and
    ``jax.make_array_from_process_local_data`` puts it where that process's devices sit in the
    mesh; the two agree only when process ``p``'s devices are the ``p``-th block of the mesh.
    """
    import jax

    owners = [d.process_index for d in devices]
    n = jax.process_count()
    per = len(owners) // n
    if len(owners) % n or owners != [p for p in range(n) for _ in range(per)]:
        raise ValueError(
            f"the mesh must hold every process's devices as one block, in process order and in "
            f"equal numbers; its devices belong to processes {owners} (use all devices, or "
            f"--devices equal to the global device count)")
