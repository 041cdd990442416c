"""Pasting instance masks into the image (``detectron2.layers.mask_ops.paste_masks_in_image``).

A mask head predicts each instance's mask as a small ``M x M`` grid of probabilities laid over its
box; :func:`paste_masks_in_image` resamples every mask bilinearly into the pixels of the full
image, the way detectron2 does with ``grid_sample(align_corners=False)``: pixel ``p`` of the image
has centre ``p + 0.5``, the box edges map to the outer edges of the mask's border cells, and
samples falling off the mask read zeros.

Agreement with detectron2 (float32). Every sample lands on the same mask cells with the same
fractional weights as in detectron2 (the sampling coordinates use its float32 operations); only
the order in which the four weighted neighbours are added differs, by a few float32 ulps. A
thresholded pixel can therefore differ only when its value lies within those ulps of the
threshold, and a soft (uint8) pixel by at most one level.

Where detectron2 depends on the device. On CPU detectron2 pastes each mask only into its box's
integer extent ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)`` (``skip_empty``)
and leaves the rest of the image zero; on GPU it samples the whole image. The two differ in the
half-mask-cell ramp just outside a box wider/taller than ``3 * M`` pixels, where the bilinear
weight of the border cell falls from 0.5 to 0 -- invisible after a threshold >= 0.5 but visible in
soft masks. ``crop_to_box_extent=True`` (the default) reproduces the CPU result on every device
here; ``False`` reproduces the GPU one. Where detectron2's CPU path raises (a box lying wholly to
the right of / below the image by more than a pixel, or wholly left / above it, makes
``torch.arange`` fail) the mask here is simply all zero.

How it is computed (separable two-tap weights, box-window tiles, bounded memory) and the measured
agreement: ``docs/design/mask_ops.md`` in the repository.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._numerics import divide, opaque

Array = jax.Array

__all__ = ["paste_masks_in_image"]

# Upper bound on the float32 working set of one chunk of masks (elements of [chunk, H, W]). On CPU
# small chunks keep the intermediate in cache-friendly sizes (measured fastest at 1-2 planes of
# 800x1333); accelerators prefer bigger batched matmuls.
_CHUNK_BYTES = {"cpu": 8 * 2**20}
_CHUNK_BYTES_DEFAULT = 256 * 2**20
# (rows, columns) of the tiles the thresholded CPU-extent paste covers each box's window with.
_TILE = (64, 128)


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int]:
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, (Sequence, np.ndarray)):
        raise TypeError(f"image_shape must be a (height, width) pair of ints, got {image_shape!r}")
    if len(image_shape) != 2:
        raise ValueError(f"image_shape must be (height, width), got {tuple(image_shape)!r}")
    dims = []
    for value in image_shape:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
            raise TypeError(f"image_shape must hold Python/NumPy ints, got {tuple(image_shape)!r}")
        dims.append(int(value))
    if dims[0] <= 0 or dims[1] <= 0:
        raise ValueError(f"image_shape must be two positive ints, got {tuple(dims)!r}")
    return dims[0], dims[1]


def _check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, jax.core.Tracer):
        raise TypeError(
            "threshold must be a static Python float (it decides the output dtype); "
            "mark it static under jax.jit"
        )
    real = (numbers.Real, np.floating, np.integer)
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, real):
        raise TypeError(f"threshold must be a float or None, got {threshold!r}")
    value = float(threshold)
    if math.isnan(value):
        raise ValueError("threshold must not be NaN")
    return value


def _check_inputs(masks: Array, boxes: Array) -> None:
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, M, M] (rank 3), got shape {masks.shape}")
    if masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be square [N, M, M] (as in detectron2), got shape {masks.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(
            f"masks and boxes must have the same N, got masks {masks.shape} and boxes {boxes.shape}"
        )
    for name, array in (("masks", masks), ("boxes", boxes)):
        if not any(jnp.issubdtype(array.dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)):
            raise TypeError(f"{name} must be a real-valued array, got dtype {array.dtype}")


def _sample_positions(pixels: Array, start: Array, end: Array, mask_size: int) -> Array:
    """Continuous mask coordinate (cell units, cell ``i`` centred at ``i``) of every pixel centre.

    ``pixels`` holds float32 pixel indices (integers); ``start``/``end`` are scalars (one box edge
    pair); returns float32 of ``pixels``' shape. The float32 operations are detectron2's
    normalisation to ``[-1, 1]`` followed by grid_sample's ``align_corners=False`` un-normalisation.
    """
    centres = pixels + 0.5
    # Kept from XLA's simplifier (see detlayers._numerics): the division by the box size must not
    # become a multiplication by its reciprocal, and `(g * 2 - 1 + 1) * (M / 2)` must not fold into
    # `g * M`; both round differently from PyTorch.
    normalized = opaque(divide(centres - start, end - start) * 2.0 - 1.0)
    return (normalized + 1.0) * (mask_size / 2.0) - 0.5


def _axis_weights(num_pixels: int, start: Array, end: Array, mask_size: int, crop: bool) -> Array:
    """1-D bilinear weights ``[num_pixels, mask_size]`` of one box side (two taps per pixel at most).

    A tap outside ``[0, mask_size)`` contributes nothing (grid_sample's zero padding). A non-finite
    position (zero-width box) matches no tap, so the pixel is 0. With ``crop`` the pixels outside
    detectron2's CPU paste window ``[floor(start) - 1, ceil(end) + 1)`` weigh zero.
    """
    pixels = jnp.arange(num_pixels, dtype=jnp.float32)
    position = _sample_positions(pixels, start, end, mask_size)
    left = jnp.floor(position)
    right_weight = position - left
    left_weight = 1.0 - right_weight
    if crop:
        inside = (pixels >= jnp.floor(start) - 1.0) & (pixels < jnp.ceil(end) + 1.0)
        left_weight = jnp.where(inside, left_weight, 0.0)
        right_weight = jnp.where(inside, right_weight, 0.0)
    taps = jnp.arange(mask_size, dtype=jnp.float32)
    # Comparing float positions with float tap numbers avoids casting inf/NaN to int.
    return jnp.where(taps == left[:, None], left_weight[:, None], 0.0) + jnp.where(
        taps == left[:, None] + 1.0, right_weight[:, None], 0.0
    )


def _paste_one(mask: Array, box: Array, height: int, width: int, crop: bool) -> Array:
    """float32 ``[height, width]`` image of one ``[M, M]`` mask resampled into ``box``."""
    mask_size = mask.shape[-1]
    rows = _axis_weights(height, box[1], box[3], mask_size, crop)  # [H, M]
    cols = _axis_weights(width, box[0], box[2], mask_size, crop)  # [W, M]
    highest = lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators
    along_x = jnp.matmul(mask, cols.T, precision=highest)  # [M, W]
    return jnp.matmul(rows, along_x, precision=highest)  # [H, W]


def _output_dtype(threshold: float | None) -> jnp.dtype:
    if threshold is None:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(jnp.bool_) if threshold >= 0 else jnp.dtype(jnp.uint8)


def _chunk_size(num_masks: int, height: int, width: int) -> int:
    budget = _CHUNK_BYTES.get(jax.default_backend(), _CHUNK_BYTES_DEFAULT)
    return max(1, min(num_masks, budget // (4 * height * width)))


def paste_masks_in_image(
    masks: Array,
    boxes: Array,
    image_shape: tuple[int, int],
    threshold: float | None = 0.5,
    *,
    crop_to_box_extent: bool = True,
) -> Array:
    """Paste ``N`` small square masks into an ``H x W`` image, each resampled into its box.

    Args:
      masks: ``[N, M, M]`` per-instance mask probabilities (detectron2's mask-head output after the
        sigmoid, e.g. ``M = 28``), any real dtype; computed in float32 (bf16/f16/int/bool are
        converted, as detectron2 converts non-float masks).
      boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels, float32 (other dtypes are cast).
        Boxes may extend past the image, lie wholly outside it (all-zero mask) or have zero width
        or height (all-zero mask).
      image_shape: ``(H, W)``, two positive Python ints (static).
      threshold: static. ``>= 0``: returns ``bool[N, H, W]`` = ``value >= threshold``. ``< 0``:
        returns detectron2's soft masks ``uint8[N, H, W]`` = ``floor(value * 255)`` (values are
        clipped to ``[0, 255]`` first; for masks in ``[0, 1]`` this is detectron2's truncating
        cast). ``None`` (an extension beyond detectron2) returns the resampled float32 values
        ``[N, H, W]`` themselves, which are differentiable with respect to ``masks`` and ``boxes``.
      crop_to_box_extent: keyword-only extension. ``True`` (default) gives detectron2's CPU result,
        which leaves zero every pixel outside ``[floor(x1) - 1, ceil(x2) + 1) x
        [floor(y1) - 1, ceil(y2) + 1)``; ``False`` gives detectron2's GPU result, which samples the
        whole image (see the module docstring for where the two differ).

    Returns:
      ``bool``/``uint8``/``float32`` array ``[N, H, W]`` as selected by ``threshold``; ``N = 0``
      gives an empty ``[0, H, W]`` array of that dtype.

    Memory: the result itself is the only ``[N, H, W]`` buffer. With a threshold and
    ``crop_to_box_extent=True`` masks are pasted one 64 x 128 tile at a time over their box
    windows (a ``while_loop`` writing into the result in place). Otherwise masks are pasted a chunk
    at a time over the whole image (a ``fori_loop``), chunks sized so the float32 intermediate
    stays under a fixed budget (8 MiB on CPU, 256 MiB elsewhere) whatever ``N``. ``threshold=0``
    (True also off the box window) takes the whole-image path.

    Works under ``jax.jit`` (``image_shape``, ``threshold``, ``crop_to_box_extent`` static) and
    ``jax.vmap`` (a leading batch axis on ``masks`` and ``boxes``); ``jax.grad`` through
    ``threshold=None``.
    """
    masks = jnp.asarray(masks)
    boxes = jnp.asarray(boxes)
    _check_inputs(masks, boxes)
    height, width = _check_image_shape(image_shape)
    threshold = _check_threshold(threshold)
    crop = bool(crop_to_box_extent)

    out_dtype = _output_dtype(threshold)
    if masks.shape[0] == 0:
        return jnp.zeros((0, height, width), out_dtype)
    chunk = _chunk_size(masks.shape[0], height, width)
    # Always compiled (also when called eagerly): the float32 operation order that matches
    # detectron2 relies on XLA fusing `(g + 1) * (M / 2) - 0.5` into one multiply-add.
    return _paste_compiled(masks, boxes, height, width, threshold, crop, chunk)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _paste_compiled(
    masks: Array, boxes: Array, height: int, width: int, threshold: float | None, crop: bool, chunk: int
) -> Array:
    out_dtype = _output_dtype(threshold)
    num_masks = masks.shape[0]
    masks = masks.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    if crop and threshold is not None and threshold != 0:  # threshold 0 is True off the window too
        return _paste_in_windows(masks, boxes, height, width, threshold)

    def paste_chunk(chunk_masks: Array, chunk_boxes: Array) -> Array:
        paste_each = jax.vmap(_paste_one, in_axes=(0, 0, None, None, None))
        values = paste_each(chunk_masks, chunk_boxes, height, width, crop)
        if threshold is None:
            return values
        if threshold >= 0:
            return values >= jnp.float32(threshold)
        return jnp.clip(values * 255.0, 0.0, 255.0).astype(jnp.uint8)

    num_chunks = -(-num_masks // chunk)
    if num_chunks == 1:
        return paste_chunk(masks, boxes)

    def body(index: Array, pasted: Array) -> Array:
        # The last chunk is shifted back to end at N (re-pasting a few masks identically) so every
        # chunk has the same static size and is written in place: no padded or concatenated copy
        # of the [N, H, W] result is ever made.
        start = jnp.minimum(index * chunk, num_masks - chunk)
        chunk_masks = lax.dynamic_slice_in_dim(masks, start, chunk)
        chunk_boxes = lax.dynamic_slice_in_dim(boxes, start, chunk)
        return lax.dynamic_update_slice_in_dim(pasted, paste_chunk(chunk_masks, chunk_boxes), start, axis=0)

    return lax.fori_loop(0, num_chunks, body, jnp.zeros((num_masks, height, width), out_dtype))


def _axis_taps(
    num_pixels: int, start: Array, end: Array, mask_size: int, first_pixel: Array
) -> tuple[Array, Array, Array]:
    """The two bilinear taps of pixels ``first_pixel + arange(num_pixels)`` of one box side, cropped
    to detectron2's CPU paste window: ``(index, low_weight, high_weight)``, ``index`` int32 into
    the mask padded by one cell (the low tap is cell ``index - 1``). The weights are
    :func:`_axis_weights`' non-zero entries: a tap outside the mask, a pixel outside the window
    or a non-finite position weighs zero."""
    # Pixel indices are integers below 2**24, exact in float32: the same positions as _axis_weights.
    pixels = jnp.arange(num_pixels, dtype=jnp.float32) + first_pixel.astype(jnp.float32)
    position = _sample_positions(pixels, start, end, mask_size)
    low = jnp.floor(position)
    high_weight = position - low
    low_weight = 1.0 - high_weight
    inside = (pixels >= jnp.floor(start) - 1.0) & (pixels < jnp.ceil(end) + 1.0)
    low_weight = jnp.where(inside & (low >= 0.0) & (low <= mask_size - 1.0), low_weight, 0.0)
    high_weight = jnp.where(inside & (low >= -1.0) & (low <= mask_size - 2.0), high_weight, 0.0)
    index = jnp.clip(jnp.nan_to_num(low, nan=-1.0), -1.0, mask_size - 1.0).astype(jnp.int32) + 1
    return index, low_weight, high_weight


def _window_start_end(start: Array, end: Array, num_pixels: int) -> tuple[Array, Array]:
    """detectron2's CPU paste window ``[floor(start) - 1, ceil(end) + 1)`` clipped to the image, int32."""
    lo = jnp.clip(jnp.nan_to_num(jnp.floor(start) - 1.0), 0.0, num_pixels)
    hi = jnp.clip(jnp.nan_to_num(jnp.ceil(end) + 1.0), 0.0, num_pixels)
    return lo.astype(jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)


def _paste_in_windows(masks: Array, boxes: Array, height: int, width: int, threshold: float) -> Array:
    """The ``crop_to_box_extent`` result, thresholded/soft, computing only each box's window.

    Every pixel outside a box's paste window is zero, so only the window is resampled: it is
    covered by fixed-size tiles (``_TILE``), and one ``while_loop`` runs over the (mask, tile)
    pairs of all masks, writing each tile into the zero-initialised result in place. A tile that
    would cross the image edge is moved back inside; its pixels outside the window weigh zero, so
    it writes the zeros already there. Each pixel is the two-tap bilinear blend of
    :func:`_axis_taps` (the non-zero entries of the whole-image path's weights), columns first.
    """
    out_dtype = _output_dtype(threshold)
    num_masks, mask_size = masks.shape[0], masks.shape[-1]
    tile_h, tile_w = min(_TILE[0], height), min(_TILE[1], width)
    x_lo, x_hi = _window_start_end(boxes[:, 0], boxes[:, 2], width)
    y_lo, y_hi = _window_start_end(boxes[:, 1], boxes[:, 3], height)
    tiles_y = (y_hi - y_lo + tile_h - 1) // tile_h
    tiles_x = (x_hi - x_lo + tile_w - 1) // tile_w
    tile_count = tiles_y * tiles_x
    tile_end = jnp.cumsum(tile_count)
    # One zero cell on each side, so the taps -1 and M read zeros (their weights are 0 anyway).
    padded_masks = jnp.pad(masks, ((0, 0), (1, 1), (1, 1)))  # [N, M + 2, M + 2]

    def convert(values: Array) -> Array:
        if threshold >= 0:
            return values >= jnp.float32(threshold)
        return jnp.clip(values * 255.0, 0.0, 255.0).astype(jnp.uint8)

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        position, out = carry
        n = jnp.sum(tile_end <= position).astype(jnp.int32)
        local = position - (tile_end[n] - tile_count[n])
        row_tile, col_tile = local // tiles_x[n], local % tiles_x[n]
        top = jnp.minimum(y_lo[n] + row_tile * tile_h, height - tile_h)
        left = jnp.minimum(x_lo[n] + col_tile * tile_w, width - tile_w)
        box = boxes[n]
        row_tap, row_lo, row_hi = _axis_taps(tile_h, box[1], box[3], mask_size, top)
        col_tap, col_lo, col_hi = _axis_taps(tile_w, box[0], box[2], mask_size, left)
        padded = padded_masks[n]
        along_x = padded[:, col_tap] * col_lo + padded[:, col_tap + 1] * col_hi  # [M + 2, w]
        tile = along_x[row_tap] * row_lo[:, None] + along_x[row_tap + 1] * row_hi[:, None]  # [h, w]
        out = lax.dynamic_update_slice(out, convert(tile)[None], (n, top, left))
        return position + 1, out

    total = tile_end[-1]
    start = (jnp.int32(0), jnp.zeros((num_masks, height, width), out_dtype))
    return lax.while_loop(lambda carry: carry[0] < total, body, start)[1]
