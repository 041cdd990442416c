"""Helpers shared by the test modules (imported as ``helpers``: pytest puts ``tests/`` on
``sys.path`` because it has no ``__init__.py``).

* ``load_fixture`` / ``load_npz``: a committed ``.npz`` read into a dict of arrays (the file is
  closed before returning).
* ``assert_close``: relative closeness measured against the largest reference magnitude.
* ``bilinear_interpolate``: the float64 bilinear sample of ROIAlign (plain and rotated).
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


def assert_close(actual, expected, rtol: float = 1e-5, nan_ok: bool = False) -> None:
    """Relative error <= rtol, measured against the largest reference magnitude.

    With ``nan_ok``, NaN/inf entries of ``expected`` must be matched exactly (NaN for NaN) and do
    not count towards the magnitude; without it every entry must be finite and close.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    magnitudes = expected[np.isfinite(expected)] if nan_ok else expected
    scale = max(float(np.max(np.abs(magnitudes), initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=nan_ok)


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
