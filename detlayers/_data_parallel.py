"""The data-parallel layout both training loops use: a 1-D device mesh with axis ``"batch"``
and batches sharded along it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"  # get_norm's default axis_name for the synchronized norms


def make_mesh(num_devices: int | None = None, *, argument: str = "make_mesh: num_devices") -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over the first ``num_devices`` devices (default: all).

    In a multi-process run every process's devices join the mesh (``jax.devices()``), so
    ``num_devices`` counts global devices. Out of range: ``ValueError`` naming ``argument``
    (the caller's name for it, e.g. a command-line flag)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"{argument} must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along ``"batch"`` (multi-process too)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
