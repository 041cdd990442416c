"""roi_align_rotated / ROIAlignRotated against detectron2 fixtures, detectron2's published tables
and a float64 NumPy derivation (tests/fixtures/roi_align_rotated.npz: tools/fixtures/make_roi_align.py)."""

from __future__ import annotations

import functools
import math
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import axis_bin_weights, load_npz, roi_bins_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import detlayers as L


@functools.partial(jax.jit, static_argnames=("output_size", "sampling_ratio"))
def _forward_and_grad(features, rois, upstream, scale, *, output_size, sampling_ratio):
    out, vjp = jax.vjp(
        lambda f: L.roi_align_rotated(f, rois, output_size, scale, sampling_ratio), features
    )
    return out, vjp(upstream)[0]


@functools.partial(jax.jit, static_argnames=("output_size", "sampling_ratio"))
def _forward(features, rois, scale, *, output_size, sampling_ratio):
    return L.roi_align_rotated(features, rois, output_size, scale, sampling_ratio)


def reference_roi_align_rotated(features, rois, output_size, scale, sampling_ratio):
    """float64 NumPy rotated ROIAlign, sample by sample, from the published algorithm."""
    features = np.asarray(features, np.float64)
    out = np.zeros((len(rois), *output_size, features.shape[-1]))
    for r, (b, xc, yc, w, h, angle) in enumerate(np.asarray(rois, np.float64)):
        xc, yc, w, h = xc * scale - 0.5, yc * scale - 0.5, w * scale, h * scale
        t = angle * math.pi / 180.0
        cos, sin = math.cos(t), math.sin(t)

        def to_image(yy, xx, cos=cos, sin=sin, yc=yc, xc=xc):  # the ROI frame: centred, turned by the angle
            return yy * cos - xx * sin + yc, yy * sin + xx * cos + xc

        out[r] = roi_bins_reference(
            features[int(b)], output_size, (-h / 2, -w / 2), (h, w), sampling_ratio, to_image
        )
    return out


def test_roi_align_rotated_matches_detectron2_forward_and_feature_gradient(fixtures_dir):
    """Fixture configs: sampling 0/1/2 x 7x7, 3x5 x scales 1, 1/2; angles in [-180, 180], the
    multiples of 90, zero-size, tiny, huge and outside boxes."""
    data = load_npz(fixtures_dir / "roi_align_rotated.npz")
    assert int(data["num_cases"]) == 12
    for i in range(int(data["num_cases"])):
        case = {k[5:]: data[k] for k in data if k.startswith(f"c{i:03d}_")}
        ratio, ph, pw, scale = case["config"]
        out, grad = _forward_and_grad(
            jnp.asarray(case["input"]), jnp.asarray(case["rois"]), jnp.asarray(case["upstream"]),
            jnp.float32(scale), output_size=(int(ph), int(pw)), sampling_ratio=int(ratio),
        )
        chex.assert_shape(out, case["output"].shape)
        msg = f"config {case['config']}"
        np.testing.assert_allclose(np.asarray(out), case["output"], atol=1e-4, rtol=1e-4, err_msg=msg)
        np.testing.assert_allclose(np.asarray(grad), case["grad"], atol=1e-4, rtol=1e-4, err_msg=msg)


def test_roi_align_rotated_matches_detectron2_published_0_90_180_270_tables():
    """detectron2 tests/layers/test_roi_align_rotated.py::test_forward_output_0_90_180_270:
    5x5 arange image, box [1, 1, 3, 3] as (2, 2, 2, 2, 90*i), 4x4 output; turning the box
    counter-clockwise turns the result clockwise."""
    table = np.asarray([[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0],
                        [12.0, 12.5, 13.0, 13.5]])
    image = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    rois = jnp.asarray([[0, 2, 2, 2, 2, 90.0 * i] for i in range(4)], jnp.float32)
    out = np.asarray(_forward(image, rois, 1.0, output_size=(4, 4), sampling_ratio=0))[..., 0]
    for i in range(4):
        # detectron2's _rot90(img, -i): i times (transpose then flip rows) undone = rotate clockwise.
        expected = np.rot90(table, k=-i)
        np.testing.assert_allclose(out[i], expected, atol=1e-4, err_msg=f"angle {90 * i}")


def test_roi_align_rotated_zero_size_box_gives_zeros():
    """detectron2 tests/layers/test_roi_align_rotated.py::test_empty_box."""
    image = jnp.asarray(np.random.default_rng(0).random((1, 5, 5, 1)), jnp.float32)
    rois = jnp.asarray([[0, 2, 3, 0, 0, 0]], jnp.float32)
    out, grad = _forward_and_grad(image, rois, jnp.ones((1, 7, 7, 1)), 1.0, output_size=(7, 7),
                                  sampling_ratio=0)
    chex.assert_shape(out, (1, 7, 7, 1))
    assert not np.asarray(out).any()
    assert not np.asarray(grad).any()


def test_roi_align_rotated_at_angle_zero_equals_aligned_roi_align():
    """The relation detectron2's CUDA gradient test checks: angle 0 = ROIAlign(aligned=True)."""
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.standard_normal((2, 15, 17, 3)), jnp.float32)
    centers = rng.uniform(2, 30, (20, 2))
    sizes = rng.uniform(1, 25, (20, 2))
    index = rng.integers(0, 2, (20, 1))
    rotated = np.concatenate([index, centers, sizes, np.zeros((20, 1))], 1).astype(np.float32)
    boxes = np.concatenate([index, centers - sizes / 2, centers + sizes / 2], 1).astype(np.float32)
    upstream = jnp.asarray(rng.standard_normal((20, 4, 4, 3)), jnp.float32)
    out, grad = _forward_and_grad(features, jnp.asarray(rotated), upstream, 0.5, output_size=(4, 4),
                                  sampling_ratio=0)

    @jax.jit
    def axis_aligned(f, upstream):
        out, vjp = jax.vjp(lambda f: L.roi_align(f, jnp.asarray(boxes), 4, 0.5, 0, True), f)
        return out, vjp(upstream)[0]

    axis_out, axis_grad = axis_aligned(features, upstream)
    np.testing.assert_allclose(np.asarray(out), np.asarray(axis_out), atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(axis_grad), atol=1e-4)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0, 0, 2, 5]))
def test_roi_align_rotated_matches_float64_reference_on_many_rois(seed, ratio):
    """More ROIs than one chunk, random angles and sizes (incl. sampling_ratio 5: chunked loops)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((2, 9, 11, 2)).astype(np.float32)
    num = 35
    rois = np.stack([
        rng.integers(0, 2, num), rng.uniform(-4, 26, num), rng.uniform(-4, 22, num),
        rng.uniform(0, 30, num), rng.uniform(0, 30, num), rng.uniform(-180, 180, num),
    ], 1).astype(np.float32)
    out = _forward(jnp.asarray(features), jnp.asarray(rois), 0.5, output_size=(2, 3),
                   sampling_ratio=ratio)
    expected = reference_roi_align_rotated(features, rois, (2, 3), 0.5, ratio)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_roi_align_rotated_jit_vmap_grad_and_module():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.standard_normal((2, 1, 8, 9, 2)), jnp.float32)
    rois = jnp.asarray([[[0, 4, 4, 6, 3, 30], [0, 2, 6, 9, 9, -120]],
                        [[0, 5, 3, 2, 7, 90], [0, 0.3, 0.2, 4, 4, 170]]], jnp.float32)
    module = L.ROIAlignRotated((3, 2), 1.0, 0)
    assert not jax.tree_util.tree_leaves(module.init(jax.random.key(0), features[0], rois[0]))

    @jax.jit
    def loss(f):
        pooled = jax.vmap(lambda f, r: module.apply({}, f, r))(f, rois)
        return (pooled**2).sum(), pooled

    (_, pooled), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(features)
    chex.assert_shape(pooled, (2, 2, 3, 2, 2))
    for i in range(2):
        expected = reference_roi_align_rotated(features[i], rois[i], (3, 2), 1.0, 0)
        np.testing.assert_allclose(np.asarray(pooled[i]), expected, atol=1e-5)
    eps = 1e-2
    bump = jnp.zeros_like(features).at[1, 0, 4, 4, 0].set(eps)
    numeric = (loss(features + bump)[0] - loss(features - bump)[0]) / (2 * eps)
    assert float(grad[1, 0, 4, 4, 0]) == pytest.approx(float(numeric), rel=1e-2, abs=1e-2)


def test_roi_align_rotated_empty_half_precision_and_bad_arguments():
    features = jnp.ones((2, 5, 6, 3))
    out = L.roi_align_rotated(features, jnp.zeros((0, 6)), (7, 4), 1.0, 0)
    chex.assert_shape(out, (0, 7, 4, 3))

    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 10, 10, 4)).astype(np.float32)
    rois = np.asarray([[0, 5, 5, 6, 4, 30.0]], np.float32)
    half = jnp.asarray(image, jnp.bfloat16)
    out = _forward(half, jnp.asarray(rois), 1.0, output_size=(3, 3), sampling_ratio=0)
    chex.assert_type(out, jnp.bfloat16)
    expected = reference_roi_align_rotated(np.asarray(half.astype(jnp.float32)), rois, (3, 3), 1.0, 0)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=2e-2)

    with pytest.raises(ValueError, match=r"\[R, 6\]"):
        L.roi_align_rotated(features, jnp.zeros((1, 5)), 2, 1.0, 0)
    with pytest.raises(ValueError, match="rank 4"):
        L.roi_align_rotated(jnp.ones((5, 6, 3)), jnp.zeros((1, 6)), 2, 1.0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        L.roi_align_rotated(features, jnp.asarray([[0, 2, 2, -1, 3, 0]], jnp.float32), 2, 1.0, 0)
    with pytest.raises(ValueError, match="batch indices"):
        L.roi_align_rotated(features, jnp.asarray([[5, 2, 2, 1, 3, 0]], jnp.float32), 2, 1.0, 0)
    with pytest.raises(TypeError, match="sampling_ratio"):
        L.roi_align_rotated(features, jnp.zeros((1, 6)), 2, 1.0, 2.0)
    # Any sampling_ratio <= 0 is adaptive, as in detectron2.
    rois = jnp.asarray([[1, 3, 2.5, 4, 3, 30.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(L.roi_align_rotated(features, rois, 2, 1.0, -2)),
                                  np.asarray(L.roi_align_rotated(features, rois, 2, 1.0, 0)))


@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align_rotated_batch_index_out_of_range_pools_zeros_under_jit(ratio):
    """Adaptive and unrolled (fixed ratio) paths: an index outside [0, N) or NaN pools zeros
    under jit (not the clamped first/last image) and sends no gradient."""
    features = jnp.concatenate([jnp.ones((1, 6, 6, 1)), jnp.full((1, 6, 6, 1), 2.0)])
    rois = jnp.asarray([[2, 3, 3, 3, 3, 20], [1, 3, 3, 3, 3, 20], [-1, 3, 3, 3, 3, 20],
                        [np.nan, 3, 3, 3, 3, 20], [0, 3, 3, 3, 3, 20]], jnp.float32)
    for bad in ([0], [2], [3]):
        with pytest.raises(ValueError, match="batch indices"):
            L.roi_align_rotated(features, rois[jnp.asarray(bad)], 2, 1.0, ratio)
    weights = jnp.arange(1.0, 6.0)[:, None, None, None]
    pooled = jax.jit(lambda f, r: L.roi_align_rotated(f, r, 2, 1.0, ratio))(features, rois)
    assert not np.asarray(pooled)[[0, 2, 3]].any()
    np.testing.assert_allclose(np.asarray(pooled[1]), 2.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled[4]), 1.0, atol=1e-6)
    grad = jax.jit(jax.grad(lambda f, r: (L.roi_align_rotated(f, r, 2, 1.0, ratio) * weights).sum()))(
        features, rois)
    expected = jax.grad(lambda f: 2 * L.roi_align_rotated(f, rois[1:2], 2, 1.0, ratio).sum()
                        + 5 * L.roi_align_rotated(f, rois[4:], 2, 1.0, ratio).sum())(features)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-6)
    with pytest.raises(ValueError, match="batch indices"):  # closed over: concrete, so checked
        jax.jit(lambda f: L.roi_align_rotated(f, rois, 2, 1.0, ratio))(features)


def test_roi_align_rotated_matches_detectron2_across_borders(fixtures_dir):
    """Boxes across every border (negative, past W/H, at the last pixel), angles 0/90/-90/180/30,
    scales 1 and 1/4, ratios 0/1/2/4, jitted: forward and detectron2's backward."""
    data = np.load(fixtures_dir / "roi_align_rotated.npz")
    assert int(data["num_border_cases"]) == 8
    for i in range(int(data["num_border_cases"])):
        case = {k[5:]: data[k] for k in data.files if k.startswith(f"b{i:03d}_")}
        ratio, ph, pw, scale = case["config"]
        out, grad = _forward_and_grad(
            jnp.asarray(case["input"]), jnp.asarray(case["rois"]), jnp.asarray(case["upstream"]),
            jnp.float32(scale), output_size=(int(ph), int(pw)), sampling_ratio=int(ratio),
        )
        msg = f"border config {case['config']}"  # a misplaced edge sample is off by ~1
        np.testing.assert_allclose(np.asarray(out), case["output"], atol=5e-5, rtol=1e-5, err_msg=msg)
        np.testing.assert_allclose(np.asarray(grad), case["grad"], atol=5e-5, rtol=1e-5, err_msg=msg)


@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align_rotated_non_finite_rois_pool_zeros_with_zero_gradient(ratio):
    rng = np.random.default_rng(13)
    features = jnp.asarray(rng.standard_normal((2, 7, 8, 2)), jnp.float32)
    inf, nan = np.inf, np.nan
    rois = jnp.asarray([[1, 4, 3, 5, 4, 30], [0, inf, 3, 4, 4, 0], [0, 3, -inf, 4, 4, 0],
                        [1, 3, 3, inf, 4, 10], [0, 3, 3, 4, nan, 0], [0, 3, 3, 4, 4, inf],
                        [0, 3, 3, 4, 4, nan], [0, 2.5, 3.5, 3, 6, -45]], jnp.float32)
    finite = [0, 7]
    expected = reference_roi_align_rotated(np.asarray(features), np.asarray(rois)[finite], (2, 3),
                                           1.0, ratio)
    for fn in (L.roi_align_rotated, jax.jit(L.roi_align_rotated, static_argnums=(2, 3, 4))):
        out = np.asarray(fn(features, rois, (2, 3), 1.0, ratio))
        assert np.isfinite(out).all()
        assert not out[1:7].any()
        np.testing.assert_allclose(out[finite], expected, atol=1e-5)
    grad = jax.jit(jax.grad(lambda f, r: L.roi_align_rotated(f, r, (2, 3), 1.0, ratio).sum()))(
        features, rois)
    expected_grad = jax.grad(lambda f: L.roi_align_rotated(f, rois[jnp.asarray(finite)], (2, 3),
                                                           1.0, ratio).sum())(features)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-6)


def test_roi_align_rotated_adaptive_grid_is_clamped_at_its_bound():
    """A box needing more than MAX_ADAPTIVE_GRID samples per bin (ceil(1800 / 3) = 600 along x)
    is sampled on the documented 512-per-bin grid: at angle 0 that is the float64 separable
    average of those samples."""
    from detlayers import _roi_sampling

    bound = _roi_sampling.MAX_ADAPTIVE_GRID
    rng = np.random.default_rng(14)
    features = rng.standard_normal((1, 8, 9, 2)).astype(np.float32)
    roi = np.asarray([[0, 300.5, 4.5, 1800, 5, 0]], np.float32)  # x from -600 to 1200 after -0.5
    out = np.asarray(_forward(jnp.asarray(features), jnp.asarray(roi), 1.0, output_size=(2, 3),
                              sampling_ratio=0))[0]

    def expected(grid_w):
        wy = axis_bin_weights(4.0 - 2.5, 5.0, 2, 3, 8)
        wx = axis_bin_weights(300.0 - 900.0, 1800.0, 3, grid_w, 9)
        return np.einsum("ph,qw,hwc->pqc", wy, wx, features[0].astype(np.float64))

    np.testing.assert_allclose(out, expected(bound), atol=1e-6)
    assert np.abs(expected(bound) - expected(600)).max() > 1e-4


HANG_SCRIPT = """
import math, jax, jax.numpy as jnp, numpy as np
import detlayers as L
f = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 7, 3)), jnp.float32)
good = [0.0, 3.0, 3.0, 4.0, 3.0, 20.0]
cases = [  # (rois, spatial_scale): the result is zeros for every one of them
    ([[0.0, 3.0, 3.0, math.inf, 4.0, 0.0]], 1.0),
    ([[0.0, -math.inf, 3.0, 4.0, 4.0, 0.0]], 1.0),
    ([[0.0, 3.0, 3.0, 4.0, math.nan, 0.0]], 1.0),
    ([[0.0, 3.0, 3.0, 3e38, 3e38, 45.0]], 1.0),
    ([[0.0, 3.0, 3.0, 4.0, 4.0, 0.0]], 1e30),
    ([[0.0, 3.0, 3.0, 4.0, 4.0, 0.0]], math.inf),
]
jitted = jax.jit(lambda f, r, s: L.roi_align_rotated(f, r, (7, 7), s, 0))
for rois, scale in cases:
    rois = jnp.asarray(rois + [good], jnp.float32)
    for out in (L.roi_align_rotated(f, rois, (7, 7), scale, 0), jitted(f, rois, jnp.float32(scale))):
        out = np.asarray(out)
        assert np.isfinite(out).all()
        assert not out[0].any(), (rois, scale, out[0])
        assert out[1].any() or scale != 1.0  # the scale moves the good box off the map too
    grad = jax.grad(lambda f: jitted(f, rois, jnp.float32(scale))[0].sum())(f)
    assert not np.asarray(grad).any()
print("bounded")
"""


def test_roi_align_rotated_non_finite_and_huge_rois_finish_in_bounded_time():
    """inf / NaN centre, size or angle, overflowing sizes, spatial_scale 1e30 and inf with
    adaptive sampling: eager and jitted, in a subprocess with a timeout."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", HANG_SCRIPT], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bounded" in result.stdout
