"""roi_align / ROIAlign against torchvision fixtures, detectron2's published tables and a float64
NumPy derivation (tests/fixtures/roi_align.npz is made by tools/fixtures/make_roi_align.py)."""

from __future__ import annotations

import functools
import inspect
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
from detlayers import _roi_sampling


@functools.partial(jax.jit, static_argnames=("output_size", "sampling_ratio", "aligned"))
def _forward_and_grad(features, rois, upstream, scale, *, output_size, sampling_ratio, aligned):
    out, vjp = jax.vjp(
        lambda f: L.roi_align(f, rois, output_size, scale, sampling_ratio, aligned), features
    )
    return out, vjp(upstream)[0]


@functools.partial(jax.jit, static_argnames=("output_size", "sampling_ratio", "aligned"))
def _forward(features, rois, scale, *, output_size, sampling_ratio, aligned):
    return L.roi_align(features, rois, output_size, scale, sampling_ratio, aligned)


def reference_roi_align(features, rois, output_size, scale, sampling_ratio, aligned):
    """float64 NumPy ROIAlign, sample by sample, written from the published algorithm."""
    features = np.asarray(features, np.float64)
    out = np.zeros((len(rois), *output_size, features.shape[-1]))
    for r, (b, x1, y1, x2, y2) in enumerate(np.asarray(rois, np.float64)):
        shift = 0.5 if aligned else 0.0
        sx, sy = x1 * scale - shift, y1 * scale - shift
        rw, rh = x2 * scale - shift - sx, y2 * scale - shift - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        out[r] = roi_bins_reference(features[int(b)], output_size, (sy, sx), (rh, rw), sampling_ratio)
    return out


def _load_cases(fixtures_dir):
    data = load_npz(fixtures_dir / "roi_align.npz")
    cases = []
    for i in range(int(data["num_cases"])):
        prefix = f"c{i:03d}_"
        cases.append({k[len(prefix):]: data[k] for k in data if k.startswith(prefix)})
    return data, cases


def test_roi_align_matches_torchvision_forward_and_feature_gradient(fixtures_dir):
    """All fixture configs: aligned T/F x sampling 0/1/2 x 7x7, 14x14, 3x5 x scales 1, 1/2, 1/4,
    on tiny, huge, empty, partly and fully outside ROIs."""
    _, cases = _load_cases(fixtures_dir)
    assert len(cases) == 54
    for case in cases:
        aligned, ratio, ph, pw, scale = case["config"]
        out, grad = _forward_and_grad(
            jnp.asarray(case["input"]), jnp.asarray(case["rois"]), jnp.asarray(case["upstream"]),
            jnp.float32(scale), output_size=(int(ph), int(pw)), sampling_ratio=int(ratio),
            aligned=bool(aligned),
        )
        chex.assert_shape(out, case["output"].shape)
        chex.assert_type(out, jnp.float32)
        msg = f"config {case['config']}"
        np.testing.assert_allclose(np.asarray(out), case["output"], atol=1e-4, rtol=1e-4, err_msg=msg)
        np.testing.assert_allclose(np.asarray(grad), case["grad"], atol=1e-4, rtol=1e-4, err_msg=msg)


def test_roi_align_single_roi_over_400x400_map_is_exact(fixtures_dir):
    """One ROI covering the whole 400x400 map, 7x7 output: 58x58 samples per bin, none dropped."""
    data, _ = _load_cases(fixtures_dir)
    image = np.random.default_rng(4242).standard_normal((400, 400)).astype(np.float32)
    assert image.astype(np.float64).sum() == pytest.approx(float(data["big_checksum"]))
    rois = jnp.asarray([[0.0, 0.0, 0.0, 400.0, 400.0]])
    out = _forward(jnp.asarray(image)[None, :, :, None], rois, 1.0, output_size=(7, 7),
                   sampling_ratio=0, aligned=True)
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], data["big_output"], atol=1e-5, rtol=1e-5)
    # The grid really is 58 x 58: the first bin's mean of 58*58 samples, in float64 from scratch.
    roi = 400.0 / 7
    ys = -0.5 + (np.arange(58) + 0.5) * roi / 58
    y0 = np.floor(np.maximum(ys, 0)).astype(int)
    ly = np.maximum(ys, 0) - y0
    wy = np.zeros(400)
    np.add.at(wy, y0, 1 - ly)
    np.add.at(wy, np.minimum(y0 + 1, 399), ly)
    expected = wy @ image.astype(np.float64) @ wy / 58**2
    assert out[0, 0, 0, 0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_detectron2_published_table(aligned):
    """detectron2 tests/layers/test_roi_align.py::test_forward_output: 5x5 arange image,
    box [1, 1, 3, 3], 4x4 output, scale 1, adaptive sampling."""
    expected = {
        False: [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
        True: [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0],
               [12.0, 12.5, 13.0, 13.5]],
    }[aligned]
    image = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    out = _forward(image, jnp.asarray([[0.0, 1, 1, 3, 3]]), 1.0, output_size=(4, 4),
                   sampling_ratio=0, aligned=aligned)
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], expected, atol=1e-5)


def test_roi_align_empty_box_gives_zeros_and_zero_gradient():
    """detectron2 tests/layers/test_roi_align.py::test_empty_box: box [3, 4, 5, 4] -> all zeros."""
    image = jnp.asarray(np.random.default_rng(0).random((1, 5, 5, 1)), jnp.float32)
    rois = jnp.asarray([[0.0, 3, 4, 5, 4]])
    out, grad = _forward_and_grad(image, rois, jnp.ones((1, 7, 7, 1)), 1.0, output_size=(7, 7),
                                  sampling_ratio=0, aligned=True)
    chex.assert_shape(out, (1, 7, 7, 1))
    assert not np.asarray(out).any()
    assert not np.asarray(grad).any()


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    ratio=st.sampled_from([0, 0, 3, 5]),
    aligned=st.booleans(),
)
def test_roi_align_matches_float64_reference_on_many_rois(seed, ratio, aligned):
    """More ROIs than one chunk (sorting, padding, per-chunk trip counts), mixed sizes."""
    num_rois = 37
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((2, 9, 12, 3)).astype(np.float32)
    corners = rng.uniform(-6, 30, (num_rois, 4))
    boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                            np.maximum(corners[:, :2], corners[:, 2:])], 1)
    rois = np.concatenate([rng.integers(0, 2, (num_rois, 1)), boxes], 1).astype(np.float32)
    out = _forward(jnp.asarray(features), jnp.asarray(rois), 0.5, output_size=(3, 2),
                   sampling_ratio=ratio, aligned=aligned)
    expected = reference_roi_align(features, rois, (3, 2), 0.5, ratio, aligned)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_roi_align_feature_gradient_is_adjoint_of_forward():
    """<roi_align(F), G> = <F, grad>: the custom VJP is the exact transpose, here for a mix of
    small and large ROIs spread over several chunks."""
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.standard_normal((2, 20, 24, 4)), jnp.float32)
    corners = rng.uniform(-5, 90, (37, 4))
    boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                            np.maximum(corners[:, :2], corners[:, 2:])], 1)
    rois = jnp.asarray(np.concatenate([rng.integers(0, 2, (37, 1)), boxes], 1), jnp.float32)
    upstream = jnp.asarray(rng.standard_normal((37, 5, 6, 4)), jnp.float32)
    out, grad = _forward_and_grad(features, rois, upstream, 0.25, output_size=(5, 6),
                                  sampling_ratio=0, aligned=True)
    lhs = float(jnp.vdot(out, upstream))
    rhs = float(jnp.vdot(features, grad))
    assert lhs == pytest.approx(rhs, rel=1e-4, abs=1e-3)


def test_roi_align_jit_vmap_and_grad_compose():
    rng = np.random.default_rng(4)
    features = jnp.asarray(rng.standard_normal((3, 1, 8, 10, 2)), jnp.float32)
    rois = jnp.asarray([[[0, 1, 1, 9, 7], [0, 0, 2, 30, 5]],
                        [[0, 2, 2, 4, 4], [0, -3, -3, 5, 20]],
                        [[0, 0, 0, 10, 8], [0, 6, 1, 7, 2]]], jnp.float32)

    @jax.jit
    def loss(f):
        pooled = jax.vmap(lambda f, r: L.roi_align(f, r, 3, 1.0, 0, aligned=True))(f, rois)
        return (pooled**2).sum(), pooled

    (_, pooled), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(features)
    chex.assert_shape(pooled, (3, 2, 3, 3, 2))
    for i in range(3):
        expected = reference_roi_align(np.asarray(features[i]), np.asarray(rois[i]), (3, 3), 1.0, 0,
                                       True)
        np.testing.assert_allclose(np.asarray(pooled[i]), expected, atol=1e-5)
    chex.assert_shape(grad, features.shape)
    # Central difference on one coordinate the ROIs cover (the loss is quadratic: exact up to
    # rounding).
    eps = 1e-2
    bump = jnp.zeros_like(features).at[0, 0, 3, 4, 1].set(eps)
    numeric = (loss(features + bump)[0] - loss(features - bump)[0]) / (2 * eps)
    assert float(grad[0, 0, 3, 4, 1]) == pytest.approx(float(numeric), rel=1e-2, abs=1e-2)


def test_roi_align_flax_module_matches_function():
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.standard_normal((1, 6, 7, 2)), jnp.float32)
    rois = jnp.asarray([[0, 0.5, 1.0, 5.0, 6.0]], jnp.float32)
    module = L.ROIAlign((2, 3), 0.5, 2, aligned=False)
    variables = module.init(jax.random.key(0), features, rois)
    assert not jax.tree_util.tree_leaves(variables)
    out = module.apply(variables, features, rois)
    expected = reference_roi_align(features, rois, (2, 3), 0.5, 2, False)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_roi_align_zero_rois_gives_empty_output():
    out = L.roi_align(jnp.ones((2, 5, 6, 3)), jnp.zeros((0, 5)), (7, 4), 1.0, 0)
    chex.assert_shape(out, (0, 7, 4, 3))
    grad = jax.grad(lambda f: L.roi_align(f, jnp.zeros((0, 5)), 7, 1.0, 0).sum())(jnp.ones((2, 5, 6, 3)))
    assert not np.asarray(grad).any()


def test_roi_align_half_precision_runs_in_float32_and_returns_input_dtype():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((1, 10, 10, 4)).astype(np.float32)
    rois = np.asarray([[0, 1, 2, 8, 9], [0, 0, 0, 10, 10]], np.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        out = _forward(jnp.asarray(features, dtype), jnp.asarray(rois), 1.0, output_size=(4, 4),
                       sampling_ratio=0, aligned=True)
        chex.assert_type(out, dtype)
        rounded = np.asarray(jnp.asarray(features, dtype).astype(jnp.float32))
        expected = reference_roi_align(rounded, rois, (4, 4), 1.0, 0, True)
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align_batch_index_out_of_range_raises_or_zeroes_under_jit(ratio):
    """Adaptive and unrolled (fixed ratio) paths: an index outside [0, N) or NaN pools zeros under
    jit (not the clamped first/last image), and raises when the ROIs are concrete."""
    features = jnp.concatenate([jnp.ones((1, 6, 6, 1)), jnp.full((1, 6, 6, 1), 2.0)])
    rois = jnp.asarray([[2, 0, 0, 4, 4], [1, 0, 0, 4, 4], [-1, 0, 0, 4, 4], [np.nan, 0, 0, 4, 4],
                        [0, 0, 0, 4, 4]], jnp.float32)
    with pytest.raises(ValueError, match=r"batch indices in \[0, 2\)"):
        L.roi_align(features, rois[:2], 2, 1.0, ratio)
    with pytest.raises(ValueError, match="batch indices"):
        L.roi_align(features, rois[2:], 2, 1.0, ratio)
    with pytest.raises(ValueError, match="batch indices"):
        L.roi_align(features, rois[3:], 2, 1.0, ratio)
    pooled = jax.jit(lambda f, r: L.roi_align(f, r, 2, 1.0, ratio))(features, rois)
    assert not np.asarray(pooled)[[0, 2, 3]].any()  # documented: unknown images pool to zeros
    np.testing.assert_allclose(np.asarray(pooled[1]), 2.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled[4]), 1.0, atol=1e-6)
    # The masked rows send no gradient: image 1 only gets row 1's weight 2, image 0 row 4's 5.
    grad = jax.jit(jax.grad(lambda f, r: (L.roi_align(f, r, 2, 1.0, ratio)
                                          * jnp.arange(1.0, 6.0)[:, None, None, None]).sum()))(
        features, rois)
    # Closed over, the ROIs are concrete at trace time: the bad indices are reported.
    with pytest.raises(ValueError, match="batch indices"):
        jax.jit(lambda f: L.roi_align(f, rois, 2, 1.0, ratio))(features)
    expected = jax.grad(lambda f: 2 * L.roi_align(f, rois[1:2], 2, 1.0, ratio).sum()
                        + 5 * L.roi_align(f, rois[4:], 2, 1.0, ratio).sum())(features)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-6)


def test_roi_align_rejects_bad_arguments():
    features = jnp.ones((1, 5, 5, 2))
    rois = jnp.zeros((1, 5))
    with pytest.raises(ValueError, match="rank 4"):
        L.roi_align(jnp.ones((5, 5, 2)), rois, 2, 1.0, 0)
    with pytest.raises(ValueError, match=r"\[R, 5\]"):
        L.roi_align(features, jnp.zeros((1, 4)), 2, 1.0, 0)
    with pytest.raises(ValueError, match=r"\[R, 5\]"):
        L.roi_align(features, jnp.zeros((5,)), 2, 1.0, 0)
    with pytest.raises(TypeError, match="output_size"):
        L.roi_align(features, rois, (2, 2, 2), 1.0, 0)
    with pytest.raises(ValueError, match="output_size"):
        L.roi_align(features, rois, 0, 1.0, 0)
    with pytest.raises(TypeError, match="sampling_ratio"):
        L.roi_align(features, rois, 2, 1.0, 1.5)
    with pytest.raises(TypeError, match="spatial_scale"):
        L.roi_align(features, rois, 2, "1", 0)
    with pytest.raises(TypeError, match="input"):
        L.roi_align(jnp.ones((1, 5, 5, 2), jnp.int32), rois, 2, 1.0, 0)


def test_roi_align_adaptive_grid_is_not_capped():
    """Chunk loops run to each chunk's own largest grid: a tiny ROI sorted with a huge one."""
    assert _roi_sampling.CHUNK_BINS >= 2 * 4  # both ROIs share one chunk
    rng = np.random.default_rng(7)
    features = rng.standard_normal((1, 64, 64, 1)).astype(np.float32)
    rois = np.asarray([[0, 10, 10, 10.5, 10.5], [0, -20, -20, 90, 90]], np.float32)
    out = _forward(jnp.asarray(features), jnp.asarray(rois), 1.0, output_size=(2, 2),
                   sampling_ratio=0, aligned=True)
    expected = reference_roi_align(features, rois, (2, 2), 1.0, 0, True)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_roi_align_runs_inside_pmap():
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (conftest forces 8 host devices)")
    rng = np.random.default_rng(8)
    features = rng.standard_normal((2, 1, 7, 9, 2)).astype(np.float32)
    rois = np.asarray([[[0, 1, 1, 8, 6]], [[0, -2, 0, 5, 12]]], np.float32)
    out = jax.pmap(lambda f, r: L.roi_align(f, r, 2, 1.0, 0, True), devices=jax.devices()[:2])(
        features, rois)
    for i in range(2):
        expected = reference_roi_align(features[i], rois[i], (2, 2), 1.0, 0, True)
        np.testing.assert_allclose(np.asarray(out[i]), expected, atol=1e-5)


def test_roi_align_takes_torchvision_defaults_and_module_keeps_aligned_true():
    """detectron2's roi_align is torchvision's: (spatial_scale=1.0, sampling_ratio=-1,
    aligned=False), any sampling_ratio <= 0 adaptive; detectron2's ROIAlign module is aligned."""
    params = inspect.signature(L.roi_align).parameters
    assert [params[k].default for k in ("spatial_scale", "sampling_ratio", "aligned")] == [
        1.0, -1, False]
    assert L.ROIAlign((7, 7), 1.0, 0).aligned is True
    image = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    box = jnp.asarray([[0.0, 1, 1, 3, 3]])
    table_unaligned = [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14],
                       [15, 15.5, 16, 16.5]]  # detectron2 test_roi_align.py, aligned=False
    np.testing.assert_allclose(np.asarray(L.roi_align(image, box, (4, 4)))[0, :, :, 0],
                               table_unaligned, atol=1e-5)
    rng = np.random.default_rng(9)
    features = rng.standard_normal((1, 9, 11, 2)).astype(np.float32)
    rois = np.asarray([[0, 0.5, 1.0, 9.0, 7.5], [0, -2, 3, 14, 6]], np.float32)
    expected = reference_roi_align(features, rois, (3, 2), 0.5, 0, False)
    for ratio in (-1, 0, -5):
        out = L.roi_align(jnp.asarray(features), jnp.asarray(rois), (3, 2), 0.5, ratio)
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    module = L.ROIAlign((3, 2), 0.5, -1)
    out = module.apply({}, jnp.asarray(features), jnp.asarray(rois))
    np.testing.assert_allclose(np.asarray(out),
                               reference_roi_align(features, rois, (3, 2), 0.5, 0, True), atol=1e-5)


def test_roi_align_matches_torchvision_forward_and_gradient_across_borders(fixtures_dir):
    """ROIs across every border (negative, past W/H, exactly at the last pixel), at scales 1 and
    1/4, aligned True/False, ratios 0/1/2/4, jitted: a sample exactly at y = H must be rounded as
    torchvision's float32 code rounds it (a fused multiply-add moves it inside the map)."""
    data = np.load(fixtures_dir / "roi_align.npz")
    assert int(data["num_border_cases"]) == 16
    for i in range(int(data["num_border_cases"])):
        case = {k[5:]: data[k] for k in data.files if k.startswith(f"b{i:03d}_")}
        aligned, ratio, ph, pw, scale = case["config"]
        out, grad = _forward_and_grad(
            jnp.asarray(case["input"]), jnp.asarray(case["rois"]), jnp.asarray(case["upstream"]),
            jnp.float32(scale), output_size=(int(ph), int(pw)), sampling_ratio=int(ratio),
            aligned=bool(aligned),
        )
        msg = f"border config {case['config']}"  # a misplaced edge sample is off by ~1
        np.testing.assert_allclose(np.asarray(out), case["output"], atol=5e-5, rtol=1e-5, err_msg=msg)
        np.testing.assert_allclose(np.asarray(grad), case["grad"], atol=5e-5, rtol=1e-5, err_msg=msg)


@pytest.mark.parametrize("ratio", [0, 2, 6])
def test_roi_align_non_finite_rois_pool_zeros_with_zero_gradient(ratio):
    """A diverged box (inf or NaN coordinate, or an extent that overflows) gives zeros and no
    gradient, eagerly and under jit, and leaves the other ROIs exact."""
    rng = np.random.default_rng(11)
    features = jnp.asarray(rng.standard_normal((2, 7, 8, 2)), jnp.float32)
    inf, nan = np.inf, np.nan
    rois = jnp.asarray([[1, 1, 2, 6, 5], [0, inf, 0, 4, 4], [0, 0, -inf, 4, 4], [1, 0, 0, inf, 4],
                        [0, 0, 0, 4, nan], [0, -3e38, 0, 3e38, 4], [0, 0.5, 0.5, 3, 6]],
                       jnp.float32)
    finite = [0, 6]
    expected = reference_roi_align(np.asarray(features), np.asarray(rois)[finite], (2, 3), 1.0,
                                   ratio, False)
    for fn in (L.roi_align, jax.jit(L.roi_align, static_argnums=(2, 3, 4))):
        out = fn(features, rois, (2, 3), 1.0, ratio)
        assert np.isfinite(np.asarray(out)).all()
        assert not np.asarray(out)[1:6].any()
        np.testing.assert_allclose(np.asarray(out)[finite], expected, atol=1e-5)
    grad = jax.jit(jax.grad(lambda f: L.roi_align(f, rois, (2, 3), 1.0, ratio).sum()))(features)
    expected_grad = jax.grad(lambda f: L.roi_align(f, rois[jnp.asarray(finite)], (2, 3), 1.0,
                                                   ratio).sum())(features)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-6)


def separable_reference(features, roi, output_size, scale, aligned, grid):
    """float64 ROIAlign of one ROI with a given ``(gh, gw)`` grid, vectorized per axis."""
    features = np.asarray(features, np.float64)
    _, height, width, _ = features.shape
    b, x1, y1, x2, y2 = np.asarray(roi, np.float64)
    shift = 0.5 if aligned else 0.0

    def weights(start, end, bins, count, length):
        extent = end - start if aligned else max(end - start, 1.0)
        return axis_bin_weights(start, extent, bins, count, length)

    wy = weights(y1 * scale - shift, y2 * scale - shift, output_size[0], grid[0], height)
    wx = weights(x1 * scale - shift, x2 * scale - shift, output_size[1], grid[1], width)
    return np.einsum("ph,qw,hwc->pqc", wy, wx, features[int(b)])


def test_roi_align_adaptive_grid_is_exact_up_to_its_bound_then_clamped():
    """Up to MAX_ADAPTIVE_GRID samples per bin the adaptive grid is detectron2's; a wider ROI
    (here 1334 samples per bin wanted along x) is sampled on the documented 512-per-bin grid."""
    bound = _roi_sampling.MAX_ADAPTIVE_GRID
    assert bound == 512
    rng = np.random.default_rng(12)
    features = rng.standard_normal((1, 8, 9, 2)).astype(np.float32)
    exact_roi = [0, -700, 1, 3 * bound - 700, 6]  # exactly 512 samples per bin along x
    wide_roi = [0, -1000, 2, 3000, 5]  # ceil(4000 / 3) = 1334 > 512
    rois = jnp.asarray([exact_roi, wide_roi], jnp.float32)
    out = np.asarray(_forward(jnp.asarray(features), rois, 1.0, output_size=(2, 3),
                              sampling_ratio=0, aligned=False))
    exact = separable_reference(features, exact_roi, (2, 3), 1.0, False, (3, bound))
    np.testing.assert_allclose(out[0], exact, atol=1e-6)
    clamped = separable_reference(features, wide_roi, (2, 3), 1.0, False, (2, bound))
    np.testing.assert_allclose(out[1], clamped, atol=1e-6)
    unclamped = separable_reference(features, wide_roi, (2, 3), 1.0, False, (2, 1334))
    assert np.abs(clamped - unclamped).max() > 1e-4  # the rule really is what is tested


HANG_SCRIPT = """
import math, jax, jax.numpy as jnp, numpy as np
import detlayers as L
f = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 7, 3)), jnp.float32)
good = [0.0, 1.0, 1.0, 5.0, 4.0]
cases = [  # (rois, spatial_scale): the result is zeros for every one of them
    ([[0.0, 0.0, 0.0, math.inf, 4.0]], 1.0),
    ([[0.0, -math.inf, 0.0, 4.0, 4.0]], 1.0),
    ([[0.0, 0.0, math.nan, 4.0, 4.0]], 1.0),
    ([[0.0, 0.0, 0.0, 3e38, 3e38]], 1.0),
    ([[0.0, 1.0, 1.0, 5.0, 4.0]], 1e30),
    ([[0.0, 1.0, 1.0, 5.0, 4.0]], math.inf),
]
jitted = jax.jit(lambda f, r, s: L.roi_align(f, r, (7, 7), s, 0))
for rois, scale in cases:
    rois = jnp.asarray(rois + [good], jnp.float32)
    for out in (L.roi_align(f, rois, (7, 7), scale, 0), jitted(f, rois, jnp.float32(scale))):
        out = np.asarray(out)
        assert not out[0].any(), (rois, scale, out[0])
        assert np.isfinite(out).all()
        assert out[1].any() or scale != 1.0  # the scale moves the good ROI off the map too
    grad = jax.grad(lambda f: jitted(f, rois, jnp.float32(scale))[0].sum())(f)
    assert not np.asarray(grad).any()
print("bounded")
"""


def test_roi_align_non_finite_and_huge_rois_finish_in_bounded_time():
    """inf / NaN coordinates, overflowing extents, spatial_scale 1e30 and inf with adaptive
    sampling (which once looped ~2^31 times): eager and jitted, in a subprocess with a timeout."""
    assert "bounded" in run_python(HANG_SCRIPT, timeout=300)


def run_python(script: str, timeout: float) -> str:
    """Runs ``script`` in a fresh interpreter (CPU, this checkout's detlayers); returns stdout."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
