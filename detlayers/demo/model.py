"""The demo's detector: detectron2's Mask R-CNN (``GeneralizedRCNN``, R18-FPN) from
:mod:`detlayers.models`, sized for the synthetic shapes.

The architecture is detectron2's, built from a detectron2 config (:func:`demo_cfg`): a ResNet-18
(``RESNETS.DEPTH 18``, ``RES2_OUT_CHANNELS 64``) with ``SyncBN`` norms (statistics synchronized
over the device axis ``"batch"`` by detlayers' ``SyncBatchNorm``), an FPN (p2-p6), the RPN, and
``StandardROIHeads`` with the ``FastRCNNConvFCHead`` box head and the ``MaskRCNNConvUpsampleHead``
mask head.  What differs from the model zoo's R50-FPN is size only: narrower FPN and heads, fewer
sampled anchors and ROIs, fewer proposals, because the images are 64 px and hold one to three
shapes.  Training starts from random weights (``FREEZE_AT 0``: nothing is frozen).

The shapes data (:mod:`detlayers.demo.data`) becomes the model's training batch with
:func:`model_batch` and its inference input with :func:`model_images`: pixels in ``[0, 1]``
normalised by ``PIXEL_MEAN``/``PIXEL_STD`` (given in that scale), padded with zeros to a multiple
of the FPN's size divisibility (32), with ``image_hw`` the unpadded size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from detlayers.demo.data import NUM_CLASSES

# the backbone's size divisibility (the FPN's coarsest stride the top-down merge needs)
SIZE_DIVISIBILITY = 32
# the synthetic images' colours are uniform in [0, 1]: centre them and bring them to unit scale
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.25, 0.25, 0.25)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """What the demo's command line sizes: the square image side and the ground-truth rows."""

    image_size: int = 64
    max_objects: int = 3


def demo_cfg(config: DetectorConfig = DetectorConfig()) -> Any:
    """The detectron2 config (``CfgNode``) of the demo's Mask R-CNN, without the solver keys
    (:func:`detlayers.demo.train.solver_cfg` adds them)."""
    from detlayers.models.config import get_cfg

    levels = ["res2", "res3", "res4", "res5"]
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.MASK_ON", True,
        "MODEL.PIXEL_MEAN", list(PIXEL_MEAN),
        "MODEL.PIXEL_STD", list(PIXEL_STD),
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT", 0,  # random initialisation: every stage trains
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "SyncBN",
        "MODEL.RESNETS.OUT_FEATURES", levels,
        "MODEL.FPN.IN_FEATURES", levels,
        "MODEL.FPN.OUT_CHANNELS", 64,
        # shapes are 14-30 px across: anchors of 16 px (p2) to 256 px (p6), three aspect ratios
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]],
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 256,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 256,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14,
        "TEST.DETECTIONS_PER_IMAGE", 20,
    ])
    return cfg


def build_detector(cfg: Any) -> Any:
    """The ``GeneralizedRCNN`` of ``cfg`` (:func:`detlayers.models.build_model`)."""
    from detlayers.models.meta_arch.build import build_model

    return build_model(cfg)


def padded_side(image_size: int) -> int:
    """The image side after zero padding to a multiple of :data:`SIZE_DIVISIBILITY`."""
    return -(-image_size // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def model_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapes images ``float32[N, S, S, 3]`` in ``[0, 1]`` -> the model's ``images``
    ``float32[N, P, P, 3]`` (normalised, zero-padded to ``P = padded_side(S)``) and ``image_hw``
    ``int32[N, 2]`` (``S, S``)."""
    n, h, w = images.shape[:3]
    out = np.zeros((n, padded_side(h), padded_side(w), 3), np.float32)
    out[:, :h, :w] = (images - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    return out, np.tile(np.asarray([[h, w]], np.int32), (n, 1))


def model_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A :func:`detlayers.demo.data.collate` batch -> the training call's arrays (``images``,
    ``image_hw``, ``gt_boxes``, ``gt_classes``, ``gt_masks``, ``gt_valid``; see
    :func:`detlayers.models.engine.step.make_train_step`). Padded ground-truth rows keep
    ``gt_valid`` False and class 0 (the class of an invalid row is never read)."""
    images, image_hw = model_images(batch["image"])
    n, g, h, w = batch["masks"].shape
    masks = np.zeros((n, g, images.shape[1], images.shape[2]), bool)
    masks[:, :, :h, :w] = batch["masks"]
    return dict(images=images, image_hw=image_hw, gt_boxes=batch["boxes"],
                gt_classes=np.maximum(batch["classes"], 0).astype(np.int32), gt_masks=masks,
                gt_valid=batch["valid"])
