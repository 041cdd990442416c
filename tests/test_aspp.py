"""detlayers.ASPP against detectron2's ASPP (tests/fixtures/wrappers.npz, aspp/* entries, made by
tools/fixtures/make_wrappers.py with detectron2.layers.ASPP), weights read through
load_torch_state_dict from detectron2's own state-dict names."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_fixture

import detlayers as L

RTOL = ATOL = 1e-5
CASES = ["bn_global", "nonorm_pool", "bn_separable"]


@pytest.fixture(scope="module")
def fx():
    return load_fixture("wrappers.npz", prefix="aspp/")


def build(fx, name, **overrides):
    cfg = json.loads(str(fx[f"aspp/{name}/config"]))
    kwargs = dict(
        norm=cfg["norm"],
        activation=jax.nn.relu,
        pool_kernel_size=cfg["pool_kernel_size"],
        use_depthwise_separable_conv=cfg.get("use_depthwise_separable_conv", False),
    )
    kwargs.update(overrides)
    module = L.ASPP(cfg["in_channels"], cfg["out_channels"], cfg["dilations"], **kwargs)
    prefix = f"aspp/{name}/sd/"
    state_dict = {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}
    x = fx[f"aspp/{name}/x"]
    return module, L.load_torch_state_dict(module, state_dict, x), x


@pytest.mark.parametrize("name", CASES)
def test_aspp_matches_detectron2_in_eval_and_train(fx, name):
    module, variables, x = build(fx, name)
    y = jax.jit(module.apply)(variables, x)
    expected = fx[f"aspp/{name}/y_eval"]
    chex.assert_shape(y, expected.shape)
    chex.assert_type(y, jnp.float32)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    train_apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
    y_train, updates = train_apply(variables, x)
    np.testing.assert_allclose(y_train, fx[f"aspp/{name}/y_train"], rtol=RTOL, atol=ATOL)
    after = f"aspp/{name}/after/"
    for key in (k for k in fx if k.startswith(after)):
        torch_name = key[len(after):]
        path = torch_name.replace("convs.", "convs_").split(".")
        # convs.1.depthwise.norm.running_mean -> batch_stats/convs_1/depthwise/norm/mean
        path = [p for p in path if p]
        leaf = {"running_mean": "mean", "running_var": "var"}[path[-1]]
        node = updates["batch_stats"]
        for p in path[:-1]:
            node = node[p]
        np.testing.assert_allclose(node[leaf], fx[key], rtol=RTOL, atol=ATOL, err_msg=torch_name)


def test_aspp_submodule_names_follow_detectron2():
    module = L.ASPP(4, 3, [1, 2, 3], norm="BN", activation=jax.nn.relu)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 6, 6, 4)))
    params = variables["params"]
    assert set(params) == {"convs_0", "convs_1", "convs_2", "convs_3", "convs_4_1", "project"}
    assert set(params["convs_0"]) == {"kernel", "norm"}  # no bias next to a norm
    assert set(params["convs_4_1"]) == {"kernel", "bias"}  # pooled branch: bias, no norm
    chex.assert_shape(params["project"]["kernel"], (1, 1, 15, 3))
    chex.assert_shape(params["convs_2"]["kernel"], (3, 3, 4, 3))
    np.testing.assert_array_equal(params["convs_4_1"]["bias"], 0.0)  # c2_xavier_fill: zero bias
    bound = np.sqrt(3.0 / 4)  # c2_xavier_fill: U(-sqrt(3/fan_in), sqrt(3/fan_in)), fan_in = 4
    assert float(jnp.abs(params["convs_0"]["kernel"]).max()) <= bound


def test_aspp_rejects_bad_configuration_and_inputs():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="divisible by the shape of inputs"):
        jax.jit(L.ASPP(4, 3, [1, 2, 3], norm="", activation=None, pool_kernel_size=(3, 4)).init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="3 dilations"):
        jax.jit(L.ASPP(4, 3, [1, 2], norm="", activation=None).init)(jax.random.key(0), x)
    module = L.ASPP(4, 3, [1, 2, 3], norm="", activation=None)
    with pytest.raises(ValueError, match="in_channels=4"):
        jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 5)))
    with pytest.raises(ValueError, match="rank 4"):
        jax.jit(module.init)(jax.random.key(0), jnp.zeros((8, 8, 4)))


def test_aspp_dropout_only_in_training_and_scales_kept_values():
    module = L.ASPP(4, 16, [1, 2, 3], norm="", activation=jax.nn.relu, dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    variables = jax.jit(module.init)(jax.random.key(1), x)
    clean = jax.jit(module.apply)(variables, x)  # eval: no dropout, no rng needed
    plain = jax.jit(L.ASPP(4, 16, [1, 2, 3], norm="", activation=jax.nn.relu).apply)(variables, x)
    np.testing.assert_allclose(clean, plain, rtol=RTOL, atol=ATOL)
    train_apply = jax.jit(lambda v, x, key: module.apply(v, x, train=True, rngs={"dropout": key}))
    dropped = train_apply(variables, x, jax.random.key(2))
    kept = np.asarray(dropped) != 0
    live = np.asarray(clean) != 0
    fraction = kept[live].mean()
    assert 0.4 < fraction < 0.6
    np.testing.assert_allclose(np.asarray(dropped)[kept], 2.0 * np.asarray(clean)[kept], rtol=RTOL, atol=ATOL)


def test_aspp_empty_batch_bf16_and_gradients(fx):
    module, variables, x = build(fx, "bn_global")
    apply = jax.jit(module.apply)
    chex.assert_shape(apply(variables, jnp.zeros((0,) + x.shape[1:])), (0,) + x.shape[1:3] + (4,))
    y16 = apply(variables, jnp.asarray(x, jnp.bfloat16))
    chex.assert_type(y16, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y16, np.float32), fx["aspp/bn_global/y_eval"], rtol=0.1, atol=0.1)

    def loss(params):
        y, _ = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(g).all(), path
        assert float(jnp.abs(g).max()) > 0, path
