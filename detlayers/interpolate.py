"""``torch.nn.functional.interpolate`` for NHWC feature maps (what ``detectron2.layers.interpolate``
re-exports): PyTorch's output sizes and sampling positions in the modes ``nearest``,
``nearest-exact``, ``bilinear``, ``bicubic`` and ``area``.

The taps (source indices and weights along each spatial axis) depend only on static shapes, so
they are computed at trace time with NumPy in float32, in the order PyTorch's CPU kernels round;
the resampling itself is one gather per tap and a weighted sum per axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detlayers._checks import IntOrPair
from detlayers._checks import as_pair as _pair
from detlayers._checks import check_floating as _check_floating

Array = jax.Array

__all__ = ["INTERPOLATE_MODES", "interpolate"]

INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_ALIGN_CORNERS_MODES = ("bilinear", "bicubic")


def _output_size(
    in_hw: tuple[int, int],
    size: IntOrPair | None,
    scale_factor: float | Sequence[float] | None,
) -> tuple[tuple[int, int], tuple[float | None, float | None]]:
    """Output ``(Ho, Wo)`` and the scale factors the coordinate transform uses (None: in/out)."""
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of `size` and `scale_factor`")
    if size is not None:
        out = _pair(size, "interpolate: size")
        if min(out) < 0:
            raise ValueError(f"interpolate: size must be non-negative, got {size!r}")
        return out, (None, None)
    if isinstance(scale_factor, Sequence) and not isinstance(scale_factor, str):
        if len(scale_factor) != 2:
            raise ValueError(f"interpolate: scale_factor must be a number or a pair, got {scale_factor!r}")
        raw = tuple(scale_factor)
    else:
        raw = (scale_factor, scale_factor)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in raw):
        raise TypeError(f"interpolate: scale_factor must be a number or a pair of numbers, got {scale_factor!r}")
    scales = (float(raw[0]), float(raw[1]))
    if not all(np.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"interpolate: scale_factor must be finite and positive, got {scale_factor!r}")
    # PyTorch: the output size is floor(input * scale), computed in double.
    out = (int(np.floor(in_hw[0] * scales[0])), int(np.floor(in_hw[1] * scales[1])))
    return out, scales


def _source_scale(in_size: int, out_size: int, scale: float | None, align_corners: bool) -> np.float32:
    """PyTorch's ``area_pixel_compute_scale`` in float32 (its opmath type for float inputs)."""
    if align_corners:
        return np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)  # PyTorch uses the user's scale_factor, not in/out
    return np.float32(in_size) / np.float32(out_size)


def _nearest_taps(in_size: int, out_size: int, scale: float | None, exact: bool) -> tuple[np.ndarray, None]:
    """PyTorch's ``nearest_idx`` (legacy ``min(floor(dst*scale), in-1)``, with its identity and
    halving shortcuts) or ``nearest_exact_idx`` (``min(floor((dst+0.5)*scale), in-1)``)."""
    dst = np.arange(out_size, dtype=np.int64)
    s = _source_scale(in_size, out_size, scale, align_corners=False)
    if exact:
        # (dst + 0.5) is a double in PyTorch; the product is rounded to float by floorf
        src = np.floor(((dst + 0.5) * np.float64(s)).astype(np.float32)).astype(np.int64)
    elif out_size == in_size:
        src = dst
    elif out_size == 2 * in_size:
        src = dst >> 1
    else:
        src = np.floor(dst.astype(np.float32) * s).astype(np.int64)
    return np.minimum(src, in_size - 1)[:, None], None


def _index_and_lambda(real: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's ``guard_index_and_lambda``: ``floor`` capped at ``in-1``, fraction in [0, 1]."""
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.clip(real - index.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return index, lam


def _linear_taps(
    in_size: int, out_size: int, scale: float | None, align_corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``[out, 2]`` and weights of linear interpolation, as PyTorch computes them
    (float32; ``compute_source_index_and_lambda``, with its copy shortcut when out == in)."""
    dst = np.arange(out_size, dtype=np.int64)
    if out_size == in_size:
        return np.stack([dst, dst], 1), np.tile(np.array([1, 0], np.float32), (out_size, 1))
    s = _source_scale(in_size, out_size, scale, align_corners)
    dst_f = dst.astype(np.float32)
    if align_corners:
        real = s * dst_f
    else:
        real = np.maximum(s * (dst_f + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0, w1 = _index_and_lambda(real.astype(np.float32), in_size)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return np.stack([i0, i1], 1), np.stack([w0, w1], 1)


def _cubic_taps(
    in_size: int, out_size: int, scale: float | None, align_corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``[out, 4]`` (clamped to the border, as PyTorch reads them) and weights of
    bicubic interpolation: Keys' kernel with ``A = -0.75`` at the unclamped source position
    ``scale*(dst+0.5)-0.5`` (or ``dst*(in-1)/(out-1)`` with ``align_corners``), in float32."""
    s = _source_scale(in_size, out_size, scale, align_corners)
    dst_f = np.arange(out_size, dtype=np.float32)
    real = s * dst_f if align_corners else s * (dst_f + np.float32(0.5)) - np.float32(0.5)
    index, t = _index_and_lambda(real.astype(np.float32), in_size)
    a = np.float32(-0.75)
    one = np.float32(1)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], 1)
    indices = np.clip(index[:, None] - 1 + np.arange(4), 0, in_size - 1)
    return indices, weights.astype(np.float32)


def _area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``adaptive_avg_pool`` bins: output ``i`` averages inputs ``[floor(i*in/out),
    ceil((i+1)*in/out))``; indices ``[out, K]`` padded with weight 0 to the longest bin."""
    dst = np.arange(out_size, dtype=np.int64)
    start = (dst * in_size) // out_size
    end = ((dst + 1) * in_size + out_size - 1) // out_size
    lengths = end - start
    k = int(lengths.max()) if out_size else 1
    offsets = np.arange(k)
    indices = np.minimum(start[:, None] + offsets, in_size - 1)
    weights = np.where(offsets < lengths[:, None], np.float32(1) / lengths[:, None].astype(np.float32), 0)
    return indices, weights.astype(np.float32)


def _resample_axis(x: Array, axis: int, indices: np.ndarray, weights: np.ndarray | None) -> Array:
    """``y[..., o, ...] = sum_k weights[o, k] * x[..., indices[o, k], ...]`` along ``axis``
    (static taps: one gather per tap, summed in tap order as PyTorch's kernels add them; a plain
    gather without weights).

    One gather per tap, not one gather of every tap reshaped to ``[out, taps]`` and reduced over
    the taps: XLA:CPU (jax 0.10.2) miscompiles that form when two resampled maps of different
    sizes meet under ``jit`` (``up(a) + up(up(b))`` returned values of 1e22 and more; eagerly
    and in this form the values are right; ``tests/test_interpolate.py`` guards it)."""
    out_size, taps = indices.shape
    if weights is None:
        return jnp.take(x, jnp.asarray(indices[:, 0], jnp.int32), axis=axis)
    w = jnp.asarray(weights, x.dtype).reshape((out_size, taps) + (1,) * (x.ndim - axis - 1))
    total = None
    for k in range(taps):
        term = jnp.take(x, jnp.asarray(indices[:, k], jnp.int32), axis=axis) * w[:, k]
        total = term if total is None else total + term
    return total


def interpolate(
    input: Array,
    size: IntOrPair | None = None,
    scale_factor: float | Sequence[float] | None = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> Array:
    """``torch.nn.functional.interpolate`` for NHWC maps ``[N, H, W, C]``.

    Args:
      input: ``[N, H, W, C]``, floating point; ``N`` and ``C`` may be 0, ``H`` and ``W`` not.
      size: output ``(Ho, Wo)`` (or one int for both).
      scale_factor: a number or a pair: the output size is ``floor(H * scale)`` (in double, as
        PyTorch), and, with ``recompute_scale_factor`` None or False, the source coordinates use
        ``1 / scale_factor`` (PyTorch's rule), not ``H / Ho``. Must be finite and positive.
      mode:

        - ``"nearest"``: PyTorch's legacy nearest, ``src = min(floor(dst * scale), H-1)`` (with its
          shortcuts for ``Ho == H`` and ``Ho == 2H``);
        - ``"nearest-exact"``: ``src = min(floor((dst + 0.5) * scale), H-1)`` (Pillow / scikit-image);
        - ``"bilinear"``: ``align_corners=False``: ``src = max(scale*(dst+0.5)-0.5, 0)``;
          ``True``: ``src = dst*(H-1)/(Ho-1)``; ``Ho == H`` copies (PyTorch's shortcut);
        - ``"bicubic"``: Keys' cubic convolution with ``A = -0.75`` on 4x4 taps at the same source
          positions as bilinear but without clamping them at 0, the taps read with the index
          clamped to the border (PyTorch's rule), so results may overshoot the input range;
        - ``"area"``: adaptive average pooling to ``(Ho, Wo)`` (bins ``[floor(i*H/Ho),
          ceil((i+1)*H/Ho))``); ``scale_factor`` only sets the output size.
      align_corners: only for ``"bilinear"`` and ``"bicubic"`` (None means False, as PyTorch).
      recompute_scale_factor: True: compute the output size from ``scale_factor``, then
        interpolate as if that size had been passed (``scale = H / Ho``). Only with
        ``scale_factor``, as PyTorch.
      antialias: must be False (PyTorch's antialiased resampling is not implemented).

    Returns:
      ``[N, Ho, Wo, C]`` in ``input.dtype``; the arithmetic is float32 for lower-precision inputs.
      The sampling positions and weights are computed at trace time in float32 exactly as
      PyTorch's CPU kernels do, so results match PyTorch's to float32 rounding. A zero output
      size is an error except for ``"area"`` (PyTorch's behaviour); ``C == 0`` gives an empty
      result in every mode (PyTorch's interpolating modes reject it).
    """
    if input.ndim != 4:
        raise ValueError(f"interpolate: input must be NHWC [N, H, W, C] (rank 4), got shape {input.shape}")
    _check_floating(input, "input")
    if mode not in INTERPOLATE_MODES:
        raise ValueError(f"interpolate: mode must be one of {INTERPOLATE_MODES}, got {mode!r}")
    if align_corners is not None and mode not in _ALIGN_CORNERS_MODES:
        raise ValueError(
            f"interpolate: align_corners can only be set with the interpolating modes "
            f"{_ALIGN_CORNERS_MODES} (as in PyTorch), got mode={mode!r}"
        )
    if antialias:
        raise ValueError("interpolate: antialias=True is not supported")
    if recompute_scale_factor and scale_factor is None:
        raise ValueError("interpolate: recompute_scale_factor is only allowed with scale_factor (as PyTorch)")
    in_hw = (int(input.shape[1]), int(input.shape[2]))
    out_hw, scales = _output_size(in_hw, size, scale_factor)
    if recompute_scale_factor:
        scales = (None, None)
    if min(in_hw) <= 0:
        raise ValueError(f"interpolate: input spatial size must be positive, got input shape {input.shape} (NHWC)")
    if min(out_hw) <= 0 and mode != "area":
        raise ValueError(
            f"interpolate: output size {out_hw} must be positive for mode={mode!r} (input shape "
            f"{input.shape}, NHWC)"
        )
    if mode in ("nearest", "nearest-exact"):
        exact = mode == "nearest-exact"
        rows = _nearest_taps(in_hw[0], out_hw[0], scales[0], exact)[0]
        cols = _nearest_taps(in_hw[1], out_hw[1], scales[1], exact)[0]
        return _resample_axis(_resample_axis(input, 1, rows, None), 2, cols, None)
    corners = bool(align_corners)
    if mode == "bilinear":
        taps_h = _linear_taps(in_hw[0], out_hw[0], scales[0], corners)
        taps_w = _linear_taps(in_hw[1], out_hw[1], scales[1], corners)
    elif mode == "bicubic":
        taps_h = _cubic_taps(in_hw[0], out_hw[0], scales[0], corners)
        taps_w = _cubic_taps(in_hw[1], out_hw[1], scales[1], corners)
    else:  # area
        taps_h = _area_taps(in_hw[0], out_hw[0])
        taps_w = _area_taps(in_hw[1], out_hw[1])
    x = input.astype(jnp.promote_types(input.dtype, jnp.float32))
    out = _resample_axis(_resample_axis(x, 2, *taps_w), 1, *taps_h)
    return out.astype(input.dtype)
