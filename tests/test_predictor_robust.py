"""``Predictor`` robustness: config values it cannot honour fail at construction naming the key,
an out-of-memory inference raises one clear ``MemoryError`` (in a subprocess with a small address
space limit) instead of hanging, and mixed image sizes compile a bounded number of times with
masks identical to the unbucketed ones.

One tiny ResNet-18-FPN Mask R-CNN (8-16 channels, random weights, 64-pixel images) keeps it fast:
one network compile in this process, and one in the out-of-memory child.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).parents[1]

TINY = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 8,
    "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RPN.PRE_NMS_TOPK_TEST", 100,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 12, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.2,
]


def _tiny_cfg(*pairs):
    from detlayers.models import mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list(TINY + list(pairs))  # in place, as detectron2's
    return cfg


OUTPUT_LAYER_SCALE = {"objectness_logits": 0.3, "anchor_deltas": 0.05, "cls_score": 0.3, "bbox_pred": 0.05,
                      "predictor": 0.3}


def _random_variables(cfg, seed: int = 0):
    """Variables of ``build_model(cfg)`` drawn from NumPy (no compiled init): kernels with std
    ``sqrt(2 / fan_in)`` (the stem's divided by 100: the input is not divided by a pixel std),
    small output layers (so that proposals and detections spread out), everything else 0 except
    FrozenBN scales and variances, 1."""
    from detlayers.models import build_model

    hw = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), hw, hw)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [p.key for p in path]
        name = keys[-1]
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) * OUTPUT_LAYER_SCALE.get(keys[-2], 1.0)
            return rng.normal(0, std / (100.0 if "stem" in keys else 1.0), leaf.shape).astype(np.float32)
        if name in ("scale", "var", "weight"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# --------------------------------------------------------------------------------------------
# config values the models cannot honour


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 0, "MODEL.RPN.PRE_NMS_TOPK_TEST must be positive"),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 0, "MODEL.RPN.POST_NMS_TOPK_TEST must be positive"),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", -5, "MODEL.RPN.POST_NMS_TOPK_TEST must be positive"),
    ("TEST.DETECTIONS_PER_IMAGE", 0, "TEST.DETECTIONS_PER_IMAGE 0 keeps no detection"),
    ("INPUT.MIN_SIZE_TEST", -1, "INPUT.MIN_SIZE_TEST must be >= 0"),
    ("INPUT.MAX_SIZE_TEST", 0, "INPUT.MAX_SIZE_TEST must be positive"),
    ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True is not supported"),
    ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True, "MODEL.ROI_BOX_HEAD.USE_FED_LOSS True is not supported"),
])
def test_bad_config_values_fail_at_construction_naming_the_key(key, value, message):
    from detlayers.models import Predictor

    cfg = _tiny_cfg(key, value)
    with pytest.raises(ValueError, match=message):
        Predictor(cfg, {"params": {}})


def test_negative_detections_per_image_is_no_limit():
    from detlayers.models import build_model

    model = build_model(_tiny_cfg("TEST.DETECTIONS_PER_IMAGE", -1))
    assert model.roi_heads.box_predictor.test_topk_per_image == -1
    hw = jnp.asarray([[64, 64]], jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), hw, hw,
                                               canvas_hw=(64, 64)))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), hw, hw, canvas_hw=(64, 64)), shapes)
    # every (proposal, class) candidate gets a slot: 50 proposals x 3 classes
    assert out["scores"].shape == (1, 150) and out["pred_masks"].shape == (1, 150, 64, 64)


@pytest.mark.parametrize("buckets, sizes, expected", [
    (128, [1, 128, 129, 300], [128, 128, 256, 384]),
    ((100, 200, 400), [50, 100, 101, 399, 401, 950], [100, 100, 200, 400, 800, 1200]),
    (None, [7, 300], [7, 300]),
])
def test_bucket_size(buckets, sizes, expected):
    from detlayers.models.predictor import bucket_size

    assert [bucket_size(s, buckets) for s in sizes] == expected


@pytest.mark.parametrize("buckets, error", [(0, ValueError), ((200, 100), ValueError), ("128", TypeError),
                                            (True, TypeError)])
def test_bad_size_buckets(buckets, error):
    from detlayers.models import Predictor

    with pytest.raises(error, match="size_buckets"):
        Predictor(_tiny_cfg(), {"params": {}}, size_buckets=buckets)


# --------------------------------------------------------------------------------------------
# mixed sizes: bounded compiles, identical masks

# Ten photo sizes; INPUT.MIN_SIZE_TEST = MAX_SIZE_TEST = 64 resizes every one to a long side of
# 64 (and, aspect ratios under 2, a short side over 32), so detectron2's padding to multiples of 32
# gives one network input shape; the canvases fall in four buckets of 128.
SIZES = [(100, 130), (90, 160), (250, 180), (64, 64), (200, 120), (127, 129), (200, 256), (129, 90),
         (40, 33), (256, 256)]


@pytest.fixture(scope="module")
def tiny_predictor():
    from detlayers.models import Predictor

    cfg = _tiny_cfg("INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64)
    return Predictor(cfg, _random_variables(cfg))


def _photo(hw, seed):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def test_mixed_sizes_compile_a_bounded_number_of_times(tiny_predictor):
    predictor = tiny_predictor
    base_forward, base_paste = predictor._forward._cache_size(), predictor._paste._cache_size()
    for seed, hw in enumerate(SIZES):
        out = predictor(_photo(hw, seed))
        assert out["pred_masks"].shape[1:] == hw
    def padded(h, w):  # long side 64, short side scaled (rounded), both padded to a multiple of 32
        short = int(min(h, w) * 64 / max(h, w) + 0.5)
        h, w = (64, short) if h >= w else (short, 64)
        return -(-h // 32) * 32, -(-w // 32) * 32

    inputs = {padded(h, w) for h, w in SIZES}
    canvases = {(-(-h // 128) * 128, -(-w // 128) * 128) for h, w in SIZES}
    assert (len(inputs), len(canvases)) == (1, 4)
    assert predictor._forward._cache_size() - base_forward == len(inputs)
    assert predictor._paste._cache_size() - base_paste == len(canvases)


def test_bucketed_masks_equal_the_exact_canvas(tiny_predictor):
    """The default canvas buckets against size_buckets=None (the canvas of detectron2's pasting, the
    original size) on the same network: every output identical, masks included."""
    from detlayers.models import Predictor

    exact = Predictor(tiny_predictor.cfg, tiny_predictor.variables, size_buckets=None)
    exact._forward = tiny_predictor._forward  # the same jitted network: compile it once
    for seed, hw in [(0, (100, 130)), (2, (250, 180))]:
        image = _photo(hw, seed)
        got, want = tiny_predictor(image), exact(image)
        assert len(want["scores"]) > 0 and want["pred_masks"].any()
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert tiny_predictor.mask_canvas(np.asarray([[250, 180]])) == (256, 256)
    assert exact.mask_canvas(np.asarray([[250, 180]])) == (250, 180)


# --------------------------------------------------------------------------------------------
# out of memory: one clear error, no hang

_OOM_CHILD = """
import resource
import sys

import numpy as np

sys.path.insert(0, {tests!r})
from test_predictor_robust import _random_variables, _tiny_cfg
from detlayers.models import Predictor

cfg = _tiny_cfg("INPUT.MIN_SIZE_TEST", 0, "MODEL.MASK_ON", False)  # no mask head: a faster compile
predictor = Predictor(cfg, _random_variables(cfg))
image = np.zeros((8000, 8000, 3), np.uint8)
# The address space the process has, plus 4 GiB: room for the compile and the host copies of
# the 8000 x 8000 input, not for the network's feature maps (about 1.9 GB a buffer).
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), vm + (4 << 30)))
try:
    predictor(image)
except MemoryError as err:
    print("MemoryError:", type(err).__name__, err, flush=True)
    sys.exit(3)
print("no error", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_raises_a_clear_error_without_hanging():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    # buffer sizes do not depend on LLVM's optimisations: without them the compile takes half the time
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    script = textwrap.dedent(_OOM_CHILD.format(tests=str(REPO / "tests")))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=420, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("MemoryError:"))
    assert "PredictorOutOfMemoryError" in line
    for part in ("out of memory", "original size 8000x8000", "padded to 8000x8000", "INPUT.MIN_SIZE_TEST",
                 "INPUT.MAX_SIZE_TEST", "fewer images per predict_batch call", "RESOURCE_EXHAUSTED"):
        assert part in line, (part, line)
