"""The jitted Mask R-CNN inference exported with ``jax.export`` and run in a fresh process.

A small ResNet-18-FPN Mask R-CNN (random weights, small image) keeps this fast; the exported
computation is the same code as the R50 model's.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).parents[1]
# One xdist worker runs the module: the model in the fixture is compiled once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("mask_rcnn_export")


def tiny_config():
    from detlayers.models import mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        "MODEL.ROI_HEADS.NUM_CLASSES", 5, "MODEL.RPN.PRE_NMS_TOPK_TEST", 300, "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
        "TEST.DETECTIONS_PER_IMAGE", 20, "INPUT.MIN_SIZE_TEST", 0,
    ])
    return cfg


def random_variables(model, *example_args) -> dict:
    """Variables for ``model`` like the ones its own init draws, made in NumPy in the tree that
    ``jax.eval_shape`` gives the init (``jax.jit(model.init)`` would compile the whole forward pass,
    costing more than the predictor's own compilation).

    Kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default; ``fan_in`` the
    product of all kernel axes but the last), FrozenBN scale 1, bias 0, mean 0 and variance 4:
    statistics that keep activations in range (identity ones let them grow through the backbone);
    the scale and bias of a norm layer without a kernel (GroupNorm, BatchNorm), 1 and 0.
    """
    rng = np.random.default_rng(0)
    frozen_bn = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 4.0}

    def fill(collection: str, tree: dict) -> dict:
        out = {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = fill(collection, leaf)
            elif collection == "batch_stats" or "kernel" not in tree:  # a norm layer's statistics or affine
                out[name] = np.full(leaf.shape, frozen_bn[name], leaf.dtype)
            else:  # a layer's kernel and bias
                bound = 1.0 / np.sqrt(np.prod(tree["kernel"].shape[:-1]))
                out[name] = rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
        return out

    shapes = jax.eval_shape(model.init, jax.random.key(0), *example_args)
    return {collection: fill(collection, tree) for collection, tree in shapes.items()}


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def tiny():
    from detlayers.models import Predictor, build_model

    cfg = tiny_config()
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    images = jnp.zeros((1, 64, 96, 3), jnp.float32)
    sizes = jnp.asarray([[60, 90]], jnp.int32)
    predictor = Predictor(cfg, random_variables(model, images, sizes, sizes))
    inputs = predictor.inputs([image])
    expected = jax.device_get(predictor.run(*inputs))
    return predictor, inputs, expected


def _run_fresh(tmp_path, artifact: bytes, inputs, import_lines: str) -> dict:
    (tmp_path / "model.bin").write_bytes(artifact)
    np.savez(tmp_path / "inputs.npz", images=inputs[0], image_hw=inputs[1], output_hw=inputs[2])
    script = "\n".join([
        "import sys",
        "import numpy as np",
        "import jax",
        import_lines,
        "data = np.load('inputs.npz')",
        "out = exported.call(data['images'], data['image_hw'], data['output_hw'])",
        "np.savez('outputs.npz', **{k: np.asarray(v) for k, v in out.items()})",
        "assert 'flax' not in sys.modules, 'the artifact must not need flax'",
    ])
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=_env())
    with np.load(tmp_path / "outputs.npz") as data:
        return {k: data[k] for k in data.files}


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DETLAYERS_NMS_BACKEND", None)
    return env


def _assert_identical(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], np.asarray(expected[key]), err_msg=key)


def _assert_same_detections(got: dict, expected: dict) -> None:
    """Baked-in weights are constants XLA may fold: floats agree to rounding, decisions exactly."""
    assert set(got) == set(expected)
    for key in ("num_instances", "valid", "pred_classes"):
        np.testing.assert_array_equal(got[key], np.asarray(expected[key]), err_msg=key)
    for key in ("scores", "mask_probs"):
        np.testing.assert_allclose(got[key], np.asarray(expected[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    # A box coordinate is a difference of values as large as the image (centre and half size), so
    # its rounding is relative to the image size, not to the coordinate (which may be near 0).
    image_size = max(np.shape(expected["pred_masks"])[-2:])
    np.testing.assert_allclose(got["pred_boxes"], np.asarray(expected["pred_boxes"]), rtol=0,
                               atol=1e-5 * image_size, err_msg="pred_boxes")
    ambiguous = np.abs(np.asarray(expected["mask_probs"]) - 0.5).min() < 1e-4
    if not ambiguous:
        np.testing.assert_array_equal(got["pred_masks"], np.asarray(expected["pred_masks"]))


def test_export_round_trip_in_a_fresh_process(tiny, tmp_path):
    from detlayers.models import export_predictor

    predictor, inputs, expected = tiny
    assert int(expected["num_instances"][0]) > 0, "the test model should detect something"
    assert expected["pred_masks"].any()
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], inputs[3])
    got = _run_fresh(
        tmp_path, exported.serialize(), inputs,
        "from detlayers.models.export import load_exported\nexported = load_exported('model.bin')",
    )
    _assert_identical(got, jax.device_get(exported.call(*inputs[:3])))
    _assert_same_detections(got, expected)


def test_xla_nms_export_needs_only_jax(tiny, tmp_path):
    from detlayers.models import export_predictor
    from detlayers.nms import get_backend

    predictor, inputs, expected = tiny
    backend = get_backend()
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], inputs[3], nms_backend="xla")
    assert get_backend() == backend, "export_predictor must restore the NMS backend"
    assert "detlayers_" not in exported.mlir_module()
    got = _run_fresh(
        tmp_path, exported.serialize(), inputs,
        # the documented jax-only reading: check the header's SHA-256, deserialize the payload
        "import hashlib\n"
        "data = open('model.bin', 'rb').read()\n"
        "assert data[:16] == b'detlayers-export' and hashlib.sha256(data[60:]).digest() == data[28:60]\n"
        "exported = jax.export.deserialize(bytearray(data[60:]))\n"
        "assert not any(m.startswith('detlayers') for m in sys.modules)",
    )
    _assert_identical(got, jax.device_get(exported.call(*inputs[:3])))
    _assert_same_detections(got, expected)


def test_weights_as_argument(tiny):
    from detlayers.models import export_predictor

    predictor, inputs, expected = tiny
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], inputs[3], with_weights=False)
    got = jax.device_get(exported.call(predictor.variables, *[jnp.asarray(a) for a in inputs[:3]]))
    _assert_identical(got, expected)


def test_predictor_call_is_the_run_output_sliced(tiny):
    predictor, inputs, expected = tiny
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)  # the fixture's image
    out = predictor(image)
    k = int(expected["num_instances"][0])
    np.testing.assert_array_equal(out["pred_boxes"], expected["pred_boxes"][0, :k])
    np.testing.assert_array_equal(out["scores"], expected["scores"][0, :k])
    np.testing.assert_array_equal(out["pred_classes"], expected["pred_classes"][0, :k])
    np.testing.assert_array_equal(out["pred_masks"], expected["pred_masks"][0, :k, :60, :90])


def test_predict_batch_is_one_call_with_per_image_results(tiny):
    predictor, inputs, expected = tiny
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    second = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    calls = []
    run = predictor._forward
    predictor._forward = lambda *a, **k: calls.append(a[1].shape) or run(*a, **k)
    try:
        batch = predictor.predict_batch([first, second])
    finally:
        predictor._forward = run
    assert calls == [(2, 64, 96, 3)]
    for image, result in zip((first, second), batch):
        single = predictor(image)  # same padded size, so the same numbers
        assert set(result) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        for key in ("pred_boxes", "scores"):
            np.testing.assert_allclose(result[key], single[key], atol=1e-4, err_msg=key)
        for key in ("pred_classes", "pred_masks"):
            np.testing.assert_array_equal(result[key], single[key], err_msg=key)
    for result in batch:  # DefaultPredictor's layout: only the valid instances, NumPy, by score
        k = len(result["scores"])
        assert k > 0
        assert result["pred_boxes"].shape == (k, 4) and result["pred_boxes"].dtype == np.float32
        assert result["scores"].dtype == np.float32 and np.all(np.diff(result["scores"]) <= 0)
        assert result["pred_classes"].dtype == np.int64
        assert result["pred_masks"].shape == (k, 60, 90) and result["pred_masks"].dtype == bool


# --------------------------------------------------------------------------------------------
# every other architecture: the pure-XLA artifact in a fresh process (jax alone)

# (zoo config function, overrides making it tiny): ResNet-18, narrow layers; each keeps the
# architecture's own code paths (three cascade stages; the panoptic semantic head with GroupNorm
# and the panoptic combination; RRPN, ROIAlignRotated and rotated NMS; DeepLabV3+'s ASPP and decoder).
_TINY_RCNN = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
    "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.ROI_HEADS.NUM_CLASSES", 5, "MODEL.RPN.PRE_NMS_TOPK_TEST", 300, "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
    "TEST.DETECTIONS_PER_IMAGE", 20, "INPUT.MIN_SIZE_TEST", 0,
]
ARCHITECTURES = {
    "cascade_mask_rcnn": ("cascade_mask_rcnn_R_50_FPN_3x_config", _TINY_RCNN),
    "panoptic_fpn": ("panoptic_fpn_R_50_3x_config", _TINY_RCNN + [
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 6]),
    "rotated_faster_rcnn": ("rotated_faster_rcnn_R_50_FPN_3x_config", _TINY_RCNN),
    "deeplab_v3_plus": ("deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config", [
        "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.SEM_SEG_HEAD.NORM", "BN", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 32,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [8],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4, "INPUT.CROP.SIZE", [64, 96], "INPUT.MIN_SIZE_TEST", 0]),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_round_trips_through_a_jax_only_artifact(architecture, tmp_path):
    import detlayers.models.config as configs
    from detlayers.models import Predictor, build_model, export_predictor

    config_function, overrides = ARCHITECTURES[architecture]
    cfg = getattr(configs, config_function)()
    cfg.merge_from_list(overrides)
    model = build_model(cfg)
    images = jnp.zeros((1, 64, 96, 3), jnp.float32)
    sizes = jnp.asarray([[60, 90]], jnp.int32)
    predictor = Predictor(cfg, random_variables(model, images, sizes, sizes))
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    inputs = predictor.inputs([image])
    expected = jax.device_get(predictor.run(*inputs))
    if "num_instances" in expected:
        assert int(expected["num_instances"][0]) > 0, "the test model should detect something"
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], inputs[3], nms_backend="xla")
    assert "detlayers_" not in exported.mlir_module()
    got = _run_fresh(
        tmp_path, exported.serialize(), inputs,
        "import hashlib\n"
        "data = open('model.bin', 'rb').read()\n"
        "assert hashlib.sha256(data[60:]).digest() == data[28:60]\n"
        "exported = jax.export.deserialize(bytearray(data[60:]))\n"
        "assert not any(m.startswith('detlayers') for m in sys.modules)",
    )
    # the artifact computes what the predictor computes (weights baked in as constants XLA may
    # fold: floats to rounding, every decision exactly)
    assert set(got) == set(expected)
    for key, value in expected.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-3, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
