"""Rotated Faster R-CNN R50-FPN (``RRPN`` + ``RotatedAnchorGenerator`` + ``RROIHeads``) against
detectron2's own outputs, plus its config, names and errors.

detectron2 has no zoo file for this model: ``detlayers/models/config/rotated_faster_rcnn_R_50_FPN_3x.yaml``
mirrors its rotated tests. Fixtures ``tests/fixtures/rotated_faster_rcnn{,_keys}.npz`` are written by
``tools/fixtures/make_rotated_faster_rcnn.py`` (detectron2 built from source, CPU) from
``synthetic_weights.rotated_faster_rcnn_r50_fpn_state_dict(seed=0, calibration=...)`` (the Mask R-CNN
FrozenBN statistics and the output-layer factors stored in the fixture), which the tests regenerate;
neither torch nor detectron2 is needed. The zoo case is ONE batch of two photographs at two sizes
(chelsea at a short side of 256, coffee at 320), padded to a multiple of 32; compared: a few channels
of p2-p6, every image's rotated RPN proposals and its rotated instances ``(xc, yc, w, h, angle)``, at
the Mask R-CNN test's bounds (``detection_parity``). The ``keys`` case runs the same weights on
the same batch with non-default ``ANCHOR_GENERATOR.ANGLES`` and ``OFFSET``, ``RPN.BBOX_REG_WEIGHTS``,
``ROI_BOX_HEAD.BBOX_REG_WEIGHTS``, ``ROI_BOX_HEAD.POOLER_SAMPLING_RATIO`` and
``PROPOSAL_GENERATOR.MIN_SIZE``; none of them touches the backbone, so only the RPN and the ROI heads
are compiled for it and run on the zoo run's FPN maps. Both keep 100 proposals an image
(``RPN.POST_NMS_TOPK_TEST``, 1000 in the YAML).
"""

from __future__ import annotations

import json
import pathlib

import detection_parity as parity
import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LEVELS = ("p2", "p3", "p4", "p5", "p6")
# One worker builds every predictor of this module, each compiled once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("rotated_faster_rcnn")


def _config():
    from detlayers.models.config import rotated_faster_rcnn_R_50_FPN_3x_config

    return rotated_faster_rcnn_R_50_FPN_3x_config()


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def rotated_variables() -> dict:
    from detlayers.models import build_model, load_detectron2_weights
    from detlayers.models.synthetic_weights import (
        rotated_faster_rcnn_calibration,
        rotated_faster_rcnn_r50_fpn_state_dict,
    )

    case = parity.load_case("rotated_faster_rcnn")
    scales = {k: case[k] for k in case if k.startswith("scale.")}
    assert len(scales) == 4, sorted(scales)
    calibration = rotated_faster_rcnn_calibration(FIXTURES / "mask_rcnn_bn_calibration.npz", scales)
    state = rotated_faster_rcnn_r50_fpn_state_dict(seed=int(case["seed"]), calibration=calibration)
    return load_detectron2_weights(build_model(_config()), state)


def _batch(case: dict, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The case's photographs, each resized to its own size, as one padded batch."""
    from detlayers.models import batch_images, preprocess_image

    photos = [parity.photo_bgr(str(name)) for name in case["image_names"]]
    np.testing.assert_array_equal([p.shape[:2] for p in photos], case["image_hw"])
    resized = []
    for photo, min_size in zip(photos, case["min_sizes"]):
        sized = cfg.clone()
        sized.merge_from_list(["INPUT.MIN_SIZE_TEST", int(min_size), "INPUT.MAX_SIZE_TEST", int(case["max_size"])])
        resized.append(preprocess_image(photo, sized))
    images, image_hw = batch_images(resized, 32)
    np.testing.assert_array_equal(image_hw, case["input_hw"])
    assert tuple(images.shape[1:3]) == tuple(case["padded_hw"])
    return images, image_hw


@pytest.fixture(scope="session")
def zoo_run(rotated_variables) -> tuple[dict, dict]:
    """The YAML's model on the zoo case's batch: ``(case, outputs with intermediates)``."""
    from detlayers.models import Predictor

    case = parity.load_case("rotated_faster_rcnn")
    cfg = _config()
    cfg.merge_from_list(parity.overrides(case))
    predictor = Predictor(cfg, rotated_variables)
    assert predictor.size_divisibility == 32
    images, image_hw = _batch(case, cfg)
    out = predictor.run(images, image_hw, np.asarray(case["image_hw"], np.int32), None, return_intermediates=True)
    return case, jax.device_get(out)


def _check_proposals_and_instances(case: dict, out: dict) -> list[int]:
    """Every image's rotated proposals and instances; returns instances compared per image."""
    assert out["proposal_boxes"].shape[-1] == 5 and out["pred_boxes"].shape[-1] == 5
    starts = np.concatenate([[0], np.cumsum(case["num_proposals"])])
    for i in range(len(case["num_proposals"])):
        parity.check_proposals(out, case["proposal_boxes"][starts[i]:starts[i + 1]],
                               case["proposal_logits"][starts[i]:starts[i + 1]], image=i)
    return parity.check_instances(out, case)


def test_rotated_parity_with_detectron2(zoo_run):
    case, out = zoo_run
    # the case exercises what is rotated: tilted proposals and instances, unclipped boxes reaching
    # outside the image, proposals on several levels
    angles = np.abs(case["pred_boxes"][:, 4])
    assert ((angles > 1) & (angles < 179)).sum() >= 50
    assert (np.abs(case["proposal_boxes"][:, 4]) > 1).sum() >= 50
    parity.check_fpn_levels(out, case, LEVELS)
    checked = _check_proposals_and_instances(case, out)
    assert sum(checked) >= 150, checked


def test_rotated_parity_with_detectron2_non_default_keys(rotated_variables, zoo_run):
    """The same weights (21 anchors a cell still) with other angles, anchor offset, delta weights,
    2x2 samples a bin in ROIAlignRotated and a minimum proposal size. None of them touches the
    backbone, and the batch is the zoo case's: only the RPN, the ROI heads and the rescaling run
    (compiled here), on the zoo run's FPN maps."""
    import flax.linen as nn

    from detlayers.models import build_model
    from detlayers.models.postprocessing import detector_postprocess

    zoo_case, zoo_out = zoo_run
    case = parity.load_case("rotated_faster_rcnn_keys")
    assert {str(k) for k in case["overrides"][2::2]} == {
        "MODEL.ANCHOR_GENERATOR.ANGLES", "MODEL.ANCHOR_GENERATOR.OFFSET", "MODEL.RPN.BBOX_REG_WEIGHTS",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO",
        "MODEL.PROPOSAL_GENERATOR.MIN_SIZE"}
    for key in ("image_names", "min_sizes", "image_hw", "input_hw", "padded_hw"):
        np.testing.assert_array_equal(case[key], zoo_case[key], err_msg=key)
    # detectron2's maps of this run are the zoo run's (same weights, batch and backbone keys)
    for level in LEVELS:
        np.testing.assert_array_equal(case[level], zoo_case[level], err_msg=level)
    cfg = _config()
    cfg.merge_from_list(parity.overrides(case))
    model = build_model(cfg)

    def heads(rcnn, features, image_hw, output_hw):
        proposals, logits, valid = rcnn.proposal_generator(features, image_hw)
        out = detector_postprocess(rcnn.roi_heads(features, proposals, valid, image_hw), image_hw, output_hw, None)
        out.update(proposal_boxes=proposals, proposal_logits=logits, proposal_valid=valid)
        return out

    features = {level: zoo_out[level] for level in LEVELS}
    image_hw = np.asarray(case["input_hw"], np.int32)
    out = jax.jit(nn.apply(heads, model))(rotated_variables, features, image_hw, np.asarray(case["image_hw"], np.int32))
    checked = _check_proposals_and_instances(case, jax.device_get(out))
    assert sum(checked) >= 150, checked


# --------------------------------------------------------------------------------------------
# anchors, config, names and errors (no compile)


def test_rotated_anchors_follow_detectron2s_layout():
    """``RotatedAnchorGenerator``: cell anchors size-, ratio-, then angle-major with detectron2's
    ``w = sqrt(s^2 / r)``, ``h = r * w``; centres ``(offset + j) * stride`` in (y, x, anchor) order."""
    from detlayers.models.anchor_generator import RotatedAnchorGenerator

    gen = RotatedAnchorGenerator(sizes=((32.0, 64.0),), aspect_ratios=((0.5, 2.0),), strides=(8, 16),
                                 angles=((-30.0, 0.0, 45.0),), offset=0.5)
    assert gen.num_anchors == [12, 12] and gen.box_dim == 5
    level0, level1 = gen([(2, 3), (1, 2)])
    assert level0.shape == (2 * 3 * 12, 5) and level1.shape == (2 * 12, 5) and level0.dtype == np.float32
    cell = level0[:12]
    w = np.sqrt(32.0**2 / 0.5)
    np.testing.assert_allclose(cell[0], [4, 4, w, 0.5 * w, -30], rtol=1e-6)
    np.testing.assert_allclose(cell[2], [4, 4, w, 0.5 * w, 45], rtol=1e-6)
    np.testing.assert_allclose(cell[3, 2:4], [np.sqrt(32.0**2 / 2), 2 * np.sqrt(32.0**2 / 2)], rtol=1e-6)
    np.testing.assert_allclose(cell[6, 2], np.sqrt(64.0**2 / 0.5), rtol=1e-6)
    # cell (y=1, x=2) of level 0, cell (0, 1) of level 1
    np.testing.assert_array_equal(level0[5 * 12, :2], [20, 12])
    np.testing.assert_array_equal(level1[12, :2], [24, 8])


def test_config_equals_the_yaml_and_detectron2s_reading_of_it():
    """``rotated_faster_rcnn_R_50_FPN_3x_config()`` equals our ``merge_from_file`` of the committed
    YAML, and that equals detectron2's ``get_cfg().merge_from_file`` of it (stored in the fixture)."""
    from test_config import assert_same_flat, flatten

    from detlayers.models.config import get_cfg
    from detlayers.models.config.zoo import ROTATED_FASTER_RCNN_YAML

    from_file = get_cfg()
    from_file.merge_from_file(str(ROTATED_FASTER_RCNN_YAML))
    assert_same_flat(flatten(_config()), flatten(from_file))
    case = parity.load_case("rotated_faster_rcnn")
    assert_same_flat(flatten(from_file), json.loads(str(case["d2_config_json"])))


def test_parts_follow_the_config():
    from detlayers.models import build_model
    from detlayers.models.anchor_generator import RotatedAnchorGenerator
    from detlayers.models.proposal_generator import RRPN
    from detlayers.models.roi_heads.rotated_fast_rcnn import RotatedFastRCNNOutputLayers, RROIHeads

    cfg = _config()
    cfg.merge_from_list(["MODEL.ANCHOR_GENERATOR.ANGLES", [[0, 45]], "MODEL.RPN.BBOX_REG_WEIGHTS", (2, 2, 1, 1, 3),
                         "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (1, 2, 3, 4, 5)])
    model = build_model(cfg)
    rpn, heads = model.proposal_generator, model.roi_heads
    assert isinstance(rpn, RRPN) and isinstance(heads, RROIHeads)
    assert isinstance(rpn.anchor_generator, RotatedAnchorGenerator) and rpn.anchor_generator.num_anchors == [6] * 5
    assert rpn.rpn_head.num_anchors == 6 and rpn.rpn_head.box_dim == 5
    assert rpn.box2box_transform.weights == (2, 2, 1, 1, 3)
    assert isinstance(heads.box_predictor, RotatedFastRCNNOutputLayers) and heads.box_predictor.box_dim == 5
    assert heads.box_predictor.box2box_transform.weights == (1, 2, 3, 4, 5)
    assert heads.box_pooler.pooler_type == "ROIAlignRotated" and heads.box_pooler.strides == (4, 8, 16, 32)


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2"], "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
    (["MODEL.MASK_ON", True], "MODEL.MASK_ON"),
    (["MODEL.RPN.BBOX_REG_WEIGHTS", (1.0, 1.0, 1.0, 1.0)], "MODEL.RPN.BBOX_REG_WEIGHTS"),
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (10.0, 10.0, 5.0, 5.0)], "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"),
    (["MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator"], "MODEL.ANCHOR_GENERATOR.NAME"),
    (["MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p7"]], "MODEL.ROI_HEADS.IN_FEATURES"),
])
def test_unsupported_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    cfg = _config()
    cfg.merge_from_list(pairs)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


def test_axis_aligned_heads_refuse_the_rotated_pooler():
    from detlayers.models import build_model

    cfg = _config()
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.PROPOSAL_GENERATOR.NAME", "RPN",
                         "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator",
                         "MODEL.RPN.BBOX_REG_WEIGHTS", (1.0, 1.0, 1.0, 1.0)])
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.POOLER_TYPE 'ROIAlignRotated'"):
        build_model(cfg)


def test_training_is_refused():
    import jax.numpy as jnp

    from detlayers.models import build_model

    model = build_model(_config())
    with pytest.raises(NotImplementedError, match="RRPN: training is not supported"):
        model.proposal_generator.apply({}, {}, jnp.zeros((1, 2), jnp.int32), train=True)
    with pytest.raises(NotImplementedError, match="RROIHeads: training is not supported"):
        model.roi_heads.apply({}, {}, jnp.zeros((1, 1, 5)), jnp.zeros((1, 1), bool), jnp.zeros((1, 2), jnp.int32),
                              train=True)
