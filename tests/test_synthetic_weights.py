"""Synthetic Mask R-CNN weights: detectron2's names/shapes, its init distributions, determinism.

The reference names, shapes and order are detectron2's own ``GeneralizedRCNN.state_dict()``,
recorded in ``tests/fixtures/mask_rcnn_bn_calibration.npz`` by ``tools/fixtures/make_mask_rcnn.py``;
the init distributions are derived here in float64 from the fan-in/fan-out rules detectron2's
constructors use (``c2_msra_fill``, ``c2_xavier_fill``, fixed-std normals).
"""

from __future__ import annotations

import numpy as np
import pytest

from detlayers.models import synthetic_weights as sw

CALIBRATION = "mask_rcnn_bn_calibration.npz"


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    with np.load(fixtures_dir / CALIBRATION) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def plain():
    return sw.mask_rcnn_r50_fpn_state_dict(seed=0)


@pytest.fixture(scope="module")
def calibrated(fixtures_dir):
    return sw.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=fixtures_dir / CALIBRATION)


def test_names_shapes_and_order_are_detectron2s(plain, reference):
    names = [str(n) for n in reference["state_dict_names"]]
    shapes = [tuple(int(d) for d in s[:n])
              for s, n in zip(reference["state_dict_shapes"], reference["state_dict_ndims"])]
    assert len(names) == 307
    assert list(plain) == names
    assert [v.shape for v in plain.values()] == shapes
    assert all(v.dtype == np.float32 for v in plain.values())
    assert sum(v.size for v in plain.values()) == sum(int(np.prod(s)) for s in shapes)
    assert sw.mask_rcnn_r50_fpn_shapes() == dict(zip(names, shapes))


def test_bit_identical_across_calls_and_pinned_values(plain, calibrated, reference):
    again = sw.mask_rcnn_r50_fpn_state_dict(seed=0)
    for k in plain:
        np.testing.assert_array_equal(again[k], plain[k], err_msg=k)
    # Values detectron2 held after loading the generator's output (guards against NumPy changing
    # its sampling algorithms, which would silently invalidate the parity fixtures).
    for name, values in zip(reference["pinned_names"], reference["pinned_values"]):
        np.testing.assert_array_equal(calibrated[str(name)].reshape(-1)[: values.size], values, err_msg=str(name))
    other = sw.mask_rcnn_r50_fpn_state_dict(seed=1)
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert not np.array_equal(other[stem], plain[stem])


def _fans(shape):
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _expected_std(name: str, shape) -> tuple[str, float]:
    fan_in, fan_out = _fans(shape)
    if name.startswith("backbone.bottom_up.") or name.startswith("roi_heads.mask_head.mask_fcn") or name.startswith(
        "roi_heads.mask_head.deconv"
    ):
        return "normal", np.sqrt(2.0 / fan_out)  # c2_msra_fill
    if name.startswith("backbone.fpn_") or name.startswith("roi_heads.box_head.fc"):
        return "uniform", np.sqrt(3.0 / fan_in)  # c2_xavier_fill: the bound
    if name.startswith("proposal_generator.") or name.endswith("cls_score.weight"):
        return "normal", 0.01
    if name.endswith("bbox_pred.weight") or name == "roi_heads.mask_head.predictor.weight":
        return "normal", 0.001
    raise AssertionError(name)


def test_init_distributions(plain):
    checked = 0
    for name, w in plain.items():
        w64 = w.astype(np.float64)
        if name.endswith(".norm.weight"):
            np.testing.assert_array_equal(w, 1.0)
        elif name.endswith((".norm.bias", ".norm.running_mean")) or name.endswith(".bias"):
            np.testing.assert_array_equal(w, 0.0)
        elif name.endswith(".norm.running_var"):
            np.testing.assert_array_equal(w, np.float32(1.0 - 1e-5))  # FrozenBatchNorm2d's init
        else:
            kind, scale = _expected_std(name, w.shape)
            n = w.size
            # The sample std of n draws is within ~5 / sqrt(2n) of the true std (relative).
            tol = 5.0 / np.sqrt(2 * n) + 1e-3
            assert abs(w64.mean()) < 5 * scale / np.sqrt(n) + 1e-9, name
            if kind == "normal":
                assert abs(w64.std() / scale - 1) < tol, (name, w64.std(), scale)
            else:
                assert np.abs(w64).max() <= scale, name
                assert abs(w64.std() / (scale / np.sqrt(3.0)) - 1) < tol, (name, w64.std(), scale)
            checked += 1
    assert checked == 53 + 8 + 3 + 4 + 4 + 1 + 1  # ResNet, FPN, RPN, box head+predictor, mask head


OUTPUT_LAYERS = {
    "proposal_generator.rpn_head.objectness_logits.weight",
    "proposal_generator.rpn_head.anchor_deltas.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.mask_head.predictor.weight",
}


def test_calibration_sets_frozen_bn_statistics_and_scales_output_layers(plain, calibrated, reference):
    stats = [k for k in plain if k.endswith((".norm.running_mean", ".norm.running_var"))]
    assert len(stats) == 2 * 53
    scales = {k[len("scale."):]: reference[k] for k in reference if k.startswith("scale.")}
    assert set(scales) == OUTPUT_LAYERS
    for k in plain:
        if k in stats:
            np.testing.assert_array_equal(calibrated[k], reference[k], err_msg=k)
        elif k in scales:
            assert scales[k].dtype == np.float32 and scales[k] > 1.0  # detectron2's init is too small
            np.testing.assert_array_equal(calibrated[k], plain[k] * scales[k], err_msg=k)
        else:
            np.testing.assert_array_equal(calibrated[k], plain[k], err_msg=k)
    # Calibrated statistics are real activation statistics, not the identity.
    assert (reference["backbone.bottom_up.stem.conv1.norm.running_var"] > 1.0).all()
    assert not np.allclose(reference["backbone.bottom_up.res4.0.conv1.norm.running_mean"], 0.0)


def test_calibration_from_mapping_and_errors(plain, reference):
    stats = {k: v for k, v in reference.items() if k.endswith((".norm.running_mean", ".norm.running_var"))}
    from_mapping = sw.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=stats)
    name = "backbone.bottom_up.res5.2.conv3.norm.running_var"
    np.testing.assert_array_equal(from_mapping[name], stats[name])
    incomplete = dict(stats)
    del incomplete[name]
    with pytest.raises(ValueError, match="missing.*res5.2.conv3.norm.running_var"):
        sw.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=incomplete)
    wrong = dict(stats, **{name: np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"wrong shape.*res5.2.conv3.norm.running_var: \(3,\)"):
        sw.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=wrong)
    misspelt = dict(stats, **{"scale.roi_heads.box_predictor.cls.weight": np.float32(2.0)})
    with pytest.raises(ValueError, match=r"unknown parameters \['roi_heads.box_predictor.cls.weight'\]"):
        sw.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=misspelt)
    scaled = sw.mask_rcnn_r50_fpn_state_dict(
        seed=0, calibration={**stats, "scale.roi_heads.box_head.fc2.weight": np.float32(0.5)}
    )
    np.testing.assert_array_equal(scaled["roi_heads.box_head.fc2.weight"], plain["roi_heads.box_head.fc2.weight"] * 0.5)


def test_num_classes_changes_only_class_dependent_tensors(plain):
    shapes = sw.mask_rcnn_r50_fpn_shapes(num_classes=3)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (4, 1024)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (12, 1024)
    assert shapes["roi_heads.mask_head.predictor.weight"] == (3, 256, 1, 1)
    changed = {k for k, s in shapes.items() if s != plain[k].shape}
    assert changed == {
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias",
    }


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": 1.5}, {"num_classes": 0}, {"num_classes": True}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="seed|num_classes"):
        sw.mask_rcnn_r50_fpn_state_dict(**kwargs)
