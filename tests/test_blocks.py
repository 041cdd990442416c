"""detlayers.blocks: DepthwiseSeparableConv2d against detectron2 (tests/fixtures/wrappers.npz,
dsc/* entries from tools/fixtures/make_wrappers.py) and CNNBlockBase.freeze() semantics (frozen
outputs equal the unfrozen eval outputs; frozen parameters get no gradient and never change)."""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_fixture, mse_train_step

import detlayers as L
from detlayers.freeze import frozen_class, masked_optimizer, trainable_mask

RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def fx():
    return load_fixture("wrappers.npz", prefix="dsc/")


def test_depthwise_separable_conv_matches_detectron2_in_eval_and_train(fx):
    module = L.DepthwiseSeparableConv2d(
        4, 6, kernel_size=3, padding=2, dilation=2, norm1="BN", activation1=jax.nn.relu, norm2="BN"
    )
    sd = {k[len("dsc/sd/"):]: v for k, v in fx.items() if k.startswith("dsc/sd/")}
    variables = L.load_torch_state_dict(module, sd, fx["dsc/x"])
    # the explicit layouts, independent of the loader's name mapping
    np.testing.assert_array_equal(variables["params"]["depthwise"]["kernel"],
                                  sd["depthwise.weight"].transpose(2, 3, 1, 0))
    chex.assert_shape(variables["params"]["depthwise"]["kernel"], (3, 3, 1, 4))
    y = jax.jit(module.apply)(variables, fx["dsc/x"])
    np.testing.assert_allclose(y, fx["dsc/y_eval"], rtol=RTOL, atol=ATOL)
    train_apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
    y_train, updates = train_apply(variables, fx["dsc/x"])
    np.testing.assert_allclose(y_train, fx["dsc/y_train"], rtol=RTOL, atol=ATOL)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["depthwise"]["norm"]["mean"], fx["dsc/after/depthwise.norm.running_mean"],
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["pointwise"]["norm"]["var"], fx["dsc/after/pointwise.norm.running_var"],
                               rtol=RTOL, atol=ATOL)


def test_depthwise_separable_conv_biases_follow_norms_and_msra_init():
    module = L.DepthwiseSeparableConv2d(64, 32, norm1=None, norm2="BN")
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 5, 5, 64)))["params"]
    assert set(params["depthwise"]) == {"kernel", "bias"}
    assert set(params["pointwise"]) == {"kernel", "norm"}
    np.testing.assert_array_equal(params["depthwise"]["bias"], 0.0)
    # c2_msra_fill: N(0, 2 / fan_out), fan_out = out * kh * kw = 32 for the 1x1 conv
    np.testing.assert_allclose(float(params["pointwise"]["kernel"].std()), np.sqrt(2 / 32), rtol=0.1)


class BasicBlock(L.CNNBlockBase):
    """A ResNet basic block: two 3x3 convs with norms and a projection shortcut."""

    norm: str = dataclasses.field(default="BN", kw_only=True)

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = L.Conv2d(self.in_channels, self.out_channels, 3, stride=self.stride, padding=1, bias=False,
                       norm=self.norm, activation=jax.nn.relu, name="conv1")(x, train=train)
        out = L.Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=False, norm=self.norm,
                       name="conv2")(out, train=train)
        shortcut = L.Conv2d(self.in_channels, self.out_channels, 1, stride=self.stride, bias=False,
                            norm=self.norm, name="shortcut")(x, train=train)
        return jax.nn.relu(out + shortcut)


def _trained_block_variables(block, x):
    """Variables with non-trivial batch-norm affine parameters and running statistics."""
    @jax.jit
    def make():
        variables = block.init(jax.random.key(0), x)
        keys = iter(jax.random.split(jax.random.key(1), 64))

        def perturb(path, leaf):
            name = path[-1].key
            noise = jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
            return leaf * noise if name in ("scale", "var") else leaf + 0.3 * (noise - 1.0)

        return jax.tree_util.tree_map_with_path(perturb, variables)

    return make()


def test_freeze_keeps_eval_outputs_and_makes_training_use_running_stats():
    block = BasicBlock(3, 8, 2)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    variables = _trained_block_variables(block, x)
    frozen, frozen_vars = block.freeze(variables)
    assert frozen.frozen and isinstance(frozen, BasicBlock) and frozen.norm == "FrozenBN"
    assert not block.frozen and block.norm == "BN"  # the original is untouched
    assert "norm" not in frozen_vars["params"]["conv1"]
    assert set(frozen_vars["batch_stats"]["conv1"]["norm"]) == {"scale", "bias", "mean", "var"}
    reference = jax.jit(block.apply)(variables, x)
    np.testing.assert_allclose(jax.jit(frozen.apply)(frozen_vars, x), reference, rtol=1e-6, atol=1e-6)
    train_apply = jax.jit(lambda v, x: frozen.apply(v, x, train=True, mutable=["batch_stats"]))
    y_train, updates = train_apply(frozen_vars, x)
    np.testing.assert_allclose(y_train, reference, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(updates["batch_stats"], frozen_vars["batch_stats"])


def test_frozen_block_parameters_get_zero_gradients():
    block = BasicBlock(3, 4, 1)
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    frozen, frozen_vars = block.freeze(jax.jit(block.init)(jax.random.key(0), x))

    def loss(params, x):
        return jnp.sum(frozen.apply({**frozen_vars, "params": params}, x) ** 2)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(frozen_vars["params"], x)
    for leaf in jax.tree.leaves(g_params):
        np.testing.assert_array_equal(leaf, 0.0)
    assert float(jnp.abs(g_x).max()) > 0  # gradients still flow through to the input


class TwoStageNet(nn.Module):
    """A frozen stem block (detectron2's freeze_at) followed by a trainable block and a head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem = frozen_class(BasicBlock)(3, 8, 1, norm="FrozenBN", frozen=True, name="stem")
        x = stem(x, train=train)
        x = BasicBlock(8, 8, 1, norm="BN", name="res2")(x, train=train)
        return L.Conv2d(8, 1, 1, name="head")(x)


def test_masked_optimizer_trains_the_model_and_leaves_frozen_block_unchanged():
    net = TwoStageNet()
    x = jax.random.normal(jax.random.key(4), (4, 6, 6, 3))
    target = jnp.tanh(x[..., :1] - x[..., 2:3])
    variables = jax.jit(net.init)(jax.random.key(5), x)
    params, stats = variables["params"], variables["batch_stats"]
    mask = trainable_mask(net, params, x)
    assert not any(jax.tree.leaves(mask["stem"])) and all(jax.tree.leaves(mask["res2"]))
    tx = masked_optimizer(optax.adamw(0.02, weight_decay=0.1), mask)
    opt_state = tx.init(params)

    step = mse_train_step(net, x, target, tx)

    new_params, new_stats, state, first = params, stats, opt_state, None
    for _ in range(40):
        new_params, new_stats, state, loss = step(new_params, new_stats, state)
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first
    chex.assert_trees_all_equal(new_params["stem"], params["stem"])
    chex.assert_trees_all_equal(new_stats["stem"], stats["stem"])
    assert not np.array_equal(new_params["res2"]["conv1"]["kernel"], params["res2"]["conv1"]["kernel"])
