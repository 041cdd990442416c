"""Single-device normalization layers against PyTorch / detectron2 references.

References: ``tests/fixtures/norms.npz`` made by ``tools/fixtures/make_norms.py`` from
``torch.nn.BatchNorm2d``/``BatchNorm1d``/``GroupNorm`` and detectron2's ``FrozenBatchNorm2d``,
``LayerNorm`` and ``CycleBatchNormList`` (computed in float64 from the stored float32 inputs).
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, load_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from detlayers.batch_norm import (
    BatchNorm2d,
    CycleBatchNormList,
    FrozenBatchNorm2d,
    GroupNorm,
    LayerNorm,
    NaiveSyncBatchNorm,
    RunningStats,
    SyncBatchNorm,
    batch_moments,
    get_norm,
    update_running_stats,
)

RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return load_fixture("norms.npz")


def torch_params(ref, prefix):
    return {"scale": jnp.asarray(ref[f"{prefix}/weight"]), "bias": jnp.asarray(ref[f"{prefix}/bias"])}


def run_bn_steps(ref, prefix, module, affine=True):
    """Train ``module`` on ``x0, x1, ...`` and compare outputs/running stats step by step."""
    x0 = jnp.asarray(ref[f"{prefix}/x0"])
    variables = module.init(jax.random.PRNGKey(0), x0)
    if affine:
        variables = {**variables, "params": torch_params(ref, prefix)}
    chex.assert_trees_all_equal(
        variables["batch_stats"],
        {"mean": np.zeros(module.num_features, np.float32), "var": np.ones(module.num_features, np.float32)},
    )
    k = 0
    while f"{prefix}/x{k}" in ref:
        y, updates = module.apply(variables, jnp.asarray(ref[f"{prefix}/x{k}"]), train=True,
                                  mutable=["batch_stats"])
        variables = {**variables, **updates}
        chex.assert_type(y, jnp.float32)
        assert_close(y, ref[f"{prefix}/y{k}"])
        assert_close(variables["batch_stats"]["mean"], ref[f"{prefix}/mean{k}"])
        assert_close(variables["batch_stats"]["var"], ref[f"{prefix}/var{k}"])
        k += 1
    assert k >= 2
    y_eval = module.apply(variables, jnp.asarray(ref[f"{prefix}/x_eval"]))
    assert_close(y_eval, ref[f"{prefix}/y_eval"])


def test_batch_norm_train_steps_and_eval_match_torch(ref):
    run_bn_steps(ref, "bn", BatchNorm2d(8, momentum=0.3))


def test_batch_norm_without_affine_matches_torch_and_has_no_params(ref):
    module = BatchNorm2d(8, affine=False)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(ref["bn_noaffine/x0"]))
    assert "params" not in variables
    run_bn_steps(ref, "bn_noaffine", module, affine=False)


def test_batch_norm_on_rank2_input_matches_torch_batchnorm1d(ref):
    run_bn_steps(ref, "bn1d", BatchNorm2d(6))


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval_too(ref):
    module = BatchNorm2d(8, track_running_stats=False)
    x = jnp.asarray(ref["bn_notrack/x"])
    variables = module.init(jax.random.PRNGKey(0), x)
    assert "batch_stats" not in variables
    variables = {"params": torch_params(ref, "bn_notrack")}
    assert_close(module.apply(variables, x, train=True), ref["bn_notrack/y_train"])
    assert_close(module.apply(variables, x, train=False), ref["bn_notrack/y_eval"])


def test_batch_norm_train_with_immutable_stats_normalizes_without_updating(ref):
    module = BatchNorm2d(8, momentum=0.3)
    x0 = jnp.asarray(ref["bn/x0"])
    variables = {**module.init(jax.random.PRNGKey(0), x0), "params": torch_params(ref, "bn")}
    y = module.apply(variables, x0, train=True)  # batch_stats not mutable: no write, no error
    assert_close(y, ref["bn/y0"])


def test_batch_norm_init_with_train_true_leaves_fresh_stats(ref):
    module = BatchNorm2d(8)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(ref["bn/x0"]), train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(8))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(8))


def test_batch_norm_works_under_jit_and_grad_matches_finite_difference(ref):
    module = BatchNorm2d(8, momentum=0.3)
    x = jnp.asarray(ref["bn/x0"])[:2, :3, :3]
    variables = {**module.init(jax.random.PRNGKey(0), x), "params": torch_params(ref, "bn")}
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)

    @jax.jit
    def loss(x):
        y, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * weights)

    grad = np.asarray(jax.grad(loss)(x), np.float64)
    # central differences in float64 NumPy on an independent BatchNorm formula
    x64 = np.asarray(x, np.float64)
    w, b = np.asarray(ref["bn/weight"], np.float64), np.asarray(ref["bn/bias"], np.float64)

    def np_loss(v):
        mean = v.mean(axis=(0, 1, 2))
        var = v.var(axis=(0, 1, 2))
        return np.sum(((v - mean) / np.sqrt(var + 1e-5) * w + b) * np.asarray(weights, np.float64))

    for idx in [(0, 0, 0, 0), (1, 2, 1, 3), (0, 1, 2, 7)]:
        step = np.zeros_like(x64)
        step[idx] = 1e-5
        fd = (np_loss(x64 + step) - np_loss(x64 - step)) / 2e-5
        np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-3)


def test_batch_norm_under_vmap_matches_per_example_calls(ref):
    module = BatchNorm2d(8)
    x = jnp.asarray(ref["bn/x0"])  # [4,5,6,8]: vmap over a leading axis of 2 batches of 2
    stacked = x.reshape(2, 2, 5, 6, 8)
    variables = module.init(jax.random.PRNGKey(0), x)
    apply = functools.partial(module.apply, variables, train=True)
    batched = jax.vmap(apply)(stacked)
    for i in range(2):
        np.testing.assert_allclose(batched[i], apply(stacked[i]), rtol=1e-6, atol=1e-6)


def test_batch_norm_accepts_bf16_and_f16_with_float32_statistics(ref):
    module = BatchNorm2d(8, momentum=0.3)
    x = jnp.asarray(ref["bn/x0"])
    variables = {**module.init(jax.random.PRNGKey(0), x), "params": torch_params(ref, "bn")}
    for dtype, tol in [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)]:
        y, updates = module.apply(variables, x.astype(dtype), train=True, mutable=["batch_stats"])
        chex.assert_type(y, dtype)
        chex.assert_type(updates["batch_stats"]["mean"], jnp.float32)
        chex.assert_type(updates["batch_stats"]["var"], jnp.float32)
        # reference computed on the rounded input, so only the output rounding remains
        y32, up32 = module.apply(variables, x.astype(dtype).astype(jnp.float32), train=True,
                                 mutable=["batch_stats"])
        np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=tol, atol=tol)
        np.testing.assert_allclose(updates["batch_stats"]["var"], up32["batch_stats"]["var"], rtol=1e-5)
        y_eval = module.apply(variables, x.astype(dtype))
        chex.assert_type(y_eval, dtype)


def test_batch_norm_empty_batch_returns_empty_and_keeps_stats():
    module = BatchNorm2d(4)
    x = jnp.zeros((0, 3, 3, 4))
    variables = module.init(jax.random.PRNGKey(0), x)
    y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_shape(y, (0, 3, 3, 4))
    chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("unbiased", [True, False])
def test_update_running_stats_moves_only_when_the_real_count_is_positive(unbiased):
    """The documented rule: ``r += momentum * (batch - r)``, and nothing at all when count == 0."""
    running_mean = jnp.array([0.5, -1.0], jnp.float32)
    running_var = jnp.array([2.0, 3.0], jnp.float32)
    mean, var = jnp.array([4.0, 5.0]), jnp.array([6.0, 7.0])
    kept = update_running_stats(running_mean, running_var, mean, var, jnp.float32(0), 0.1,
                                unbiased=unbiased)
    chex.assert_trees_all_equal(kept, RunningStats(running_mean, running_var))
    moved = update_running_stats(running_mean, running_var, mean, var, jnp.float32(4), 0.1,
                                 unbiased=unbiased)
    factor = 4 / 3 if unbiased else 1.0
    np.testing.assert_allclose(moved.mean, [0.9 * 0.5 + 0.4, 0.9 * -1.0 + 0.5], rtol=1e-6)
    np.testing.assert_allclose(moved.var, [0.9 * 2.0 + 0.6 * factor, 0.9 * 3.0 + 0.7 * factor],
                               rtol=1e-6)


def test_batch_moments_names_its_statistics_and_leaves_out_masked_rows():
    x = np.random.default_rng(7).standard_normal((5, 3, 2, 4)) * 3 + 2
    x[3:] = np.nan  # padded rows: must not reach the statistics
    moments = batch_moments(jnp.asarray(x, jnp.float32), mask=jnp.array([True, True, True, False, False]))
    np.testing.assert_allclose(moments.mean, x[:3].mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(moments.var, x[:3].var(axis=(0, 1, 2)), rtol=1e-5)
    assert float(moments.count) == 3 * 3 * 2


@pytest.mark.parametrize("layer", [BatchNorm2d, SyncBatchNorm, NaiveSyncBatchNorm])
def test_batch_norms_take_pytorch_positional_arguments(layer):
    """``(num_features, eps, momentum, affine, track_running_stats)`` positionally, in the order of
    ``torch.nn.BatchNorm2d`` and of detectron2's ``NaiveSyncBatchNorm`` (a BatchNorm2d subclass)."""
    x = np.random.default_rng(5).standard_normal((3, 2, 2, 8)).astype(np.float32) * 2 + 1
    module = layer(8, 0.5, 0.25, False)  # eps=0.5, momentum=0.25, affine=False
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert "params" not in variables and set(variables["batch_stats"]) == {"mean", "var"}
    # eval with fresh statistics (mean 0, var 1): x / sqrt(1 + eps)
    np.testing.assert_allclose(module.apply(variables, jnp.asarray(x)), x / np.sqrt(1.5), rtol=1e-6)
    _, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.25 * x.astype(np.float64).mean((0, 1, 2)),
                               rtol=1e-5)
    no_running = layer(8, 1e-5, 0.1, True, False)
    assert set(no_running.init(jax.random.PRNGKey(0), jnp.asarray(x))) == {"params"}


def test_naive_sync_batch_norm_extras_are_keyword_only():
    """detectron2: ``NaiveSyncBatchNorm(num_features, eps, momentum, affine, track_running_stats,
    *, stats_mode="")``: its fourth positional argument is ``affine``, and the extras are never
    positional."""
    x = jnp.ones((2, 2, 2, 8))
    assert "params" not in NaiveSyncBatchNorm(8, 1e-5, 0.1, False).init(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match="positional"):
        NaiveSyncBatchNorm(8, 1e-5, 0.1, True, True, "N")
    with pytest.raises(TypeError, match="positional"):
        SyncBatchNorm(8, 1e-5, 0.1, True, True, "data")
    # stats_mode where affine goes (this layer's old order) is refused, not taken as affine=True
    with pytest.raises(TypeError, match=r"NaiveSyncBatchNorm: affine must be a bool, got 'N'.*keyword-only"):
        NaiveSyncBatchNorm(8, 1e-5, 0.1, "N").init(jax.random.PRNGKey(0), x)
    module = NaiveSyncBatchNorm(8, stats_mode="N", axis_name="data")
    assert (module.stats_mode, module.axis_name, module.affine) == ("N", "data", True)


@pytest.mark.parametrize(
    "module",
    [SyncBatchNorm(4), NaiveSyncBatchNorm(4), NaiveSyncBatchNorm(4, stats_mode="N")],
    ids=["SyncBatchNorm", "naive", "naive_N"],
)
def test_batch_norm_with_no_real_example_keeps_running_stats(module):
    """A training step whose mask marks no real example (one device) learns nothing."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 2, 2, 4)) * 5 + 7, jnp.float32)
    stats = {"mean": jnp.array([0.5, -1.0, 2.0, 0.0]), "var": jnp.array([2.0, 3.0, 0.5, 1.0])}
    variables = {"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}, "batch_stats": stats}
    y, updates = module.apply(variables, x, train=True, mask=jnp.zeros(3, bool),
                              mutable=["batch_stats"])
    chex.assert_trees_all_equal(updates["batch_stats"], stats)
    assert np.all(np.isfinite(np.asarray(y)))
    # one real example: the statistics do move (the test above can fail)
    _, moved = module.apply(variables, x, train=True, mask=jnp.array([True, False, False]),
                            mutable=["batch_stats"])
    assert np.all(np.asarray(moved["batch_stats"]["mean"]) != np.asarray(stats["mean"]))


def test_get_norm_group_norm_needs_a_positive_multiple_of_32():
    with pytest.raises(ValueError, match=r"out_channels must be positive, got 0"):
        get_norm("GN", 0)
    with pytest.raises(ValueError, match=r"divisible by 32, got 48"):
        get_norm("GN", 48)
    with pytest.raises(ValueError, match="num_channels must be positive"):
        GroupNorm(1, 0).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 0)))


def test_batch_norm_rejects_bad_inputs():
    module = BatchNorm2d(8)
    with pytest.raises(ValueError, match=r"5 channels.*num_features=8"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 3, 5)))
    with pytest.raises(ValueError, match="rank >= 2"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((8,)))
    with pytest.raises(TypeError, match="floating"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 1, 8)), train=True)


def test_frozen_batch_norm_matches_detectron2(ref):
    module = FrozenBatchNorm2d(8, eps=1e-3)
    x = jnp.asarray(ref["frozen/x"])
    stats = {name: jnp.asarray(ref[f"frozen/{src}"])
             for name, src in [("scale", "weight"), ("bias", "bias"), ("mean", "mean"), ("var", "var")]}
    variables = {"batch_stats": stats}
    assert_close(module.apply(variables, x), ref["frozen/y"])
    y_train, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(y_train, ref["frozen/y"])
    chex.assert_trees_all_equal(updates["batch_stats"], stats)


def test_frozen_batch_norm_fresh_is_exact_identity_and_keeps_all_out_of_params():
    module = FrozenBatchNorm2d(16)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 4, 16)) * 100.0, jnp.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"batch_stats"}
    assert set(variables["batch_stats"]) == {"scale", "bias", "mean", "var"}
    np.testing.assert_allclose(variables["batch_stats"]["var"], np.full(16, 1 - 1e-5, np.float32))
    np.testing.assert_array_equal(module.apply(variables, x), x)
    xb = x.astype(jnp.bfloat16)
    yb = module.apply(variables, xb)
    chex.assert_type(yb, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(xb, np.float32))


@pytest.mark.parametrize("case, groups, channels", [("gn", 32, 64), ("gn_small", 2, 6)])
def test_group_norm_matches_torch(ref, case, groups, channels):
    module = GroupNorm(groups, channels)
    x = jnp.asarray(ref[f"{case}/x"])
    assert_close(module.apply({"params": torch_params(ref, case)}, x), ref[f"{case}/y"])


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(32, 48).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 48)))


def test_layer_norm_normalizes_channels_like_detectron2(ref):
    module = LayerNorm(16)
    x = jnp.asarray(ref["ln/x"])
    variables = module.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]) == {"scale", "bias"}
    assert_close(module.apply({"params": torch_params(ref, "ln")}, x), ref["ln/y"])
    with pytest.raises(ValueError, match="normalized_shape=16"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 8)))


class _CycleUser(nn.Module):
    """Calls one CycleBatchNormList once per input, as a head shared across FPN levels would."""

    @nn.compact
    def __call__(self, xs, train=False):
        cycle = CycleBatchNormList(length=2, num_features=4, momentum=0.2)
        return [cycle(x, train=train) for x in xs]


def test_cycle_batch_norm_list_matches_detectron2_cycle(ref):
    model = _CycleUser()
    xs = [jnp.asarray(ref[f"cycle/x{k}"]) for k in range(4)]
    variables = model.init(jax.random.PRNGKey(0), xs[:1])  # one call creates every position
    stats = variables["batch_stats"]["CycleBatchNormList_0"]
    assert set(stats) == {"bn_0", "bn_1"}
    variables["params"]["CycleBatchNormList_0"] = {
        "scale": jnp.asarray(ref["cycle/weight"]), "bias": jnp.asarray(ref["cycle/bias"])}
    # the Python counter restarts at every apply: two applies of two calls = four detectron2 calls
    for first in (0, 2):
        ys, updates = model.apply(variables, xs[first:first + 2], train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        for k, y in enumerate(ys):
            assert_close(y, ref[f"cycle/y{first + k}"])
    stats = variables["batch_stats"]["CycleBatchNormList_0"]
    for p in range(2):
        assert_close(stats[f"bn_{p}"]["mean"], ref[f"cycle/mean_{p}"])
        assert_close(stats[f"bn_{p}"]["var"], ref[f"cycle/var_{p}"])
    ys = model.apply(variables, [jnp.asarray(ref[f"cycle/xe{k}"]) for k in range(2)])
    for k, y in enumerate(ys):
        assert_close(y, ref[f"cycle/ye{k}"])
    # explicit index picks the same statistics
    cycle = CycleBatchNormList(length=2, num_features=4, momentum=0.2)
    own = {"params": variables["params"]["CycleBatchNormList_0"], "batch_stats": stats}
    y1 = cycle.apply(own, jnp.asarray(ref["cycle/xe1"]), index=1)
    assert_close(y1, ref["cycle/ye1"])
    with pytest.raises(ValueError, match="index"):
        cycle.init(jax.random.PRNGKey(0), xs[0], index=2)


@pytest.mark.parametrize(
    "name, cls, extra",
    [
        ("BN", BatchNorm2d, {}),
        ("SyncBN", SyncBatchNorm, {"axis_name": "batch"}),
        ("FrozenBN", FrozenBatchNorm2d, {}),
        ("GN", GroupNorm, {"num_groups": 32}),
        ("nnSyncBN", SyncBatchNorm, {"axis_name": "batch"}),
        ("naiveSyncBN", NaiveSyncBatchNorm, {"stats_mode": ""}),
        ("naiveSyncBN_N", NaiveSyncBatchNorm, {"stats_mode": "N"}),
        ("LN", LayerNorm, {}),
    ],
)
def test_get_norm_builds_detectron2_layer_for_each_name(name, cls, extra):
    module = get_norm(name, 64)
    assert type(module) is cls
    for attr, value in extra.items():
        assert getattr(module, attr) == value
    assert get_norm(name, 64, name="norm").name == "norm"


def test_get_norm_none_empty_and_unknown():
    assert get_norm(None, 8) is None
    assert get_norm("", 8) is None
    with pytest.raises(ValueError, match=r"unknown norm 'BatchNorm'.*'FrozenBN'.*'naiveSyncBN_N'"):
        get_norm("BatchNorm", 8)
    with pytest.raises(TypeError):
        get_norm(3, 8)


class _ConvLike(nn.Module):
    """A parent that builds its norm the way Conv2d does: get_norm(..., name="norm")."""

    norm: object

    @nn.compact
    def __call__(self, x, train=False):
        return get_norm(self.norm, x.shape[-1], name="norm")(x, train=train)


@pytest.mark.parametrize(
    "norm",
    [
        "BN",
        "GN",
        "FrozenBN",
        functools.partial(GroupNorm, 4),  # accepts name=
        lambda c: BatchNorm2d(c, eps=1e-3),  # no name parameter: copied under the name
    ],
    ids=["BN", "GN", "FrozenBN", "partial", "lambda"],
)
def test_get_norm_names_the_submodule_norm_inside_a_parent(norm):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 32)), jnp.float32)
    variables = _ConvLike(norm).init(jax.random.PRNGKey(1), x)
    for collection in variables.values():
        assert set(collection) == {"norm"}
    y = _ConvLike(norm).apply(variables, x, train=False)
    chex.assert_shape(y, x.shape)


def test_get_norm_calls_a_callable_with_the_channel_count():
    seen = []

    def factory(channels):
        seen.append(channels)
        return LayerNorm(channels)

    module = get_norm(factory, 24)
    assert seen == [24] and isinstance(module, LayerNorm) and module.normalized_shape == 24


@settings(max_examples=4, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)).filter(
        lambda s: s[0] * s[1] * s[2] >= 2),
    loc=st.floats(-5, 5),
    spread=st.floats(0.1, 4),
    momentum=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_norm_train_step_matches_numpy_on_random_shapes(shape, loc, spread, momentum, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * spread + loc).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    module = BatchNorm2d(shape[-1], momentum=momentum)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": np.full(shape[-1], 0.5, np.float32),
                                 "var": np.full(shape[-1], 2.0, np.float32)}}
    y, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    # float64 NumPy: PyTorch's documented BatchNorm train step
    x64 = x.astype(np.float64)
    n = x.size // shape[-1]
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    ref_y = (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias
    assert_close(y, ref_y, rtol=2e-5)
    assert_close(updates["batch_stats"]["mean"], (1 - momentum) * 0.5 + momentum * mean, rtol=2e-5)
    assert_close(updates["batch_stats"]["var"], (1 - momentum) * 2.0 + momentum * var * n / (n - 1),
                 rtol=2e-5)
