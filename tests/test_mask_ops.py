"""``paste_masks_in_image`` against detectron2 and an independent float64 NumPy derivation.

References:
* ``tests/fixtures/mask_ops.npz`` (``tools/fixtures/make_mask_ops.py``): detectron2's
  ``paste_masks_in_image`` on CPU (``cpu_*``, the per-box-extent paste) and detectron2's GPU code
  path ``_do_paste_mask(skip_empty=False)`` run on CPU (``full_*``), on 60 x 80 images with boxes
  inside, partly and wholly outside the image, zero-area, sub-pixel and larger than the image.
* ``_reference_paste``: grid_sample's bilinear rule with zero padding written out in float64 from
  its definition (pixel centre ``p + 0.5`` -> mask position ``(p + 0.5 - x1) / (x2 - x1) * M - 0.5``).

Measured agreement with detectron2 (``make_mask_ops.py --measure``, random masks and boxes):
thresholded masks (0.5) differ on 0 of 9.6M pixels (2000 masks on 60 x 80), 0 of 92M (300 on
480 x 640) and 0 of 107M (100 on 800 x 1333); soft masks differ by at most one level, on 1.5e-6,
6.3e-7 and 6.9e-7 of the pixels respectively. The tests below allow a thresholded difference only
where our value lies within a few float32 ulps of the threshold.
"""

from __future__ import annotations

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from detlayers import mask_ops
from detlayers.mask_ops import paste_masks_in_image

# Each pixel whose threshold decision differs from detectron2 must hold a value this close to the
# threshold (a few float32 ulps at 0.5 -- the summation order is the only difference).
ULP_BAND = 4 * float(np.spacing(np.float32(0.5)))


@functools.partial(jax.jit, static_argnames=("image_shape", "threshold", "crop_to_box_extent"))
def paste(masks, boxes, image_shape, threshold=0.5, crop_to_box_extent=True):
    return paste_masks_in_image(masks, boxes, image_shape, threshold, crop_to_box_extent=crop_to_box_extent)


@pytest.fixture(scope="module")
def ref():
    return load_fixture("mask_ops.npz")


def _unpack(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)


def _image_shape(ref) -> tuple[int, int]:
    return int(ref["image_hw"][0]), int(ref["image_hw"][1])


def _axis_weights_f64(num_pixels: int, start: float, end: float, mask_size: int, crop: bool) -> np.ndarray:
    """``[num_pixels, mask_size]`` linear-interpolation weights, float64, from the definition."""
    weights = np.zeros((num_pixels, mask_size))
    for p in range(num_pixels):
        if crop and not (np.floor(start) - 1 <= p < np.ceil(end) + 1):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            position = (p + 0.5 - start) / (end - start) * mask_size - 0.5
        if not np.isfinite(position):
            continue
        for tap in range(mask_size):
            weights[p, tap] = max(0.0, 1.0 - abs(position - tap))
    return weights


def _reference_paste(masks, boxes, image_shape, crop):
    height, width = image_shape
    out = np.zeros((len(masks), height, width))
    for n, (mask, box) in enumerate(zip(np.asarray(masks, np.float64), np.asarray(boxes, np.float64))):
        rows = _axis_weights_f64(height, box[1], box[3], mask.shape[0], crop)
        cols = _axis_weights_f64(width, box[0], box[2], mask.shape[0], crop)
        out[n] = rows @ mask @ cols.T
    return out


def _assert_threshold_matches(ours, expected, values, threshold):
    """Equal, except where our float value sits within a few ulps of the threshold."""
    ours, expected = np.asarray(ours), np.asarray(expected)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype == bool
    differ = ours != expected
    near = np.abs(np.asarray(values, np.float64) - threshold) <= ULP_BAND
    assert not np.any(differ & ~near), f"{int((differ & ~near).sum())} pixels differ away from the threshold"
    assert differ.mean() <= 1e-4


def _assert_soft_matches(ours, expected):
    ours, expected = np.asarray(ours), np.asarray(expected)
    assert ours.dtype == expected.dtype == np.uint8 and ours.shape == expected.shape
    levels = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    assert levels.max() <= 1
    assert (levels > 0).mean() <= 1e-3


# ------------------------------------------------------------------------------------------------
# detectron2 CPU result (per-box extent), the default
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold, key", [(0.5, "cpu_bool_05"), (0.3, "cpu_bool_03")])
def test_thresholded_masks_match_detectron2_cpu(ref, threshold, key):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    ours = paste(masks, boxes, hw, threshold)
    chex.assert_shape(ours, (len(masks), *hw))
    chex.assert_type(ours, jnp.bool_)
    values = paste(masks, boxes, hw, None)
    expected = _unpack(ref[key], (len(masks), *hw))
    _assert_threshold_matches(ours, expected, values, threshold)
    assert expected.sum() > 1000  # the fixture does paste something


def test_soft_masks_match_detectron2_cpu_within_one_level(ref):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    ours = paste(masks, boxes, hw, -1.0)
    chex.assert_type(ours, jnp.uint8)
    _assert_soft_matches(ours, ref["cpu_soft"])


def test_zero_area_and_off_image_boxes_paste_nothing(ref):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    soft = np.asarray(paste(masks, boxes, hw, -1.0))
    empty = (boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1]) | (boxes[:, 0] >= hw[1] + 0.25)
    assert empty.sum() >= 4
    assert not soft[empty].any() and not ref["cpu_soft"][empty].any()


def test_boxes_wholly_outside_the_image_give_zeros(ref):
    # detectron2's CPU path raises on these; its whole-image (GPU) path gives zeros, as we do.
    masks, boxes, hw = ref["far_masks"], ref["far_boxes"], _image_shape(ref)
    for crop in (True, False):
        ours = paste(masks, boxes, hw, -1.0, crop)
        np.testing.assert_array_equal(np.asarray(ours), ref["far_full_soft"])
    assert not ref["far_full_soft"].any()


def test_other_mask_size_and_bfloat16_masks(ref):
    masks, boxes, hw = ref["m7_masks"], ref["m7_boxes"], _image_shape(ref)  # bf16-exact values
    expected = _unpack(ref["m7_cpu_bool_05"], (len(masks), *hw))
    values = paste(masks, boxes, hw, None)
    for dtype in (jnp.float32, jnp.bfloat16):
        ours = paste(jnp.asarray(masks, dtype), boxes, hw, 0.5)
        _assert_threshold_matches(ours, expected, values, 0.5)
        _assert_soft_matches(paste(jnp.asarray(masks, dtype), boxes, hw, -1.0), ref["m7_cpu_soft"])
    half = paste(jnp.asarray(masks, jnp.float16), boxes, hw, None)  # f16 rounds the inputs
    np.testing.assert_allclose(np.asarray(half), np.asarray(values), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# detectron2 GPU code path (whole-image sampling): crop_to_box_extent=False
# ------------------------------------------------------------------------------------------------
def test_whole_image_values_match_detectron2_grid_sample(ref):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    values = paste(masks, boxes, hw, None, False)
    chex.assert_type(values, jnp.float32)
    # detectron2's float values are NaN where a zero-width/height box divides by zero; its
    # threshold then gives False and its uint8 cast 0. Ours are 0 there.
    expected_values = ref["full_float"]
    nan_masks = np.isnan(expected_values).any(axis=(1, 2))
    zero_area = (boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])
    np.testing.assert_array_equal(nan_masks, zero_area)
    np.testing.assert_allclose(np.asarray(values), np.nan_to_num(expected_values, nan=0.0), rtol=0, atol=2e-7)
    expected = _unpack(ref["full_bool_05"], (len(masks), *hw))
    _assert_threshold_matches(paste(masks, boxes, hw, 0.5, False), expected, values, 0.5)
    _assert_soft_matches(paste(masks, boxes, hw, -1.0, False), ref["full_soft"])


def test_crop_differs_from_whole_image_only_outside_the_box_extent(ref):
    # The bilinear ramp half a mask cell outside large boxes is what detectron2's CPU crop drops.
    boxes, hw = ref["boxes"], _image_shape(ref)
    cpu, full = ref["cpu_soft"], ref["full_soft"]
    assert (cpu != full).sum() > 100
    ys, xs = np.arange(hw[0]), np.arange(hw[1])
    for n, box in enumerate(boxes):
        in_x = (xs >= np.floor(box[0]) - 1) & (xs < np.ceil(box[2]) + 1)
        in_y = (ys >= np.floor(box[1]) - 1) & (ys < np.ceil(box[3]) + 1)
        window = in_y[:, None] & in_x[None, :]
        np.testing.assert_array_equal(cpu[n][window], full[n][window])
        assert not cpu[n][~window].any()


# ------------------------------------------------------------------------------------------------
# independent float64 derivation
# ------------------------------------------------------------------------------------------------
def test_float_values_match_float64_derivation(ref):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    for crop in (True, False):
        ours = np.asarray(paste(masks, boxes, hw, None, crop))
        # float32 sampling positions (as detectron2's) are off by ~1e-6 of a cell at these coordinates
        np.testing.assert_allclose(ours, _reference_paste(masks, boxes, hw, crop), rtol=0, atol=5e-6)


@settings(max_examples=15, deadline=None)
@given(
    masks=hnp.arrays(np.float32, (3, 5, 5), elements=st.floats(0, 1, width=32)),
    corners=hnp.arrays(np.float32, (3, 2), elements=st.floats(-12, 30, width=32)),
    sizes=hnp.arrays(np.float32, (3, 2), elements=st.floats(0, 40, width=32)),
    crop=st.booleans(),
)
def test_property_float_values_match_float64_derivation(masks, corners, sizes, crop):
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    ours = np.asarray(paste(masks, boxes, (17, 23), None, crop))
    np.testing.assert_allclose(ours, _reference_paste(masks, boxes, (17, 23), crop), rtol=0, atol=5e-6)


# ------------------------------------------------------------------------------------------------
# transformations, memory, edge cases
# ------------------------------------------------------------------------------------------------
def test_vmap_over_a_batch_of_images(ref):
    masks, boxes, hw = ref["masks"][:8], ref["boxes"][:8], _image_shape(ref)
    batch_masks = np.stack([masks, masks[::-1]])
    batch_boxes = np.stack([boxes, boxes[::-1]])
    batched = jax.jit(jax.vmap(lambda m, b: paste_masks_in_image(m, b, hw, 0.5)))(batch_masks, batch_boxes)
    chex.assert_shape(batched, (2, 8, *hw))
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(paste(masks, boxes, hw, 0.5)))
    second = paste(masks[::-1], boxes[::-1], hw, 0.5)
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(second))


def test_pmap_over_devices(ref):
    masks, boxes, hw = ref["masks"][:8], ref["boxes"][:8], _image_shape(ref)
    if jax.local_device_count() < 2:
        pytest.skip("needs 2 devices")
    per_device = jax.pmap(lambda m, b: paste_masks_in_image(m, b, hw, -1.0))
    sharded = per_device(masks.reshape(2, 4, 28, 28), boxes.reshape(2, 4, 4))
    np.testing.assert_array_equal(np.asarray(sharded).reshape(8, *hw), np.asarray(paste(masks, boxes, hw, -1.0)))


def test_grad_of_float_paste_matches_float64_derivation(ref):
    masks, boxes, hw = ref["masks"][:6], ref["boxes"][:6], _image_shape(ref)
    cotangent = np.random.default_rng(0).standard_normal((6, *hw)).astype(np.float32)

    def loss(m):
        return jnp.sum(paste_masks_in_image(m, boxes, hw, None) * cotangent)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(masks)))
    expected = np.zeros_like(masks, dtype=np.float64)
    for n, box in enumerate(boxes.astype(np.float64)):
        rows = _axis_weights_f64(hw[0], box[1], box[3], masks.shape[1], True)
        cols = _axis_weights_f64(hw[1], box[0], box[2], masks.shape[1], True)
        expected[n] = rows.T @ cotangent[n] @ cols
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-4)


def test_grad_wrt_boxes_matches_finite_differences():
    rng = np.random.default_rng(1)
    masks = rng.random((2, 6, 6)).astype(np.float32)
    boxes = np.asarray([[3.3, 2.6, 15.1, 12.7], [1.2, 4.4, 9.9, 16.3]], np.float32)
    weights = rng.standard_normal((2, 20, 18))

    def ref_loss(b):
        return float(np.sum(_reference_paste(masks, b, (20, 18), False) * weights))

    def loss(b):
        pasted = paste_masks_in_image(masks, b, (20, 18), None, crop_to_box_extent=False)
        return jnp.sum(pasted * weights)

    grad = jax.grad(loss)
    ours = np.asarray(grad(jnp.asarray(boxes)))
    eps = 1e-4
    numeric = np.zeros((2, 4))
    for idx in np.ndindex(2, 4):
        plus, minus = boxes.astype(np.float64), boxes.astype(np.float64)
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
    np.testing.assert_allclose(ours, numeric, rtol=1e-3, atol=1e-3)


def test_memory_stays_bounded_for_100_masks_on_a_coco_image():
    masks = jax.ShapeDtypeStruct((100, 28, 28), jnp.float32)
    boxes = jax.ShapeDtypeStruct((100, 4), jnp.float32)
    compiled = jax.jit(lambda m, b: paste_masks_in_image(m, b, (800, 1333))).lower(masks, boxes).compile()
    memory = compiled.memory_analysis()
    assert memory.output_size_in_bytes == 100 * 800 * 1333  # bool result only
    # A float32 [100, 800, 1333] stack would be 426 MB; scratch holds one chunk of float planes.
    plane = 4 * 800 * 1333
    chunk = mask_ops._chunk_size(100, 800, 1333)
    assert chunk < 100
    assert memory.temp_size_in_bytes <= (chunk + 1) * plane, (memory.temp_size_in_bytes, chunk)


def test_result_does_not_depend_on_chunk_size(ref, monkeypatch):
    masks, boxes, hw = ref["masks"], ref["boxes"], _image_shape(ref)
    default = np.asarray(paste_masks_in_image(masks, boxes, hw, None))
    monkeypatch.setattr(mask_ops, "_CHUNK_BYTES", {"cpu": 3 * 4 * hw[0] * hw[1]})  # 3 masks a chunk
    assert mask_ops._chunk_size(len(masks), *hw) == 3
    np.testing.assert_array_equal(np.asarray(paste_masks_in_image(masks, boxes, hw, None)), default)


@pytest.mark.parametrize("threshold, dtype", [(0.5, jnp.bool_), (-1.0, jnp.uint8), (None, jnp.float32)])
def test_no_masks_give_an_empty_image_stack(threshold, dtype):
    out = paste(jnp.zeros((0, 28, 28)), jnp.zeros((0, 4)), (60, 80), threshold)
    chex.assert_shape(out, (0, 60, 80))
    chex.assert_type(out, dtype)


@pytest.mark.parametrize(
    "masks_shape, boxes_shape, image_shape, threshold, error, match",
    [
        ((3, 28, 14), (3, 4), (60, 80), 0.5, ValueError, r"square.*\(3, 28, 14\)"),
        ((28, 28), (1, 4), (60, 80), 0.5, ValueError, r"rank 3.*\(28, 28\)"),
        ((3, 28, 28), (2, 4), (60, 80), 0.5, ValueError, r"same N.*\(3, 28, 28\).*\(2, 4\)"),
        ((3, 28, 28), (3, 5), (60, 80), 0.5, ValueError, r"boxes must be \[N, 4\].*\(3, 5\)"),
        ((3, 28, 28), (3, 4), (60, 0), 0.5, ValueError, r"image_shape.*positive"),
        ((3, 28, 28), (3, 4), (60, 80, 3), 0.5, ValueError, r"image_shape"),
        ((3, 28, 28), (3, 4), (60.0, 80), 0.5, TypeError, r"image_shape"),
        ((3, 28, 28), (3, 4), (60, 80), float("nan"), ValueError, r"threshold"),
        ((3, 28, 28), (3, 4), (60, 80), "0.5", TypeError, r"threshold"),
    ],
)
def test_bad_arguments_raise_naming_the_shapes(masks_shape, boxes_shape, image_shape, threshold, error, match):
    with pytest.raises(error, match=match):
        paste_masks_in_image(jnp.zeros(masks_shape), jnp.zeros(boxes_shape), image_shape, threshold)


def test_complex_masks_are_rejected():
    with pytest.raises(TypeError, match="masks must be a real-valued array"):
        paste_masks_in_image(jnp.zeros((1, 4, 4), jnp.complex64), jnp.zeros((1, 4)), (8, 8))


def test_traced_threshold_is_rejected():
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda t: paste_masks_in_image(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4)), (8, 8), t))(0.5)


# ------------------------------------------------------------------------------------------------
# the windowed (tiled) paste over many 64 x 128 tiles, against detectron2 and the whole-image path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiles_480x640", "tiles_800x1333"])
def test_windowed_paste_over_many_tiles_matches_detectron2_and_whole_image_path(ref, name):
    masks, boxes = ref[f"{name}_masks"], ref[f"{name}_boxes"]
    hw = tuple(int(v) for v in name.split("_")[1].split("x"))
    assert hw[0] > 4 * mask_ops._TILE[0] and hw[1] > 4 * mask_ops._TILE[1]
    # the whole-image path (dense weights, cropped to the same windows): independent of the tiling
    values = np.asarray(paste(masks, boxes, hw, None))
    whole_bool = values >= np.float32(0.5)
    whole_soft = np.clip(values * np.float32(255), 0, 255).astype(np.uint8)

    ours = np.asarray(paste(masks, boxes, hw, 0.5))
    expected = _unpack(ref[f"{name}_bool_05"], (len(masks), *hw))
    assert expected.sum() > 10_000
    _assert_threshold_matches(ours, expected, values, 0.5)
    _assert_threshold_matches(ours, whole_bool, values, 0.5)

    soft = np.asarray(paste(masks, boxes, hw, -1.0))
    _assert_soft_matches(soft, whole_soft)
    # detectron2's soft masks, by their per-row / per-column sums and non-zero counts: one level
    # on a few pixels may differ (summation order), a misplaced tile moves whole rows or columns
    soft = soft.astype(np.int64)
    for axis, key in ((2, "soft_row_sums"), (1, "soft_col_sums")):
        np.testing.assert_allclose(soft.sum(axis=axis), ref[f"{name}_{key}"], atol=2, rtol=0)
    np.testing.assert_allclose(np.count_nonzero(soft, axis=(1, 2)), ref[f"{name}_soft_total_nonzero"], atol=2)
