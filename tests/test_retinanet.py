"""RetinaNet R50-FPN (``retinanet_R_50_FPN_3x.yaml``) against detectron2's own outputs, plus its
config, decoding and export.

Parity fixtures ``tests/fixtures/retinanet_*.npz`` are written by ``tools/fixtures/make_retinanet.py``
(detectron2 built from source, CPU, both photographs as one batch) from the weights
``retinanet_r50_fpn_state_dict(seed=0, calibration=retinanet_calibration(<Mask R-CNN file>, <the
case's head scales>))``, which the tests regenerate; neither torch nor detectron2 is needed here. Besides the zoo config
at two sizes, one case changes every test-time key (score threshold, candidates per level, NMS
threshold, box-regression weights, detections per image, anchor offset) and one the head
(``NUM_CONVS``, ``NORM`` "GN", ``NUM_CLASSES``).
"""

from __future__ import annotations

import pathlib

import detection_parity as parity
import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MASK_RCNN_CALIBRATION = FIXTURES / "mask_rcnn_bn_calibration.npz"
FPN_LEVELS = ("p3", "p4", "p5", "p6", "p7")


def _merged(cfg, pairs):
    """``cfg`` with ``pairs`` merged in (``merge_from_list`` changes a config in place)."""
    cfg.merge_from_list(list(pairs))
    return cfg



# retinanet_R_50_FPN_3x_config() against detectron2's own flattened config: tests/test_config.py.


# --------------------------------------------------------------------------------------------
# decoding (float64 NumPy derivation)


def test_per_level_topk_above_threshold_and_decoding():
    from detlayers.models.box_regression import Box2BoxTransform
    from detlayers.models.meta_arch.dense_detector import decode_per_level_predictions

    rng = np.random.default_rng(0)
    m, k, topk, thresh = 30, 4, 7, 0.6
    anchors = np.concatenate([rng.uniform(0, 50, (m, 2)), rng.uniform(60, 120, (m, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (1, m, k)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (1, m, 4)).astype(np.float32)
    weights = (2.0, 3.0, 1.5, 0.5)
    boxes, top, classes, valid = jax.device_get(decode_per_level_predictions(
        anchors, jnp.asarray(scores), jnp.asarray(deltas), box2box_transform=Box2BoxTransform(weights),
        score_thresh=thresh, topk_candidates=topk))
    flat = scores[0].reshape(-1).astype(np.float64)
    order = [i for i in np.argsort(-flat, kind="stable") if flat[i] > thresh][:topk]
    assert valid[0].sum() == len(order) and valid[0, :len(order)].all()
    np.testing.assert_array_equal(top[0, :len(order)], flat[order].astype(np.float32))
    np.testing.assert_array_equal(classes[0, :len(order)], np.asarray(order) % k)
    a = anchors[np.asarray(order) // k].astype(np.float64)
    d = deltas[0, np.asarray(order) // k].astype(np.float64) / weights
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + 0.5 * w + d[:, 0] * w, a[:, 1] + 0.5 * h + d[:, 1] * h
    pw, ph = np.exp(d[:, 2]) * w, np.exp(d[:, 3]) * h
    expected = np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], 1)
    np.testing.assert_allclose(boxes[0, :len(order)], expected, rtol=1e-5, atol=1e-3)


def test_unsupported_head_norm_raises_naming_the_key():
    from detlayers.models import build_model, retinanet_R_50_FPN_3x_config

    with pytest.raises(ValueError, match="MODEL.RETINANET.NORM"):
        build_model(_merged(retinanet_R_50_FPN_3x_config(), ["MODEL.RETINANET.NORM", "BN"]))
    with pytest.raises(ValueError, match="MODEL.RETINANET.IN_FEATURES"):
        build_model(_merged(retinanet_R_50_FPN_3x_config(), ["MODEL.RETINANET.IN_FEATURES", ["p2", "p3"]]))


# --------------------------------------------------------------------------------------------
# parity with detectron2

_VARIABLES: dict = {}


def _variables(case: dict):
    from detlayers.models import build_model, load_detectron2_weights, retinanet_R_50_FPN_3x_config
    from detlayers.models.synthetic_weights import retinanet_calibration, retinanet_r50_fpn_state_dict

    kwargs = parity.weights_kwargs(case)
    key = tuple(sorted(kwargs.items()))
    if key not in _VARIABLES:
        head_scales = {k: v for k, v in case.items() if k.startswith("scale.")}
        assert head_scales, "the case stores the head's scale factors"
        state = retinanet_r50_fpn_state_dict(seed=int(case["seed"]), calibration=retinanet_calibration(
            MASK_RCNN_CALIBRATION, head_scales), **kwargs)
        cfg = _merged(retinanet_R_50_FPN_3x_config(), parity.overrides(case))
        _VARIABLES[key] = load_detectron2_weights(build_model(cfg), state)
    return _VARIABLES[key]


def _predictor(case: dict):
    from detlayers.models import Predictor, retinanet_R_50_FPN_3x_config

    cfg = _merged(retinanet_R_50_FPN_3x_config(),
        ["INPUT.MIN_SIZE_TEST", int(case["min_size"]), "INPUT.MAX_SIZE_TEST", int(case["max_size"]),
         *parity.overrides(case)]
    )
    return Predictor(cfg, _variables(case))


@pytest.mark.parametrize("stem", ["retinanet_256", "retinanet_320"])
def test_parity_with_detectron2(stem):
    case = parity.load_case(stem)
    assert not len(case["overrides"])
    checked = parity.check_case(_predictor(case), case, FPN_LEVELS)
    assert sum(checked) >= 100


@pytest.mark.parametrize("stem", ["retinanet_thresholds_256", "retinanet_head_256"])
def test_parity_with_detectron2_non_default_keys(stem):
    case = parity.load_case(stem)
    assert len(case["overrides"])
    parity.check_case(_predictor(case), case)


# --------------------------------------------------------------------------------------------
# export


def _tiny_retinanet():
    """A ResNet-18 RetinaNet with narrow layers (random weights, small image): cheap to compile."""
    from detlayers.models import Predictor, build_model, retinanet_R_50_FPN_3x_config

    cfg = _merged(retinanet_R_50_FPN_3x_config(), [
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.RETINANET.NUM_CLASSES", 5, "MODEL.RETINANET.NUM_CONVS", 1,
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 20, "INPUT.MIN_SIZE_TEST", 0,
    ])
    model = build_model(cfg)
    images = jnp.zeros((1, 64, 96, 3), jnp.float32)
    sizes = jnp.asarray([[60, 90]], jnp.int32)
    # Shapes only (compiling model.init would cost more than the test), values drawn in NumPy:
    # LeCun normal kernels in the backbone, normal ones in the head, zero biases.
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, sizes, sizes)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        if names[-1] == "kernel":
            std = (1.0 / np.prod(leaf.shape[:-1])) ** 0.5
            if "head" in names:  # detectron2's std 0.01, class logits wider so that scores spread
                std = 0.02 if "cls_score" in names else 0.01
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if names[-1] == "var":  # each FrozenBN halves its input: activations stay in range
            return np.full(leaf.shape, 4.0, np.float32)
        if names[-1] == "scale":
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    return Predictor(cfg, variables)


def test_export_round_trip_with_xla_nms():
    from detlayers.models import export_predictor, load_exported

    predictor = _tiny_retinanet()
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    inputs = predictor.inputs([image])
    expected = jax.device_get(predictor.run(*inputs))
    assert 3 <= int(expected["num_instances"][0]) <= 20, "the test model should detect something"
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], None, nms_backend="xla")
    assert "detlayers_" not in exported.mlir_module()
    restored = load_exported(exported.serialize())
    got = jax.device_get(restored.call(*inputs[:3]))
    assert set(got) == set(expected)
    for key in ("num_instances", "valid", "pred_classes"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # baked-in weights are constants XLA may fold: floats agree within the parity bounds
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-2)
