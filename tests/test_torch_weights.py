"""load_torch_state_dict on a small detectron2 model (tests/fixtures/checkpoint_tiny.*, made by
tools/fixtures/make_checkpoint.py): a FrozenBN stem, detectron2 BottleneckBlocks with BN and
FrozenBN, detectron2's ASPP, a grouped ConvTranspose2d and a Linear head, rebuilt here from
detlayers layers with detectron2's module names. The Flax outputs must equal PyTorch's."""

from __future__ import annotations

import dataclasses
import pickle

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detlayers as L
from detlayers.torch_weights import flax_name_to_torch, read_state_dict
from helpers import load_fixture

RTOL = ATOL = 1e-5


class BottleneckBlock(L.CNNBlockBase):
    """detectron2's ResNet BottleneckBlock (stride in the 3x3 conv), NHWC."""

    bottleneck_channels: int = dataclasses.field(kw_only=True)
    num_groups: int = dataclasses.field(default=1, kw_only=True)
    norm: str = dataclasses.field(default="BN", kw_only=True)

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = self.bottleneck_channels
        out = L.Conv2d(self.in_channels, b, 1, bias=False, norm=self.norm, name="conv1")(x, train=train)
        out = jax.nn.relu(out)
        out = L.Conv2d(
            b, b, 3, stride=self.stride, padding=1, groups=self.num_groups, bias=False, norm=self.norm, name="conv2"
        )(out, train=train)
        out = jax.nn.relu(out)
        out = L.Conv2d(b, self.out_channels, 1, bias=False, norm=self.norm, name="conv3")(out, train=train)
        if self.in_channels != self.out_channels:
            x = L.Conv2d(
                self.in_channels, self.out_channels, 1, stride=self.stride, bias=False, norm=self.norm, name="shortcut"
            )(x, train=train)
        return jax.nn.relu(out + x)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.relu(L.Conv2d(3, 8, 3, stride=2, padding=1, bias=False, norm="FrozenBN", name="stem")(x, train=train))
        x = BottleneckBlock(8, 16, 1, bottleneck_channels=4, norm="BN", name="res2_0")(x, train=train)
        x = BottleneckBlock(16, 16, 1, bottleneck_channels=4, num_groups=2, norm="FrozenBN", name="res2_1")(x, train=train)
        x = L.ASPP(16, 8, [1, 2, 3], norm="BN", activation=jax.nn.relu, name="aspp")(x, train=train)
        deconv = L.ConvTranspose2d(8, 4, kernel_size=2, stride=2, groups=2, name="deconv")(x)
        logits = L.Linear(8, 3, name="cls")(x.mean(axis=(1, 2)))
        return deconv, logits


@pytest.fixture(scope="module")
def fx():
    return load_fixture("checkpoint_tiny.npz")


@pytest.fixture(scope="module")
def pkl_path(fixtures_dir):
    return fixtures_dir / "checkpoint_tiny.pkl"


@pytest.fixture(scope="module")
def loaded(pkl_path, fx):
    return L.load_torch_state_dict(TinyNet(), pkl_path, fx["x"])


_apply = jax.jit(TinyNet().apply, static_argnames="train")


def test_flax_name_to_torch_maps_list_positions():
    assert flax_name_to_torch("convs_0") == "convs.0"
    assert flax_name_to_torch("convs_4_1") == "convs.4.1"
    assert flax_name_to_torch("res2_0") == "res2.0"
    assert flax_name_to_torch("fpn_lateral2") == "fpn_lateral2"
    assert flax_name_to_torch("project") == "project"


def test_loaded_pkl_model_matches_pytorch_in_eval(loaded, fx):
    deconv, logits = _apply(loaded, fx["x"])
    chex.assert_shape(deconv, fx["deconv_eval"].shape)
    chex.assert_shape(logits, (2, 3))
    np.testing.assert_allclose(deconv, fx["deconv_eval"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(logits, fx["logits_eval"], rtol=RTOL, atol=ATOL)


def test_loaded_pkl_model_matches_pytorch_in_train_with_stat_updates(loaded, fx):
    train_apply = jax.jit(lambda v, x: TinyNet().apply(v, x, train=True, mutable=["batch_stats"]))
    (deconv, logits), updates = train_apply(loaded, fx["x"])
    np.testing.assert_allclose(deconv, fx["deconv_train"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(logits, fx["logits_train"], rtol=RTOL, atol=ATOL)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(
        stats["res2_0"]["conv2"]["norm"]["mean"], fx["after/res2.0.conv2.norm.running_mean"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        stats["aspp"]["project"]["norm"]["var"], fx["after/aspp.project.norm.running_var"], rtol=RTOL, atol=ATOL
    )
    # FrozenBN statistics never move
    np.testing.assert_array_equal(stats["res2_1"]["conv1"]["norm"]["mean"], fx["after/res2.1.conv1.norm.running_mean"])


def test_loaded_variables_have_flax_layouts_and_collections(loaded, pkl_path):
    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    params, stats = loaded["params"], loaded["batch_stats"]
    np.testing.assert_array_equal(params["stem"]["kernel"], sd["stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["cls"]["kernel"], sd["cls.weight"].T)
    np.testing.assert_array_equal(params["aspp"]["convs_4_1"]["bias"], sd["aspp.convs.4.1.bias"])
    chex.assert_shape(params["deconv"]["kernel"], (2, 2, 4, 4))
    # frozen BN: all four arrays in batch_stats, nothing in params
    assert set(stats["stem"]["norm"]) == {"scale", "bias", "mean", "var"}
    assert "norm" not in params["stem"]
    np.testing.assert_array_equal(stats["stem"]["norm"]["scale"], sd["stem.norm.weight"])
    np.testing.assert_array_equal(stats["res2_0"]["conv1"]["norm"]["var"], sd["res2.0.conv1.norm.running_var"])


def test_dict_of_numpy_arrays_loads_the_same_as_the_pkl(loaded, pkl_path, fx):
    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    from_dict = L.load_torch_state_dict(TinyNet(), sd, fx["x"])
    chex.assert_trees_all_equal(from_dict, loaded)


def test_missing_unexpected_and_misshaped_keys_are_all_listed(pkl_path, fx):
    with open(pkl_path, "rb") as f:
        sd = dict(pickle.load(f)["model"])
    del sd["aspp.project.weight"]
    sd["head.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["cls.weight"] = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError) as err:
        L.load_torch_state_dict(TinyNet(), sd, fx["x"])
    message = str(err.value)
    assert "missing keys" in message and "aspp.project.weight" in message
    assert "unexpected keys" in message and "head.extra.weight" in message
    assert "mis-shaped keys" in message and "cls.weight" in message and "(4, 8)" in message


def test_checkpoint_wrappers_and_ddp_prefix_are_unwrapped(pkl_path):
    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    flat = read_state_dict(wrapped)
    assert set(flat) == {k for k in sd if not k.endswith("num_batches_tracked")}


def test_pth_file_loads_through_torch(tmp_path, pkl_path, fx, loaded):
    torch = pytest.importorskip("torch")
    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "iteration": 7}, path)
    from_pth = L.load_torch_state_dict(TinyNet(), path, fx["x"])
    chex.assert_trees_all_equal(from_pth, loaded)
    # torch tensors in a plain dict work too
    from_tensors = L.load_torch_state_dict(TinyNet(), {k: torch.from_numpy(v) for k, v in sd.items()}, fx["x"])
    chex.assert_trees_all_equal(from_tensors, loaded)


def test_bfloat16_input_runs_on_loaded_model(loaded, fx):
    deconv, logits = _apply(loaded, jnp.asarray(fx["x"], jnp.bfloat16))
    chex.assert_type(deconv, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(logits, np.float32), fx["logits_eval"], rtol=0.1, atol=0.1)


def test_flax_sequential_children_map_to_torch_sequential_indices():
    model = nn.Sequential([L.Conv2d(2, 3, 1, norm="BN"), jax.nn.relu, L.Conv2d(3, 4, 3, bias=False)])
    rng = np.random.default_rng(0)
    sd = {
        "0.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
        "0.bias": rng.normal(size=3).astype(np.float32),
        "0.norm.weight": rng.normal(size=3).astype(np.float32),
        "0.norm.bias": rng.normal(size=3).astype(np.float32),
        "0.norm.running_mean": rng.normal(size=3).astype(np.float32),
        "0.norm.running_var": rng.uniform(1, 2, size=3).astype(np.float32),
        "0.norm.num_batches_tracked": np.array(5),
        "2.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    }
    variables = L.load_torch_state_dict(model, sd, jnp.zeros((1, 5, 5, 2)))
    np.testing.assert_array_equal(variables["params"]["layers_2"]["kernel"], sd["2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["layers_0"]["norm"]["var"], sd["0.norm.running_var"])
