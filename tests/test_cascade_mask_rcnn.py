"""Cascade Mask R-CNN R50-FPN (``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``, ``CascadeROIHeads``)
against detectron2's own outputs, plus its config and errors.

Fixtures ``tests/fixtures/cascade_mask_rcnn{,_keys}.npz`` and ``cascade_mask_rcnn_calibration.npz``
are written by ``tools/fixtures/make_cascade_mask_rcnn.py`` (detectron2 built from source, CPU) from
``synthetic_weights.cascade_mask_rcnn_r50_fpn_state_dict(seed=0, calibration=..., num_stages=...)``,
which the tests regenerate; neither torch nor detectron2 is needed. The zoo case is ONE batch of two
photographs at two sizes (chelsea at a short side of 256, coffee at 320, padded together to a
multiple of 32), compared on FPN channels, every image's RPN proposals, its instances and their
masks, at the Mask R-CNN test's bounds (``detection_parity``); it keeps 250 proposals an image
(``RPN.POST_NMS_TOPK_TEST``, 1000 in the zoo) so that the three fc stages stay small. The ``keys``
case runs two stages (``ROI_BOX_CASCADE_HEAD.IOUS`` of length 2) with box weights (10, 10, 5, 5)
and (15, 15, 8, 8), without masks, on the same batch: only its ROI heads are compiled, on the zoo
run's FPN maps and proposals. The ``jax.export`` round trip is not tested here: even a minimal
ResNet-18 two-stage cascade without masks costs about 9 CPU-seconds (compiled once by the
predictor, once from the artifact), more than this module's budget leaves
(``tests/test_retinanet.py`` tests the export path on a RetinaNet).
"""

from __future__ import annotations

import pathlib

import detection_parity as parity
import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CALIBRATION = FIXTURES / "cascade_mask_rcnn_calibration.npz"
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
# One worker builds every predictor of this module, each compiled once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("cascade_mask_rcnn")


def _config(*pairs):
    from detlayers.models.config import cascade_mask_rcnn_R_50_FPN_3x_config

    cfg = cascade_mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list(list(pairs))
    return cfg


def _state_dict(num_stages: int) -> dict[str, np.ndarray]:
    from detlayers.models.synthetic_weights import cascade_mask_rcnn_r50_fpn_state_dict

    if not CALIBRATION.is_file():
        pytest.skip(f"no {CALIBRATION.name}: generate it with tools/fixtures/make_cascade_mask_rcnn.py "
                    "(needs detectron2)")
    return cascade_mask_rcnn_r50_fpn_state_dict(seed=0, calibration=CALIBRATION, num_stages=num_stages)


def _run_case(stem: str) -> tuple[dict, dict, dict]:
    """detlayers on the case's batch (each photograph at its own size, one padded batch) with the
    case's overrides: ``(case, outputs with intermediates, variables)``; masks are not pasted in the
    network (``canvas_hw`` None), :func:`_instances` pastes them per image."""
    from detlayers.models import Predictor, batch_images, preprocess_image

    case = parity.load_case(stem)
    assert int(case["seed"]) == 0
    cfg = _config(*parity.overrides(case))
    predictor = Predictor(cfg, _state_dict(int(case["num_stages"])))
    assert len(predictor.model.roi_heads.box_head) == int(case["num_stages"])
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
    return case, jax.device_get(out), predictor.variables


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def zoo_run() -> tuple[dict, dict, dict]:
    """The zoo case, run once: its FPN maps and proposals also feed the ``keys`` case."""
    return _run_case("cascade_mask_rcnn")


def _reference_masks(case: dict) -> list[np.ndarray]:
    """Every image's detectron2 masks ``bool[k, h, w]`` (unpacked from the flat bit-packed array)."""
    masks, start = [], 0
    for k, h, w in case["mask_shapes"].tolist():
        size = k * h * ((w + 7) // 8)
        packed = case["pred_masks_packed"][start:start + size].reshape(k, h, (w + 7) // 8)
        masks.append(np.unpackbits(packed, axis=-1, count=w).astype(bool))
        start += size
    return masks


def _instances(out: dict, i: int, hw: tuple[int, int]) -> dict:
    """Image ``i``'s valid instances as ``compare_instances`` takes them, with masks pasted into the
    original image (``paste_masks_in_image``, detectron2's threshold 0.5), the pixels within
    ``MASK_PROB_MARGIN`` of 0.5 (``ambiguous``) and ``paste_at(j, box)``."""
    from detlayers.mask_ops import paste_masks_in_image

    k = int(out["num_instances"][i])
    probs, boxes = out["mask_probs"][i, :k], out["pred_boxes"][i, :k]
    soft = np.asarray(paste_masks_in_image(probs, boxes, hw, None))
    paste_one = jax.jit(lambda p, box: paste_masks_in_image(p[None], box[None], hw, None)[0])
    return {
        "pred_boxes": boxes, "scores": out["scores"][i, :k],
        "pred_classes": out["pred_classes"][i, :k].astype(np.int64),
        "pred_masks": soft >= 0.5, "ambiguous": np.abs(soft - 0.5) < parity.MASK_PROB_MARGIN,
        "paste_at": lambda j, box: np.asarray(paste_one(probs[j], np.asarray(box, np.float32))),
    }


def _check_proposals(case: dict, out: dict) -> None:
    starts = np.concatenate([[0], np.cumsum(case["num_proposals"])])
    for i in range(len(case["num_proposals"])):
        parity.check_proposals(out, case["proposal_boxes"][starts[i]:starts[i + 1]],
                               case["proposal_logits"][starts[i]:starts[i + 1]], image=i)


def test_cascade_parity_with_detectron2(zoo_run):
    """The zoo config: FPN, proposals, instances (scores averaged over three stages, boxes of the
    last) and masks (the mask head on the final boxes) of both images of one batch."""
    case, out, _ = zoo_run
    parity.check_fpn_levels(out, case, FPN_LEVELS)
    _check_proposals(case, out)
    checked = parity.check_instances(out, case)
    assert min(checked) >= 30, checked
    starts = np.concatenate([[0], np.cumsum(case["num_instances"])])
    with_masks = 0
    for i, (ref_masks, hw) in enumerate(zip(_reference_masks(case), case["image_hw"].tolist())):
        ref = {key: case[key][starts[i]:starts[i + 1]] for key in ("pred_boxes", "scores", "pred_classes")}
        ref["pred_masks"] = ref_masks
        with_masks += parity.compare_instances(ref, _instances(out, i, tuple(hw)), float(case["score_thresh"]),
                                               int(case["topk"]), float(case["next_score"][i]))
    assert with_masks == sum(checked)


def test_cascade_parity_with_two_stages_and_other_box_weights(zoo_run):
    """``ROI_BOX_CASCADE_HEAD.IOUS``/``BBOX_REG_WEIGHTS`` of length 2 (two stages; the second
    stage's weights not the default's) and ``MASK_ON`` False. Only the ROI heads run (one small
    compile): on the zoo run's FPN maps and proposals, which detectron2's two-stage model shares
    (same batch, same backbone and RPN weights; the fixture's proposals are checked equal), with
    the zoo variables' first two stages, which are the two-stage state dict's."""
    from detlayers.models import build_model
    from detlayers.models.postprocessing import detector_postprocess

    zoo_case, zoo_out, zoo_variables = zoo_run
    case = parity.load_case("cascade_mask_rcnn_keys")
    assert {str(k) for k in case["overrides"][0::2]} == {
        "MODEL.RPN.POST_NMS_TOPK_TEST", "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
        "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", "MODEL.MASK_ON"}
    for key in ("image_names", "min_sizes", "input_hw", "padded_hw", "proposal_boxes", "proposal_logits"):
        np.testing.assert_array_equal(case[key], zoo_case[key], err_msg=key)
    heads = build_model(_config(*parity.overrides(case))).roi_heads
    assert heads.mask_head is None and heads.num_cascade_stages == 2
    params = {name: zoo_variables["params"]["roi_heads"][name]
              for name in ("box_head_0", "box_head_1", "box_predictor_0", "box_predictor_1")}
    image_hw = jnp.asarray(case["input_hw"], jnp.int32)

    @jax.jit
    def run(params, features, proposals, proposal_valid):
        det = heads.apply({"params": params}, features, proposals, proposal_valid, image_hw)
        return detector_postprocess(det, image_hw, jnp.asarray(case["image_hw"], jnp.int32), None)

    features = {name: zoo_out[name] for name in heads.box_in_features}
    out = jax.device_get(run(params, features, zoo_out["proposal_boxes"], zoo_out["proposal_valid"]))
    checked = parity.check_instances(out, case)
    assert min(checked) >= 30, checked


# --------------------------------------------------------------------------------------------
# configs, names and errors (no compile)


def test_zoo_function_equals_the_yaml_file():
    from test_config import CASES as CONFIG_CASES
    from test_config import assert_same_flat, flatten

    assert_same_flat(flatten(_config()), CONFIG_CASES["configs/Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"]["flat"])


def test_stages_follow_the_cascade_keys():
    """One box head and one class-agnostic predictor per stage, named ``box_head_{k}`` /
    ``box_predictor_{k}`` (detectron2's ``box_head.{k}``), each decoding with its stage's weights;
    the test thresholds of the last stage are the config's."""
    from detlayers.models import build_model

    heads = build_model(_config()).roi_heads
    assert type(heads).__name__ == "CascadeROIHeads" and heads.num_cascade_stages == 3
    assert [p.box2box_transform.weights for p in heads.box_predictor] == [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    assert all(p.cls_agnostic_bbox_reg for p in heads.box_predictor)
    heads = build_model(_config("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.7),
                                "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ((1.0, 2.0, 3.0, 4.0), (5.0, 6, 7, 8)),
                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.3)).roi_heads
    assert [p.box2box_transform.weights for p in heads.box_predictor] == [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]
    assert heads.box_predictor[-1].test_score_thresh == 0.3


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False], "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"),
    (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6)], r"MODEL.ROI_BOX_CASCADE_HEAD.IOUS \(2\)"),
    (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.4, 0.6, 0.7)], r"MODEL.ROI_BOX_CASCADE_HEAD.IOUS\[0\]"),
    (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (), "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ()],
     "BBOX_REG_WEIGHTS needs at least one stage"),
    (["MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ((10.0, 10.0, 5.0, 5.0), (1.0, 2.0, 3.0), (1.0, 1, 1, 1))],
     r"BBOX_REG_WEIGHTS\[1\] must hold 4"),
    (["MODEL.KEYPOINT_ON", True], "MODEL.KEYPOINT_ON"),
    (["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True], "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
    (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"], "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
    (["MODEL.ROI_HEADS.NAME", "CascadeROIHead"], "MODEL.ROI_HEADS.NAME"),
])
def test_unsupported_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    with pytest.raises(ValueError, match=key):
        build_model(_config(*pairs))


def test_training_is_refused_naming_what_is_supported():
    from detlayers.models import build_model
    from detlayers.models.train import check_trainable

    heads = build_model(_config()).roi_heads
    with pytest.raises(NotImplementedError, match="CascadeROIHeads: training .*StandardROIHeads"):
        heads.proposal_append_gt  # noqa: B018 - what GeneralizedRCNN reads before training the heads
    with pytest.raises(NotImplementedError, match="CascadeROIHeads: training"):
        heads.apply({}, {}, jnp.zeros((1, 2, 4)), jnp.ones((1, 2), bool), jnp.ones((1, 2), jnp.int32), train=True)
    # the trainer refuses it before building anything
    with pytest.raises(NotImplementedError, match="MODEL.ROI_HEADS.NAME 'CascadeROIHeads' is inference only"):
        check_trainable(_config())
    check_trainable(_config("MODEL.ROI_HEADS.NAME", "StandardROIHeads"))


# --------------------------------------------------------------------------------------------
# stage boxes (float64 NumPy derivation)


def test_stage_boxes_decode_with_the_stage_weights_and_clip_to_each_image():
    from detlayers.models.box_regression import Box2BoxTransform
    from detlayers.models.roi_heads.cascade_rcnn import cascade_stage_boxes

    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(-20, 60, (2, 5, 2)), rng.uniform(70, 140, (2, 5, 2))], -1).astype(np.float32)
    deltas = rng.normal(0, 2.0, (2, 5, 4)).astype(np.float32)
    valid = np.array([[True] * 5, [True, True, True, False, False]])
    image_hw = np.array([[100, 120], [90, 80]], np.int32)
    weights = (20.0, 20.0, 10.0, 10.0)
    got = np.asarray(cascade_stage_boxes(Box2BoxTransform(weights), jnp.asarray(deltas), jnp.asarray(boxes),
                                         jnp.asarray(valid), jnp.asarray(image_hw)))
    b, d = boxes.astype(np.float64), deltas.astype(np.float64) / np.asarray(weights)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    cx, cy = b[..., 0] + 0.5 * w + d[..., 0] * w, b[..., 1] + 0.5 * h + d[..., 1] * h
    pw, ph = np.exp(np.minimum(d[..., 2], np.log(1000 / 16))) * w, np.exp(np.minimum(d[..., 3], np.log(1000 / 16))) * h
    expected = np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], -1)
    limits = np.stack([image_hw[:, 1], image_hw[:, 0], image_hw[:, 1], image_hw[:, 0]], -1)[:, None, :]
    expected = np.where(valid[..., None], np.clip(expected, 0, limits), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert (got[..., 2] <= limits[..., 2]).all() and (got >= 0).all()
