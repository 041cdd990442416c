"""Benchmark: Panoptic FPN R50 inference end to end vs detectron2 (``python -m detlayers.bench panoptic_fpn``).

The Mask R-CNN family's photograph (``mask_rcnn.benchmark_image()``: 800 x 1333, BGR) through:

- ours: ``detlayers.models.Predictor(panoptic_fpn_R_50_3x_config(), weights)(image)``: instances with
  masks, the semantic logits at 800 x 1333 and the panoptic map with its ``segments_info``;
- theirs (when detectron2 is importable): detectron2's ``DefaultPredictor`` on
  ``COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml`` with the same weights, in the same
  process, its ``panoptic_seg`` map copied to the host (as ours is).

The weights are ``synthetic_weights.panoptic_fpn_r50_state_dict(seed=0)`` calibrated with
``tests/fixtures/mask_rcnn_bn_calibration.npz`` updated by the ``calibration.*`` entries of
``tests/fixtures/panoptic_fpn.npz`` when both are found (a source checkout), so the scores and the
semantic map spread out as in the parity test; without them the row says "uncalibrated".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from detlayers.bench import Case
from detlayers.bench.mask_rcnn import (
    IMAGE_HW,
    MAX_SIZE,
    MIN_SIZE,
    SEED,
    benchmark_image,
    calibration_file,
    detectron2_default_predictor,
    fixture_file,
)

CONFIG = "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml"


def benchmark_weights() -> tuple[dict[str, np.ndarray], bool]:
    """The synthetic Panoptic FPN R50 state dict (seed ``SEED``) and whether it is calibrated."""
    from detlayers.models.synthetic_weights import panoptic_fpn_r50_state_dict

    base, fixture = calibration_file(), fixture_file("panoptic_fpn.npz")
    if base is None or fixture is None:
        return panoptic_fpn_r50_state_dict(seed=SEED), False
    with np.load(base) as f, np.load(fixture) as g:
        calibration = {**{k: f[k] for k in f.files},
                       **{k[len("calibration."):]: g[k] for k in g.files if k.startswith("calibration.")}}
    return panoptic_fpn_r50_state_dict(seed=SEED, calibration=calibration), True


def cases(platform: str) -> list[Case]:
    from detlayers.models import Predictor
    from detlayers.models.config import panoptic_fpn_R_50_3x_config

    weights, calibrated = benchmark_weights()
    image = benchmark_image()
    cfg = panoptic_fpn_R_50_3x_config()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", MIN_SIZE, "INPUT.MAX_SIZE_TEST", MAX_SIZE])
    ours = Predictor(cfg, weights)
    try:
        theirs = detectron2_default_predictor(weights, config=CONFIG, device="cuda" if platform == "gpu" else "cpu")
    except ImportError:
        theirs = None
    name = f"panoptic_fpn R50 {IMAGE_HW[0]}x{IMAGE_HW[1]} end-to-end (vs detectron2 DefaultPredictor)"
    if not calibrated:
        name += " uncalibrated"

    def run_ours() -> Any:
        return ours(image)["panoptic_seg"][0]

    def run_theirs() -> Any:
        return theirs(image)["panoptic_seg"][0].cpu()

    return [Case("panoptic_fpn", name, run_ours, None if theirs is None else run_theirs, warmup=1, min_repeats=3)]
