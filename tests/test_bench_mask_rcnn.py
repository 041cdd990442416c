"""The mask_rcnn benchmark's op recorder: the calls a jitted model makes are recorded and replayed.

The end-to-end benchmark itself needs the full model (minutes of compilation) and is run by
``python -m detlayers.bench mask_rcnn``; here a small jitted "model" that calls detlayers ops
through its module globals, as ``detlayers.models`` does, stands in for it.
"""

import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from detlayers.bench import mask_rcnn as bench_mask_rcnn

# The modules (the package re-exports functions of the same names over the attributes).
nms_module = importlib.import_module("detlayers.nms")
roi_align_module = importlib.import_module("detlayers.roi_align")


def _toy_model_module(monkeypatch):
    module = types.ModuleType("detlayers._toy_model")
    module.batched_nms = nms_module.batched_nms
    module.roi_align = roi_align_module.roi_align

    def forward(features, boxes, scores, classes):
        keep = module.batched_nms(boxes, scores, classes, 0.5, max_output_size=8)
        rois = jnp.concatenate([jnp.zeros((boxes.shape[0], 1)), boxes], axis=1)
        pooled = module.roi_align(features, rois, (7, 7), 0.25, 0, True)
        return keep.indices, pooled.mean(axis=(1, 2))

    module.forward = forward
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _inputs():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (12, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 12).astype(np.float32)
    classes = rng.integers(0, 3, 12).astype(np.int32)
    features = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    return features, boxes, scores, classes


def test_recorded_calls_replay_to_the_same_outputs(monkeypatch):
    toy = _toy_model_module(monkeypatch)
    features, boxes, scores, classes = _inputs()
    records = []
    original = nms_module.batched_nms
    with bench_mask_rcnn._recording(records):
        assert toy.batched_nms is not original
        indices, pooled = jax.block_until_ready(jax.jit(toy.forward)(features, boxes, scores, classes))
    assert toy.batched_nms is nms_module.batched_nms  # restored
    assert toy.roi_align is roi_align_module.roi_align
    # one record per op call (callbacks are unordered: sort by label)
    assert sorted(r.label for r in records) == ["NMS", "ROIAlign"]
    records.sort(key=lambda r: r.label)
    nms_record, roi_record = records
    np.testing.assert_array_equal(nms_record.arrays[0], boxes)
    np.testing.assert_array_equal(nms_record.arrays[2], classes)
    assert 0.5 in nms_record.static.values() and 8 in nms_record.static.values()
    assert roi_record.arrays[1].shape == (12, 5)

    replayed_nms, replayed_roi = jax.block_until_ready(bench_mask_rcnn._replay(records)())
    np.testing.assert_array_equal(np.asarray(replayed_nms.indices), np.asarray(indices))
    np.testing.assert_allclose(np.asarray(replayed_roi).mean(axis=(1, 2)), np.asarray(pooled), rtol=1e-6)
    direct = roi_align_module.roi_align(jnp.asarray(features), jnp.asarray(roi_record.arrays[1]), (7, 7), 0.25, 0, True)
    np.testing.assert_array_equal(np.asarray(replayed_roi), np.asarray(direct))


def test_benchmark_image_is_800x1333_bgr():
    image = bench_mask_rcnn.benchmark_image()
    assert image.shape == (800, 1333, 3) and image.dtype == np.uint8
    import skimage.data

    rgb = skimage.data.coffee()
    # BGR order: the mean colour of the crop, channels reversed
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0)[::-1], rgb[20:380].reshape(-1, 3).mean(0), atol=1.0)
