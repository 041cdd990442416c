"""convert_frozen_batchnorm and the optimiser masks of detlayers.freeze.

References: detectron2's ASPP outputs (tests/fixtures/wrappers.npz, tools/fixtures/make_wrappers.py)
for the converted model, and the unconverted model's own eval outputs (freezing must not change
them)."""

from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_fixture

import detlayers as L
from detlayers.freeze import masked_optimizer, prefix_trainable_mask

RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def aspp_case():
    fx = load_fixture("wrappers.npz", prefix="aspp/bn_separable/")
    cfg = json.loads(str(fx["aspp/bn_separable/config"]))
    module = L.ASPP(
        cfg["in_channels"], cfg["out_channels"], cfg["dilations"], norm="BN", activation=jax.nn.relu,
        use_depthwise_separable_conv=True,
    )
    prefix = "aspp/bn_separable/sd/"
    sd = {k[len(prefix):]: v for k, v in fx.items() if k.startswith(prefix)}
    x = fx["aspp/bn_separable/x"]
    return module, L.load_torch_state_dict(module, sd, x), x, fx["aspp/bn_separable/y_eval"]


@pytest.mark.parametrize("exact", [False, True], ids=["structural", "with_example_inputs"])
def test_converted_aspp_keeps_detectron2_eval_output_in_train_mode(aspp_case, exact):
    module, variables, x, y_detectron2 = aspp_case
    args = (x,) if exact else ()
    frozen, frozen_vars = L.convert_frozen_batchnorm(module, variables, *args)
    assert frozen.norm == "FrozenBN" and module.norm == "BN"
    norm = frozen_vars["batch_stats"]["convs_1"]["pointwise"]["norm"]
    assert set(norm) == {"scale", "bias", "mean", "var"}
    assert "norm" not in frozen_vars["params"]["convs_1"]["pointwise"]
    assert "norm" in variables["params"]["convs_1"]["pointwise"]  # input not modified
    np.testing.assert_allclose(jax.jit(frozen.apply)(frozen_vars, x), y_detectron2, rtol=RTOL, atol=ATOL)
    train_apply = jax.jit(lambda v, x: frozen.apply(v, x, train=True, mutable=["batch_stats"]))
    y_train, updates = train_apply(frozen_vars, x)
    np.testing.assert_allclose(y_train, y_detectron2, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_equal(updates["batch_stats"], frozen_vars["batch_stats"])


def test_batch_norm_module_fields_become_frozen_with_their_eps():
    conv = L.Conv2d(3, 4, 3, padding=1, norm=L.BatchNorm2d(4, eps=1e-3), activation=jax.nn.relu)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    variables = jax.jit(conv.init)(jax.random.key(1), x)
    variables = jax.tree.map(lambda a: a + 0.25, variables)  # non-trivial stats and affine
    frozen, frozen_vars = L.convert_frozen_batchnorm(conv, variables, x)
    assert isinstance(frozen.norm, L.FrozenBatchNorm2d) and frozen.norm.eps == 1e-3
    np.testing.assert_allclose(frozen.apply(frozen_vars, x), conv.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_top_level_batch_norm_and_affine_free_batch_norm_convert():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    for bn in (L.BatchNorm2d(4), L.BatchNorm2d(4, affine=False), L.SyncBatchNorm(4),
               L.NaiveSyncBatchNorm(4, stats_mode="N")):
        variables = jax.jit(bn.init)(jax.random.key(1), x)
        variables = {**variables, "batch_stats": jax.tree.map(lambda a: a * 1.5 + 0.1, variables["batch_stats"])}
        frozen, frozen_vars = L.convert_frozen_batchnorm(bn, variables)
        assert isinstance(frozen, L.FrozenBatchNorm2d)
        np.testing.assert_allclose(frozen.apply(frozen_vars, x), bn.apply(variables, x), rtol=1e-6, atol=1e-6)


class HiddenBN(nn.Module):
    """Creates its batch norm inside __call__, out of reach of the field walk."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return L.BatchNorm2d(x.shape[-1], name="bn")(x, train=train)


def test_unreachable_batch_norm_is_reported_when_example_inputs_are_given():
    x = jnp.ones((2, 3, 3, 4))
    variables = jax.jit(HiddenBN().init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="do not match the frozen module"):
        L.convert_frozen_batchnorm(HiddenBN(), variables, x)


def test_prefix_mask_and_masked_adamw_keep_frozen_params_bit_identical():
    params = {"stem": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    mask = prefix_trainable_mask(params, ["stem"])
    assert mask == {"stem": {"kernel": False, "bias": False}, "head": {"kernel": True}}
    tx = masked_optimizer(optax.adamw(0.1, weight_decay=0.5), mask)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["stem"]["kernel"], 1.0)
    np.testing.assert_array_equal(params["stem"]["bias"], 1.0)
    assert float(jnp.abs(params["head"]["kernel"] - 1.0).min()) > 0.1
