"""Synchronized batch norm over 4 and 8 (forced CPU) devices.

``SyncBatchNorm`` (``torch.nn.SyncBatchNorm``) and ``NaiveSyncBatchNorm(stats_mode="N")`` equal
one BatchNorm over the real examples, and so does ``stats_mode=""`` when every device holds the
same number of them. Reference: ``tests/fixtures/norms_sync.npz``
(``tools/fixtures/make_norms.py``): one training step of ``torch.nn.BatchNorm2d(4)`` in float64 on
all 16 real examples concatenated -- its output, the updated running statistics, and the gradients
of ``sum(y * g)`` w.r.t. input, weight and bias. ``NaiveSyncBatchNorm`` writes detectron2's biased
running variance, derived here from the same examples in float64.

The 16 examples are dealt to the devices either evenly (no mask) or unevenly into padded
per-device batches with a ``mask`` (one device may hold none); padded rows hold large finite junk
so that any leak into the statistics would show. Each layout runs under ``jax.pmap`` and under
``jax.shard_map`` on a ``Mesh`` of the first k devices.

``NaiveSyncBatchNorm(stats_mode="")`` with unequal real counts is checked against a float64 NumPy
derivation of detectron2's formula (equal device weights), its gradient by central differences.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, load_fixture
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from detlayers.batch_norm import BatchNorm2d, NaiveSyncBatchNorm, SyncBatchNorm, get_norm

C = 4
# layout name -> (devices, real examples per device, padded per-device batch or None for no mask)
LAYOUTS = {
    "equal4": (4, [4, 4, 4, 4], None),
    "equal8": (8, [2] * 8, None),
    "unequal4": (4, [5, 3, 1, 7], 8),
    "unequal8_with_empty_device": (8, [3, 1, 2, 0, 4, 2, 1, 3], 4),
    "unequal8": (8, [3, 1, 2, 1, 4, 2, 1, 2], 4),
}
# the layouts every count-weighted layer is checked on
EXACT_LAYOUTS = ["equal4", "equal8", "unequal4", "unequal8_with_empty_device"]
PAD_VALUE = 1.0e4
# layer kind -> module; "naive" is detectron2's default stats_mode=""
KINDS = {
    "sync": lambda: SyncBatchNorm(C),
    "naive_N": lambda: NaiveSyncBatchNorm(C, stats_mode="N"),
    "naive": lambda: NaiveSyncBatchNorm(C, stats_mode=""),
}


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


def biased_running_var(ref, momentum=0.1):
    """detectron2's NaiveSyncBatchNorm update from var=1: the biased variance of the examples."""
    return (1 - momentum) + momentum * ref["x"].astype(np.float64).var(axis=(0, 1, 2))


@functools.cache
def pmapped_step(kind, masked):
    module = KINDS[kind]()

    def step(params, stats, x, g, mask):
        y, new_stats, grad_params, grad_x = local_step(module, params, stats, x, g,
                                                       mask if masked else None)
        # pmap leaves per-device parameter grads; their sum is the gradient of the total loss
        return y, new_stats, jax.lax.psum(grad_params, "batch"), grad_x

    return jax.pmap(step, axis_name="batch", in_axes=(None, None, 0, 0, 0))


@functools.cache
def shard_mapped_step(kind, masked, devices):
    module = KINDS[kind]()
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


def run_mapped(kind, mapping, layout, x, g, mask, params, stats):
    """One train step of layer ``kind`` on per-device blocks ``x`` ``[D, B, ...]``: per-device
    ``y`` and ``grad_x`` ``[D, B, ...]``, and the (device-invariant) stats and param grads."""
    devices, _, batch = LAYOUTS[layout]
    masked = batch is not None
    if mapping == "pmap":
        y, new_stats, grad_params, grad_x = pmapped_step(kind, masked)(params, stats, x, g, mask)
        # every device holds the same (global) running stats and param grads
        for tree in (new_stats, grad_params):
            for leaf in jax.tree.leaves(tree):
                chex.assert_shape(leaf, (devices, C))
                np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
        new_stats, grad_params = jax.tree.map(lambda a: a[0], (new_stats, grad_params))
        return y, new_stats, grad_params, grad_x
    batch = x.shape[1]
    flat = lambda a: a.reshape((devices * batch,) + a.shape[2:])  # noqa: E731
    y, new_stats, grad_params, grad_x = shard_mapped_step(kind, masked, devices)(
        params, stats, flat(x), flat(g), flat(mask))
    y, grad_x = (np.asarray(a).reshape((devices, batch) + a.shape[1:]) for a in (y, grad_x))
    return y, new_stats, grad_params, grad_x


@pytest.mark.parametrize(
    "kind, layout",
    [(kind, layout) for kind in ("sync", "naive_N") for layout in EXACT_LAYOUTS]
    # equal device weights are count weights only when every device has the same real count
    + [("naive", "equal4"), ("naive", "equal8")],
)
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_sync_batch_norm_equals_single_batch_norm_on_real_examples(ref, mapping, layout, kind):
    devices, counts, batch = LAYOUTS[layout]
    masked = batch is not None
    batch = batch or counts[0]
    x, mask = deal(ref["x"], counts, batch)
    g, _ = deal(ref["g"], counts, batch)
    params, stats = initial_variables(ref)

    y, new_stats, grad_params, grad_x = run_mapped(kind, mapping, layout, x, g, mask, params, stats)
    expected_var = ref["var"] if kind == "sync" else biased_running_var(ref)

    assert_close(gather_real(y, counts), ref["y"])
    assert_close(new_stats["mean"], ref["mean"])
    assert_close(new_stats["var"], expected_var)
    assert_close(grad_params["scale"], ref["grad_weight"])
    assert_close(grad_params["bias"], ref["grad_bias"])
    assert_close(gather_real(grad_x, counts), ref["grad_x"])
    if masked:  # padded rows get outputs but never gradients
        grad_x = np.asarray(grad_x)
        assert np.all(np.isfinite(np.asarray(y)))
        assert np.all(grad_x[~mask] == 0.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sync_batch_norm_with_no_real_example_anywhere_keeps_stats_and_stays_finite(ref, kind):
    counts = [0] * 4
    x, mask = deal(ref["x"][:0], counts, 2)
    x = x + np.float32(1.0)  # finite junk in every padded row
    g = np.ones_like(x)
    params, stats = initial_variables(ref)
    y, new_stats, grad_params, grad_x = pmapped_step(kind, True)(params, stats, x, g, mask)
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
    module = SyncBatchNorm(C)
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
    assert_close(updates["batch_stats"]["var"], biased_running_var(ref))
    y_sync, updates_sync = SyncBatchNorm(C).apply(variables, jnp.asarray(ref["x"]), train=True,
                                                  mutable=["batch_stats"])
    assert_close(y_sync, ref["y"])
    assert_close(updates_sync["batch_stats"]["var"], ref["var"])
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
    np.testing.assert_allclose(updates["batch_stats"]["var"][0], biased_running_var(ref), rtol=1e-2)


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
    y, new_stats, grad_params, grad_x = pmapped_step("sync", True)(params, stats, x, g, mask)
    ref_y, ref_mean, ref_var, ref_gx, ref_gs, ref_gb = numpy_batch_norm_step(
        real_x, real_g, scale.astype(np.float64), bias.astype(np.float64))
    assert_close(gather_real(y, counts), ref_y, rtol=2e-5)
    assert_close(new_stats["mean"][0], ref_mean, rtol=2e-5)
    assert_close(new_stats["var"][0], ref_var, rtol=2e-5)
    assert_close(gather_real(grad_x, counts), ref_gx, rtol=2e-5)
    assert_close(grad_params["scale"][0], ref_gs, rtol=2e-5)
    assert_close(grad_params["bias"][0], ref_gb, rtol=2e-5)


def detectron2_naive_sync_step(blocks, weights, scale, bias, stats_mode, eps=1e-5, momentum=0.1):
    """Float64 NumPy of detectron2's ``NaiveSyncBatchNorm.forward`` in training over devices
    holding ``blocks`` (each ``[n_d, H, W, C]`` real examples): per-device ``E[x]`` and
    ``E[x^2]``, averaged with equal weight (``""``) or weighted by ``n_d`` (``"N"``),
    ``var = E[x^2] - E[x]^2``, running stats from (0, 1) with the biased ``var``; returns the
    per-device outputs, the running stats and ``sum(y * g)`` for ``weights`` ``g``.

    A device without examples is left out of the equal-weight average (detectron2 asserts there
    is none)."""
    live = [b.astype(np.float64) for b in blocks if b.shape[0]]
    means = np.stack([b.mean(axis=(0, 1, 2)) for b in live])
    meansqrs = np.stack([(b * b).mean(axis=(0, 1, 2)) for b in live])
    device_weights = (np.ones(len(live)) if stats_mode == "" else
                      np.array([b.shape[0] for b in live], np.float64))
    device_weights = device_weights / device_weights.sum()
    mean = device_weights @ means
    var = device_weights @ meansqrs - mean * mean
    ys = [(b - mean) / np.sqrt(var + eps) * scale + bias for b in blocks]
    loss = sum(np.sum(y * w) for y, w in zip(ys, weights))
    return ys, momentum * mean, (1 - momentum) + momentum * var, loss


def central_difference_grad(f, blocks, h=1e-5):
    """d f(blocks) / d blocks by central differences, float64."""
    blocks = [b.astype(np.float64).copy() for b in blocks]
    grads = [np.zeros_like(b) for b in blocks]
    for b, gr in zip(blocks, grads):
        flat, gflat = b.reshape(-1), gr.reshape(-1)
        for i in range(flat.size):
            keep = flat[i]
            flat[i] = keep + h
            up = f(blocks)
            flat[i] = keep - h
            down = f(blocks)
            flat[i] = keep
            gflat[i] = (up - down) / (2 * h)
    return grads


@pytest.mark.parametrize("layout", ["unequal4", "unequal8", "unequal8_with_empty_device"])
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_naive_sync_batch_norm_default_mode_weights_devices_equally_like_detectron2(ref, mapping, layout):
    devices, counts, batch = LAYOUTS[layout]
    x, mask = deal(ref["x"], counts, batch)
    g, _ = deal(ref["g"], counts, batch)
    params, stats = initial_variables(ref)
    y, new_stats, grad_params, grad_x = run_mapped("naive", mapping, layout, x, g, mask, params, stats)

    scale, bias = ref["weight"].astype(np.float64), ref["bias"].astype(np.float64)
    blocks = [x[d, :n] for d, n in enumerate(counts)]
    weights = [g[d, :n].astype(np.float64) for d, n in enumerate(counts)]
    ref_ys, ref_mean, ref_var, _ = detectron2_naive_sync_step(blocks, weights, scale, bias, "")
    # the equal-weight statistics really differ from the count-weighted ones on this layout
    assert np.max(np.abs(ref_var - biased_running_var(ref))) > 1e-3
    assert_close(gather_real(y, counts), np.concatenate(ref_ys))
    assert_close(new_stats["mean"], ref_mean)
    assert_close(new_stats["var"], ref_var)

    def loss(blocks_):
        return detectron2_naive_sync_step(blocks_, weights, scale, bias, "")[3]

    ref_grad_x = central_difference_grad(loss, blocks)
    assert_close(gather_real(grad_x, counts), np.concatenate(ref_grad_x), rtol=2e-5)
    assert np.all(np.asarray(grad_x)[~mask] == 0.0)
    xhat = [(b - (ref_mean / 0.1)) for b in blocks]  # x - mean, with mean = running mean / momentum
    inv_std = 1.0 / np.sqrt((ref_var - 0.9) / 0.1 + 1e-5)
    assert_close(grad_params["scale"], sum(np.sum(w * xc * inv_std, axis=(0, 1, 2))
                                           for w, xc in zip(weights, xhat)))
    assert_close(grad_params["bias"], sum(np.sum(w, axis=(0, 1, 2)) for w in weights))


def test_naive_sync_batch_norm_n_mode_matches_detectron2_formula(ref):
    """The NumPy derivation of detectron2's "N" mode gives the single-BatchNorm fixture's output,
    so the derivation itself is checked against torch."""
    _, counts, batch = LAYOUTS["unequal4"]
    x, _ = deal(ref["x"], counts, batch)
    blocks = [x[d, :n] for d, n in enumerate(counts)]
    zeros = [np.zeros(b.shape) for b in blocks]
    ys, mean, var, _ = detectron2_naive_sync_step(
        blocks, zeros, ref["weight"].astype(np.float64), ref["bias"].astype(np.float64), "N")
    assert_close(np.concatenate(ys), ref["y"])
    assert_close(mean, ref["mean"])
    assert_close(var, biased_running_var(ref))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
def test_sync_batch_norm_inside_other_mapped_axes_raises_naming_both(ref, kind, mapping):
    module = KINDS[kind]()  # axis_name="batch"
    params, stats = initial_variables(ref)
    variables = {"params": params, "batch_stats": stats}
    x = jnp.asarray(ref["x"][:8].reshape(4, 2, 3, 3, C))

    def train_step(x):
        return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    def eval_step(x):
        return module.apply(variables, x)

    if mapping == "pmap":
        def run(fn):
            return jax.pmap(fn, axis_name="data")(x)
    else:
        mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))

        def run(fn):
            return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
                x.reshape((8,) + x.shape[2:]))

    with pytest.raises(ValueError, match=r"mapped axes \('data',\).*axis_name='batch'"):
        run(train_step)
    # eval needs no communication, and axis_name=None asks for per-device statistics explicitly
    chex.assert_shape(run(eval_step), (4, 2, 3, 3, C) if mapping == "pmap" else (8, 3, 3, C))
    local = module.clone(axis_name=None)
    y = run(lambda x: local.apply(variables, x, train=True, mutable=["batch_stats"])[0])
    first = np.asarray(y).reshape(4, 2, 3, 3, C)[0]
    # device 0's output is the local batch norm of its own two examples
    bn = BatchNorm2d(C)
    assert_close(first, bn.apply(variables, x[0], train=True, mutable=["batch_stats"])[0])


@pytest.mark.parametrize("name", ["SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N"])
def test_get_norm_passes_axis_name_to_sync_norms(ref, name):
    module = get_norm(name, C, axis_name="data")
    assert module.axis_name == "data"
    assert get_norm(name, C).axis_name == "batch"
    params, stats = initial_variables(ref)
    counts = [4, 4, 4, 4]
    x, _ = deal(ref["x"], counts, 4)
    y, _ = jax.pmap(
        lambda x: module.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"]),
        axis_name="data",
    )(x)
    assert_close(gather_real(y, counts), ref["y"])


def test_get_norm_ignores_axis_name_for_norms_that_do_not_sync():
    assert isinstance(get_norm("BN", 8, axis_name="data"), BatchNorm2d)
    assert get_norm("GN", 64, axis_name="data").num_groups == 32
    assert get_norm(None, 8, axis_name="data") is None
