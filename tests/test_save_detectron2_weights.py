"""``save_detectron2_weights``: the ``.pkl`` it writes holds detectron2's state dict.

Torch-free round trip on Mask R-CNN R50-FPN: random variables of the model's shapes are saved
and read back: the file holds exactly detectron2's names and PyTorch-layout shapes (those of
``synthetic_weights.mask_rcnn_r50_fpn_shapes``, checked against detectron2's state dict in
``test_synthetic_weights.py``), and loading it gives the same variables bit for bit. The layouts
themselves are checked against torch's own state dict in ``test_torch_weights.py``. Nothing is
compiled (the model is only traced abstractly).

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
    from detlayers.models import build_model, mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.checkpoint import example_inputs, save_detectron2_weights

    model = build_model(mask_rcnn_R_50_FPN_3x_config())
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs()))
    shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
    # random values (no two variables alike), so any swap or missing transpose changes arrays
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    written = save_detectron2_weights(variables, path, model=model)
    return model, variables, path, written


def test_file_holds_detectron2s_names_and_shapes(saved):
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_shapes

    _, _, path, written = saved
    with open(path, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "detlayers" and payload["matching_heuristics"] is False
    weights = payload["model"]
    expected = mask_rcnn_r50_fpn_shapes()  # detectron2's state dict (checked against detectron2)
    assert sorted(weights) == sorted(expected)
    for name, shape in expected.items():
        assert weights[name].shape == shape and weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(weights[name], written[name], err_msg=name)


def test_reading_the_file_back_gives_the_same_variables(saved):
    from detlayers.models import load_detectron2_weights

    model, variables, path, _ = saved
    again = load_detectron2_weights(model, path)
    flat, tree = jax.tree_util.tree_flatten_with_path(variables)
    flat_again, tree_again = jax.tree_util.tree_flatten_with_path(again)
    assert tree == tree_again
    for (key, a), (_, b) in zip(flat, flat_again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


def test_the_spec_spelling_without_model_writes_the_same_file(saved, tmp_path):
    # save_detectron2_weights(variables, path): the zoo model is recognised from the variables' tree
    from detlayers.models.checkpoint import save_detectron2_weights

    _, variables, _, written = saved
    again = save_detectron2_weights(variables, tmp_path / "again.pkl")
    assert sorted(again) == sorted(written)
    for name in written:
        np.testing.assert_array_equal(again[name], written[name], err_msg=name)


def test_without_model_unknown_variables_ask_for_the_model(saved, tmp_path):
    from detlayers.models.checkpoint import save_detectron2_weights

    _, variables, _, _ = saved
    trimmed = {"params": dict(variables["params"]), "batch_stats": variables["batch_stats"]}
    trimmed["params"]["roi_heads"] = {k: v for k, v in variables["params"]["roi_heads"].items() if k != "box_head"}
    with pytest.raises(ValueError, match="pass model="):
        save_detectron2_weights(trimmed, tmp_path / "w.pkl")
    with pytest.raises(ValueError, match="pass model="):
        save_detectron2_weights({"params": {"conv": {}}}, tmp_path / "w.pkl")


def test_refuses_other_suffixes(saved, tmp_path):
    from detlayers.models.checkpoint import save_detectron2_weights

    model, variables, _, _ = saved
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
