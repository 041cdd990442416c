"""Synchronized batch norm train step vs ``torch.nn.BatchNorm2d`` train forward + backward.

One training step: normalized output, updated running statistics, gradients w.r.t. input, scale
and bias of ``sum(y * grad_out)``. Ours runs ``NaiveSyncBatchNorm`` under ``jax.shard_map`` over
all local devices (the global batch split along N, statistics ``psum``-ed); a second row masks
out a quarter of every device's rows (padded per-device batches). A third row runs our
single-device ``BatchNorm2d`` on device 0, the like-for-like comparison with PyTorch. PyTorch runs
``BatchNorm2d`` on one device (its SyncBatchNorm needs a process group; on one device it is the
same computation) in NCHW on the same values.

Sizes, ResNet stage-2 like: CPU ``N=8, C=256, 64x64``; GPU ``N=32, C=256, 100x152``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from detlayers.batch_norm import BatchNorm2d, NaiveSyncBatchNorm
from detlayers.bench import Case


def _problem(n: int, c: int, h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        x=(2.0 * rng.standard_normal((n, h, w, c)) + 1.0).astype(np.float32),
        grad_out=rng.standard_normal((n, h, w, c)).astype(np.float32),
        scale=rng.uniform(0.5, 1.5, (c,)).astype(np.float32),
        bias=rng.standard_normal((c,)).astype(np.float32),
    )


def _train_step(module, masked: bool):
    """(params, stats, x, grad_out, mask) -> (y, new stats, grads w.r.t. params and x)."""

    def step(params, stats, x, grad_out, mask):
        def forward(params, x):
            kwargs = {"mask": mask} if masked else {}
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"], **kwargs)
            return y, updates["batch_stats"]

        y, pullback, new_stats = jax.vjp(forward, params, x, has_aux=True)
        grad_params, grad_x = pullback(grad_out)
        return y, new_stats, grad_params, grad_x

    return step


def _ours_sync(p: dict[str, np.ndarray], masked: bool):
    devices = np.asarray(jax.local_devices())
    mesh = Mesh(devices, ("batch",))
    c = p["x"].shape[-1]
    step = _train_step(NaiveSyncBatchNorm(c), masked)
    mapped = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
            out_specs=(P("batch"), P(), P(), P("batch")),
        )
    )
    batch_sharded = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())
    n = p["x"].shape[0]
    per_device = n // len(devices)
    mask = np.arange(n) % per_device < per_device - per_device // 4
    params = jax.device_put({"scale": p["scale"], "bias": p["bias"]}, replicated)
    stats = jax.device_put(
        {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}, replicated
    )
    x, grad_out, mask = (jax.device_put(a, batch_sharded) for a in (p["x"], p["grad_out"], mask))
    return lambda: mapped(params, stats, x, grad_out, mask)


def _ours_single(p: dict[str, np.ndarray]):
    c = p["x"].shape[-1]
    step = jax.jit(_train_step(BatchNorm2d(c), masked=False))
    dev = jax.devices()[0]
    params = jax.device_put({"scale": p["scale"], "bias": p["bias"]}, dev)
    stats = jax.device_put({"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}, dev)
    x, grad_out = (jax.device_put(p[k], dev) for k in ("x", "grad_out"))
    return lambda: step(params, stats, x, grad_out, None)


def _torch(p: dict[str, np.ndarray], device: str):
    try:
        import torch
    except ImportError:
        return None

    def nchw(a):
        return torch.tensor(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))), device=device)

    c = p["x"].shape[-1]
    bn = torch.nn.BatchNorm2d(c).to(device).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(p["scale"]))
        bn.bias.copy_(torch.tensor(p["bias"]))
    x = nchw(p["x"]).requires_grad_(True)
    grad_out = nchw(p["grad_out"])
    leaves = [x, bn.weight, bn.bias]

    def fwd_bwd():
        out = bn(x)
        return out, torch.autograd.grad(out, leaves, grad_out)

    return fwd_bwd


def cases(platform: str) -> list[Case]:
    """The sync_bn rows for ``platform``: a NaiveSyncBatchNorm train step over all local devices
    (plain and with a 3/4 mask) and a single-device BatchNorm2d step, all against PyTorch's
    BatchNorm2d train step; N is rounded up to a multiple of the device count."""
    n_dev = len(jax.local_devices())
    n, c, h, w = (8, 256, 64, 64) if platform == "cpu" else (32, 256, 100, 152)
    torch_device = "cpu" if platform == "cpu" else "cuda"
    n = -(-n // n_dev) * n_dev  # the global batch splits evenly over the devices
    p = _problem(n, c, h, w)
    try:
        torch_fn = _torch(p, torch_device)
    except Exception:  # torch without the matching device
        torch_fn = None
    size = f"N={n} C={c} {h}x{w}"
    return [
        Case("sync_bn", f"NaiveSyncBN train step {n_dev} dev {size}", _ours_sync(p, False), torch_fn),
        Case("sync_bn", f"NaiveSyncBN train step masked 3/4 {n_dev} dev {size}",
             _ours_sync(p, True), torch_fn),
        Case("sync_bn", f"BatchNorm2d train step 1 dev {size}", _ours_single(p), torch_fn),
    ]
