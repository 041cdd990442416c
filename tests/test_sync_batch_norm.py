"""NaiveSyncBatchNorm over 4 and 8 (forced CPU) devices equals one BatchNorm over the real examples.

Reference: ``tests/fixtures/norms_sync.npz`` (``tools/fixtures/make_norms.py``): one training step
of ``torch.nn.BatchNorm2d(4)`` in float64 on all 16 real examples concatenated -- its output, the
updated running statistics, and the gradients of ``sum(y * g)`` w.r.t. input, weight and bias.

The 16 examples are dealt to the devices either evenly (no mask) or unevenly into padded
per-device batches with a ``mask`` (one device may hold none); padded rows hold large finite junk
so that any leak into the statistics would show. Each layout runs under ``jax.pmap`` and under
``jax.shard_map`` on a ``Mesh`` of the first k devices, in both ``stats_mode``s.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from detlayers.batch_norm import BatchNorm2d, NaiveSyncBatchNorm
from helpers import assert_close, load_fixture

C = 4
# layout name -> (devices, real examples per device, padded per-device batch or None for no mask)
LAYOUTS = {
    "equal4": (4, [4, 4, 4, 4], None),
    "equal8": (8, [2] * 8, None),
    "unequal4": (4, [5, 3, 1, 7], 8),
    "unequal8_with_empty_device": (8, [3, 1, 2, 0, 4, 2, 1, 3], 4),
}
PAD_VALUE = 1.0e4


@pytest.fixture(scope="module")
def ref():
    return load_fixture("norms_sync.npz")


def deal(array, counts, batch):
    """Split rows of ``array`` into per-device blocks of ``counts``, padded to ``batch`` rows."""
    blocks, masks, start = [], [], 0
    for n in counts:
        block = np.full((batch,) + array.shape[1:], PAD_VALUE, array.dtype)
        block[:n] = array[start:start + n]
        start += n
        blocks.append(block)
        masks.append(np.arange(batch) < n)
    assert start == array.shape[0]
    return np.stack(blocks), np.stack(masks)


def gather_real(per_device, counts):
    return np.concatenate([np.asarray(per_device[d][:n]) for d, n in enumerate(counts)])


def local_step(module, params, stats, x, g, mask):
    """Per-device train step: output, new running stats, grads of the local masked loss."""

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mask=mask, mutable=["batch_stats"])
        real = mask if mask is not None else jnp.ones(x.shape[0], bool)
        contrib = jnp.where(real[:, None, None, None], y * g, 0.0)
        return jnp.sum(contrib), (y, updates["batch_stats"])

    (_, (y, new_stats)), (grad_params, grad_x) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_stats, grad_params, grad_x


@functools.lru_cache(maxsize=None)
def pmapped_step(stats_mode, masked):
    module = NaiveSyncBatchNorm(C, stats_mode=stats_mode)

    def step(params, stats, x, g, mask):
        y, new_stats, grad_params, grad_x = local_step(module, params, stats, x, g,
                                                       mask if masked else None)
        # pmap leaves per-device parameter grads; their sum is the gradient of the total loss
        return y, new_stats, jax.lax.psum(grad_params, "batch"), grad_x

    return jax.pmap(step, axis_name="batch", in_axes=(None, None, 0, 0, 0))


@functools.lru_cache(maxsize=None)
def shard_mapped_step(stats_mode, masked, devices):
    module = NaiveSyncBatchNorm(C, stats_mode=stats_mode)
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("batch",))

    def step(params, stats, x, g, mask):
        # replicated params: shard_map's grad already sums the per-device contributions
        return local_step(module, params, stats, x, g, mask if masked else None)

    mapped = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
        out_specs=(P("batch"), P(), P(), P("batch")),
    )
    return jax.jit(mapped)


def initial_variables(ref):
    params = {"scale": jnp.asarray(ref["weight"]), "bias": jnp.asarray(ref["bias"])}
    stats = {"mean": jnp.zeros(C, jnp.float32), "var": jnp.ones(C, jnp.float32)}
    return params, stats


@pytest.mark.parametrize("stats_mode", ["", "N"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_sync_batch_norm_equals_single_batch_norm_on_real_examples(ref, mapping, layout, stats_mode):
    devices, counts, batch = LAYOUTS[layout]
    masked = batch is not None
    batch = batch or counts[0]
    x, mask = deal(ref["x"], counts, batch)
    g, _ = deal(ref["g"], counts, batch)
    params, stats = initial_variables(ref)

    if mapping == "pmap":
        y, new_stats, grad_params, grad_x = pmapped_step(stats_mode, masked)(params, stats, x, g, mask)
        # every device holds the same (global) running stats and param grads
        for tree in (new_stats, grad_params):
            for leaf in jax.tree.leaves(tree):
                chex.assert_shape(leaf, (devices, C))
                np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
        new_stats, grad_params = jax.tree.map(lambda a: a[0], (new_stats, grad_params))
    else:
        flat = lambda a: a.reshape((devices * batch,) + a.shape[2:])  # noqa: E731
        y, new_stats, grad_params, grad_x = shard_mapped_step(stats_mode, masked, devices)(
            params, stats, flat(x), flat(g), flat(mask))
        y, grad_x = (np.asarray(a).reshape((devices, batch) + a.shape[1:]) for a in (y, grad_x))

    assert_close(gather_real(y, counts), ref["y"])
    assert_close(new_stats["mean"], ref["mean"])
    assert_close(new_stats["var"], ref["var"])
    assert_close(grad_params["scale"], ref["grad_weight"])
    assert_close(grad_params["bias"], ref["grad_bias"])
    assert_close(gather_real(grad_x, counts), ref["grad_x"])
    if masked:  # padded rows get outputs but never gradients
        grad_x = np.asarray(grad_x)
        assert np.all(np.isfinite(np.asarray(y)))
        assert np.all(grad_x[~mask] == 0.0)


def test_sync_batch_norm_with_no_real_example_anywhere_keeps_stats_and_stays_finite(ref):
    counts = [0] * 4
    x, mask = deal(ref["x"][:0], counts, 2)
    x = x + np.float32(1.0)  # finite junk in every padded row
    g = np.ones_like(x)
    params, stats = initial_variables(ref)
    y, new_stats, grad_params, grad_x = pmapped_step("N", True)(params, stats, x, g, mask)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(new_stats["mean"][0], stats["mean"])
    np.testing.assert_array_equal(new_stats["var"][0], stats["var"])
    np.testing.assert_array_equal(grad_x, np.zeros_like(x))
    for leaf in jax.tree.leaves(grad_params):
        np.testing.assert_array_equal(leaf, 0.0)


def test_sync_batch_norm_statistics_ignore_nan_in_padded_rows(ref):
    counts = [5, 3, 1, 7]
    x, mask = deal(ref["x"], counts, 8)
    x[~mask] = np.nan
    module = NaiveSyncBatchNorm(C, stats_mode="N")
    params, stats = initial_variables(ref)
    apply = jax.pmap(
        lambda x, m: module.apply({"params": params, "batch_stats": stats}, x, train=True, mask=m,
                                  mutable=["batch_stats"]),
        axis_name="batch",
    )
    y, updates = apply(x, mask)
    assert_close(gather_real(y, counts), ref["y"])
    assert_close(updates["batch_stats"]["var"][0], ref["var"])


def test_sync_batch_norm_under_named_vmap_equals_single_batch_norm(ref):
    module = NaiveSyncBatchNorm(C)
    params, stats = initial_variables(ref)
    x = ref["x"].reshape(4, 4, 3, 3, C)
    y, updates = jax.vmap(
        lambda x: module.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"]),
        axis_name="batch",
    )(x)
    assert_close(np.asarray(y).reshape(ref["y"].shape), ref["y"])
    assert_close(updates["batch_stats"]["mean"][0], ref["mean"])


def test_sync_batch_norm_without_bound_axis_uses_local_statistics(ref):
    module = NaiveSyncBatchNorm(C)
    params, stats = initial_variables(ref)
    variables = {"params": params, "batch_stats": stats}
    y, updates = module.apply(variables, jnp.asarray(ref["x"]), train=True, mutable=["batch_stats"])
    assert_close(y, ref["y"])
    assert_close(updates["batch_stats"]["var"], ref["var"])
    # with a mask, locally: the same as BatchNorm2d on the real rows only
    x, mask = deal(ref["x"], [16], 20)
    y_masked = module.apply(variables, jnp.asarray(x[0]), train=True, mask=jnp.asarray(mask[0]))
    assert_close(np.asarray(y_masked)[:16], ref["y"])
    # eval uses the running statistics, exactly like BatchNorm2d
    bn = BatchNorm2d(C)
    np.testing.assert_array_equal(
        module.apply({**variables, **updates}, jnp.asarray(ref["x"])),
        bn.apply({**variables, **updates}, jnp.asarray(ref["x"])),
    )


def test_sync_batch_norm_runs_bf16_under_pmap_with_float32_stats(ref):
    counts = [4, 4, 4, 4]
    x, mask = deal(ref["x"], counts, 4)
    module = NaiveSyncBatchNorm(C)
    params, stats = initial_variables(ref)
    y, updates = jax.pmap(
        lambda x: module.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"]),
        axis_name="batch",
    )(jnp.asarray(x, jnp.bfloat16))
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_type(updates["batch_stats"]["var"], jnp.float32)
    np.testing.assert_allclose(np.asarray(gather_real(y, counts), np.float32), ref["y"], rtol=0.05,
                               atol=0.05)
    np.testing.assert_allclose(updates["batch_stats"]["var"][0], ref["var"], rtol=1e-2)


def test_sync_batch_norm_rejects_bad_arguments():
    x = jnp.zeros((4, 2, 2, C))
    with pytest.raises(ValueError, match="stats_mode"):
        NaiveSyncBatchNorm(C, stats_mode="M").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch,\) = \(4,\).*\(3,\)"):
        NaiveSyncBatchNorm(C).init(jax.random.PRNGKey(0), x, train=True, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        NaiveSyncBatchNorm(C).init(jax.random.PRNGKey(0), x, train=True, mask=jnp.ones((4, 1), bool))
    with pytest.raises(TypeError, match="bool"):
        NaiveSyncBatchNorm(C).init(jax.random.PRNGKey(0), x, train=True, mask=jnp.ones(4))
    with pytest.raises(ValueError, match=r"3 channels.*num_features=4"):
        NaiveSyncBatchNorm(C).init(jax.random.PRNGKey(0), jnp.zeros((4, 2, 2, 3)))


def numpy_batch_norm_step(x, g, scale, bias, eps=1e-5, momentum=0.1):
    """Float64 NumPy BatchNorm train step on the real rows ``x`` ``[n, H, W, C]``: output, running
    stats from (0, 1), and the textbook backward of ``sum(y * g)``."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    axes = (0, 1, 2)
    m = x.shape[0] * x.shape[1] * x.shape[2]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    y = xhat * scale + bias
    run_mean = momentum * mean
    run_var = (1 - momentum) + momentum * var * m / max(m - 1, 1)
    grad_scale = np.sum(g * xhat, axis=axes)
    grad_bias = np.sum(g, axis=axes)
    grad_x = scale * inv / m * (m * g - grad_bias - xhat * grad_scale)
    return y, run_mean, run_var, grad_x, grad_scale, grad_bias


@settings(max_examples=8, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=8, max_size=8).filter(lambda c: sum(c) >= 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_sync_batch_norm_random_uneven_split_matches_numpy_batch_norm(counts, seed):
    rng = np.random.default_rng(seed)
    total = sum(counts)
    real_x = (rng.standard_normal((total, 3, 3, C)) * rng.uniform(0.5, 3) + rng.uniform(-3, 3))
    real_g = rng.standard_normal((total, 3, 3, C))
    real_x, real_g = real_x.astype(np.float32), real_g.astype(np.float32)
    scale = rng.uniform(0.5, 1.5, C).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    x, mask = deal(real_x, counts, 4)
    g, _ = deal(real_g, counts, 4)
    params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
    stats = {"mean": jnp.zeros(C, jnp.float32), "var": jnp.ones(C, jnp.float32)}
    y, new_stats, grad_params, grad_x = pmapped_step("N", True)(params, stats, x, g, mask)
    ref_y, ref_mean, ref_var, ref_gx, ref_gs, ref_gb = numpy_batch_norm_step(
        real_x, real_g, scale.astype(np.float64), bias.astype(np.float64))
    assert_close(gather_real(y, counts), ref_y, rtol=2e-5)
    assert_close(new_stats["mean"][0], ref_mean, rtol=2e-5)
    assert_close(new_stats["var"][0], ref_var, rtol=2e-5)
    assert_close(gather_real(grad_x, counts), ref_gx, rtol=2e-5)
    assert_close(grad_params["scale"][0], ref_gs, rtol=2e-5)
    assert_close(grad_params["bias"][0], ref_gb, rtol=2e-5)
