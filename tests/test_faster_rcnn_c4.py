"""Faster R-CNN without FPN against detectron2's own outputs: R50-C4 (``faster_rcnn_R_50_C4_3x.yaml``,
``Res5ROIHeads``: res5 per region on 14x14 crops of res4) and R50-DC5 (``faster_rcnn_R_50_DC5_3x.yaml``:
res5 dilated 2, RPN and ``StandardROIHeads`` on res5), plus their configs and errors.

Fixtures ``tests/fixtures/faster_rcnn_{c4,dc5,c4_keys}.npz`` and ``faster_rcnn_{c4,dc5}_calibration.npz``
are written by ``tools/fixtures/make_faster_rcnn_c4.py`` (detectron2 built from source, CPU) from
``synthetic_weights.faster_rcnn_r50_{c4,dc5}_state_dict(seed=0, calibration=...)``, which the tests
regenerate; neither torch nor detectron2 is needed. Each zoo case is ONE batch of two photographs at
two sizes (chelsea at a short side of 256, coffee at 320), padded to their largest size as detectron2
pads for a backbone without FPN; compared: a few channels of the backbone map, every image's RPN
proposals and its instances, at the Mask R-CNN test's bounds (``detection_parity``). The ``keys``
case runs the C4 weights on chelsea at 256 with non-default ``RESNETS.STRIDE_IN_1X1`` (False: the
stride of each first block, the res5 head's included, moves to its 3x3 conv),
``ROI_BOX_HEAD.POOLER_SAMPLING_RATIO`` 2 and ``POOLER_TYPE`` "ROIAlign". Every case keeps 50
proposals an image (``RPN.POST_NMS_TOPK_TEST``, 1000 in the zoo) so that the per-region res5 and fc
work stays small; one compile per case.
"""

from __future__ import annotations

import pathlib

import detection_parity as parity
import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# One worker builds every predictor of this module, each compiled once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("faster_rcnn_c4")


def _config(model: str):
    from detlayers.models.config import faster_rcnn_R_50_C4_3x_config, faster_rcnn_R_50_DC5_3x_config

    return {"c4": faster_rcnn_R_50_C4_3x_config, "dc5": faster_rcnn_R_50_DC5_3x_config}[model]()


def _variables(model: str, seed: int) -> dict:
    from detlayers.models import build_model, load_detectron2_weights
    from detlayers.models.synthetic_weights import faster_rcnn_r50_c4_state_dict, faster_rcnn_r50_dc5_state_dict

    generate = {"c4": faster_rcnn_r50_c4_state_dict, "dc5": faster_rcnn_r50_dc5_state_dict}[model]
    calibration = FIXTURES / f"faster_rcnn_{model}_calibration.npz"
    if not calibration.is_file():
        pytest.skip(f"no {calibration.name}: generate it with tools/fixtures/make_faster_rcnn_c4.py (needs detectron2)")
    state = generate(seed=seed, calibration=calibration)
    return load_detectron2_weights(build_model(_config(model)), state)


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def c4_variables() -> dict:
    return _variables("c4", 0)


def _run_case(stem: str, model: str, variables: dict) -> tuple[dict, dict]:
    """detlayers on the case's batch (each photograph at its own size, one padded batch) with the
    case's overrides: ``(case, outputs with intermediates)``."""
    from detlayers.models import Predictor, batch_images, preprocess_image

    case = parity.load_case(stem)
    assert int(case["seed"]) == 0
    cfg = _config(model)
    cfg.merge_from_list(parity.overrides(case))
    predictor = Predictor(cfg, variables)
    assert predictor.size_divisibility == 0, "a backbone without FPN pads to the largest image only"
    photos = [parity.photo_bgr(str(name)) for name in case["image_names"]]
    np.testing.assert_array_equal([p.shape[:2] for p in photos], case["image_hw"])
    resized = []
    for photo, min_size in zip(photos, case["min_sizes"]):
        sized = cfg.clone()
        sized.merge_from_list(["INPUT.MIN_SIZE_TEST", int(min_size), "INPUT.MAX_SIZE_TEST", int(case["max_size"])])
        resized.append(preprocess_image(photo, sized))
    images, image_hw = batch_images(resized, predictor.size_divisibility)
    np.testing.assert_array_equal(image_hw, case["input_hw"])
    assert tuple(images.shape[1:3]) == tuple(case["padded_hw"])
    out = predictor.run(images, image_hw, np.asarray(case["image_hw"], np.int32), None, return_intermediates=True)
    return case, jax.device_get(out)


def _check_case(case: dict, out: dict) -> list[int]:
    """Backbone channels, every image's proposals and instances; returns instances compared per image."""
    parity.check_fpn_levels(out, case, (str(case["feature_name"]),))
    starts = np.concatenate([[0], np.cumsum(case["num_proposals"])])
    for i in range(len(case["num_proposals"])):
        parity.check_proposals(out, case["proposal_boxes"][starts[i]:starts[i + 1]],
                               case["proposal_logits"][starts[i]:starts[i + 1]], image=i)
    return parity.check_instances(out, case)


def test_c4_parity_with_detectron2(c4_variables):
    case, out = _run_case("faster_rcnn_c4", "c4", c4_variables)
    assert str(case["feature_name"]) == "res4" and "res5" not in out
    checked = _check_case(case, out)
    assert sum(checked) >= 90, checked


def test_c4_parity_with_detectron2_non_default_keys(c4_variables):
    """The same weights (the variables do not change shape) with the stride of every first block on
    its 3x3 conv, ROIAlign with 2x2 samples a bin and without the half-pixel offset."""
    case, out = _run_case("faster_rcnn_c4_keys", "c4", c4_variables)
    assert {str(k) for k in case["overrides"][2::2]} == {
        "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "MODEL.ROI_BOX_HEAD.POOLER_TYPE"}
    checked = _check_case(case, out)
    assert sum(checked) >= 50, checked


def test_dc5_parity_with_detectron2():
    case, out = _run_case("faster_rcnn_dc5", "dc5", _variables("dc5", 0))
    assert str(case["feature_name"]) == "res5" and out["res5"].shape[1:3] == (20, 30)  # stride 16: dilated
    checked = _check_case(case, out)
    assert sum(checked) >= 100, checked


# --------------------------------------------------------------------------------------------
# configs, names and errors (no compile)


def test_zoo_functions_equal_the_yaml_files():
    from test_config import CASES as CONFIG_CASES
    from test_config import assert_same_flat, flatten

    for model, yaml in (("c4", "faster_rcnn_R_50_C4_3x"), ("dc5", "faster_rcnn_R_50_DC5_3x")):
        assert_same_flat(flatten(_config(model)), CONFIG_CASES[f"configs/COCO-Detection/{yaml}.yaml"]["flat"])


def test_res5_head_geometry_follows_the_config():
    """``Res5ROIHeads`` reads detectron2's keys: res5 8x as wide as ``RES2_OUT_CHANNELS``, the
    bottleneck ``NUM_GROUPS x WIDTH_PER_GROUP x 8``, the pooler over res4's stride."""
    from detlayers.models import build_model

    cfg = _config("c4")
    cfg.merge_from_list(["MODEL.RESNETS.RES2_OUT_CHANNELS", 128, "MODEL.RESNETS.NUM_GROUPS", 2,
                         "MODEL.RESNETS.WIDTH_PER_GROUP", 16, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 10])
    heads = build_model(cfg).roi_heads
    assert (heads.in_channels, heads.out_channels, heads.bottleneck_channels) == (512, 1024, 256)
    assert heads.pooler.output_size == 10 and heads.pooler.strides == (16,)
    assert heads.box_predictor.input_dim == 1024 and heads.stride_in_1x1 is True


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.MASK_ON", True], "MODEL.MASK_ON"),
    (["MODEL.ROI_HEADS.IN_FEATURES", ["res3", "res4"]], "MODEL.ROI_HEADS.IN_FEATURES"),
    (["MODEL.ROI_HEADS.IN_FEATURES", ["res5"]], "MODEL.ROI_HEADS.IN_FEATURES"),
    (["MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, True]], r"MODEL.RESNETS.DEFORM_ON_PER_STAGE\[3\]"),
    (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"], "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
    (["MODEL.ROI_HEADS.NAME", "Res5ROIHead"], "MODEL.ROI_HEADS.NAME"),
])
def test_unsupported_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    cfg = _config("c4")
    cfg.merge_from_list(pairs)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


def test_training_is_refused():
    from detlayers.models import build_model

    heads = build_model(_config("c4")).roi_heads
    with pytest.raises(NotImplementedError, match="Res5ROIHeads: training"):
        heads.proposal_append_gt  # noqa: B018 - what GeneralizedRCNN reads before training the heads


def test_predictor_pads_a_batch_to_its_largest_image(c4_variables):
    """``Predictor.inputs`` pads as detectron2's ``ImageList`` with the backbone's
    ``size_divisibility`` (0 for a plain ResNet): to the largest resized image, not to 32."""
    from detlayers.models import Predictor

    cfg = _config("c4")
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", 256])
    images, image_hw, original_hw, _ = Predictor(cfg, c4_variables).inputs(
        [parity.photo_bgr("chelsea"), parity.photo_bgr("coffee")])
    np.testing.assert_array_equal(image_hw, [[256, 385], [256, 384]])
    np.testing.assert_array_equal(original_hw, [[300, 451], [400, 600]])
    assert images.shape == (2, 256, 385, 3) and not images[1, :, 384:].any()


def test_batch_images_without_size_divisibility_pads_to_the_largest_image():
    from detlayers.models import batch_images

    a, b = np.ones((5, 7, 3), np.float32), np.full((6, 4, 3), 2.0, np.float32)
    images, hw = batch_images([a, b], 0)
    assert images.shape == (2, 6, 7, 3)
    np.testing.assert_array_equal(hw, [[5, 7], [6, 4]])
    assert images[0, 5].sum() == 0 and images[1, :, 4:].sum() == 0 and images[1, :6, :4].min() == 2.0
    assert batch_images([a, b], 32)[0].shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="size_divisibility"):
        batch_images([a], -1)
