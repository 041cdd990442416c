"""Helpers shared by the test modules (imported as ``helpers``: pytest puts ``tests/`` on
``sys.path`` because it has no ``__init__.py``).

* ``load_fixture`` / ``load_npz``: a committed ``.npz`` read into a dict of arrays (the file is
  closed before returning).
* ``assert_close``: relative closeness measured against the largest reference magnitude.
* ``bilinear_interpolate``: the float64 bilinear sample of ROIAlign (plain and rotated);
  ``sample_positions`` / ``adaptive_grid``: ROIAlign's sample positions and adaptive grid in the
  reference kernels' operation order, in float64 or in their own float32 rounding;
  ``roi_bins_reference``: the bins of one ROI, each the mean of its grid of such samples;
  ``axis_bin_weights``: the same along one axis as a ``[bins, length]`` matrix (vectorized).
* ``mse_train_step``: a jitted training step of a module with batch statistics.
* ``shapely_iou_matrix`` / ``expected_rotated_keep``: the float64 rotated IoU and the rotated NMS
  result the spec requires (detectron2's where its IoU is sound).
"""

from __future__ import annotations

import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_npz(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` whose keys start with ``prefix``, as a dict."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files if key.startswith(prefix)}


def load_fixture(name: str, prefix: str = "") -> dict[str, np.ndarray]:
    """``load_npz`` of ``tests/fixtures/<name>`` (made by ``tools/fixtures/make_*.py``)."""
    return load_npz(FIXTURES / name, prefix)


def case_config(fx: dict[str, np.ndarray], prefix: str) -> dict:
    """The JSON ``<prefix>/config`` of a fixture archive's case, lists made tuples (PyTorch's
    ``int | tuple`` arguments, as the fixture script passed them)."""
    import json

    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(str(fx[f"{prefix}/config"])).items()}


def assert_close(actual, expected, rtol: float = 1e-5, nan_ok: bool = False, msg: str = "") -> None:
    """Relative error <= rtol, measured against the largest reference magnitude.

    With ``nan_ok``, NaN/inf entries of ``expected`` must be matched exactly (NaN for NaN) and do
    not count towards the magnitude; without it every entry must be finite and close. ``msg`` is
    added to the failure message.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    magnitudes = expected[np.isfinite(expected)] if nan_ok else expected
    scale = max(float(np.max(np.abs(magnitudes), initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=nan_ok,
                               err_msg=msg)


def bilinear_interpolate(image: np.ndarray, y: float, x: float) -> np.ndarray:
    """ROIAlign's bilinear sample of ``image`` ``[H, W, C]`` at ``(y, x)`` in float64: zero
    outside ``[-1, H] x [-1, W]``, coordinates clamped at 0 and at the last row/column."""
    height, width, channels = image.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(channels)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[y0, x0] + (1 - ly) * lx * image[y0, x1]
            + ly * (1 - lx) * image[y1, x0] + ly * lx * image[y1, x1])


def sample_positions(start, extent, bins: int, count: int, dtype=np.float64) -> np.ndarray:
    """``[bins, count]`` ROIAlign sample positions along one axis: sample ``k`` of bin ``p`` sits at
    ``start + p * size + (k + 0.5) * size / count`` with ``size = extent / bins``, evaluated in that
    order with every operation rounded to ``dtype``. In float32 these are torchvision's and
    detectron2's own float32 coordinates (their CPU kernels write the same expression), which
    decides whether a sample on a border (``-1``, the map size) is in or out."""
    t = np.dtype(dtype).type
    size = t(extent) / t(bins)
    p = np.arange(bins, dtype=dtype)[:, None]
    k = np.arange(count, dtype=dtype)[None, :]
    return (t(start) + p * size) + (k + t(0.5)) * size / t(count)


def adaptive_grid(extent, bins: int, dtype=np.float64) -> int:
    """ROIAlign's adaptive samples per bin, ``ceil(extent / bins)`` with the quotient in ``dtype``."""
    t = np.dtype(dtype).type
    return int(math.ceil(t(extent) / t(bins)))


def roi_bins_reference(image: np.ndarray, output_size, start, size, sampling_ratio: int,
                       to_image=None, dtype=np.float64) -> np.ndarray:
    """float64 ROIAlign bins ``[ph, pw, C]`` of one ROI of ``image`` ``[H, W, C]``, from the
    published algorithm: the ROI spans ``size = (h, w)`` from ``start = (y0, x0)`` in its own frame;
    bin ``(p, q)`` averages the bilinear samples at the centres of a ``gh x gw`` grid of cells
    (``sampling_ratio`` per axis, or ``ceil(h / ph)`` / ``ceil(w / pw)`` when it is ``<= 0``).
    ``to_image(y, x)`` maps a point of the ROI frame to image coordinates (default: identity).
    The sample positions (and the adaptive grid) are computed in ``dtype`` as
    :func:`sample_positions` does (``np.float32``: the reference kernels' own rounding; then
    ``to_image`` receives float32 scalars), the bilinear rule and the average in float64."""
    ph_count, pw_count = output_size
    y0, x0 = start
    h, w = size
    gh = sampling_ratio if sampling_ratio > 0 else adaptive_grid(h, ph_count, dtype)
    gw = sampling_ratio if sampling_ratio > 0 else adaptive_grid(w, pw_count, dtype)
    ys = sample_positions(y0, h, ph_count, gh, dtype)
    xs = sample_positions(x0, w, pw_count, gw, dtype)
    out = np.zeros((ph_count, pw_count, image.shape[-1]))
    for p in range(ph_count):
        for q in range(pw_count):
            acc = np.zeros(image.shape[-1])
            for y in ys[p]:
                for x in xs[q]:
                    point = to_image(y, x) if to_image else (y, x)
                    acc += bilinear_interpolate(image, *(float(v) for v in point))
            out[p, q] = acc / max(gh * gw, 1)
    return out


def axis_bin_weights(start: float, extent: float, bins: int, count: int, length: int) -> np.ndarray:
    """float64 ``[bins, length]`` weights of ROIAlign along one axis: bin ``i`` averages ``count``
    bilinear samples at the cell centres of ``[start + i*extent/bins, start + (i+1)*extent/bins)``
    (zero outside ``[-1, length]``, clamped at 0 and at the last index). An axis-aligned ROI pools
    to ``einsum("ph,qw,hwc->pqc", wy, wx, image)``."""
    y = sample_positions(start, extent, bins, count)
    valid = (y >= -1) & (y <= length)
    y = np.maximum(y, 0)
    low = np.floor(y).astype(int)
    at_end = low >= length - 1
    low = np.minimum(low, length - 1)
    high = np.where(at_end, low, low + 1)
    frac = np.where(at_end, 0.0, y - low)
    out = np.zeros((bins, length))
    rows = np.repeat(np.arange(bins)[:, None], count, 1)
    np.add.at(out, (rows, low), np.where(valid, 1 - frac, 0))
    np.add.at(out, (rows, high), np.where(valid, frac, 0))
    return out / count


def mse_train_step(module, x, target, tx: optax.GradientTransformation):
    """Jitted ``(params, batch_stats, opt_state) -> (params, batch_stats, opt_state, loss)``: one
    ``tx`` step on the mean squared error of ``module.apply(..., x, train=True)`` to ``target``."""

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            y, upd = module.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def shapely_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """float64 IoU of every pair of rotated boxes (shapely polygons; 0 for areas below 1e-14)."""
    import shapely

    b = boxes.astype(np.float64)
    t = np.deg2rad(b[:, 4])
    u = np.stack([np.cos(t), -np.sin(t)], -1) * (b[:, 2:3] / 2)
    v = np.stack([np.sin(t), np.cos(t)], -1) * (b[:, 3:4] / 2)
    c = b[:, :2]
    polygons = shapely.polygons(np.stack([c + u + v, c + u - v, c - u - v, c - u + v], 1))
    inter = shapely.area(shapely.intersection(polygons[:, None], polygons[None, :]))
    area = b[:, 2] * b[:, 3]
    iou = inter / (area[:, None] + area[None, :] - inter)
    degenerate = (area[:, None] < 1e-14) | (area[None, :] < 1e-14)
    return np.where(degenerate, 0.0, iou)


def expected_rotated_keep(case, j) -> np.ndarray:
    """What nms_rotated must return: detectron2's keep, except that where detectron2's IoU is
    unsound (off the exact IoU by more than SOUND_TOLERANCE) the exact IoU decides. Cases that
    store detectron2's pairwise IoUs (``iou``) are re-derived by a greedy NMS on the spec's IoU."""
    if "iou" not in case:
        return case[f"keep{j}"]
    from detlayers.rotated_boxes import SOUND_TOLERANCE

    detectron2 = case["iou"].astype(np.float64)
    exact = shapely_iou_matrix(case["boxes"])
    iou = np.where(np.abs(detectron2 - exact) <= SOUND_TOLERANCE, np.clip(detectron2, 0, 1), exact)
    thr = float(case["thresholds"][j])
    scores, idxs = case["scores"], case.get("idxs")
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if not any(iou[k, i] > thr and (idxs is None or idxs[k] == idxs[i]) for k in kept):
            kept.append(int(i))
    return np.array(kept, np.int64)
