"""``save_detectron2_weights``: the ``.pkl`` it writes holds detectron2's state dict.

Torch-free round trip on Mask R-CNN R50-FPN: the synthetic detectron2 state dict (detectron2's
names, shapes and PyTorch layouts, checked against detectron2 in ``test_synthetic_weights.py``)
is loaded, saved and read back: the file holds exactly detectron2's names with the original
arrays bit for bit (so every transpose is inverted), and loading it again gives the same
variables. Nothing is compiled (the model is only traced abstractly).

That detectron2 itself loads such a file and then predicts detlayers' detections is checked by
``tools/fixtures/make_detectron2_roundtrip.py`` (run with detectron2), whose result is
``tests/fixtures/detectron2_roundtrip.json``.
"""

from __future__ import annotations

import json
import pathlib
import pickle

import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from detlayers.models import build_model, load_detectron2_weights, mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.checkpoint import save_detectron2_weights
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_state_dict

    model = build_model(mask_rcnn_R_50_FPN_3x_config())
    state = mask_rcnn_r50_fpn_state_dict(seed=3)
    # FrozenBN statistics that are not the identity, so a swapped mean/var would show
    rng = np.random.default_rng(0)
    for name in state:
        if name.endswith(("running_mean", "running_var", "norm.weight", "norm.bias")):
            state[name] = rng.uniform(0.5, 2.0, state[name].shape).astype(np.float32)
    variables = load_detectron2_weights(model, state)
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    written = save_detectron2_weights(variables, path, model=model)
    return model, state, variables, path, written


def test_file_is_detectron2s_state_dict_bit_for_bit(saved):
    _, state, _, path, written = saved
    with open(path, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "detlayers" and payload["matching_heuristics"] is False
    weights = payload["model"]
    assert sorted(weights) == sorted(state)
    for name, array in state.items():
        assert weights[name].shape == array.shape, name
        assert weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    assert sorted(written) == sorted(state)


def test_reading_the_file_back_gives_the_same_variables(saved):
    from detlayers.models import load_detectron2_weights

    model, _, variables, path, _ = saved
    again = load_detectron2_weights(model, path)
    flat, tree = jax.tree_util.tree_flatten_with_path(variables)
    flat_again, tree_again = jax.tree_util.tree_flatten_with_path(again)
    assert tree == tree_again
    for (key, a), (_, b) in zip(flat, flat_again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


def test_refuses_other_suffixes(saved, tmp_path):
    from detlayers.models.checkpoint import save_detectron2_weights

    model, _, variables, _, _ = saved
    with pytest.raises(ValueError, match=r"\.pkl"):
        save_detectron2_weights(variables, tmp_path / "w.pth", model=model)


def test_detectron2_loaded_the_file_and_predicted_the_same_detections():
    """Written by tools/fixtures/make_detectron2_roundtrip.py with detectron2."""
    result = json.loads((FIXTURES / "detectron2_roundtrip.json").read_text())
    assert result["missing_keys"] == [] and result["unexpected_keys"] == []
    assert result["num_instances_detectron2"] == result["num_instances_detlayers"] > 0
    assert result["max_box_diff_px"] < 4e-3
    assert result["max_score_diff"] < 1e-4
    assert result["matched"] is True
