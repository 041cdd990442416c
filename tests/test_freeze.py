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
from detlayers.freeze import frozen_class, masked_optimizer, prefix_trainable_mask

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


# ---------------------------------------------------------------------------------------------
# the field walk: norms in fields of any name, lists of them, and norms that must stay
# ---------------------------------------------------------------------------------------------
class MixedNorms(nn.Module):
    """Batch norms chosen through fields not called ``norm``, a tuple of names, a norm module in
    a field named ``bn``, a non-batch norm and an already frozen one."""

    shortcut_norm: str = "BN"
    head_norm: str = "LN"  # not a batch norm: stays
    stage_norms: tuple[str, ...] = ("SyncBN", "", "FrozenBN")
    bn: nn.Module | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = L.Conv2d(4, 4, 1, bias=False, norm=self.shortcut_norm, name="shortcut")(x, train=train)
        x = L.Conv2d(4, 4, 1, bias=False, norm=self.head_norm, name="head")(x, train=train)
        for i, norm in enumerate(self.stage_norms):
            x = L.Conv2d(4, 4, 1, bias=False, norm=norm, name=f"stage_{i}")(x, train=train)
        return self.bn(x, train=train)


def _perturbed(variables, seed=0):
    """Non-trivial statistics and affine parameters, so a moved or reset value shows."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def perturb(path, leaf):
        noise = jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
        return leaf * noise if path[-1].key in ("scale", "var") else leaf + (noise - 1.0)

    return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.fixture(scope="module")
def mixed():
    module = MixedNorms(bn=L.BatchNorm2d(4, eps=1e-3))
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    variables = _perturbed(jax.jit(module.init)(jax.random.key(0), x))
    return module, variables, x, jax.jit(module.apply)(variables, x)


@pytest.mark.parametrize("exact", [False, True], ids=["structural", "with_example_inputs"])
def test_batch_norms_in_fields_of_any_name_are_converted_and_nothing_else(mixed, exact):
    module, variables, x, y_eval = mixed
    frozen, frozen_vars = L.convert_frozen_batchnorm(module, variables, *((x,) if exact else ()))
    assert frozen.shortcut_norm == "FrozenBN"
    assert frozen.head_norm == "LN"
    assert frozen.stage_norms == ("FrozenBN", "", "FrozenBN") and type(frozen.stage_norms) is tuple
    assert isinstance(frozen.bn, L.FrozenBatchNorm2d) and frozen.bn.eps == 1e-3
    for name in ("shortcut", "stage_0"):
        assert set(frozen_vars["batch_stats"][name]["norm"]) == {"scale", "bias", "mean", "var"}
        for leaf in ("scale", "bias"):
            assert frozen_vars["batch_stats"][name]["norm"][leaf] is variables["params"][name]["norm"][leaf]
        assert "norm" not in frozen_vars["params"][name]
    chex.assert_trees_all_equal(frozen_vars["params"]["head"], variables["params"]["head"])  # LN keeps its params
    # the frozen BN's values stay as they are (none reset to ones/zeros)
    chex.assert_trees_all_equal(frozen_vars["batch_stats"]["stage_2"], variables["batch_stats"]["stage_2"])
    assert set(frozen_vars["batch_stats"]["bn"]) == {"scale", "bias", "mean", "var"}
    assert "bn" not in frozen_vars["params"]
    y = jax.jit(frozen.apply)(frozen_vars, x)
    np.testing.assert_allclose(y, y_eval, rtol=1e-6, atol=1e-6)
    y_train, updates = frozen.apply(frozen_vars, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(updates["batch_stats"], frozen_vars["batch_stats"])


class Wrapper(nn.Module):
    inner: nn.Module

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.inner(x, train=train)


class OnlyABatchNorm(nn.Module):
    bn: nn.Module

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.bn(x, train=train)


def test_params_left_empty_by_the_move_are_removed_up_the_tree():
    module = Wrapper(OnlyABatchNorm(L.BatchNorm2d(4)))
    x = jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
    variables = _perturbed(jax.jit(module.init)(jax.random.key(0), x))
    frozen, frozen_vars = L.convert_frozen_batchnorm(module, variables)
    assert frozen_vars["params"] == {}
    assert set(frozen_vars["batch_stats"]["inner"]["bn"]) == {"scale", "bias", "mean", "var"}
    np.testing.assert_allclose(frozen.apply(frozen_vars, x), module.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_frozen_class_is_idempotent_and_keeps_batch_statistics_mutable():
    frozen_conv = frozen_class(L.Conv2d)
    assert frozen_class(frozen_conv) is frozen_conv and frozen_class(L.Conv2d) is frozen_conv
    assert issubclass(frozen_conv, L.Conv2d) and frozen_conv.__name__ == "Conv2d"
    x = jax.random.normal(jax.random.key(3), (4, 3, 3, 2))
    plain, stopped = L.Conv2d(2, 3, 1, bias=False, norm="BN"), frozen_conv(2, 3, 1, bias=False, norm="BN")
    variables = jax.jit(plain.init)(jax.random.key(0), x)
    want, want_updates = plain.apply(variables, x, train=True, mutable=["batch_stats"])
    got, got_updates = stopped.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(got_updates, want_updates, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got_updates["batch_stats"]["norm"]["mean"], variables["batch_stats"]["norm"]["mean"])


# ---------------------------------------------------------------------------------------------
# prefix masks: whole names, list elements, and prefixes that match nothing
# ---------------------------------------------------------------------------------------------
def _leaf():
    return {"kernel": jnp.ones((1, 1))}


def test_prefix_components_match_whole_names_and_list_elements_only():
    params = {"backbone": {name: _leaf() for name in (
        "stem", "res2", "res2_0", "res2_11", "res20", "res2a", "res2_b", "layer1", "layer1_0_1", "layer10")},
              "res2": _leaf(), "head": _leaf()}
    mask = prefix_trainable_mask(params, ["backbone/stem", ("backbone", "res2"), "backbone/layer1"])
    frozen = {name for name, leaf in mask["backbone"].items() if not leaf["kernel"]}
    assert frozen == {"stem", "res2", "res2_0", "res2_11", "layer1", "layer1_0_1"}
    assert mask["res2"]["kernel"] and mask["head"]["kernel"]  # a prefix is anchored at the top
    top_only = prefix_trainable_mask(params, ["res2"])
    assert not top_only["res2"]["kernel"] and all(leaf["kernel"] for leaf in top_only["backbone"].values())
    assert prefix_trainable_mask(params, ["backbone/res2_0"])["backbone"]["res2_11"]["kernel"]


@pytest.mark.parametrize(("prefix", "message"), [
    ("backbone/res6", r"'backbone/res6' matches no parameter: backbone has no 'res6' \(names there: res2_0, stem\)"),
    ("stem", r"'stem' matches no parameter: the top level has no 'stem' \(names there: backbone, head\)"),
    ("backbone/stem/kernel/x", r"goes below a parameter \(backbone/stem/kernel is an array\)"),
])
def test_prefix_that_matches_nothing_is_refused(prefix, message):
    params = {"backbone": {"stem": _leaf(), "res2_0": _leaf()}, "head": _leaf()}
    with pytest.raises(ValueError, match=message):
        prefix_trainable_mask(params, ["head", prefix])


def test_freeze_at_2_prefixes_freeze_detectron2s_stem_and_res2_on_the_resnet():
    # detectron2's FREEZE_AT = 2 freezes backbone.bottom_up.{stem, res2}.*: the same parameters,
    # named by their detectron2 keys (torch_weights' mapping), must be the frozen ones here
    from detlayers.models.backbone.resnet import ResNet
    from detlayers.torch_weights import flax_name_to_torch

    net = ResNet(depth=18, norm="BN", stem_out_channels=8, res2_out_channels=8, out_features=("res3",))
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    mask = prefix_trainable_mask(params, ["stem", "res2"])
    checked = 0
    for path, trainable in jax.tree_util.tree_leaves_with_path(mask):
        torch_key = ".".join(flax_name_to_torch(k.key) for k in path)
        assert trainable == (not torch_key.startswith(("stem.", "res2."))), torch_key
        checked += 1
    assert checked == 30 and any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
