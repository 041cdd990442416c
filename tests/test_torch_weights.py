"""load_torch_state_dict on a small detectron2 model (tests/fixtures/checkpoint_tiny.*, made by
tools/fixtures/make_checkpoint.py): a FrozenBN stem, detectron2 BottleneckBlocks with BN and
FrozenBN, detectron2's ASPP, a grouped ConvTranspose2d and a Linear head, rebuilt here from
detlayers layers with detectron2's module names. The Flax outputs must equal PyTorch's."""

from __future__ import annotations

import dataclasses
import pickle
import re
import struct
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_fixture

import detlayers as L
from detlayers.torch_weights import flax_name_to_torch, read_state_dict

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
        stem = L.Conv2d(3, 8, 3, stride=2, padding=1, bias=False, norm="FrozenBN", name="stem")
        x = jax.nn.relu(stem(x, train=train))
        x = BottleneckBlock(8, 16, 1, bottleneck_channels=4, norm="BN", name="res2_0")(x, train=train)
        x = BottleneckBlock(16, 16, 1, bottleneck_channels=4, num_groups=2, norm="FrozenBN",
                            name="res2_1")(x, train=train)
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


# ---------------------------------------------------------------- hostile and damaged files
class _CreatesFile:
    """Unpickling this calls ``callable_(*args)``: the classic pickle code-execution payload."""

    def __init__(self, callable_, args):
        self.callable_, self.args = callable_, args

    def __reduce__(self):
        return self.callable_, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.open", "nested"])
def test_pkl_that_would_run_code_is_refused_before_running_it(tmp_path, payload):
    import os

    marker = tmp_path / "pwned.txt"
    if payload == "os.system":
        evil = _CreatesFile(os.system, (f"touch {marker}",))
        refused = "system"  # posix.system on Linux, nt.system on Windows
    elif payload == "builtins.open":
        evil = _CreatesFile(open, (str(marker), "w"))
        refused = "io.open"  # how pickle names the builtin open
    else:  # hidden inside an otherwise ordinary model-zoo dict
        evil = {"model": {"stem.weight": np.zeros((8, 3, 3, 3), np.float32),
                          "x": _CreatesFile(os.system, (f"touch {marker}",))}}
        refused = "system"
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump(evil if payload == "nested" else {"model": evil}, f, protocol=2)
    # the payload is real: a plain pickle.load creates the file
    with open(path, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=rf"model_final\.pkl.*{refused}.*refused"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=refused):
        L.load_torch_state_dict(TinyNet(), path, np.zeros((1, 16, 16, 3), np.float32))
    assert not marker.exists()


def _real_pkl_bytes(pkl_path):
    return pkl_path.read_bytes()


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_pkl_names_the_path_and_the_expected_format(tmp_path, pkl_path, damage):
    data = _real_pkl_bytes(pkl_path)
    content = {"empty": b"", "truncated": data[: len(data) // 2],
               "random": np.random.default_rng(0).bytes(4096)}[damage]
    path = tmp_path / f"{damage}.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError,
                       match=rf"{damage}\.pkl.*pickled dict of NumPy arrays \(detectron2 model-zoo \.pkl\)"):
        L.load_torch_state_dict(TinyNet(), path, np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_pth_names_the_path_and_the_expected_format(tmp_path, pkl_path, damage):
    torch = pytest.importorskip("torch")
    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    good = tmp_path / "good.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, good)
    data = good.read_bytes()
    content = {"empty": b"", "truncated": data[: len(data) // 2],
               "random": np.random.default_rng(1).bytes(4096)}[damage]
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{damage}\.pth.*PyTorch \.pth/\.pt file"):
        read_state_dict(path)


def test_detectron2_model_zoo_style_pkl_protocol_2_loads(tmp_path, pkl_path, fx, loaded):
    """The model zoo's files: pickle protocol 2 of {"model": {name: ndarray}, "__author__": ...},
    read with encoding latin1 (bytes appear as _codecs.encode calls)."""
    import collections

    with open(pkl_path, "rb") as f:
        sd = pickle.load(f)["model"]
    path = tmp_path / "model_final_280758.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": collections.OrderedDict(sd), "__author__": "Detectron2 Model Zoo",
                     "matching_heuristics": True, "scalar": np.float32(0.5)}, f, protocol=2)
    assert b"_codecs" in path.read_bytes() and b"_reconstruct" in path.read_bytes()
    chex.assert_trees_all_equal(L.load_torch_state_dict(TinyNet(), path, fx["x"]), loaded)
    for protocol in (4, 5):  # what pickle.dump writes today
        with open(path, "wb") as f:
            pickle.dump({"model": sd}, f, protocol=protocol)
        flat = read_state_dict(path)
        assert set(flat) == {k for k in sd if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize(
    "bad, kind",
    [
        (np.array([1, "a", None], dtype=object), "object"),
        (np.array([1 + 2j, 3 + 0j], np.complex64), "complex64"),
        (np.array(["a", "b"]), "<U1"),
    ],
    ids=["object", "complex", "string"],
)
def test_non_numeric_entries_are_refused_not_coerced(tmp_path, bad, kind):
    with pytest.raises(TypeError, match=rf"'stem.norm.bias' has dtype {re.escape(kind)}"):
        read_state_dict({"stem.norm.bias": bad})
    if kind != "object":  # the same through a .pkl file
        path = tmp_path / "bad.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {"stem.norm.bias": bad}}, f, protocol=2)
        with pytest.raises(TypeError, match="stem.norm.bias"):
            read_state_dict(path)


def test_object_array_of_numbers_in_a_pkl_is_refused(tmp_path):
    path = tmp_path / "object.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.array([1.0, 2.0], dtype=object)}}, f, protocol=2)
    with pytest.raises(TypeError, match="'w' has dtype object"):
        read_state_dict(path)


def test_misshaped_kernel_message_compares_shapes_in_one_layout(pkl_path, fx):
    with open(pkl_path, "rb") as f:
        sd = dict(pickle.load(f)["model"])
    sd["stem.weight"] = np.zeros((8, 3, 5, 5), np.float32)  # a 5x5 kernel where 3x3 is needed
    sd["res2.0.conv1.weight"] = np.zeros((4, 8, 1), np.float32)  # wrong rank: no transpose
    with pytest.raises(ValueError) as err:
        L.load_torch_state_dict(TinyNet(), sd, fx["x"])
    message = str(err.value)
    assert ("stem.weight: checkpoint shape (5, 5, 3, 8) after the layout transpose (PyTorch layout "
            "(8, 3, 5, 5)), params/stem/kernel needs (3, 3, 3, 8)") in message
    assert "res2.0.conv1.weight: checkpoint shape (4, 8, 1) (PyTorch layout) has no transpose" in message


def test_frozen_bn_version_1_checkpoint_fills_mean_0_and_var_1_like_detectron2(pkl_path, fx):
    """detectron2's FrozenBatchNorm2d version-1 state dicts lack running_mean/running_var;
    detectron2 loads them as 0 and 1 (reference outputs from detectron2 itself)."""
    with open(pkl_path, "rb") as f:
        sd = dict(pickle.load(f)["model"])
    frozen = [k for k in fx["v1_dropped_keys"]]
    assert frozen and all(k in sd for k in frozen)
    for k in frozen:
        del sd[k]
    variables = L.load_torch_state_dict(TinyNet(), sd, fx["x"])
    stem = variables["batch_stats"]["stem"]["norm"]
    np.testing.assert_array_equal(stem["mean"], np.zeros(8))
    np.testing.assert_array_equal(stem["var"], np.ones(8))  # ones, not 1 - eps
    deconv, logits = _apply(variables, jnp.asarray(fx["x"]))
    np.testing.assert_allclose(deconv, fx["v1_deconv_eval"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(logits, fx["v1_logits_eval"], rtol=RTOL, atol=ATOL)
    # a frozen BN that lost only one statistic is a damaged checkpoint, not version 1
    with open(pkl_path, "rb") as f:
        damaged = dict(pickle.load(f)["model"])
    stem_var = next(k for k in frozen if k.endswith("running_var"))
    del damaged[stem_var]
    with pytest.raises(ValueError, match=r"missing keys:\n  " + re.escape(stem_var)):
        L.load_torch_state_dict(TinyNet(), damaged, fx["x"])
    # a BatchNorm2d (not frozen) without its statistics is still reported missing
    del sd["res2.0.conv1.norm.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys:\n  res2\.0\.conv1\.norm\.running_mean"):
        L.load_torch_state_dict(TinyNet(), sd, fx["x"])


# ---------------------------------------------------------------- pickles that describe too much
def _write_pickle(tmp_path, name: str, payload: bytes):
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def test_pkl_whose_model_entry_is_not_a_dict_names_the_file_and_what_was_expected(tmp_path):
    path = _write_pickle(tmp_path, "listed.pkl", pickle.dumps({"model": [np.zeros(3, np.float32)]}, protocol=2))
    with pytest.raises(TypeError, match=r"listed\.pkl\['model'\] is a list; expected a dict \{parameter name: array\}"):
        read_state_dict(path)
    with pytest.raises(TypeError, match=r"state_dict\['state_dict'\] is a str; expected a dict"):
        read_state_dict({"state_dict": "weights.pth"})
    # a weight that happens to be called "model" is still a weight
    np.testing.assert_array_equal(read_state_dict({"model": np.ones(2)})["model"], np.ones(2))


def test_few_kb_pickle_of_shared_nested_lists_is_refused_before_it_expands(tmp_path):
    row = [0] * 1000
    block = [row] * 1000  # the same list 1000 times: pickle stores it once, then 1000 memo references
    payload = pickle.dumps({"model": {"w": [block] * 10}}, protocol=2)
    assert len(payload) < 5000  # ten million elements once expanded (np.asarray of it: 80 MB)
    path = _write_pickle(tmp_path, "bomb.pkl", payload)
    with pytest.raises(ValueError, match=rf"bomb\.pkl' describes more than 1048576 nested elements in {len(payload)} "
                                         r"bytes \(one object referenced many times"):
        read_state_dict(path)


def test_expansion_check_is_cheap_whatever_the_structure_expands_to():
    from detlayers.torch_weights import _check_pickle_expansion

    level = [0] * 1000
    for _ in range(5):  # 10**15 elements, described by a few thousand objects
        level = [level] * 1000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="describes more than"):
        _check_pickle_expansion({"model": {"w": level}}, "bomb.pkl", 4096)
    assert time.perf_counter() - start < 2.0


def test_shared_references_within_the_budget_load(tmp_path):
    # just under 2**20 elements: 1000 references to one 1000-element row, plus the containers
    payload = pickle.dumps({"model": {"w": [[1] * 1000] * 1000}}, protocol=2)
    weights = read_state_dict(_write_pickle(tmp_path, "shared.pkl", payload))
    np.testing.assert_array_equal(weights["w"], np.ones((1000, 1000)))


def _nested_lists_pickle(depth: int) -> bytes:
    """``{"model": {"w": [[[...]]]}}`` with ``depth`` lists, written opcode by opcode (the pickler
    itself would recurse that deep): EMPTY_LIST ``depth`` times, then APPEND each into the one below."""
    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()  # BINUNICODE

    nested = b"]" * depth + b"a" * (depth - 1)
    return b"\x80\x02}" + text("model") + b"}" + text("w") + nested + b"ss."


def test_deeply_nested_pickle_is_refused(tmp_path):
    ok = pickle.loads(_nested_lists_pickle(3))
    assert ok == {"model": {"w": [[[]]]}}  # the crafted opcodes mean what they say
    path = _write_pickle(tmp_path, "deep.pkl", _nested_lists_pickle(100_000))
    with pytest.raises(ValueError, match=r"deep\.pkl' nests containers more than 100 deep"):
        read_state_dict(path)


def test_pickle_that_contains_itself_is_refused(tmp_path):
    loop = []
    loop.append(loop)
    path = _write_pickle(tmp_path, "loop.pkl", pickle.dumps({"model": {"w": loop}}, protocol=2))
    with pytest.raises(ValueError, match=r"loop\.pkl' holds a list that contains itself"):
        read_state_dict(path)


def test_torch_state_dict_inverts_the_loader_bit_for_bit(loaded, pkl_path, fx):
    """Back to PyTorch: torch's own state dict of TinyNet (grouped transposed convolution, BN,
    FrozenBN, Sequential, linear) with its names and layouts, every array bit for bit."""
    from detlayers.torch_weights import read_state_dict, torch_state_dict

    expected = read_state_dict(pkl_path)  # num_batches_tracked dropped, as torch_state_dict writes none
    state = torch_state_dict(TinyNet(), loaded, fx["x"])
    assert sorted(state) == sorted(expected)
    for name, array in expected.items():
        assert state[name].shape == array.shape, name
        np.testing.assert_array_equal(state[name], array, err_msg=name)


def test_torch_state_dict_refuses_variables_of_another_module(loaded, fx):
    from detlayers.torch_weights import torch_state_dict

    params = dict(loaded["params"])
    del params["cls"]
    with pytest.raises(ValueError, match=r"missing \[\"\['params'\]\['cls'\]"):
        torch_state_dict(TinyNet(), {**loaded, "params": params}, fx["x"])
