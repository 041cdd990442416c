"""Mask R-CNN R50-FPN (``detlayers.models``) against detectron2's own outputs, plus the config,
checkpoint loading and static-shape contracts.

Parity fixtures ``tests/fixtures/mask_rcnn_<image>_<min_size>.npz`` are written by
``tools/fixtures/make_mask_rcnn.py`` (detectron2 built from source, CPU) from the weights
``detlayers.models.synthetic_weights.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=...)``,
which the tests regenerate; neither torch nor detectron2 is needed here.
"""

from __future__ import annotations

import pathlib
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from detection_parity import MASK_PROB_MARGIN, check_fpn_and_proposals, compare_instances, photo_bgr

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CALIBRATION = FIXTURES / "mask_rcnn_bn_calibration.npz"
# mask_rcnn_<image>_<MIN_SIZE_TEST>.npz (the GN/dconv variants' files carry one more name part)
CASES = sorted(p for p in FIXTURES.glob("mask_rcnn_*_*.npz") if re.fullmatch(r"mask_rcnn_[a-z]+_\d+\.npz", p.name))

# The bounds (detection_parity: scores within 1e-4, boxes within 1e-2 px, mask IoU >= 0.99 on the
# pixels float32 rounding cannot flip) hold with room: the largest differences seen are 5.6e-5
# (coffee 320) and 4.1e-3 px (coffee 256), float32 accumulation order through 50 conv layers (FPN
# relative error ~4e-5), amplified by the fixture's rescaled output layers, whose targets
# (tools/fixtures/make_mask_rcnn.py) keep it near half these bounds.


# --------------------------------------------------------------------------------------------
# config


def test_model_and_predictor_do_not_follow_later_edits_of_the_config():
    """Modules take plain fields copied out of the config, and Predictor keeps a frozen clone: the
    caller's config stays mutable and its later edits reach neither."""
    from detlayers.models import build_model, mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.predictor import Predictor

    cfg = mask_rcnn_R_50_FPN_3x_config()
    model = build_model(cfg)
    assert model.roi_heads.box_predictor.num_classes == 80
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    assert model.roi_heads.box_predictor.num_classes == 80
    assert hash(model) == hash(build_model(mask_rcnn_R_50_FPN_3x_config()))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    predictor = Predictor.__new__(Predictor)
    Predictor.__init__(predictor, cfg, {"params": {}, "batch_stats": {}})
    assert predictor.cfg == cfg and predictor.cfg is not cfg and predictor.cfg.is_frozen() and not cfg.is_frozen()
    cfg.INPUT.MIN_SIZE_TEST = 64
    assert predictor.cfg.INPUT.MIN_SIZE_TEST == 800


def test_resize_shortest_edge_shape_is_detectron2s():
    from detlayers.models import resize_shortest_edge_shape

    # values from detectron2's ResizeShortestEdge.get_output_shape
    assert resize_shortest_edge_shape(300, 451, 256, 1333) == (256, 385)
    assert resize_shortest_edge_shape(400, 600, 320, 1333) == (320, 480)
    assert resize_shortest_edge_shape(480, 640, 800, 1333) == (800, 1067)
    assert resize_shortest_edge_shape(100, 1000, 800, 1333) == (133, 1333)
    assert resize_shortest_edge_shape(1000, 100, 800, 1333) == (1333, 133)


def test_models_import_is_lazy():
    code = (
        "import sys, detlayers, detlayers.models\n"
        "assert 'detlayers.models.meta_arch.rcnn' not in sys.modules, sorted(sys.modules)\n"
        "assert 'flax' not in sys.modules\n"
        "detlayers.models.mask_rcnn_R_50_FPN_3x_config\n"
        "detlayers.models.META_ARCH_REGISTRY\n"
        "assert 'detlayers.models.meta_arch.rcnn' not in sys.modules\n"
        "assert 'flax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


# --------------------------------------------------------------------------------------------
# anchors and box decoding (float64 NumPy derivations)


def test_cell_anchors_match_the_float64_formula():
    from detlayers.models.anchor_generator import generate_cell_anchors, grid_anchors

    base = generate_cell_anchors((32,), (0.5, 1.0, 2.0))
    w = np.sqrt(32.0**2 / np.array([0.5, 1.0, 2.0]))
    h = np.array([0.5, 1.0, 2.0]) * w
    np.testing.assert_array_equal(base, np.stack([-w / 2, -h / 2, w / 2, h / 2], 1).astype(np.float32))
    grid = grid_anchors((2, 3), 4, (32,), (0.5, 1.0, 2.0))
    assert grid.shape == (2 * 3 * 3, 4)
    # order (y, x, anchor): entry 1*3*3 + 2*3 + 1 is row 1, column 2, anchor 1
    np.testing.assert_array_equal(grid[1 * 9 + 2 * 3 + 1], base[1] + np.float32([8, 4, 8, 4]))


def test_apply_deltas_clamps_like_detectron2():
    import jax.numpy as jnp

    from detlayers.models.box_regression import DEFAULT_SCALE_CLAMP, Box2BoxTransform

    boxes = np.array([[10.0, 20.0, 50.0, 40.0]], np.float32)
    deltas = np.array([[1.0, -2.0, 10.0, -0.5]], np.float32)
    out = np.asarray(Box2BoxTransform((10.0, 10.0, 5.0, 5.0)).apply_deltas(jnp.asarray(deltas), jnp.asarray(boxes)))
    b, d = boxes.astype(np.float64)[0], deltas.astype(np.float64)[0] / [10, 10, 5, 5]
    w, h = b[2] - b[0], b[3] - b[1]
    cx, cy = b[0] + 0.5 * w + d[0] * w, b[1] + 0.5 * h + d[1] * h
    pw, ph = np.exp(min(d[2], DEFAULT_SCALE_CLAMP)) * w, np.exp(min(d[3], DEFAULT_SCALE_CLAMP)) * h
    np.testing.assert_allclose(out[0], [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], rtol=1e-6)
    big = np.asarray(Box2BoxTransform((1, 1, 1, 1)).apply_deltas(jnp.asarray([[0.0, 0.0, 100.0, 0.0]]),
                                                                jnp.asarray(boxes)))
    np.testing.assert_allclose(big[0, 2] - big[0, 0], 40.0 * 1000 / 16, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# weights shared by the tests below


def _synthetic_state_dict() -> dict[str, np.ndarray]:
    synthetic = pytest.importorskip("detlayers.models.synthetic_weights")
    calibration = str(CALIBRATION) if CALIBRATION.is_file() else None
    return synthetic.mask_rcnn_r50_fpn_state_dict(seed=0, calibration=calibration)


# The tests of the R50 weights and predictors run on one xdist worker, which builds the module's
# fixtures and compiles each predictor once (tests/conftest.py).
R50_GROUP = pytest.mark.xdist_group("mask_rcnn_r50")


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def state_dict() -> dict[str, np.ndarray]:
    return _synthetic_state_dict()


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def r50_variables(state_dict):
    from detlayers.models import build_model, load_detectron2_weights, mask_rcnn_R_50_FPN_3x_config

    return load_detectron2_weights(build_model(mask_rcnn_R_50_FPN_3x_config()), state_dict)


_PREDICTORS: dict = {}


def _predictor(variables, min_size: int, max_size: int = 1333):
    """One predictor (one compiled function per input shape) per test size, shared by the module."""
    from detlayers.models import Predictor, mask_rcnn_R_50_FPN_3x_config

    key = (min_size, max_size)
    if key not in _PREDICTORS:
        cfg = mask_rcnn_R_50_FPN_3x_config()
        cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", min_size, "INPUT.MAX_SIZE_TEST", max_size])
        _PREDICTORS[key] = Predictor(cfg, variables)
    return _PREDICTORS[key]


# --------------------------------------------------------------------------------------------
# parity with detectron2


def _load_case(path: pathlib.Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        case = {k: data[k] for k in data.files}
    k, h, w = (int(v) for v in case["mask_shape"])
    case["pred_masks"] = np.unpackbits(case["pred_masks_packed"], axis=-1, count=w).astype(bool).reshape(k, h, w)
    return case


def test_parity_fixtures_exist():
    if not CASES:
        pytest.skip(
            "no tests/fixtures/mask_rcnn_<image>_<size>.npz: generate them with "
            "tools/fixtures/make_mask_rcnn.py (needs detectron2)"
        )
    assert CALIBRATION.is_file(), "the parity fixtures need tests/fixtures/mask_rcnn_bn_calibration.npz"
    assert len({str(_load_case(p)["image_name"]) for p in CASES}) >= 2
    assert len({int(_load_case(p)["min_size"]) for p in CASES}) >= 2


@R50_GROUP
@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_parity_with_detectron2(case_path, r50_variables):
    case = _load_case(case_path)
    image = photo_bgr(str(case["image_name"]))
    assert tuple(image.shape[:2]) == tuple(case["image_hw"])
    predictor = _predictor(r50_variables, int(case["min_size"]), int(case["max_size"]))
    images, image_hw, original_hw, canvas = predictor.inputs([image])
    assert tuple(image_hw[0]) == tuple(case["input_hw"])
    out = jax.device_get(predictor.run(images, image_hw, original_hw, canvas, return_intermediates=True))

    check_fpn_and_proposals(out, case)
    valid = out["proposal_valid"][0]
    np.testing.assert_allclose(out["proposal_boxes"][0][valid][:10], case["proposal_boxes"][:10], atol=1e-2, rtol=0)
    ours = instances_with_masks(out, case)
    assert np.all(np.diff(ours["scores"]) <= 0), "instances are not sorted by score"
    assert not np.any((ours["pasted_soft"] != ours["pred_masks"]) & ~ours["ambiguous"])
    checked = compare_instances(case, ours, float(case["score_thresh"]), int(case["topk"]))
    assert checked >= min(10, len(case["scores"]) // 2), f"only {checked} instances compared"


def instances_with_masks(out: dict, case: dict) -> dict:
    """Image 0's valid instances of a ``return_intermediates`` run, as ``compare_instances`` takes
    them: masks cut to the image, the pixels within ``MASK_PROB_MARGIN`` of 0.5 (``ambiguous``),
    ``pasted_soft >= 0.5`` and ``paste_at(j, box)`` (our mask ``j`` pasted into another box)."""
    from detlayers.mask_ops import paste_masks_in_image

    k = int(out["num_instances"][0])
    h, w = (int(v) for v in case["image_hw"])
    ours = {
        "pred_boxes": out["pred_boxes"][0, :k],
        "scores": out["scores"][0, :k],
        "pred_classes": out["pred_classes"][0, :k].astype(np.int64),
        "pred_masks": out["pred_masks"][0, :k, :h, :w],
    }
    soft = np.asarray(paste_masks_in_image(out["mask_probs"][0, :k], ours["pred_boxes"], (h, w), None))
    ours["ambiguous"] = np.abs(soft - 0.5) < MASK_PROB_MARGIN
    ours["pasted_soft"] = soft >= 0.5
    paste_one = jax.jit(lambda probs, box: paste_masks_in_image(probs[None], box[None], (h, w), None)[0])
    ours["paste_at"] = lambda j, box: np.asarray(paste_one(out["mask_probs"][0, j], np.asarray(box, np.float32)))
    return ours


@R50_GROUP
def test_static_shapes_and_valid_prefix(r50_variables):
    predictor = _predictor(r50_variables, 256)
    image = photo_bgr("chelsea")
    images, image_hw, original_hw, canvas = predictor.inputs([image])
    assert images.shape[1] % 32 == 0 and images.shape[2] % 32 == 0
    out = predictor.run(images, image_hw, original_hw, canvas, return_intermediates=True)
    assert out["pred_boxes"].shape == (1, 100, 4)
    assert out["pred_masks"].shape == (1, 100, *canvas)
    assert out["mask_probs"].shape == (1, 100, 28, 28)
    assert out["proposal_boxes"].shape == (1, 1000, 4)
    valid = np.asarray(out["valid"][0])
    k = int(out["num_instances"][0])
    assert valid[:k].all() and not valid[k:].any()
    assert not np.asarray(out["pred_masks"][0, k:]).any()
    pv = np.asarray(out["proposal_valid"][0])
    assert pv[: pv.sum()].all()


# --------------------------------------------------------------------------------------------
# checkpoints


@R50_GROUP
def test_pkl_and_pth_load_like_the_dict(state_dict, r50_variables, tmp_path):
    from detlayers.models import build_model, load_detectron2_weights, mask_rcnn_R_50_FPN_3x_config

    model = build_model(mask_rcnn_R_50_FPN_3x_config())
    pkl = tmp_path / "model_final_test.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": state_dict, "__author__": "test", "matching_heuristics": True}, f)
    from_pkl = load_detectron2_weights(model, pkl)
    jax.tree.map(np.testing.assert_array_equal, from_pkl, r50_variables)

    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    tensors["pixel_mean"] = torch.zeros(3, 1, 1)  # detectron2 buffers that carry no weights
    tensors["pixel_std"] = torch.ones(3, 1, 1)
    tensors["backbone.bottom_up.stem.conv1.norm.num_batches_tracked"] = torch.tensor(0)
    pth = tmp_path / "model.pth"
    torch.save({"model": tensors}, pth)
    from_pth = load_detectron2_weights(model, pth)
    jax.tree.map(np.testing.assert_array_equal, from_pth, r50_variables)
    fc1 = from_pth["params"]["roi_heads"]["box_head"]["fc1"]["kernel"]
    np.testing.assert_array_equal(fc1, state_dict["roi_heads.box_head.fc1.weight"].T)


@R50_GROUP
def test_checkpoint_errors_list_every_bad_key(state_dict):
    from detlayers.models import build_model, load_detectron2_weights, mask_rcnn_R_50_FPN_3x_config

    bad = dict(state_dict)
    del bad["roi_heads.mask_head.deconv.weight"]
    del bad["backbone.bottom_up.res3.2.conv2.norm.running_var"]
    bad["roi_heads.box_head.fc3.weight"] = np.zeros((4, 4), np.float32)
    bad["roi_heads.box_predictor.cls_score.weight"] = np.zeros((91, 1024), np.float32)
    with pytest.raises(ValueError) as info:
        load_detectron2_weights(build_model(mask_rcnn_R_50_FPN_3x_config()), bad)
    message = str(info.value)
    for key in ("roi_heads.mask_head.deconv.weight", "backbone.bottom_up.res3.2.conv2.norm.running_var",
                "roi_heads.box_head.fc3.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert key in message
    assert "missing keys" in message and "unexpected keys" in message and "mis-shaped keys" in message


@R50_GROUP
def test_state_dict_names_are_detectron2s(state_dict):
    from detlayers._module_trace import trace_init
    from detlayers.models import build_model, mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.checkpoint import example_inputs
    from detlayers.torch_weights import _torch_key

    shapes, modules = trace_init(build_model(mask_rcnn_R_50_FPN_3x_config()), example_inputs(), {})
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path({k: shapes[k] for k in ("params", "batch_stats")})[0]:
        keys = [p.key for p in path]
        names.add(_torch_key(keys[0], tuple(keys[1:]), modules))
    assert names == set(state_dict)


@pytest.mark.parametrize("norm", ["FrozenBN", "GN"])
def test_freeze_at_stops_gradients_of_the_frozen_stages(norm):
    import jax.numpy as jnp

    from detlayers.models.backbone.resnet import ResNet

    net = ResNet(depth=18, norm=norm, stem_out_channels=32, res2_out_channels=32, freeze_at=2,
                 out_features=("res2", "res3"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
    variables = net.init(jax.random.key(0), x)
    params = variables["params"]
    assert set(params) == {"stem", "res2_0", "res2_1", "res3_0", "res3_1"}
    if norm == "GN":
        assert set(params["res3_0"]["conv1"]["norm"]) == {"scale", "bias"}

    def loss(p):
        out = net.apply({**variables, "params": p}, x)
        return jnp.sum(out["res3"] ** 2) + jnp.sum(out["res2"] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norms = {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v))) for k, v in grads.items()}
    assert norms["stem"] == 0 and norms["res2_0"] == 0 and norms["res2_1"] == 0
    assert norms["res3_0"] > 0 and norms["res3_1"] > 0
