"""DeepLabV3+ (detectron2's ``projects/DeepLab``) against detectron2's own outputs, plus its config,
names and errors.

Fixtures ``tests/fixtures/deeplab_v3_plus{,_keys}.npz`` and ``deeplab{,_keys}_calibration.npz`` are
written by ``tools/fixtures/make_deeplab.py`` (detectron2 built from source, CPU) from
``synthetic_weights.deeplab_v3_plus_state_dict(seed=0, depth=50, calibration=...)``, which the tests
regenerate; neither torch nor detectron2 is needed. The config is the zoo's
``deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16.yaml`` with ``RESNETS.DEPTH`` 50 (R-103 is
ResNet-101 with the DeepLab stem: the same code paths, 17 more res4 blocks) and ``INPUT.CROP.SIZE``
(160, 240) (the ASPP pools over ``CROP.SIZE / 16``, which must divide res5: 10x15 for the 320x480
batch). SyncBN at inference is a batch norm with running statistics.

* ``zoo``: ONE batch of chelsea at a short side of 256 and coffee at 320 (padded to 320x480);
  compared: a few channels of res2 and res5, the head's logits at the padded input size and the
  final ``sem_seg`` logits at each original size (a subsample of pixels and classes) and their
  argmax at every pixel.
* ``keys``: own weights (``STEM_TYPE`` "basic", ``USE_DEPTHWISE_SEPARABLE_CONV`` True, a decoder on
  res2 and res3 with ``PROJECT_CHANNELS`` [48, 32]) with
  ``RES4_DILATION`` 2 / ``RES5_DILATION`` 4, ``RES5_MULTI_GRID`` [1, 3, 2], ``ASPP_DILATIONS``
  [3, 6, 9], ``INPUT.CROP.ENABLED`` False (global image pooling) and ``COMMON_STRIDE`` 2, both
  photographs at 128 through ``Predictor.predict_batch``: the final ``sem_seg``.

One compile per case.
"""

from __future__ import annotations

import detection_parity as parity
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("deeplab")

# Max error over the compared maps and logits, relative to their largest magnitude. Measured: res2
# 2e-6, res5 1.0e-4, logits 1.5e-4 (detection_parity.FPN_RTOL is 1e-4): float32 rounding grows
# through 16 bottleneck blocks whose batch norms divide by the spread of channels the calibration
# photograph barely excites.
LOGIT_RTOL = 3e-4


def _config(case: dict | None = None, head: str = "DeepLabV3PlusHead"):
    from detlayers.models.config import (
        deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config,
        deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config,
    )

    if head == "DeepLabV3PlusHead":
        cfg = deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config()
    else:
        cfg = deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config()
    if case is not None:
        cfg.merge_from_list(parity.overrides(case))
    return cfg


def _predictor(case: dict, calibration: str, extra: tuple = ()):
    from detlayers.models import Predictor
    from detlayers.models.synthetic_weights import deeplab_v3_plus_state_dict

    assert int(case["seed"]) == 0
    path = parity.FIXTURES / f"{calibration}.npz"
    if not path.is_file():
        pytest.skip(f"no {path.name}: generate it with tools/fixtures/make_deeplab.py (needs detectron2)")
    kwargs = parity.weights_kwargs(case)
    state = deeplab_v3_plus_state_dict(seed=0, calibration=path, **kwargs)
    cfg = _config(case, kwargs.get("head", "DeepLabV3PlusHead"))
    cfg.merge_from_list(list(extra))
    return Predictor(cfg, state)


def _check_logits(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    error = np.abs(ours - ref).max() / np.abs(ref).max()
    assert error <= LOGIT_RTOL, f"{what}: relative error {error:.2e}"


def _check_sem_seg(sem_seg: np.ndarray, case: dict, i: int) -> None:
    """Image ``i``'s final logits ``[H, W, C]`` at its original size: the stored subsample, and the
    argmax at every pixel where our two best logits differ by more than the two may err (twice
    the logits' tolerance), so rounding cannot swap them."""
    h, w = (int(v) for v in case["image_hw"][i])
    assert sem_seg.shape[:2] == (h, w)
    ref = case[f"sem_seg_{i}"]
    _check_logits(sem_seg[::8, ::8, ::3], ref, f"sem_seg of image {i}")
    top2 = np.sort(sem_seg, axis=-1)[..., -2:]
    certain = top2[..., 1] - top2[..., 0] > 2 * LOGIT_RTOL * np.abs(ref).max()
    assert certain.mean() > 0.99, certain.mean()
    labels = sem_seg.argmax(axis=-1)
    agree = (labels == case[f"sem_seg_argmax_{i}"]) | ~certain
    assert agree.all(), f"image {i}: {(~agree).sum()} pixels of another class"
    assert len(np.unique(labels)) >= 10  # a meaningful map, not one class everywhere


def _run_batch(stem: str, calibration: str) -> tuple[dict, dict]:
    """detlayers on a case's batch (each photograph at its own size, one padded batch), with
    intermediates, on a bucketed canvas."""
    from detlayers.models import batch_images, preprocess_image

    case = parity.load_case(stem)
    predictor = _predictor(case, calibration)
    assert predictor.size_divisibility == 0 and predictor.is_semantic and not predictor.panoptic
    photos = [parity.photo_bgr(str(name)) for name in case["image_names"]]
    resized = []
    for photo, min_size in zip(photos, case["min_sizes"]):
        sized = predictor.cfg.clone()
        sized.defrost()
        sized.merge_from_list(["INPUT.MIN_SIZE_TEST", int(min_size), "INPUT.MAX_SIZE_TEST", int(case["max_size"])])
        resized.append(preprocess_image(photo, sized))
    images, image_hw = batch_images(resized, predictor.size_divisibility)
    np.testing.assert_array_equal(image_hw, case["input_hw"])
    assert tuple(images.shape[1:3]) == tuple(case["padded_hw"])
    originals = np.asarray(case["image_hw"], np.int32)
    canvas = predictor.mask_canvas(originals)
    assert canvas == (512, 640)  # larger than every image: the logits sit in each [:h, :w] corner
    out = predictor.run(images, image_hw, originals, canvas, return_intermediates=True)
    return case, jax.device_get(out)


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def zoo_run() -> tuple[dict, dict]:
    return _run_batch("deeplab_v3_plus", "deeplab_calibration")


def test_zoo_backbone_and_logits_match_detectron2(zoo_run):
    case, out = zoo_run
    for name in ("res2", "res5"):
        step = 2 if name == "res2" else 1
        _check_logits(out[name][:, ::step, ::step, case[f"{name}_channels"]], case[name], name)
    assert out["res5"].shape[1:3] == (20, 30)  # output stride 16: res5 dilated
    _check_logits(out["sem_seg_logits"][:, ::8, ::8, ::3], case["sem_seg_logits"], "head logits")


def test_zoo_sem_seg_matches_detectron2(zoo_run):
    case, out = zoo_run
    for i, (h, w) in enumerate(case["image_hw"].tolist()):
        _check_sem_seg(out["sem_seg"][i, :h, :w], case, i)
        assert not out["sem_seg"][i, h:].any() and not out["sem_seg"][i, :, w:].any()


def test_deeplab_v3_head_matches_detectron2():
    """``deeplab_v3_R_103_os16_mg124_poly_90k_bs16.yaml``: ``DeepLabV3Head`` (the ASPP on res5,
    its pooling window ``CROP.SIZE / COMMON_STRIDE``, logits upsampled by 16) on its own weights."""
    case, out = _run_batch("deeplab_v3", "deeplab_v3_calibration")
    assert "res2" not in out and out["res5"].shape[1:3] == (20, 30)
    _check_logits(out["res5"][..., case["res5_channels"]], case["res5"], "res5")
    _check_logits(out["sem_seg_logits"][:, ::8, ::8, ::3], case["sem_seg_logits"], "head logits")
    for i, (h, w) in enumerate(case["image_hw"].tolist()):
        _check_sem_seg(out["sem_seg"][i, :h, :w], case, i)


def test_non_default_keys_match_detectron2():
    """Basic stem, depthwise-separable ASPP and decoder, a two-stage decoder (res3 projected to 32,
    then res2 to 48), res4 dilated (output stride 8), a multi-grid of 1, 3, 2, ASPP dilations
    3/6/9, global image pooling and COMMON_STRIDE 2, on their own weights, through
    ``Predictor.predict_batch``."""
    case = parity.load_case("deeplab_v3_plus_keys")
    keys = {str(k) for k in case["overrides"][0::2]}
    assert {"MODEL.RESNETS.STEM_TYPE", "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV",
            "MODEL.RESNETS.RES5_MULTI_GRID", "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", "MODEL.RESNETS.RES4_DILATION",
            "INPUT.CROP.ENABLED", "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS"} <= keys
    (min_size,) = set(case["min_sizes"].tolist())
    predictor = _predictor(case, "deeplab_keys_calibration", ("INPUT.MIN_SIZE_TEST", min_size))
    assert predictor.model.backbone.output_shape()["res5"].stride == 8
    head = predictor.model.sem_seg_head
    assert head.aspp_pool_kernel is None and head.in_features == ("res2", "res3", "res5")
    assert head.project_channels == (48, 32)
    results = predictor.predict_batch([parity.photo_bgr(str(name)) for name in case["image_names"]])
    for i, result in enumerate(results):
        _check_sem_seg(result["sem_seg"], case, i)


# --------------------------------------------------------------------------------------------
# configs, names and errors (no compile)


@pytest.mark.parametrize("head, name", [("DeepLabV3PlusHead", "deeplab_v3_plus"), ("DeepLabV3Head", "deeplab_v3")])
def test_zoo_functions_equal_the_yaml_files(head, name):
    from test_config import CASES as CONFIG_CASES
    from test_config import assert_same_flat, flatten

    yaml = f"projects/DeepLab/configs/Cityscapes-SemanticSegmentation/{name}_R_103_os16_mg124_poly_90k_bs16.yaml"
    assert_same_flat(flatten(_config(head=head)), CONFIG_CASES[yaml]["flat"])


def test_zoo_model_structure_follows_the_config():
    """R-103 (ResNet-101, DeepLab stem of 128), res5 multi-grid dilations 2/4/8 at stride 16, the
    ASPP window 32x64 (``CROP.SIZE / 16``), res2 projected to 48; its weights' names load."""
    from detlayers.models import build_model, load_detectron2_weights
    from detlayers.models.synthetic_weights import deeplab_v3_plus_state_dict

    model = build_model(_config())
    backbone, head = model.backbone, model.sem_seg_head
    assert (backbone.depth, backbone.stem_type, backbone.stem_out_channels) == (101, "deeplab", 128)
    assert [backbone._block_dilation(5, b) for b in range(3)] == [2, 4, 8]
    assert backbone.output_shape()["res5"].stride == 16 and backbone.norm == "SyncBN"
    assert head.aspp_pool_kernel == (32, 64) and head.in_features == ("res2", "res5")
    assert head.project_channels == (48,) and head.common_stride == 4 and head.num_classes == 19
    assert model.example_input_hw() == (512, 1024)
    variables = load_detectron2_weights(model, deeplab_v3_plus_state_dict(depth=101))
    assert len(variables["params"]["backbone"]) == 1 + 3 + 4 + 23 + 3  # the stem and every block


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.RESNETS.STEM_TYPE", "wide"], "MODEL.RESNETS.STEM_TYPE"),
    (["MODEL.RESNETS.RES4_DILATION", 4], "MODEL.RESNETS.RES4_DILATION"),
    (["MODEL.RESNETS.RES4_DILATION", 2], "MODEL.RESNETS.RES5_DILATION"),
    (["MODEL.RESNETS.RES5_DILATION", 3], "MODEL.RESNETS.RES5_DILATION"),
    (["MODEL.RESNETS.RES5_MULTI_GRID", [1, 2]], "MODEL.RESNETS.RES5_MULTI_GRID"),
    (["MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", [6, 12]], "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS"),
    (["MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [48, 32]], "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS"),
    (["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res3", "res5"]], "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    (["MODEL.SEM_SEG_HEAD.LOSS_TYPE", "dice"], "MODEL.SEM_SEG_HEAD.LOSS_TYPE"),
    (["INPUT.CROP.SIZE", (500, 1000)], "INPUT.CROP.SIZE"),
    (["INPUT.CROP.TYPE", "relative"], "INPUT.CROP.TYPE"),
    (["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHeads"], "MODEL.SEM_SEG_HEAD.NAME"),
])
def test_unsupported_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    cfg = _config()
    cfg.merge_from_list(pairs)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


@pytest.mark.parametrize("pairs, key", [
    (["MODEL.SEM_SEG_HEAD.CONVS_DIM", 128], "MODEL.SEM_SEG_HEAD.CONVS_DIM"),
    (["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res4", "res5"]], "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    (["INPUT.CROP.SIZE", (512, 1000)], "INPUT.CROP.SIZE"),
])
def test_unsupported_v3_values_raise_naming_the_key(pairs, key):
    from detlayers.models import build_model

    cfg = _config(head="DeepLabV3Head")
    cfg.merge_from_list(pairs)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


def test_deeplab_keys_are_needed():
    """The project's keys come from ``add_deeplab_config``; without them the builder says so."""
    from detlayers.models import build_model
    from detlayers.models.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "SemanticSegmentor",
                         "MODEL.BACKBONE.NAME", "build_resnet_deeplab_backbone"])
    with pytest.raises(ValueError, match="add_deeplab_config"):
        build_model(cfg)


def test_training_is_refused():
    import jax.numpy as jnp

    from detlayers.models import build_model

    model = build_model(_config())
    images = jnp.zeros((1, 512, 1024, 3))
    hw = jnp.array([[512, 1024]])
    with pytest.raises(NotImplementedError, match="SemanticSegmentor: training"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), images, hw, hw, train=True))


# --------------------------------------------------------------------------------------------
# export


def test_export_round_trip():
    """A narrow DeepLabV3+ (random weights, 64x96 input) exported with its weights, serialized and
    loaded back: the same logits at the original size."""
    from detlayers.models import Predictor, build_model, export_predictor, load_exported

    cfg = _config()
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.RESNETS.WIDTH_PER_GROUP", 4, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 8, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 8,
        "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [4], "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3, "INPUT.CROP.ENABLED", False,
        "INPUT.MIN_SIZE_TEST", 0,
    ])
    model = build_model(cfg)
    images = jax.numpy.zeros((1, 64, 96, 3))
    sizes = jax.numpy.asarray([[60, 90]], jax.numpy.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, sizes, sizes)
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # He-normal kernels, unit batch-norm statistics, zero biases
        name = getattr(path[-1], "key", None)
        if name == "kernel":
            return rng.normal(0.0, (2.0 / np.prod(leaf.shape[:-1])) ** 0.5, leaf.shape).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("var", "scale") else 0.0, np.float32)

    predictor = Predictor(cfg, jax.tree_util.tree_map_with_path(draw, shapes))
    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    inputs = predictor.inputs([image])
    expected = jax.device_get(predictor.run(*inputs))["sem_seg"]
    assert expected.shape == (1, 60, 90, 3) and np.isfinite(expected).all() and expected.std() > 0
    exported = export_predictor(predictor, 1, inputs[0].shape[1:3], inputs[3])
    got = jax.device_get(load_exported(exported.serialize()).call(*inputs[:3]))["sem_seg"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_benchmark_photo_is_half_a_cityscapes_frame_that_the_resize_keeps():
    """The ``deeplab`` benchmark's photograph: BGR uint8 512x1024, which ``ResizeShortestEdge(512,
    1024)`` leaves as it is, so res5 (stride 16) is the zoo ASPP's 32x64 window."""
    from detlayers.bench import FAMILIES
    from detlayers.bench import deeplab as bench_deeplab
    from detlayers.models import resize_shortest_edge_shape

    image = bench_deeplab.benchmark_image()
    assert image.shape == (512, 1024, 3) and image.dtype == np.uint8
    assert resize_shortest_edge_shape(512, 1024, 512, 1024) == (512, 1024)
    assert FAMILIES["deeplab"] == "detlayers.bench.deeplab"
    crop = parity.photo_bgr("coffee")[50:350]
    assert abs(float(image.mean()) - float(crop.mean())) < 2  # the same photograph, channel order kept
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), crop.reshape(-1, 3).mean(0), atol=2)
