"""The training-step benchmark family (``python -m detlayers.bench mask_rcnn_train``): its batch,
and its step row run at a tiny size without torch.

The R50-FPN rows themselves (minutes of compilation, detectron2 in the same process) are run by
hand (BENCHMARKS.md); here the family's step row is built for the tiny R18-FPN of
tests/test_models_train.py and run twice, as the runner's warm-up and one timed call.
"""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np

from detlayers import bench
from detlayers.bench import mask_rcnn_train

TINY_SHORT_SIDES = (64, 96)


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_batch_is_two_photos_at_512_with_ellipse_masks_in_their_boxes():
    from detlayers.models import mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    batch = mask_rcnn_train.train_batch(cfg)
    arrays = batch.arrays
    # ResizeShortestEdge: chelsea 300x451 -> 512 x 769.7, coffee 400x600 -> 512 x 768; padded to 32s
    np.testing.assert_array_equal(arrays["image_hw"], [[512, 770], [512, 768]])
    assert arrays["images"].shape == (2, 512, 800, 3) and arrays["gt_masks"].shape == (2, 3, 512, 800)
    mean, std = np.asarray(cfg.MODEL.PIXEL_MEAN), np.asarray(cfg.MODEL.PIXEL_STD)
    import skimage.data

    for i, (name, (h, w)) in enumerate(zip(("chelsea", "coffee"), arrays["image_hw"])):
        photo = batch.photos_bgr[i]
        assert photo.shape == (h, w, 3) and photo.dtype == np.uint8
        # normalised with detectron2's BGR mean and std, zero padding
        np.testing.assert_allclose(arrays["images"][i, :h, :w] * std + mean, photo, atol=1e-3)
        assert not arrays["images"][i, h:].any() and not arrays["images"][i, :, w:].any()
        # BGR: the resized photo's mean colour is the original's, channels reversed
        rgb = getattr(skimage.data, name)()
        np.testing.assert_allclose(photo.reshape(-1, 3).mean(0)[::-1], rgb.reshape(-1, 3).mean(0), atol=1.0)
    np.testing.assert_array_equal(arrays["gt_valid"], [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(arrays["gt_classes"], [[15, 15, 0], [41, 45, 0]])
    # coffee's cup: (0.16, 0.12, 0.78, 0.78) of 768 x 512
    np.testing.assert_allclose(arrays["gt_boxes"][1, 0], [122.88, 61.44, 599.04, 399.36], rtol=1e-6)
    for i, k in np.argwhere(arrays["gt_valid"]):
        x1, y1, x2, y2 = arrays["gt_boxes"][i, k]
        mask = arrays["gt_masks"][i, k].astype(bool)
        ys, xs = np.nonzero(mask)
        # the inscribed ellipse: touches its box's sides (within a pixel), area pi/4 of the box's
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x1, y1, x2, y2], atol=1.0)
        np.testing.assert_allclose(mask.sum(), math.pi / 4 * (x2 - x1) * (y2 - y1), rtol=5e-3)
    assert not arrays["gt_masks"][1, 2].any()


def test_shares_split_the_step_into_backbone_heads_and_backward():
    shares = mask_rcnn_train.step_shares({"step": 10.0, "forward": 4.0, "backbone": 3.0})
    assert shares == {"backbone fwd": 0.3, "heads+losses fwd": 0.1, "backward+SGD": 0.6}


def test_family_step_row_trains_the_tiny_model_without_torch(tmp_path):
    from test_models_train import TINY_CONFIG

    from detlayers.models.config import get_cfg
    from detlayers.models.engine.train_loop import init_variables
    from detlayers.models.meta_arch.build import build_model

    assert bench.FAMILIES["mask_rcnn_train"] == mask_rcnn_train.__name__
    assert callable(importlib.import_module(bench.FAMILIES["mask_rcnn_train"]).cases)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    # the family's COCO classes; two images on one device (SyncBN over that device)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 80, "SOLVER.IMS_PER_BATCH", 2])
    variables = init_variables(cfg, build_model(cfg), seed=0)
    batch = mask_rcnn_train.train_batch(cfg, TINY_SHORT_SIDES)
    np.testing.assert_array_equal(batch.arrays["image_hw"], [[64, 96], [96, 144]])
    rows = mask_rcnn_train.build_cases(cfg, variables, None, batch, label="R18-FPN tiny")
    assert [row.torch for row in rows] == [None, None, None]
    step = rows[0]
    assert step.name.startswith("mask_rcnn_train R18-FPN tiny step: fwd+bwd+SGD, 2 images 64x96+96x144 (padded 96x160)")

    seconds = bench.time_callable(step.ours, bench._block, warmup=1, min_repeats=1, min_seconds=0.0)
    assert seconds > 0
    steps = step.ours
    assert steps.iteration == 2  # the state each call donates is the previous call's output
    summary = step.summary(seconds, None)
    lower_s, compile_s = (float(v) for v in summary["compile s (trace+lower, XLA)"].split(", "))
    assert lower_s > 0 and compile_s > 0
    losses = steps.first_losses
    assert sorted(losses) == ["loss_box_reg", "loss_cls", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"]
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert abs(float(summary["first step's total_loss"]) - sum(losses.values())) <= 1e-4
    # detectron2's solver through the trainer: FREEZE_AT 1 keeps the stem, every other parameter moves
    before = _leaves(variables["params"])
    after = _leaves(jax.device_get(steps.state[0]))
    assert before.keys() == after.keys()
    stem = [name for name in before if "'stem'" in name]
    assert stem and all(np.array_equal(before[name], after[name]) for name in stem)
    assert all(not np.array_equal(before[name], after[name]) for name in before if name not in stem)
