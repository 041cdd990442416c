"""Shared by the end-to-end model benchmarks (``mask_rcnn``, ``deeplab``, ``models``, ...): the
photograph, the fixture files of a source checkout and detectron2's ``DefaultPredictor`` holding a
state dict. Not a benchmark family itself (it has no ``cases``).

Everything that needs torch or detectron2 imports it inside the function, so this module loads
with NumPy alone.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import numpy as np

SOURCE_ENV = "DETLAYERS_DETECTRON2_SOURCE"
# A folder holding the test fixtures (an installed package has no tests folder next to it).
FIXTURES_ENV = "DETLAYERS_FIXTURES_DIR"


def coffee_bgr(image_hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` BGR: scikit-image's ``coffee()`` (400 x 600) center-cropped to the aspect
    ratio ``H : W`` (full width, ``round(600 H / W)`` rows; ``H / W`` must be at most 2 / 3) and
    resized once with PIL bilinear to ``image_hw``."""
    import skimage.data
    from PIL import Image

    rgb = skimage.data.coffee()
    h, w = image_hw
    rows = round(rgb.shape[1] * h / w)
    if not 0 < rows <= rgb.shape[0]:
        raise ValueError(f"image_hw {image_hw}: the aspect ratio must be at most {rgb.shape[0]}:{rgb.shape[1]}")
    top = (rgb.shape[0] - rows) // 2
    resized = np.asarray(Image.fromarray(rgb[top : top + rows]).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(resized[..., ::-1])


def fixture_file(name: str) -> pathlib.Path | None:
    """``<DETLAYERS_FIXTURES_DIR>/<name>`` when that variable is set, else ``tests/fixtures/<name>``
    of a source checkout; ``None`` when the file is not there (an installed package has no tests
    folder: point the variable at a checkout's ``tests/fixtures``)."""
    env = os.environ.get(FIXTURES_ENV)
    folder = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    path = folder / name
    return path if path.is_file() else None


def detectron2_installed() -> bool:
    """Whether torch and detectron2 can be imported (looked up, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "detectron2"))


def detectron2_zoo_config(config: str) -> pathlib.Path | None:
    """``configs/<config>`` of the installed detectron2 (its ``model_zoo/configs`` folder, which a
    source install has), or None when detectron2 or the file is not there."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "configs" / config
    return path if path.is_file() else None


def detectron2_source_file(relative: str) -> pathlib.Path | None:
    """``<detectron2 source tree>/<relative>`` (e.g. a ``projects/`` config), or None: the tree is
    ``$DETLAYERS_DETECTRON2_SOURCE``, else the folder above an installed detectron2 built from
    source (``pip install -e``)."""
    env = os.environ.get(SOURCE_ENV)
    roots = [pathlib.Path(env)] if env else []
    spec = importlib.util.find_spec("detectron2")
    if not env and spec is not None and spec.submodule_search_locations:
        roots.append(pathlib.Path(list(spec.submodule_search_locations)[0]).parent)
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    return None


def load_into_detectron2(predictor: Any, weights: dict[str, np.ndarray], config: str) -> Any:
    """``predictor`` (a detectron2 ``DefaultPredictor``) with ``weights`` loaded into its model;
    ValueError naming ``config`` when a name is missing or unexpected (``pixel_mean``/``pixel_std``
    and anchors are non-persistent buffers, so a full state dict matches exactly)."""
    import torch

    missing, unexpected = predictor.model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(f"not a state dict of {config}: missing {missing}, unexpected {unexpected}")
    return predictor


def detectron2_default_predictor(
    weights: dict[str, np.ndarray],
    *,
    config: str | None = None,
    device: str = "cpu",
    min_size: int = 800,
    max_size: int = 1333,
) -> Any:
    """detectron2's ``DefaultPredictor`` for a model-zoo config holding ``weights``.

    ``config`` is a path under detectron2's ``configs/`` (``"COCO-Detection/retinanet_R_50_FPN_3x.yaml"``),
    read from the ``model_zoo/configs`` folder of the installed detectron2 (a source install has
    it; ``detectron2.model_zoo`` is not imported: it needs ``pkg_resources``, which current
    setuptools no longer ships); ``None`` is ``mask_rcnn_R_50_FPN_3x.yaml`` from values written
    out here, which needs no YAML file. Raises ImportError when torch or detectron2 is not
    installed, FileNotFoundError when the YAML is not there.
    """
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    sizes = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", min_size,
             "INPUT.MAX_SIZE_TEST", max_size]
    if config is not None:
        yaml = detectron2_zoo_config(config)
        if yaml is None:
            raise FileNotFoundError(f"config {config!r}: not in this detectron2 install's model_zoo/configs")
        cfg.merge_from_file(str(yaml))
        cfg.merge_from_list(sizes)
        return load_into_detectron2(DefaultPredictor(cfg), weights, config)
    # configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml over Base-RCNN-FPN.yaml, at
    # inference (the training-only keys do not matter here).
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.RESNETS.DEPTH", 50,
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]],
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 1000,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 1000,
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 4,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14,
        "MODEL.MASK_ON", True,
        *sizes,
    ])
    return load_into_detectron2(DefaultPredictor(cfg), weights, "mask_rcnn_R_50_FPN_3x.yaml")
