"""roi_align / ROIAlign against torchvision fixtures, detectron2's published tables and a float64
NumPy derivation (tests/fixtures/roi_align.npz is made by tools/fixtures/make_roi_align.py)."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import detlayers as L
from detlayers import _roi_sampling
from helpers import bilinear_interpolate, load_npz


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
    _, height, width, channels = features.shape
    ph_count, pw_count = output_size
    out = np.zeros((len(rois), ph_count, pw_count, channels))

    for r, (b, x1, y1, x2, y2) in enumerate(np.asarray(rois, np.float64)):
        shift = 0.5 if aligned else 0.0
        sx, sy = x1 * scale - shift, y1 * scale - shift
        rw, rh = x2 * scale - shift - sx, y2 * scale - shift - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_count, rw / pw_count
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_count)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_count)
        for p in range(ph_count):
            for q in range(pw_count):
                acc = np.zeros(channels)
                for iy in range(gh):
                    y = sy + p * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sx + q * bw + (ix + 0.5) * bw / gw
                        acc += bilinear_interpolate(features[int(b)], y, x)
                out[r, p, q] = acc / max(gh * gw, 1)
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
        pooled = jax.vmap(lambda f, r: L.roi_align(f, r, 3, 1.0, 0))(f, rois)
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


def test_roi_align_batch_index_out_of_range_raises_or_zeroes_under_jit():
    features = jnp.ones((2, 6, 6, 1))
    rois = jnp.asarray([[2, 0, 0, 4, 4], [0, 0, 0, 4, 4]], jnp.float32)
    with pytest.raises(ValueError, match=r"batch indices in \[0, 2\)"):
        L.roi_align(features, rois, 2, 1.0, 0)
    with pytest.raises(ValueError, match="batch indices"):
        L.roi_align(features, rois.at[0, 0].set(-1), 2, 1.0, 0)
    out = jax.jit(lambda f, r: L.roi_align(f, r, 2, 1.0, 0))(features, rois)
    assert not np.asarray(out[0]).any()  # documented: unknown images pool to zeros under jit
    np.testing.assert_allclose(np.asarray(out[1]), 1.0, atol=1e-6)


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
    with pytest.raises(ValueError, match="sampling_ratio"):
        L.roi_align(features, rois, 2, 1.0, -1)
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
    out = jax.pmap(lambda f, r: L.roi_align(f, r, 2, 1.0, 0), devices=jax.devices()[:2])(
        features, rois)
    for i in range(2):
        expected = reference_roi_align(features[i], rois[i], (2, 2), 1.0, 0, True)
        np.testing.assert_allclose(np.asarray(out[i]), expected, atol=1e-5)
