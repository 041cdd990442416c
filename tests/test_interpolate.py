"""detlayers.interpolate against PyTorch's ``F.interpolate`` (tests/fixtures/wrappers.npz, interp/*
and interp_down/* entries, made by tools/fixtures/make_wrappers.py) and against float64 NumPy
definitions of the bilinear, bicubic and area modes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import case_config, load_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

import detlayers as L

RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def fx():
    return load_fixture("wrappers.npz")


INTERP_CASES = [("interp", i) for i in range(28)] + [("interp_down", i) for i in range(14)]


@pytest.mark.parametrize("family, case", INTERP_CASES, ids=[f"{f}{i}" for f, i in INTERP_CASES])
def test_interpolate_matches_torch(fx, family, case):
    kwargs = case_config(fx, f"{family}/{case}")
    fn = jax.jit(lambda x: L.interpolate(x, **kwargs))
    x = fx[f"{family}/x"]
    y = fn(x)
    expected = fx[f"{family}/{case}/y"]
    chex.assert_shape(y, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL * scale)


def test_interpolate_fixture_covers_every_mode_and_scale_direction(fx):
    seen = set()
    for family, case in INTERP_CASES:
        cfg = case_config(fx, f"{family}/{case}")
        out_h = fx[f"{family}/{case}/y"].shape[1]
        seen.add((cfg["mode"], "up" if out_h > fx[f"{family}/x"].shape[1] else "down"))
    modes = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
    assert seen >= {(m, d) for m in modes for d in ("up", "down")}


def _numpy_bilinear_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 reference: sample at dst * (in-1)/(out-1), weights from the fractional part."""
    n, h, w, c = x.shape
    ys = np.arange(out_h) * ((h - 1) / (out_h - 1) if out_h > 1 else 0.0)
    xs = np.arange(out_w) * ((w - 1) / (out_w - 1) if out_w > 1 else 0.0)
    out = np.zeros((n, out_h, out_w, c))
    for i, yy in enumerate(ys):
        y0 = min(int(np.floor(yy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        ly = yy - y0
        for j, xx in enumerate(xs):
            x0 = min(int(np.floor(xx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            lx = xx - x0
            out[:, i, j] = (
                (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1])
            )
    return out


@settings(max_examples=10, deadline=None)
@given(
    h=st.integers(1, 6), w=st.integers(1, 6), out_h=st.integers(1, 9), out_w=st.integers(1, 9)
)
def test_interpolate_bilinear_align_corners_matches_float64_numpy(h, w, out_h, out_w):
    x = np.random.default_rng(h * 100 + w).normal(size=(1, h, w, 2)).astype(np.float32)
    y = L.interpolate(jnp.asarray(x), size=(out_h, out_w), mode="bilinear", align_corners=True)
    ref = _numpy_bilinear_align_corners(x.astype(np.float64), out_h, out_w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_interpolate_empty_batch_bf16_and_errors():
    chex.assert_shape(L.interpolate(jnp.zeros((0, 4, 4, 2)), scale_factor=2), (0, 8, 8, 2))
    y = L.interpolate(jnp.ones((1, 4, 4, 2), jnp.bfloat16), size=(7, 3), mode="bilinear")
    chex.assert_type(y, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        L.interpolate(jnp.zeros((1, 4, 4, 2)), size=3, scale_factor=2)
    with pytest.raises(ValueError, match="align_corners"):
        L.interpolate(jnp.zeros((1, 4, 4, 2)), size=3, align_corners=True)
    with pytest.raises(ValueError, match="rank 4"):
        L.interpolate(jnp.zeros((4, 4, 2)), size=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        L.interpolate(jnp.zeros((1, 4, 4, 2)), size=3, mode="trilinear")


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic", "area"])
def test_interpolate_zero_size_inputs_follow_pytorch(mode):
    # empty batch and no channels: correctly shaped empty results
    chex.assert_shape(L.interpolate(jnp.zeros((0, 4, 5, 2)), size=(6, 7), mode=mode), (0, 6, 7, 2))
    chex.assert_shape(L.interpolate(jnp.zeros((2, 4, 5, 0)), scale_factor=1.5, mode=mode), (2, 6, 7, 0))
    with pytest.raises(ValueError, match=r"input spatial size must be positive.*\(2, 0, 5, 3\)"):
        L.interpolate(jnp.zeros((2, 0, 5, 3)), size=(3, 7), mode=mode)
    if mode == "area":  # adaptive pooling to an empty size is allowed by PyTorch
        chex.assert_shape(L.interpolate(jnp.zeros((2, 4, 5, 3)), size=(0, 7), mode=mode), (2, 0, 7, 3))
        chex.assert_shape(L.interpolate(jnp.zeros((2, 4, 5, 3)), scale_factor=0.1, mode=mode), (2, 0, 0, 3))
    else:
        with pytest.raises(ValueError, match=r"output size \(0, 0\) must be positive"):
            L.interpolate(jnp.zeros((2, 4, 5, 3)), scale_factor=0.1, mode=mode)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, -1.5, (2.0, float("nan"))])
def test_interpolate_rejects_non_finite_or_non_positive_scale_factor(bad):
    with pytest.raises(ValueError, match="scale_factor must be finite and positive"):
        L.interpolate(jnp.zeros((1, 4, 4, 2)), scale_factor=bad, mode="bilinear")


def test_interpolate_argument_rules_follow_pytorch():
    x = jnp.zeros((1, 4, 4, 2))
    for mode in ("nearest", "nearest-exact", "area"):
        with pytest.raises(ValueError, match="align_corners can only be set"):
            L.interpolate(x, size=3, mode=mode, align_corners=False)
    with pytest.raises(ValueError, match="recompute_scale_factor"):
        L.interpolate(x, size=3, recompute_scale_factor=True)
    with pytest.raises(ValueError, match="antialias"):
        L.interpolate(x, size=3, mode="bilinear", antialias=True)
    with pytest.raises(TypeError, match="scale_factor"):
        L.interpolate(x, scale_factor="2")


def _numpy_bicubic_1d(x: np.ndarray, out_size: int, scale: float, align_corners: bool) -> np.ndarray:
    """Float64 Keys cubic convolution (A=-0.75) along axis 1 with border-clamped taps, written
    from the textbook kernel W(d) (not from the implementation's two branches)."""
    a = -0.75

    def kernel(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    in_size = x.shape[1]
    out = np.zeros((x.shape[0], out_size) + x.shape[2:])
    for o in range(out_size):
        src = o * scale if align_corners else (o + 0.5) * scale - 0.5
        base = int(np.floor(src))
        for j in range(base - 1, base + 3):
            out[:, o] += kernel(src - j) * x[:, min(max(j, 0), in_size - 1)]
    return out


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), out_h=st.integers(1, 11), out_w=st.integers(1, 11),
       align_corners=st.booleans())
def test_interpolate_bicubic_matches_float64_numpy(h, w, out_h, out_w, align_corners):
    x = np.random.default_rng(h * 100 + w).normal(size=(1, h, w, 2))
    y = L.interpolate(jnp.asarray(x, jnp.float32), size=(out_h, out_w), mode="bicubic",
                      align_corners=align_corners)

    def scale(i, o):
        if align_corners:
            return (i - 1) / (o - 1) if o > 1 else 0.0
        return i / o

    ref = _numpy_bicubic_1d(x, out_h, scale(h, out_h), align_corners)
    ref = _numpy_bicubic_1d(ref.transpose(0, 2, 1, 3), out_w, scale(w, out_w), align_corners).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), out_h=st.integers(1, 9), out_w=st.integers(1, 9))
def test_interpolate_area_matches_float64_window_means(h, w, out_h, out_w):
    x = np.random.default_rng(h * 10 + w).normal(size=(2, h, w, 3))
    y = L.interpolate(jnp.asarray(x, jnp.float32), size=(out_h, out_w), mode="area")
    ref = np.zeros((2, out_h, out_w, 3))
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h)))
            cols = slice(int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w)))
            ref[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_interpolate_new_modes_keep_dtype_and_run_under_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6, 3)), jnp.float32)
    for mode in ("nearest-exact", "bicubic", "area"):
        y32 = L.interpolate(x, scale_factor=1.5, mode=mode)
        y16 = jax.jit(lambda v, m=mode: L.interpolate(v, scale_factor=1.5, mode=m))(x.astype(jnp.bfloat16))
        chex.assert_type(y16, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)
        stacked = jax.vmap(lambda v, m=mode: L.interpolate(v, size=(4, 9), mode=m))(x[:, None])
        np.testing.assert_allclose(stacked[:, 0], L.interpolate(x, size=(4, 9), mode=mode), rtol=1e-6)


def test_bilinear_maps_of_two_sizes_summed_under_jit_equal_eager():
    """The Panoptic FPN semantic head's pattern: a map upsampled once plus a coarser one upsampled
    twice. XLA:CPU (jax 0.10.2) miscompiled it under ``jit`` when the taps were gathered at once and
    reduced (values of 1e22 and more); one gather per tap is compiled right."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((1, 8, 12, 32)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((1, 4, 6, 32)), jnp.float32)

    def up(x):
        return L.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def heads(a, b):
        return up(a) + up(up(b))

    eager = np.asarray(heads(a, b))
    assert np.abs(eager).max() < 10
    np.testing.assert_allclose(np.asarray(jax.jit(heads)(a, b)), eager, rtol=1e-6, atol=1e-6)
