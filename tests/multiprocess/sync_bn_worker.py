"""One process of the multi-process sync-BN check (started by tests/test_multiprocess.py).

Joins the runtime from the DETLAYERS_* environment that ``detlayers.distributed.launch`` sets, builds the
same global batch in every process from a seed, keeps only its own devices' rows, runs one
training step of NaiveSyncBatchNorm under ``pmap`` and under ``shard_map`` over a global Mesh,
gathers the global outputs/gradients/statistics, and process 0 writes them to ``argv[1]``.
"""

import sys

import numpy as np

from detlayers import distributed

info = distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from detlayers.batch_norm import NaiveSyncBatchNorm, SyncBatchNorm  # noqa: E402

out_path = sys.argv[1]
C, B, HW = 3, 3, 2  # channels, padded per-device batch, spatial size
CASES = {  # name -> (layer, real examples per device): "" / "N" are NaiveSyncBatchNorm's modes
    "equal": ("", [3, 3, 3, 3]),
    "masked": ("SyncBatchNorm", [3, 1, 2, 2]),
    "empty_device": ("SyncBatchNorm", [2, 3, 0, 1]),
    "N_masked": ("N", [3, 1, 2, 2]),
    "N_empty_device": ("N", [2, 0, 3, 1]),
}
ndev = jax.device_count()
assert ndev == 4, f"expected 4 global devices, got {ndev}"
rng = np.random.default_rng(0)
x_global = rng.normal(2.0, 3.0, size=(ndev, B, HW, HW, C)).astype(np.float32)
cot_global = rng.normal(size=(ndev, B, HW, HW, C)).astype(np.float32)
scale0 = rng.uniform(0.5, 1.5, size=C).astype(np.float32)
bias0 = rng.normal(size=C).astype(np.float32)
mean0 = rng.normal(size=C).astype(np.float32)
var0 = rng.uniform(0.5, 2.0, size=C).astype(np.float32)
first = distributed.process_slice(ndev, info).start
local = slice(first, first + info.local_device_count)


def make_step(mode):
    if mode == "SyncBatchNorm":
        bn = SyncBatchNorm(C, axis_name="batch")
    else:
        bn = NaiveSyncBatchNorm(C, stats_mode=mode, axis_name="batch")

    def step(params, stats, x, mask, cot):
        def loss(params, x):
            y, upd = bn.apply({"params": params, "batch_stats": stats}, x, train=True, mask=mask,
                              mutable=["batch_stats"])
            return jnp.sum(y * cot * mask[:, None, None, None]), (y, upd["batch_stats"])

        (_, (y, new_stats)), (g_params, g_x) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(params, x)
        g_params = jax.lax.psum(g_params, "batch")  # global gradient, as data parallelism sums
        return y, g_x, g_params, new_stats

    return step


params = {"scale": jnp.asarray(scale0), "bias": jnp.asarray(bias0)}
stats = {"mean": jnp.asarray(mean0), "var": jnp.asarray(var0)}
results = {}
mesh = Mesh(np.array(jax.devices()), ("batch",))
for name, (mode, counts) in CASES.items():
    mask_global = np.array([[i < n for i in range(B)] for n in counts])
    step = make_step(mode)

    # pmap over the local devices; the axis spans all processes' devices.
    p_step = jax.pmap(step, axis_name="batch", in_axes=(None, None, 0, 0, 0))
    y, g_x, g_p, new_stats = p_step(params, stats, x_global[local], mask_global[local],
                                    cot_global[local])
    gathered = multihost_utils.process_allgather((y, g_x), tiled=False)
    results[f"{name}/pmap/y"] = np.asarray(gathered[0]).reshape(x_global.shape)
    results[f"{name}/pmap/grad_x"] = np.asarray(gathered[1]).reshape(x_global.shape)
    for k, v in g_p.items():
        results[f"{name}/pmap/grad_{k}"] = np.asarray(v[0])
    for k, v in new_stats.items():
        results[f"{name}/pmap/{k}"] = np.asarray(v[0])

    # shard_map over a global mesh built from jax.devices().
    sharded = NamedSharding(mesh, P("batch"))

    def to_global(a, sharded=sharded):
        return jax.make_array_from_process_local_data(sharded, a[local], a.shape)

    def per_shard(params, stats, x, mask, cot, step=step):
        y, g_x, g_p, new_stats = step(params, stats, x[0], mask[0], cot[0])
        return y[None], g_x[None], g_p, new_stats

    s_step = jax.jit(jax.shard_map(per_shard, mesh=mesh,
                                   in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
                                   out_specs=(P("batch"), P("batch"), P(), P()), check_vma=False))
    y, g_x, g_p, new_stats = s_step(params, stats, to_global(x_global), to_global(mask_global),
                                    to_global(cot_global))
    y, g_x = multihost_utils.process_allgather((y, g_x), tiled=True)
    results[f"{name}/shard_map/y"] = np.asarray(y)
    results[f"{name}/shard_map/grad_x"] = np.asarray(g_x)
    # replicated outputs: every process holds the whole value
    for k, v in g_p.items():
        results[f"{name}/shard_map/grad_{k}"] = np.asarray(v.addressable_data(0))
    for k, v in new_stats.items():
        results[f"{name}/shard_map/{k}"] = np.asarray(v.addressable_data(0))

if info.is_main:
    np.savez(out_path, x=x_global, cot=cot_global, scale=scale0, bias=bias0, mean=mean0, var=var0,
             **results)
print(f"process {info.process_index}/{info.process_count} done", flush=True)
