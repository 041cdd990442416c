"""Panoptic FPN R50 (``COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml``) against detectron2's own
outputs: FPN maps, proposals, instances and masks (the Mask R-CNN part), the semantic head's logits
and map after ``sem_seg_postprocess``, and the panoptic map with its ``segments_info``.

Fixtures ``tests/fixtures/panoptic_fpn{,_keys}.npz`` are written by
``tools/fixtures/make_panoptic_fpn.py`` (detectron2 built from source, CPU) from
``synthetic_weights.panoptic_fpn_r50_state_dict(seed=0, calibration=...)`` (the Mask R-CNN
calibration file updated by the case's ``calibration.*`` entries), which the tests regenerate;
neither torch nor detectron2 is needed. The zoo case is ONE batch of two photographs at two sizes
(chelsea at a short side of 256, coffee at 320, padded to a multiple of 32); the ``keys`` case
runs chelsea at 256 with ``SEM_SEG_HEAD.NORM`` "" (biased convs, no GroupNorm),
``PANOPTIC_FPN.COMBINE.ENABLED`` False (ignored, as detectron2 does), ``OVERLAP_THRESH`` 0.2,
``STUFF_AREA_LIMIT`` 9000 and ``INSTANCES_CONFIDENCE_THRESH`` 0.3. One compile per case.

Bounds: the Mask R-CNN test's for boxes, scores, masks and FPN maps (``detection_parity``); the
semantic logits within 2e-4 of their range; the semantic map equal wherever detectron2's top-two
logits differ by more than the fixture's ``logit_tie`` (1e-3); the panoptic map equal on all but ``PANOPTIC_PIXELS``
of the pixels (mask pixels near probability 0.5 and semantic near-ties may flip); the segments
equal field by field (ids, categories, instance ids, scores within 1e-4), stuff areas within
``AREA_PIXELS``.
"""

from __future__ import annotations

import pathlib

import detection_parity as parity
import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# One worker builds every predictor of this module, each compiled once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("panoptic_fpn")

PANOPTIC_PIXELS = 2e-4  # the fraction of panoptic pixels that may differ (measured: 1-11 px, < 5e-5)
AREA_PIXELS = 5  # a stuff area may differ by the pixels whose label or instance is ambiguous (measured: <= 1)
SEM_SEG_ATOL = 2e-4  # relative to the logits' range (measured: <= 3.2e-5)
MASK_PIXELS = 2  # a tiny mask may differ by this many pixels (its 1% rounds to none)


def _config():
    from detlayers.models.config import panoptic_fpn_R_50_3x_config

    return panoptic_fpn_R_50_3x_config()


def _state(case: dict) -> dict:
    """The case's detectron2 state dict: the seed-0 weights with the Mask R-CNN calibration file
    updated by the case's ``calibration.*`` entries."""
    from detlayers.models.synthetic_weights import panoptic_fpn_r50_state_dict

    assert int(case["seed"]) == 0
    calibration_file = FIXTURES / "mask_rcnn_bn_calibration.npz"
    if not calibration_file.is_file():
        pytest.skip("no mask_rcnn_bn_calibration.npz: generate it with tools/fixtures/make_mask_rcnn.py")
    with np.load(calibration_file) as f:
        calibration = {k: f[k] for k in f.files}
    calibration.update({k[len("calibration."):]: v for k, v in case.items() if k.startswith("calibration.")})
    return panoptic_fpn_r50_state_dict(seed=0, calibration=calibration, **parity.weights_kwargs(case))


def _canvas(case: dict) -> tuple[int, int]:
    return tuple(int(v) for v in np.max(case["image_hw"], axis=0))


@pytest.fixture(scope="module")
def zoo_case() -> tuple[dict, dict]:
    """detlayers' ``Predictor`` on the zoo case's batch (each photograph at its own size, one padded
    batch): ``(case, outputs with intermediates)``."""
    from detlayers.models import Predictor, batch_images, preprocess_image

    case = parity.load_case("panoptic_fpn")
    assert len(case["overrides"]) == 0
    cfg = _config()
    predictor = Predictor(cfg, _state(case))
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
    out = predictor.run(images, image_hw, np.asarray(case["image_hw"], np.int32), _canvas(case),
                        return_intermediates=True)
    return case, jax.device_get(out), predictor.variables


@pytest.fixture(scope="module")
def keys_case(zoo_case) -> tuple[dict, dict]:
    """The non-default keys change only the semantic head and the combination, so the keys model's
    ``segment`` runs on the zoo run's FPN maps and instances (the same batch, the same backbone and
    ROI-head weights): ``(case, outputs)``, a small compile instead of the whole network's."""
    from detlayers import load_torch_state_dict
    from detlayers.models import build_model

    zoo, zoo_out, zoo_variables = zoo_case
    case = parity.load_case("panoptic_fpn_keys")
    for key in ("image_names", "input_hw", "padded_hw", "pred_boxes", "scores", "pred_classes"):
        np.testing.assert_array_equal(case[key], zoo[key], err_msg=f"{key}: the keys case must share the zoo batch")
    cfg = _config()
    with pytest.warns(UserWarning, match="COMBINE.ENABLED is no longer used"):
        cfg.merge_from_list(parity.overrides(case))
        model = build_model(cfg)
    assert model.sem_seg_head.norm == "" and model.combine_stuff_area_thresh == 9000
    features = {name: zoo_out[name] for name in model.backbone.output_shape()}
    # the zoo weights with the keys case's semantic head (only its variables differ)
    head_state = {k[len("sem_seg_head."):]: v for k, v in _state(case).items() if k.startswith("sem_seg_head.")}
    small = {name: features[name][:1, :32 // s.stride, :32 // s.stride]  # one 32x32 image's shapes
             for name, s in model.sem_seg_head.input_shape.items()}
    head = load_torch_state_dict(model.sem_seg_head, head_state, small)
    variables = {**zoo_variables, "params": {**zoo_variables["params"], "sem_seg_head": head["params"]}}
    instances = {key: zoo_out[key] for key in ("pred_masks", "scores", "pred_classes", "valid")}
    segment = jax.jit(lambda v, f, inst, hw, out_hw: model.apply(v, f, inst, hw, out_hw, canvas_hw=_canvas(case),
                                                                 method="segment"))
    out = segment(variables, features, instances, case["input_hw"].astype(np.int32), case["image_hw"].astype(np.int32))
    return case, {**zoo_out, **jax.device_get(out)}


def _check_instances_and_masks(case: dict, out: dict) -> None:
    starts = np.concatenate([[0], np.cumsum(case["num_proposals"])])
    for i in range(len(case["num_proposals"])):
        parity.check_proposals(out, case["proposal_boxes"][starts[i]:starts[i + 1]],
                               case["proposal_logits"][starts[i]:starts[i + 1]], image=i)
    checked = parity.check_instances(out, case)
    assert min(checked) >= 50, checked
    # masks: detectron2's first instances against ours, matched by class and box
    starts = np.concatenate([[0], np.cumsum(case["num_instances"])])
    for i, (h, w) in enumerate(case["image_hw"]):
        theirs = np.unpackbits(case[f"pred_masks_packed_{i}"], axis=-1, count=int(w)).astype(bool)
        k = int(out["num_instances"][i])
        ours = out["pred_masks"][i, :k, :h, :w]
        ref_boxes = case["pred_boxes"][starts[i]:starts[i] + len(theirs)]
        iou = parity.box_iou(ref_boxes, out["pred_boxes"][i, :k])
        for r, mask in enumerate(theirs):
            j = int(iou[r].argmax())
            assert iou[r, j] > 0.99, f"image {i}: instance {r} has no counterpart"
            # pixels near probability 0.5 or on the edge of a box (boxes agree within 1e-2 px) may flip
            union = np.logical_or(mask, ours[j]).sum()
            differ = union - np.logical_and(mask, ours[j]).sum()
            assert differ <= max(0.01 * union, MASK_PIXELS), f"image {i}: mask {r}: {differ} of {union} pixels differ"


def _check_semantic(case: dict, out: dict) -> None:
    stride = int(case["sem_seg_pixel_stride"])
    for i, (h, w) in enumerate(case["image_hw"]):
        sample = case[f"sem_seg_sample_{i}"]
        ours = out["sem_seg"][i, :h:stride, :w:stride]
        assert ours.shape == sample.shape
        span = float(sample.max() - sample.min())
        np.testing.assert_allclose(ours, sample, atol=SEM_SEG_ATOL * span, rtol=0, err_msg=f"sem_seg of image {i}")
        theirs = case[f"sem_seg_map_{i}"]
        ties = np.unpackbits(case[f"sem_seg_ties_packed_{i}"], axis=-1, count=int(w)).astype(bool)
        certain = ~ties
        mine = out["sem_seg_map"][i, :h, :w]
        assert certain.mean() > 0.99
        np.testing.assert_array_equal(mine[certain], theirs[certain].astype(np.int32), err_msg=f"semantic map {i}")


def _check_panoptic(case: dict, out: dict) -> None:
    from detlayers.models.meta_arch.panoptic_fpn import segments_info

    start = 0
    for i, (h, w) in enumerate(case["image_hw"]):
        theirs = case[f"panoptic_seg_{i}"].astype(np.int32)
        mine = out["panoptic_seg"][i]
        assert not mine[h:].any() and not mine[:, w:].any(), "the canvas past the image must stay 0"
        mine = mine[:h, :w]
        assert (mine != theirs).mean() <= PANOPTIC_PIXELS, f"image {i}: {(mine != theirs).mean():.2e} pixels differ"
        k = int(case["num_segments"][i])
        info = segments_info(out, i)
        ref = {key: case[key][start:start + k] for key in ("segment_id", "segment_isthing", "segment_category",
                                                            "segment_score", "segment_instance", "segment_area")}
        start += k
        assert len(info) == k, f"image {i}: {len(info)} segments, detectron2 {k}"
        for j, seg in enumerate(info):
            assert seg["id"] == ref["segment_id"][j] == j + 1
            assert seg["isthing"] == bool(ref["segment_isthing"][j]), f"image {i} segment {j}"
            assert seg["category_id"] == ref["segment_category"][j], f"image {i} segment {j}"
            if seg["isthing"]:
                assert list(seg) == ["id", "isthing", "score", "category_id", "instance_id"]
                assert seg["instance_id"] == ref["segment_instance"][j], f"image {i} segment {j}"
                assert abs(seg["score"] - ref["segment_score"][j]) <= parity.SCORE_ATOL
            else:
                assert list(seg) == ["id", "isthing", "category_id", "area"]
                assert abs(seg["area"] - ref["segment_area"][j]) <= AREA_PIXELS, f"image {i} segment {j}"
                assert seg["area"] == (mine == seg["id"]).sum()


def test_parity_with_detectron2(zoo_case):
    case, out, _ = zoo_case
    parity.check_fpn_levels(out, case, ("p2", "p3", "p4", "p5", "p6"))
    _check_instances_and_masks(case, out)
    _check_semantic(case, out)
    _check_panoptic(case, out)


def test_parity_with_detectron2_non_default_keys(keys_case):
    """GroupNorm-free semantic head, and the combination with lower thresholds (more things kept,
    smaller stuff regions kept, more overlap refused)."""
    case, out = keys_case
    assert {str(k) for k in case["overrides"][0::2]} == {
        "MODEL.SEM_SEG_HEAD.NORM", "MODEL.PANOPTIC_FPN.COMBINE.ENABLED", "MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH",
        "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH"}
    _check_semantic(case, out)
    _check_panoptic(case, out)


def test_predictor_outputs_are_detectron2s_per_image_fields(zoo_case):
    """``Predictor.predict_batch``'s host side: detectron2's ``sem_seg`` (NHWC here: ``[h, w, C]``, as
    the ``SemanticSegmentor``'s), ``panoptic_seg`` as ``(map, segments_info)`` and the instances,
    each cut to its image."""
    from detlayers.models.predictor import split_batch_outputs

    case, out, _ = zoo_case
    results = split_batch_outputs(out, case["image_hw"])
    for i, ((h, w), result) in enumerate(zip(case["image_hw"], results)):
        k = int(out["num_instances"][i])
        assert result["pred_masks"].shape == (k, h, w) and result["scores"].shape == (k,)
        assert result["sem_seg"].shape == (h, w, 54) and result["sem_seg"].dtype == np.float32
        np.testing.assert_array_equal(result["sem_seg"], out["sem_seg"][i, :h, :w])
        np.testing.assert_array_equal(result["sem_seg"].argmax(axis=-1), out["sem_seg_map"][i, :h, :w])
        panoptic, info = result["panoptic_seg"]
        assert panoptic.shape == (h, w) and len(info) == int(out["num_segments"][i])
        assert sorted(np.unique(panoptic[panoptic > 0]).tolist()) == [s["id"] for s in info]


def test_predictor_runs_a_panoptic_model_on_the_mask_canvas(zoo_case, monkeypatch):
    """A panoptic model gets the bucketed canvas in its ONE network call (it pastes its masks to
    combine them); a Mask R-CNN still pastes in a second call."""
    from detlayers.models import Predictor

    case, out, variables = zoo_case
    predictor = Predictor(_config(), variables, size_buckets=128)
    assert predictor.panoptic and not predictor.is_semantic
    calls = []
    monkeypatch.setattr(predictor, "run", lambda *args: calls.append(args[3]) or out)
    predictor._compute(np.zeros((2, 320, 480, 3), np.float32), case["input_hw"], case["image_hw"])
    assert calls == [(512, 640)]


# --------------------------------------------------------------------------------------------
# the combination against a NumPy transcription of detectron2's loop (no network)


_COMPILED: dict = {}  # one compile for every parameter set


def _combine_reference(masks, scores, classes, semantic, overlap, stuff_area, score_thresh):
    """detectron2's ``combine_semantic_and_instance_outputs``, step by step in NumPy."""
    panoptic = np.zeros(semantic.shape, np.int32)
    info = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < score_thresh:
            break
        mask = masks[i].copy()
        area = mask.sum()
        if area == 0:
            continue
        intersect = (mask & (panoptic > 0)).sum()
        if intersect / area > overlap:
            continue
        mask &= panoptic == 0
        panoptic[mask] = len(info) + 1
        info.append({"id": len(info) + 1, "isthing": True, "score": float(scores[i]), "category_id": int(classes[i]),
                     "instance_id": int(i)})
    for label in np.unique(semantic):
        if label == 0:
            continue
        mask = (semantic == label) & (panoptic == 0)
        if mask.sum() < stuff_area:
            continue
        panoptic[mask] = len(info) + 1
        info.append({"id": len(info) + 1, "isthing": False, "category_id": int(label), "area": int(mask.sum())})
    return panoptic, info


def _boundary_inputs():
    """Four instances on an 8x10 image (in a 9x12 canvas) and a semantic map, built so that each
    threshold is met exactly: instance 1 overlaps instance 0 on exactly half its area, instance 2
    scores exactly the score threshold, instance 3 is empty; label 5 covers exactly 6 free pixels,
    label 7 lies only under instances (0 free pixels), label 0 (things) lies on 2 free pixels."""
    h, w = 8, 10
    masks = np.zeros((5, 9, 12), bool)  # 5 slots: the last one invalid
    masks[0, 0:4, 0:4] = True
    masks[1, 2:6, 0:2] = True  # 8 pixels, 4 of them on instance 0
    masks[2, 5:8, 6:10] = True
    masks[4, :, :] = True  # invalid slot: must be ignored
    masks[:, h:, :] = masks[:, :, w:] = False
    scores = np.array([0.9, 0.8, 0.5, 0.45, 0.0], np.float32)
    classes = np.array([3, 1, 2, 4, -1])
    valid = np.array([True, True, True, True, False])
    semantic = np.full((9, 12), 0, np.int32)
    semantic[:h, :w] = 2
    semantic[0:2, 6:9] = 5  # 6 pixels, all free
    semantic[0, 0:3] = 7  # only under instance 0
    semantic[7, 0:2] = 0  # the things label on free pixels: never a stuff segment
    semantic[h:, :] = 9  # outside the image: must not count
    semantic[:, w:] = 9
    return masks, scores, classes, valid, semantic, (h, w)


@pytest.mark.parametrize("overlap, stuff_area, score_thresh", [
    (0.5, 6, 0.5),  # every comparison at equality: kept (detectron2 skips only above / below)
    (0.49, 7, 0.6),  # just past each threshold
    (0.5, 0, 0.3),  # area 0 passes a limit of 0: label 7 becomes an empty segment, as in detectron2
])
def test_combination_matches_detectron2s_loop_at_the_thresholds(overlap, stuff_area, score_thresh):
    import jax.numpy as jnp

    from detlayers.models.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs, segments_info

    masks, scores, classes, valid, semantic, (h, w) = _boundary_inputs()
    combine = _COMPILED.setdefault("combine", jax.jit(combine_semantic_and_instance_outputs,
                                                      static_argnames="num_semantic_classes"))  # thresholds traced
    out = jax.device_get(combine(
        masks[None], scores[None], classes[None], valid[None], semantic[None], jnp.asarray([[h, w]], jnp.int32),
        num_semantic_classes=10, overlap_thresh=jnp.float32(overlap), stuff_area_thresh=jnp.float32(stuff_area),
        instances_score_thresh=jnp.float32(score_thresh)))
    ref_map, ref_info = _combine_reference(masks[:4, :h, :w], scores[:4], classes[:4], semantic[:h, :w], overlap,
                                           stuff_area, score_thresh)
    np.testing.assert_array_equal(out["panoptic_seg"][0, :h, :w], ref_map)
    assert not out["panoptic_seg"][0, h:].any() and not out["panoptic_seg"][0, :, w:].any()
    assert segments_info(out, 0) == ref_info
    assert len(ref_info) >= 2



# --------------------------------------------------------------------------------------------
# configs, names and errors (no compile)


def test_zoo_function_equals_the_yaml_file():
    from test_config import CASES as CONFIG_CASES
    from test_config import assert_same_flat, flatten

    flat = CONFIG_CASES["configs/COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml"]["flat"]
    assert_same_flat(flatten(_config()), flat)


def test_semantic_head_geometry_follows_the_config():
    """``SemSegFPNHead`` reads detectron2's keys: one conv (and no upsampling) at ``COMMON_STRIDE``,
    ``log2(stride / COMMON_STRIDE)`` conv + 2x upsampling steps above it, named as detectron2's
    ``nn.Sequential`` indices."""
    import jax.numpy as jnp

    from detlayers.models import build_model
    from detlayers.models.meta_arch.semantic_seg import scale_head_lengths

    cfg = _config()
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8, "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p3", "p5"],
                         "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5])
    head = build_model(cfg).sem_seg_head
    assert sorted(head.input_shape) == ["p3", "p5"] and head.common_stride == 8
    assert scale_head_lengths([4, 8, 16, 32], 4) == [1, 1, 2, 3]
    features = {"p3": jnp.zeros((1, 4, 8, 256)), "p5": jnp.zeros((1, 1, 2, 256))}
    shapes = jax.eval_shape(head.init, jax.random.key(0), features)["params"]
    assert sorted(shapes) == ["p3_0", "p5_0", "p5_2", "predictor"]
    assert shapes["p5_2"]["kernel"].shape == (3, 3, 32, 32) and shapes["predictor"]["kernel"].shape == (1, 1, 32, 5)
    logits = jax.eval_shape(head.apply, jax.tree.map(jnp.zeros_like, {"params": shapes}), features)
    assert logits.shape == (1, 32, 64, 5)


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.SEM_SEG_HEAD.NORM", "BN"], "MODEL.SEM_SEG_HEAD.NORM"),
    (["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8], "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"),  # above p2's stride
    (["MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 3, "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p3"]],
     "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"),
    (["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "res5"]], "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    (["MODEL.SEM_SEG_HEAD.NAME", "SemSegHead"], "MODEL.SEM_SEG_HEAD.NAME"),
    (["MODEL.MASK_ON", False], "MODEL.MASK_ON"),
])
def test_unsupported_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    cfg = _config()
    cfg.merge_from_list(pairs)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


def test_training_is_refused():
    from detlayers.models import build_model

    model = build_model(_config())
    images = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(NotImplementedError, match="PanopticFPN: training is not implemented.*GeneralizedRCNN"):
        model.apply({}, images, np.full((1, 2), 64), train=True)
