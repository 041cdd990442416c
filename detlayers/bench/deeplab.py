"""Benchmark: DeepLabV3+ R-103 inference end to end vs detectron2 (``python -m detlayers.bench deeplab``).

One 512 x 1024 photograph (scikit-image's ``coffee()``, 400 x 600, center-cropped to 1:2 and
resized once with PIL bilinear, so that ``ResizeShortestEdge(512, 1024)`` keeps the size: half a
Cityscapes frame), BGR, through:

- ours: ``detlayers.models.Predictor(deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config(),
  weights)(image)`` with ``INPUT.MIN_SIZE_TEST`` 512 / ``MAX_SIZE_TEST`` 1024 (res5 is 32 x 64,
  the ASPP's pooling window of the zoo config);
- theirs (when torch, detectron2 and its source tree are available: ``DETLAYERS_DETECTRON2_SOURCE``
  names the tree holding ``projects/DeepLab``, else the tree of a detectron2 installed from
  source): detectron2's ``DefaultPredictor`` on the project's YAML file with the same sizes and
  weights, in the same process.

Both calls are what a user times: host resize, the network, ``sem_seg_postprocess`` and the
logits copied back to NumPy. The weights are
``detlayers.models.synthetic_weights.deeplab_v3_plus_state_dict(seed=0, depth=101)`` without
calibration (the timing does not depend on the values).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from detlayers.bench import Case
from detlayers.bench.end_to_end import coffee_bgr, detectron2_source_file, load_into_detectron2

IMAGE_HW = (512, 1024)
SEED = 0
CONFIG = "projects/DeepLab/configs/Cityscapes-SemanticSegmentation/deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16.yaml"


def benchmark_image() -> np.ndarray:
    """uint8 [512, 1024, 3] BGR: skimage's coffee() center-cropped to 1:2 and resized with PIL."""
    return coffee_bgr(IMAGE_HW)


def benchmark_weights() -> dict[str, np.ndarray]:
    """The synthetic DeepLabV3+ R-103 state dict (seed ``SEED``, uncalibrated)."""
    from detlayers.models.synthetic_weights import deeplab_v3_plus_state_dict

    return deeplab_v3_plus_state_dict(seed=SEED, depth=101)


def _sizes(image_hw: tuple[int, int] = IMAGE_HW) -> list:
    return ["INPUT.MIN_SIZE_TEST", image_hw[0], "INPUT.MAX_SIZE_TEST", image_hw[1]]


def _our_predictor(weights: dict[str, np.ndarray]) -> Any:
    from detlayers.models import Predictor
    from detlayers.models.config import deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config

    cfg = deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16_config()
    cfg.merge_from_list(_sizes())
    return Predictor(cfg, weights)


def detectron2_available() -> bool:
    """Whether :func:`detectron2_predictor` can build: torch, detectron2 and ``projects/DeepLab``
    (``$DETLAYERS_DETECTRON2_SOURCE``, or the tree of a source install) are there."""
    from detlayers.bench.end_to_end import detectron2_installed

    return detectron2_installed() and detectron2_source_file(CONFIG) is not None


def detectron2_predictor(
    weights: dict[str, np.ndarray], device: str, image_hw: tuple[int, int] = IMAGE_HW
) -> Callable[[np.ndarray], Any] | None:
    """detectron2's ``DefaultPredictor`` of the project's file holding ``weights`` (test sizes
    ``image_hw``), returning the logits on the host, or None when torch, detectron2 or the source
    tree is missing (:func:`detectron2_available`)."""
    if not detectron2_available():
        return None
    yaml = detectron2_source_file(CONFIG)
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    sys.path.insert(0, str(yaml.parents[2]))  # projects/DeepLab
    from deeplab import add_deeplab_config  # registers the project's backbone and heads

    cfg = get_cfg()
    add_deeplab_config(cfg)
    cfg.merge_from_file(str(yaml))
    cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", *_sizes(image_hw)])
    predictor = load_into_detectron2(DefaultPredictor(cfg), weights, CONFIG)

    def run(image: np.ndarray) -> Any:
        return predictor(image)["sem_seg"].cpu()  # the host copy ours makes too

    return run


def cases(platform: str) -> list[Case]:
    weights = benchmark_weights()
    image = benchmark_image()
    ours = _our_predictor(weights)
    theirs = detectron2_predictor(weights, "cuda" if platform == "gpu" else "cpu")
    name = (f"deeplab_v3_plus R-103 {IMAGE_HW[0]}x{IMAGE_HW[1]} end-to-end "
            "(vs detectron2 DefaultPredictor, projects/DeepLab)")

    def run_ours() -> Any:
        return ours(image)["sem_seg"]

    return [Case("deeplab", name, run_ours, None if theirs is None else (lambda: theirs(image)), warmup=1,
                 min_repeats=3)]
