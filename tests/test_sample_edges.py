"""Samples exactly on the borders of the map: eager, ``jit`` and the reference kernels agree.

The sampling ops decide per sample whether it reads the map, and a sample exactly on a border is a
decision of the last float32 bit. ROIAlign (plain and rotated) keeps ``-1 <= y <= H`` and reads
0 one ulp further out, so a coordinate rounded differently from torchvision's / detectron2's
drops (or keeps) a whole sample of a bin. Deformable convolution keeps ``-1 < y < H``, and the
mask paste's bilinear taps fall off the mask at ``-1`` and ``M``.

Each test builds inputs whose reference float32 coordinate lands exactly on ``-1``, ``0``,
``size - 1`` or ``size`` (a box end is found by bisection over float32 values so that the
reference kernel's own float32 expression gives the edge) and compares the op with a reference
that computes the coordinates in float32 in the reference kernel's operation order and applies
the sampling rule in float64. The reference is a weight matrix (the bins of a "one-hot" image
whose channel ``n`` is pixel ``n``), so the same matrix gives the forward and the feature
gradient. Under ``jit`` (where the compiler could rewrite the arithmetic) the inputs are
hypothesis examples passed as arguments to one compiled function per configuration; eagerly
(every operation compiled on first use, so slow to start) one fixed batch per code path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import adaptive_grid, assert_close, roi_bins_reference, sample_positions
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import detlayers as L
from detlayers import _roi_sampling

f32 = np.float32
HEIGHT, WIDTH = 6, 7
# Pixel n of the map as channel n: the reference pools this image into its weight matrix.
ONE_HOT = np.eye(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH, HEIGHT * WIDTH)
# Positive features: a sample wrongly dropped or kept moves its bin by at least 1 / samples.
FEATURES = np.random.default_rng(0).uniform(1.0, 2.0, (1, HEIGHT, WIDTH, 2)).astype(np.float32)


def edges(length: int) -> tuple[int, ...]:
    """The borders of an axis of ``length`` pixels: just outside, first, last, just past."""
    return (-1, 0, length - 1, length)


# ---------------------------------------------------------------------------------------------
# Solving for a float32 input that gives an exact float32 coordinate.
# ---------------------------------------------------------------------------------------------


def _ordered(value) -> int:
    """float32 -> integer whose order is the floats' order (adjacent floats differ by 1)."""
    bits = int(np.asarray(value, np.float32).view(np.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_ordered(key: int) -> np.float32:
    bits = key if key >= 0 else (-key) | -0x80000000
    return np.asarray(bits, np.int32).view(np.float32)[()]


def solve_float32(position, target, lo, hi) -> np.float32 | None:
    """A float32 ``v`` in ``[lo, hi]`` with ``position(v) == target`` exactly, by bisection over
    consecutive float32 values; ``position`` must be monotone there. ``None`` when no float32
    value gives the target (the coordinate steps over it)."""
    a, b = _ordered(lo), _ordered(hi)
    sign = 1.0 if position(_from_ordered(a)) <= position(_from_ordered(b)) else -1.0
    if not sign * position(_from_ordered(a)) <= sign * target <= sign * position(_from_ordered(b)):
        return None
    while b - a > 1:
        middle = (a + b) // 2
        if sign * position(_from_ordered(middle)) < sign * target:
            a = middle
        else:
            b = middle
    return next((_from_ordered(k) for k in (a, b) if position(_from_ordered(k)) == target), None)


# ---------------------------------------------------------------------------------------------
# ROIAlign.
# ---------------------------------------------------------------------------------------------

# Bins whose reciprocals are inexact (1/5, 1/7) and indices whose products p * bin_size are
# inexact (p = 3, 5, 6): what a rewritten division or a fused multiply-add rounds differently.
POOLED = (5, 7)
NUM_ROIS = 16  # per example: one eager call (op by op, the slow part) checks them all
UPSTREAM_ROIS = np.random.default_rng(1).uniform(-1.0, 1.0, (NUM_ROIS, *POOLED, 2)).astype(np.float32)


def torchvision_axis(lo, hi, scale, aligned: bool) -> tuple[np.float32, np.float32]:
    """``(start, extent)`` of one ROI axis as torchvision's float32 kernel computes them."""
    shift = f32(0.5) if aligned else f32(0.0)
    start = f32(f32(lo) * f32(scale)) - shift
    extent = (f32(f32(hi) * f32(scale)) - shift) - start
    return start, (extent if aligned else max(extent, f32(1.0)))


def roi_axis_through(target: int, *, bins: int, ratio: int, grid: int, p: int, k: int, u: float,
                     scale: float, aligned: bool) -> tuple[np.float32, np.float32] | None:
    """Box coordinates ``(lo, hi)`` of one axis that put torchvision's float32 position of sample
    ``k`` of bin ``p`` exactly on ``target`` (``grid`` samples per bin; with the adaptive ratio
    the extent is kept where ``ceil(extent / bins) == grid``). ``u`` in [0, 1) picks the extent;
    when no float32 box end hits the target there, a few other extents are tried."""
    lo_extent = 1.0 if ratio > 0 else max(1.0, (grid - 1) * bins)
    hi_extent = 3.0 * bins if ratio > 0 else float(grid * bins)
    fraction = (p + (k + 0.5) / grid) / bins
    for attempt in range(8):
        extent = lo_extent + ((u + 0.618 * attempt) % 1.0) * (hi_extent - lo_extent)
        lo = f32((target - extent * fraction + (0.5 if aligned else 0.0)) / scale)

        def position(hi, lo=lo):
            start, size = torchvision_axis(lo, hi, scale, aligned)
            count = ratio if ratio > 0 else adaptive_grid(size, bins, np.float32)
            if count != grid:  # outside the extents with this grid: keep the search monotone
                return -np.inf if count < grid else np.inf
            return sample_positions(start, size, bins, count, np.float32)[p, k]

        hi = solve_float32(position, f32(target), f32(lo + 0.5 * lo_extent / scale),
                           f32(lo + hi_extent / scale))
        if hi is not None:
            return lo, hi
    return None


def edge_roi(choose, ratio: int, scale: float, aligned: bool) -> list | None:
    """One ROI ``(0, x1, y1, x2, y2)`` with a sample exactly on a row border and one exactly on a
    column border (-1, 0, size - 1 or size; any bin, any sample of the bin), or ``None`` when the
    choices give none; ``choose(options)`` picks each free parameter. When the chosen sample
    cannot reach the border, the next samples (in bin-major order) are tried."""
    axes = []
    for length, bins in ((HEIGHT, POOLED[0]), (WIDTH, POOLED[1])):
        grid = ratio if ratio > 0 else choose([1, 2, 3])
        target, u = choose(edges(length)), choose(EXTENT_CHOICES)
        samples = [(p, k) for p in range(bins) for k in range(grid)]
        first = choose(range(len(samples)))
        ends = None
        for p, k in samples[first:] + samples[:first]:
            ends = roi_axis_through(target, bins=bins, ratio=ratio, grid=grid, p=p, k=k, u=u,
                                    scale=scale, aligned=aligned)
            if ends is not None:
                break
        if ends is None:
            return None
        axes.append(ends)
    (y1, y2), (x1, x2) = axes
    return [0, x1, y1, x2, y2]


EXTENT_CHOICES = np.linspace(0.0, 0.999, 37).tolist()


@st.composite
def edge_rois(draw, ratio: int, scale: float, aligned: bool) -> np.ndarray:
    """``[NUM_ROIS, 5]`` ROIs of :func:`edge_roi`."""
    rois = [edge_roi(lambda options: draw(st.sampled_from(list(options))), ratio, scale, aligned)
            for _ in range(NUM_ROIS)]
    assume(None not in rois)
    return np.asarray(rois, np.float32)


def fixed_rois(seed: int, build) -> np.ndarray:
    """``[NUM_ROIS, ...]`` ROIs ``build(choose)`` with a seeded NumPy generator choosing."""
    rng = np.random.default_rng(seed)

    def choose(options):
        options = list(options)
        return options[rng.integers(len(options))]

    rois = []
    while len(rois) < NUM_ROIS:
        roi = build(choose)
        rois += [] if roi is None else [roi]
    return np.asarray(rois, np.float32)


def roi_align_with_grad(features, rois, upstream, scale, ratio, aligned):
    out, vjp = jax.vjp(lambda f: L.roi_align(f, rois, POOLED, scale, ratio, aligned), features)
    return out, vjp(upstream)[0]


roi_align_with_grad_jit = jax.jit(roi_align_with_grad, static_argnums=(4, 5))


def roi_align_reference_weights(roi, scale, ratio, aligned) -> np.ndarray:
    """``[PH, PW, H*W]``: bin ``(p, q)`` is ``weights[p, q] @ features.reshape(H*W, C)``."""
    _, x1, y1, x2, y2 = roi
    y0, h = torchvision_axis(y1, y2, scale, aligned)
    x0, w = torchvision_axis(x1, x2, scale, aligned)
    return roi_bins_reference(ONE_HOT, POOLED, (y0, x0), (h, w), ratio, dtype=np.float32)


def check_against_reference(results, weights, features, upstream, what: str) -> None:
    """``results``: ``{name: (out [R, PH, PW, C], grad [1, H, W, C])}``; ``weights``
    ``[R, PH, PW, H*W]`` from the reference."""
    table = features[0].reshape(-1, features.shape[-1]).astype(np.float64)
    expected = np.einsum("rpqn,nc->rpqc", weights, table)
    expected_grad = np.einsum("rpqn,rpqc->nc", weights, upstream).reshape(features[0].shape)
    # A sample wrongly dropped or kept moves a bin by >= 1/9 and a gradient entry by >= 1e-3.
    for name, (out, grad) in results.items():
        assert_close(out, expected, rtol=2e-6, msg=f"{name} forward, {what}")
        assert_close(np.asarray(grad)[0], expected_grad, rtol=2e-6,
                     msg=f"{name} feature gradient, {what}")


def roi_sample_positions(start, extent, bins: int, ratio: int, max_grid: int):
    """``[R, bins, max_grid]`` sample positions (and ``[R]`` grids) as roi_align computes them:
    a static ``ratio`` and the bin and sample indices are compile-time constants under jit."""
    grid = _roi_sampling.sample_grid(extent, bins, ratio)
    size = _roi_sampling.per_bin(extent, bins)
    bin_index = jnp.arange(bins, dtype=jnp.float32)[None, :, None]
    k = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
    y = _roi_sampling.sample_coordinate(start[:, None, None], size[:, None, None],
                                        grid[:, None, None], bin_index, k)
    return y, grid


@pytest.mark.parametrize("ratio", [0, 3])
def test_roi_sample_positions_are_torchvisions_float32_ones_bit_for_bit(ratio):
    """Not only on the borders: every sample position (and adaptive grid) of 2000 random ROIs
    equals torchvision's float32 value exactly, eagerly and under jit (7 bins, an inexact
    reciprocal; starts and extents of all magnitudes)."""
    rng = np.random.default_rng(ratio)
    start = (rng.uniform(-1, 1, 2000) * 10.0 ** rng.uniform(-3, 3, 2000)).astype(np.float32)
    extent = (10.0 ** rng.uniform(-1, 1.5, 2000)).astype(np.float32)
    bins, max_grid = 7, 3 if ratio else 5
    expected = np.full((2000, bins, max_grid), np.nan, np.float32)
    for r in range(2000):
        count = ratio or adaptive_grid(extent[r], bins, np.float32)
        expected[r, :, :count] = sample_positions(start[r], extent[r], bins, count, np.float32)
    in_grid = ~np.isnan(expected)
    jitted = jax.jit(roi_sample_positions, static_argnums=(2, 3, 4))
    for name, fn in (("eager", roi_sample_positions), ("jit", jitted)):
        y, grid = fn(jnp.asarray(start), jnp.asarray(extent), bins, ratio, max_grid)
        np.testing.assert_array_equal(np.asarray(grid), in_grid.sum((-2, -1)) // bins, err_msg=name)
        np.testing.assert_array_equal(np.asarray(y)[in_grid], expected[in_grid], err_msg=name)


def check_roi_align(rois, ratio: int, aligned: bool, scale: float, eager: bool) -> None:
    args = (jnp.asarray(FEATURES), jnp.asarray(rois), jnp.asarray(UPSTREAM_ROIS), jnp.float32(scale))
    results = {"jit": roi_align_with_grad_jit(*args, ratio, aligned)}
    if eager:
        results["eager"] = roi_align_with_grad(*args, ratio, aligned)
    weights = np.stack([roi_align_reference_weights(r, scale, ratio, aligned) for r in rois])
    check_against_reference(results, weights, FEATURES, UPSTREAM_ROIS,
                            f"rois {rois.tolist()} ratio {ratio} aligned {aligned} scale {scale}")


@settings(max_examples=30, deadline=None)
@given(data=st.data(), ratio=st.sampled_from([0, 3]), aligned=st.booleans(),
       scale=st.sampled_from([1.0, 0.5, 0.3]))
def test_roi_align_samples_on_the_borders_match_torchvision_under_jit(data, ratio, aligned, scale):
    """ROIs with a sample exactly on a row border and one exactly on a column border (-1, 0,
    size - 1, size), a fixed ratio (3) or the adaptive grid, aligned or not, scale 1, 1/2 or
    0.3 (a traced argument): forward and feature gradient equal torchvision's under jit."""
    check_roi_align(data.draw(edge_rois(ratio, scale, aligned)), ratio, aligned, scale, eager=False)


@pytest.mark.parametrize(("ratio", "aligned"), [(3, False), (0, True)])
def test_roi_align_samples_on_the_borders_match_torchvision_eagerly(ratio, aligned):
    """The same eagerly (op by op, where no compiler rewrites the arithmetic), on a fixed batch
    of such ROIs: torchvision's defaults with a fixed ratio, and detectron2's ROIAlignV2. (Eager
    calls compile every operation on first use, so one batch per path keeps this fast.)"""
    rois = fixed_rois(11 + ratio, lambda choose: edge_roi(choose, ratio, 0.5, aligned))
    check_roi_align(rois, ratio, aligned, 0.5, eager=True)


def test_roi_align_border_samples_under_jit_with_rois_known_at_compile_time():
    """The user's case (torchvision's defaults, a fixed ratio, ROIs past the map) with the ROIs
    closed over by the jitted function, so that XLA sees every coordinate as a constant."""
    rois = fixed_rois(7, lambda choose: edge_roi(choose, 3, 1.0, False))
    run = jax.jit(lambda f, g: roi_align_with_grad(f, jnp.asarray(rois), g, 1.0, 3, False))
    results = {"jit, constant rois": run(jnp.asarray(FEATURES), jnp.asarray(UPSTREAM_ROIS))}
    weights = np.stack([roi_align_reference_weights(r, 1.0, 3, False) for r in rois])
    check_against_reference(results, weights, FEATURES, UPSTREAM_ROIS, f"rois {rois.tolist()}")


# ---------------------------------------------------------------------------------------------
# Rotated ROIAlign.
# ---------------------------------------------------------------------------------------------

POOLED_ROTATED = POOLED


def detectron2_rotation(angle_degrees: float) -> tuple[np.float32, np.float32]:
    """``(cos, sin)`` as detectron2's float32 kernel gets them: ``theta = angle * M_PI / 180.0``
    in double rounded to float, then the correctly rounded float cosine and sine."""
    theta = f32(np.float64(f32(angle_degrees)) * math.pi / 180.0)
    return f32(math.cos(float(theta))), f32(math.sin(float(theta)))


def rotated_frame(box, scale):
    """detectron2's float32 ``(centre_y, centre_x, h, w)`` of a ``(x, y, w, h, angle)`` box."""
    cx, cy, w, h, _ = (f32(v) for v in box)
    s = f32(scale)
    return f32(cy * s) - f32(0.5), f32(cx * s) - f32(0.5), f32(h * s), f32(w * s)


def rotated_to_image(box, scale):
    """The reference's float32 map ``(yy, xx)`` of the box frame -> ``(y, x)`` of the image."""
    centre_y, centre_x, _, _ = rotated_frame(box, scale)
    cos, sin = detectron2_rotation(box[4])

    def to_image(yy, xx):
        return (f32(yy * cos) - f32(xx * sin)) + centre_y, (f32(yy * sin) + f32(xx * cos)) + centre_x

    return to_image


def rotated_grid(box, scale, ratio) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's float32 sample positions ``yy [PH, gh]``, ``xx [PW, gw]`` in the box frame."""
    _, _, h, w = rotated_frame(box, scale)
    (ph, pw), t = POOLED_ROTATED, np.float32
    grid_h = ratio if ratio > 0 else adaptive_grid(h, ph, t)
    grid_w = ratio if ratio > 0 else adaptive_grid(w, pw, t)
    return (sample_positions(-h / f32(2), h, ph, grid_h, t),
            sample_positions(-w / f32(2), w, pw, grid_w, t))


def edge_rotated_roi(choose, ratio: int, scale: float) -> list | None:
    """One rotated box ``(0, x, y, w, h, angle)`` (angles 0, +-90, 180, where the float32 cosine
    and sine are known) whose centre puts one sample exactly on a row border and one exactly on
    a column border: the centre's y moves the image y of every sample, its x the image x. When a
    sample's coordinate steps over the border, the next samples are tried; ``None`` if all do."""
    size = [f32(choose(BOX_SIZE_CHOICES)) for _ in range(2)]
    box = [f32(0.0), f32(0.0), *size, f32(choose([0, 90, 180, -90]))]
    yy, xx = rotated_grid(box, scale, ratio)
    samples = [(a, b) for a in yy.ravel() for b in xx.ravel()]
    for axis, length in ((0, HEIGHT), (1, WIDTH)):
        target = f32(choose(edges(length)))
        first = choose(range(len(samples)))
        for sample in samples[first:] + samples[:first]:

            def position(centre, axis=axis, sample=sample, box=box):
                trial = list(box)
                trial[1 - axis] = centre
                return rotated_to_image(trial, scale)(*sample)[axis]

            guess = (float(target) - float(position(f32(0.0)))) / scale
            centre = solve_float32(position, target, f32(guess - 1.0), f32(guess + 1.0))
            if centre is not None:
                break
        if centre is None:
            return None
        box[1 - axis] = centre
    return [0, *box]


BOX_SIZE_CHOICES = np.linspace(0.5, 6.0, 23, dtype=np.float32).tolist()


@st.composite
def edge_rotated_rois(draw, ratio: int, scale: float) -> np.ndarray:
    """``[NUM_ROIS, 6]`` boxes of :func:`edge_rotated_roi`."""
    rois = [edge_rotated_roi(lambda options: draw(st.sampled_from(list(options))), ratio, scale)
            for _ in range(NUM_ROIS)]
    assume(None not in rois)
    return np.asarray(rois, np.float32)


def rotated_reference_weights(roi, scale, ratio) -> np.ndarray:
    box = roi[1:]
    _, _, h, w = rotated_frame(box, scale)
    return roi_bins_reference(ONE_HOT, POOLED_ROTATED, (-h / f32(2), -w / f32(2)), (h, w), ratio,
                              rotated_to_image(box, scale), dtype=np.float32)


def rotated_with_grad(features, rois, upstream, scale, ratio):
    out, vjp = jax.vjp(
        lambda f: L.roi_align_rotated(f, rois, POOLED_ROTATED, scale, ratio), features)
    return out, vjp(upstream)[0]


rotated_with_grad_jit = jax.jit(rotated_with_grad, static_argnums=(4,))


def check_rotated(rois, ratio: int, scale: float, eager: bool) -> None:
    args = (jnp.asarray(FEATURES), jnp.asarray(rois), jnp.asarray(UPSTREAM_ROIS), jnp.float32(scale))
    results = {"jit": rotated_with_grad_jit(*args, ratio)}
    if eager:
        results["eager"] = rotated_with_grad(*args, ratio)
    weights = np.stack([rotated_reference_weights(r, scale, ratio) for r in rois])
    check_against_reference(results, weights, FEATURES, UPSTREAM_ROIS,
                            f"rois {rois.tolist()} ratio {ratio} scale {scale}")


@settings(max_examples=20, deadline=None)
@given(data=st.data(), ratio=st.sampled_from([0, 3]), scale=st.sampled_from([1.0, 0.5]))
def test_roi_align_rotated_samples_on_the_borders_match_detectron2_under_jit(data, ratio, scale):
    """Rotated boxes with a sample exactly on a row border and one on a column border: forward
    and feature gradient equal detectron2's under jit."""
    check_rotated(data.draw(edge_rotated_rois(ratio, scale)), ratio, scale, eager=False)


def test_roi_align_rotated_samples_on_the_borders_match_detectron2_eagerly():
    """The same eagerly, on a fixed batch of such boxes (adaptive grid, detectron2's default)."""
    rois = fixed_rois(13, lambda choose: edge_rotated_roi(choose, 0, 1.0))
    check_rotated(rois, 0, 1.0, eager=True)


# ---------------------------------------------------------------------------------------------
# Deformable convolution.
# ---------------------------------------------------------------------------------------------

KERNEL = np.random.default_rng(2).uniform(-1.0, 1.0, (3, 3, 1, 1)).astype(np.float32)


def deform_with_grads(image, offset, upstream):
    out, vjp = jax.vjp(lambda x, o: L.deform_conv(x, o, jnp.asarray(KERNEL), padding=1),
                       image, offset)
    return (out, *vjp(upstream))


deform_with_grads_jit = jax.jit(deform_with_grads)


def deform_reference_weights(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``[Ho*Wo, K, H*W]`` bilinear weights of torchvision's deform_conv2d for float32 sample
    positions ``y, x`` ``[Ho, Wo, K]``: a sample counts only when ``-1 < y < H`` and
    ``-1 < x < W``, and each of its four neighbours only when it is inside the map."""
    weights = np.zeros((y.size, HEIGHT * WIDTH))
    for n, (sy, sx) in enumerate(zip(y.ravel().astype(np.float64), x.ravel().astype(np.float64))):
        if not (-1 < sy < HEIGHT and -1 < sx < WIDTH):
            continue
        y0, x0 = math.floor(sy), math.floor(sx)
        for row, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
            for col, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                if 0 <= row < HEIGHT and 0 <= col < WIDTH:
                    weights[n, row * WIDTH + col] += wy * wx
    return weights.reshape(HEIGHT * WIDTH, 9, HEIGHT * WIDTH)


def deform_edge_case(seed: int, on_edge: float):
    """Offsets of 3x3 taps (padding 1) that put a share ``on_edge`` of the samples exactly on
    -1, 0, size - 1 or size per axis (also offsets that only round onto the border), the rest
    anywhere around the map. Returns ``(offset, upstream, y, x)`` with the float32 positions
    ``y, x`` ``[Ho, Wo, K]`` torchvision computes: ``float(ho*stride - pad + i*dil) + offset``."""
    rng = np.random.default_rng(seed)
    taps = np.arange(9)
    base_y = (np.arange(HEIGHT)[:, None, None] - 1 + taps // 3).astype(np.float32)  # [Ho, 1, K]
    base_x = (np.arange(WIDTH)[None, :, None] - 1 + taps % 3).astype(np.float32)  # [1, Wo, K]
    positions, offsets = [], []
    for base, length in ((base_y, HEIGHT), (base_x, WIDTH)):
        base = np.broadcast_to(base, (HEIGHT, WIDTH, 9))
        target = rng.choice(edges(length), base.shape).astype(np.float32)
        # A few ulps away from `target - base`: the sum still rounds onto the target when the
        # offset is finer than the target's ulp; where it does not, the sample is just off it.
        nudge = rng.integers(-2, 3, base.shape) * np.spacing(np.abs(target - base) + 1e-30)
        offset = (target.astype(np.float64) - base + nudge).astype(np.float32)
        anywhere = rng.uniform(-1.5, length + 0.5, base.shape).astype(np.float32) - base
        offset = np.where(rng.uniform(size=base.shape) < on_edge, offset, anywhere)
        offsets.append(offset)
        positions.append(base + offset)  # float32 + float32: torchvision's rounding
    y, x = positions
    on_border = np.isin(y, edges(HEIGHT)) | np.isin(x, edges(WIDTH))
    assert on_border.mean() > on_edge / 4  # the construction really puts samples on the borders
    offset = np.stack(offsets, -1).reshape(1, HEIGHT, WIDTH, 18)
    upstream = rng.uniform(-1, 1, (1, HEIGHT, WIDTH, 1)).astype(np.float32)
    return offset, upstream, y, x


def check_deform(seed: int, on_edge: float, eager: bool) -> None:
    offset, upstream, y, x = deform_edge_case(seed, on_edge)
    image = FEATURES[..., :1]
    args = (jnp.asarray(image), jnp.asarray(offset), jnp.asarray(upstream))
    results = {"jit": deform_with_grads_jit(*args)}
    if eager:
        results["eager"] = deform_with_grads(*args)
    weights = deform_reference_weights(y, x)  # [Ho*Wo, K, H*W]
    columns = np.einsum("okn,n->ok", weights, image.reshape(-1).astype(np.float64))
    expected = (columns @ KERNEL.reshape(9).astype(np.float64)).reshape(1, HEIGHT, WIDTH, 1)
    expected_grad = np.einsum("okn,k,o->n", weights, KERNEL.reshape(9), upstream.reshape(-1))
    for name, (out, grad_image, _) in results.items():
        assert_close(out, expected, rtol=2e-6, msg=f"{name} forward, seed {seed}")
        assert_close(np.asarray(grad_image).reshape(-1), expected_grad, rtol=2e-6,
                     msg=f"{name} input gradient, seed {seed}")
    if eager:  # torchvision's offset gradient is one-sided on the borders: eager = jit there
        assert_close(results["jit"][2], results["eager"][2], rtol=1e-6, msg=f"offset gradient, seed {seed}")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), on_edge=st.floats(0.3, 1.0))
def test_deform_conv_samples_on_the_borders_match_torchvision_under_jit(seed, on_edge):
    """Forward and input gradient equal torchvision's under jit with many samples exactly on
    -1, 0, size - 1 or size (see :func:`deform_edge_case`)."""
    check_deform(seed, on_edge, eager=False)


def test_deform_conv_samples_on_the_borders_match_torchvision_eagerly():
    """The same eagerly for one such offset field, and the offset gradient (torchvision's
    one-sided derivative on the -1 border) equal eagerly and under jit."""
    check_deform(3, 0.8, eager=True)


# ---------------------------------------------------------------------------------------------
# Mask pasting.
# ---------------------------------------------------------------------------------------------

MASK_SIZE = 4
IMAGE = (9, 11)


def detectron2_paste_positions(pixels: np.ndarray, start, end) -> np.ndarray:
    """float32 mask coordinates of pixel centres, as detectron2's ``_do_paste_mask`` and
    ``grid_sample(align_corners=False)`` compute them on CPU: ``g = (p + 0.5 - x0) / (x1 - x0)
    * 2 - 1`` in float32, then ``(g + 1) * (M / 2) - 0.5`` as one fused multiply-add (PyTorch's
    vectorized kernel; emulated in float64, where the product is exact)."""
    start, end = f32(start), f32(end)
    g = (pixels.astype(np.float32) + f32(0.5) - start) / (end - start) * f32(2) - f32(1)
    return ((g + f32(1)).astype(np.float64) * (MASK_SIZE / 2) - 0.5).astype(np.float32)


def paste_axis_weights(length: int, start, end, crop: bool) -> np.ndarray:
    """float64 ``[length, M]`` bilinear weights of one box side from detectron2's positions:
    taps outside ``[0, M)`` read zero, and with ``crop`` (detectron2's CPU path) pixels outside
    ``[floor(start) - 1, ceil(end) + 1)`` are zero."""
    pixels = np.arange(length)
    position = detectron2_paste_positions(pixels, start, end).astype(np.float64)
    weights = np.zeros((length, MASK_SIZE))
    for pixel, pos in zip(pixels, position):
        if crop and not math.floor(start) - 1 <= pixel < math.ceil(end) + 1:
            continue
        left = math.floor(pos)
        for tap, weight in ((left, 1 - (pos - left)), (left + 1, pos - left)):
            if 0 <= tap < MASK_SIZE:
                weights[pixel, tap] += weight
    return weights


def paste_side_through(target: int, pixel: int, start: np.float32) -> np.float32 | None:
    """A box end that puts detectron2's float32 position of ``pixel`` exactly on ``target``."""
    def position(end):
        return detectron2_paste_positions(np.asarray([pixel]), start, end)[0]

    # In real numbers the position is (pixel + 0.5 - start) / (end - start) * M - 0.5.
    extent = (pixel + 0.5 - float(start)) * MASK_SIZE / (target + 0.5)
    if not 0.25 < extent < 40:
        return None
    return solve_float32(position, f32(target), f32(start + 0.9 * extent), f32(start + 1.1 * extent))


def paste_side(choose, length: int) -> tuple[np.float32, np.float32, int] | None:
    """``(start, end, pixel)`` of one box side such that pixel ``pixel`` of an axis of ``length``
    pixels sits exactly on mask coordinate -1, 0, M - 1 or M. When no float32 box end gives the
    chosen pixel's target (or the pixel is on the wrong side of the box start for it), the next
    pixels are tried; ``None`` if none gives it."""
    target = choose(edges(MASK_SIZE))
    start = f32(choose(PASTE_START_CHOICES))
    first = choose(range(length))
    for pixel in list(range(first, length)) + list(range(first)):
        end = paste_side_through(target, pixel, start)
        if end is not None:
            return start, end, pixel
    return None


PASTE_START_CHOICES = np.linspace(-3.0, 8.0, 45, dtype=np.float32).tolist()


paste_jit = jax.jit(L.paste_masks_in_image, static_argnums=(2, 3), static_argnames="crop_to_box_extent")


@settings(max_examples=20, deadline=None)
@given(data=st.data(), crop=st.booleans())
def test_paste_masks_samples_on_the_mask_borders_match_detectron2_eagerly_and_under_jit(data, crop):
    """Three boxes, each placing one pixel row and one pixel column exactly on mask coordinate
    -1, 0, M - 1 or M (where a bilinear tap falls off the mask): that pixel is exactly a mask
    value or 0, as in detectron2, and the whole image matches detectron2's grid computation,
    as float32 values (crop or whole image) and as detectron2's soft uint8 masks."""
    def choose(options):
        return data.draw(st.sampled_from(list(options)))

    sides = [(paste_side(choose, IMAGE[1]), paste_side(choose, IMAGE[0])) for _ in range(3)]
    assume(all(None not in pair for pair in sides))
    boxes = np.asarray([[x0, y0, x1, y1] for (x0, x1, _), (y0, y1, _) in sides], np.float32)
    exact_pixels = [(row, col) for (_, _, col), (_, _, row) in sides]
    masks = np.random.default_rng(data.draw(st.integers(0, 2**31))).uniform(
        0.0, 1.0, (3, MASK_SIZE, MASK_SIZE)).astype(np.float32)
    expected = np.stack([
        paste_axis_weights(IMAGE[0], y0, y1, crop) @ m.astype(np.float64)
        @ paste_axis_weights(IMAGE[1], x0, x1, crop).T
        for m, (x0, y0, x1, y1) in zip(masks, boxes)])
    results = {
        "eager": L.paste_masks_in_image(masks, boxes, IMAGE, None, crop_to_box_extent=crop),
        "jit": paste_jit(jnp.asarray(masks), jnp.asarray(boxes), IMAGE, None, crop_to_box_extent=crop),
    }
    for name, values in results.items():
        values = np.asarray(values)
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6, err_msg=name)
        for n, (row, col) in enumerate(exact_pixels):
            assert values[n, row, col] == f32(expected[n, row, col]), (name, n, row, col)
    if crop:  # the tiled window path (thresholded output) shares the sample positions
        soft = np.asarray(paste_jit(jnp.asarray(masks), jnp.asarray(boxes), IMAGE, -1.0,
                                    crop_to_box_extent=True))
        for n, (row, col) in enumerate(exact_pixels):
            assert soft[n, row, col] == np.uint8(np.floor(f32(expected[n, row, col]) * f32(255)))
