"""detectron2's Mask R-CNN variants from ``configs/Misc`` against detectron2's own outputs:
GroupNorm (``mask_rcnn_R_50_FPN_3x_gn``) and deformable convolution in res3-res5
(``mask_rcnn_R_50_FPN_3x_dconv_c3-c5``, and the same with ``DEFORM_MODULATED``).

Fixtures ``tests/fixtures/mask_rcnn_<variant>_<image>_<min_size>.npz`` and
``mask_rcnn_<variant>_calibration.npz`` are written by ``tools/fixtures/make_mask_rcnn_variants.py``
(detectron2 built from source, CPU) from ``synthetic_weights.mask_rcnn_r50_fpn_state_dict(seed=0,
variant=..., calibration=...)``, which the tests regenerate; neither torch nor detectron2 is needed.
The comparison (FPN features, proposals, instances, masks) and its bounds are the Mask R-CNN test's.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import test_mask_rcnn as base
from detection_parity import check_fpn_and_proposals, compare_instances, photo_bgr

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# fixture variant -> the synthetic_weights variant (the config file under configs/, no .yaml)
VARIANTS = {
    "gn": "Misc/mask_rcnn_R_50_FPN_3x_gn",
    "dconv": "Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5",
    "mdconv": "Misc/mask_rcnn_R_50_FPN_3x_mdconv_c3-c5",
}
CASES = sorted(
    p for variant in VARIANTS for p in FIXTURES.glob(f"mask_rcnn_{variant}_*_*.npz") if "calibration" not in p.name
)


def _variant_of(path: pathlib.Path) -> str:
    return path.name.split("_")[2]


def _config(variant: str, min_size: int, max_size: int):
    from detlayers.models.config import mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config, mask_rcnn_R_50_FPN_3x_gn_config

    if variant == "gn":
        cfg = mask_rcnn_R_50_FPN_3x_gn_config()
    else:
        cfg = mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config()
        cfg.MODEL.RESNETS.DEFORM_MODULATED = variant == "mdconv"
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", min_size, "INPUT.MAX_SIZE_TEST", max_size])
    return cfg


_PREDICTORS: dict = {}


def _predictor(variant: str, min_size: int, max_size: int):
    """One predictor (one compile) per variant and size, shared by the module."""
    from detlayers.models import Predictor
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_state_dict

    key = (variant, min_size, max_size)
    if key not in _PREDICTORS:
        state = mask_rcnn_r50_fpn_state_dict(seed=0, variant=VARIANTS[variant],
                                             calibration=FIXTURES / f"mask_rcnn_{variant}_calibration.npz")
        _PREDICTORS[key] = Predictor(_config(variant, min_size, max_size), state)
    return _PREDICTORS[key]


def test_variant_fixtures_exist():
    found = {_variant_of(p) for p in CASES}
    if not found:
        pytest.skip("no variant fixtures: generate them with tools/fixtures/make_mask_rcnn_variants.py")
    assert {"gn", "dconv"} <= found, found


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_variant_parity_with_detectron2(case_path):
    case = base._load_case(case_path)
    variant = _variant_of(case_path)
    assert str(case["config"]) == VARIANTS[variant]
    image = photo_bgr(str(case["image_name"]))
    predictor = _predictor(variant, int(case["min_size"]), int(case["max_size"]))
    images, image_hw, original_hw, canvas = predictor.inputs([image])
    assert tuple(image_hw[0]) == tuple(case["input_hw"])
    out = jax.device_get(predictor.run(images, image_hw, original_hw, canvas, return_intermediates=True))

    check_fpn_and_proposals(out, case)
    checked = compare_instances(case, base.instances_with_masks(out, case), float(case["score_thresh"]),
                                int(case["topk"]))
    assert checked >= min(10, len(case["scores"]) // 2), f"only {checked} instances compared"


@pytest.mark.parametrize("variant", ["gn", "mdconv"])
def test_state_dict_names_are_detectron2s(variant):
    """The modules' detectron2 names equal the synthetic state dict's, which the fixture script
    checks against detectron2's own ``state_dict()`` (names, shapes and order)."""
    from detlayers._module_trace import trace_init
    from detlayers.models import build_model
    from detlayers.models.checkpoint import example_inputs
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_shapes
    from detlayers.torch_weights import _torch_key

    shapes, modules = trace_init(build_model(_config(variant, 256, 1333)), example_inputs(), {})
    names = set()
    collections = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}  # GN: no batch_stats
    for path, _ in jax.tree_util.tree_flatten_with_path(collections)[0]:
        keys = [p.key for p in path]
        names.add(_torch_key(keys[0], tuple(keys[1:]), modules))
    assert names == set(mask_rcnn_r50_fpn_shapes(variant=VARIANTS[variant]))


def test_deformable_config_errors():
    from detlayers.models import build_model
    from detlayers.models.config import mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config

    cfg = mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config()
    cfg.MODEL.RESNETS.DEPTH = 34
    with pytest.raises(ValueError, match="DEFORM_ON_PER_STAGE is unsupported for R18/R34"):
        build_model(cfg)
    cfg = mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config()
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True]
    with pytest.raises(ValueError, match=r"DEFORM_ON_PER_STAGE needs 4 entries"):
        build_model(cfg)


def test_split_offset_mask_keeps_detectron2s_channel_order():
    """detectron2: ``x, y, m = chunk(out, 3, dim=1); offset = cat(x, y); mask = sigmoid(m)``."""
    from detlayers.models.backbone.resnet import split_offset_mask

    raw = np.random.default_rng(0).normal(size=(1, 2, 3, 54)).astype(np.float32)
    offset, mask = split_offset_mask(raw, 2)
    np.testing.assert_array_equal(np.asarray(offset), raw[..., :36])
    np.testing.assert_allclose(np.asarray(mask), 1 / (1 + np.exp(-raw[..., 36:].astype(np.float64))), rtol=1e-6)


def test_variant_zoo_functions_equal_the_yaml_files():
    from test_config import CASES as CONFIG_CASES
    from test_config import assert_same_flat, flatten

    from detlayers.models.config import mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config, mask_rcnn_R_50_FPN_3x_gn_config

    assert_same_flat(flatten(mask_rcnn_R_50_FPN_3x_gn_config()),
                     CONFIG_CASES["configs/Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"]["flat"])
    assert_same_flat(flatten(mask_rcnn_R_50_FPN_3x_dconv_c3_c5_config()),
                     CONFIG_CASES["configs/Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml"]["flat"])
