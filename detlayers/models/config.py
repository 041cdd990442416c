"""An immutable detectron2-style config for the reference models (inference keys).

Field names follow detectron2's ``get_cfg()`` keys (``cfg.MODEL.RESNETS.DEPTH``,
``cfg.INPUT.MIN_SIZE_TEST``, ...) for what the models cover; defaults are detectron2's
``config/defaults.py`` values. Every node is a frozen dataclass: ``merge_from_list`` returns a new
config instead of mutating (detectron2's ``CfgNode`` mutates in place), so a config can be a static
argument of ``jax.jit`` and be shared safely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Config",
    "mask_rcnn_R_50_FPN_3x_config",
    "mask_rcnn_R_101_FPN_3x_config",
    "faster_rcnn_R_50_FPN_3x_config",
    "retinanet_R_50_FPN_3x_config",
]


def _frozen(cls):
    return dataclasses.dataclass(frozen=True)(cls)


@_frozen
class BackboneConfig:
    NAME: str = "build_resnet_fpn_backbone"
    FREEZE_AT: int = 2


@_frozen
class ResNetsConfig:
    DEPTH: int = 50
    OUT_FEATURES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    NUM_GROUPS: int = 1
    NORM: str = "FrozenBN"
    WIDTH_PER_GROUP: int = 64
    STRIDE_IN_1X1: bool = True
    RES5_DILATION: int = 1
    RES2_OUT_CHANNELS: int = 256
    STEM_OUT_CHANNELS: int = 64
    DEFORM_ON_PER_STAGE: tuple[bool, ...] = (False, False, False, False)


@_frozen
class FPNConfig:
    IN_FEATURES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
    OUT_CHANNELS: int = 256
    NORM: str = ""
    FUSE_TYPE: str = "sum"


@_frozen
class AnchorGeneratorConfig:
    NAME: str = "DefaultAnchorGenerator"
    SIZES: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),)
    OFFSET: float = 0.0


@_frozen
class ProposalGeneratorConfig:
    NAME: str = "RPN"
    MIN_SIZE: float = 0.0


@_frozen
class RPNConfig:
    HEAD_NAME: str = "StandardRPNHead"
    IN_FEATURES: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    BBOX_REG_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    PRE_NMS_TOPK_TEST: int = 1000
    POST_NMS_TOPK_TEST: int = 1000
    NMS_THRESH: float = 0.7
    CONV_DIMS: tuple[int, ...] = (-1,)


@_frozen
class ROIHeadsConfig:
    NAME: str = "StandardROIHeads"
    NUM_CLASSES: int = 80
    IN_FEATURES: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    SCORE_THRESH_TEST: float = 0.05
    NMS_THRESH_TEST: float = 0.5


@_frozen
class RetinaNetConfig:
    """``MODEL.RETINANET`` with detectron2's defaults. The loss keys (``FOCAL_LOSS_*``,
    ``SMOOTH_L1_LOSS_BETA``, ``BBOX_REG_LOSS_TYPE``, ``IOU_*``) and ``PRIOR_PROB`` (the initial
    ``cls_score`` bias) do not change inference; they are here so that a detectron2 config loads."""

    NUM_CLASSES: int = 80
    IN_FEATURES: tuple[str, ...] = ("p3", "p4", "p5", "p6", "p7")
    NUM_CONVS: int = 4
    IOU_THRESHOLDS: tuple[float, ...] = (0.4, 0.5)
    IOU_LABELS: tuple[int, ...] = (0, -1, 1)
    PRIOR_PROB: float = 0.01
    SCORE_THRESH_TEST: float = 0.05
    TOPK_CANDIDATES_TEST: int = 1000
    NMS_THRESH_TEST: float = 0.5
    BBOX_REG_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    FOCAL_LOSS_GAMMA: float = 2.0
    FOCAL_LOSS_ALPHA: float = 0.25
    SMOOTH_L1_LOSS_BETA: float = 0.1
    BBOX_REG_LOSS_TYPE: str = "smooth_l1"
    NORM: str = ""


@_frozen
class _ROIHeadConfig:
    """The keys detectron2 gives both ROI heads (a conv stack and its ROI pooler), with the
    defaults it gives both; each head's node overrides what its config changes."""

    NAME: str = ""
    NUM_CONV: int = 0
    CONV_DIM: int = 256
    NORM: str = ""
    POOLER_RESOLUTION: int = 14
    POOLER_SAMPLING_RATIO: int = 0
    POOLER_TYPE: str = "ROIAlignV2"


@_frozen
class ROIBoxHeadConfig(_ROIHeadConfig):
    NAME: str = "FastRCNNConvFCHead"
    POOLER_RESOLUTION: int = 7
    NUM_FC: int = 2
    FC_DIM: int = 1024
    BBOX_REG_WEIGHTS: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    CLS_AGNOSTIC_BBOX_REG: bool = False


@_frozen
class ROIMaskHeadConfig(_ROIHeadConfig):
    NAME: str = "MaskRCNNConvUpsampleHead"
    NUM_CONV: int = 4
    CLS_AGNOSTIC_MASK: bool = False


@_frozen
class ModelConfig:
    META_ARCHITECTURE: str = "GeneralizedRCNN"
    MASK_ON: bool = False
    WEIGHTS: str = ""
    PIXEL_MEAN: tuple[float, ...] = (103.530, 116.280, 123.675)
    PIXEL_STD: tuple[float, ...] = (1.0, 1.0, 1.0)
    BACKBONE: BackboneConfig = BackboneConfig()
    RESNETS: ResNetsConfig = ResNetsConfig()
    FPN: FPNConfig = FPNConfig()
    ANCHOR_GENERATOR: AnchorGeneratorConfig = AnchorGeneratorConfig()
    PROPOSAL_GENERATOR: ProposalGeneratorConfig = ProposalGeneratorConfig()
    RPN: RPNConfig = RPNConfig()
    ROI_HEADS: ROIHeadsConfig = ROIHeadsConfig()
    ROI_BOX_HEAD: ROIBoxHeadConfig = ROIBoxHeadConfig()
    ROI_MASK_HEAD: ROIMaskHeadConfig = ROIMaskHeadConfig()
    RETINANET: RetinaNetConfig = RetinaNetConfig()


@_frozen
class InputConfig:
    MIN_SIZE_TEST: int = 800
    MAX_SIZE_TEST: int = 1333
    FORMAT: str = "BGR"


@_frozen
class TestConfig:
    DETECTIONS_PER_IMAGE: int = 100


@_frozen
class Config:
    """Root config: ``MODEL``, ``INPUT``, ``TEST`` (detectron2's names, inference keys only).

    Immutable and hashable. ``merge_from_list`` and ``replace`` return new configs.
    """

    MODEL: ModelConfig = ModelConfig()
    INPUT: InputConfig = InputConfig()
    TEST: TestConfig = TestConfig()

    def merge_from_list(self, cfg_list: Sequence[Any]) -> Config:
        """detectron2's ``cfg.merge_from_list([key, value, ...])``, returning a NEW config.

        Keys are dotted paths (``"MODEL.ROI_HEADS.SCORE_THRESH_TEST"``); values are converted to the
        field's type (lists become tuples, ints become floats where the field is a float, strings
        such as ``"0.5"`` or ``"(1, 2)"`` are parsed as detectron2 does with ``literal_eval``).

        Raises:
          ValueError: an odd-length list, or a value that does not fit the field's type.
          KeyError: a key this config does not have (listing the valid keys of that node).
        """
        items = list(cfg_list)
        if len(items) % 2:
            raise ValueError(f"merge_from_list: needs key, value pairs; got an odd-length list of {len(items)}")
        cfg = self
        for key, value in zip(items[0::2], items[1::2]):
            cfg = _replace_path(cfg, str(key).split("."), value, str(key))
        return cfg

    def replace(self, **changes: Any) -> Config:
        """``dataclasses.replace`` on the root (``cfg.replace(INPUT=...)``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{"MODEL.RESNETS.DEPTH": 50, ...}`` of every key."""
        flat: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            for field in dataclasses.fields(node):
                value = getattr(node, field.name)
                if dataclasses.is_dataclass(value):
                    walk(value, f"{prefix}{field.name}.")
                else:
                    flat[prefix + field.name] = value

        walk(self, "")
        return flat


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"merge_from_list: cannot parse {value!r} for {key}") from err
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"merge_from_list: {key} needs a bool, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"merge_from_list: {key} needs an int, got {value!r}")
        return int(value)
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"merge_from_list: {key} needs a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ValueError(f"merge_from_list: {key} needs a string, got {value!r}")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"merge_from_list: {key} needs a list or tuple, got {value!r}")

        def freeze(v: Any) -> Any:
            return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

        return freeze(value)
    return value


def _replace_path(node: Any, path: list[str], value: Any, key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    head = path[0]
    if head not in names:
        raise KeyError(f"merge_from_list: unknown config key {key!r} ({head!r} is not one of {names})")
    current = getattr(node, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError(f"merge_from_list: {key!r} is a config node, not a value")
        return dataclasses.replace(node, **{head: _coerce(value, current, key)})
    if not dataclasses.is_dataclass(current):
        raise KeyError(f"merge_from_list: unknown config key {key!r} ({head!r} is a value, not a node)")
    return dataclasses.replace(node, **{head: _replace_path(current, path[1:], value, key)})


def mask_rcnn_R_50_FPN_3x_config() -> Config:
    """detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` (inference keys).

    That is ``Base-RCNN-FPN.yaml`` (FPN on res2-res5, P2-P6 RPN, 1000 proposals a level before
    NMS and 1000 after, 7x7 box and 14x14 mask ROIAlignV2 poolers, 2-FC box head, 4-conv mask
    head) with ``MASK_ON: True`` and ``RESNETS.DEPTH: 50``, on detectron2's defaults (FrozenBN,
    ``STRIDE_IN_1X1``, MSRA pixel mean in BGR with std 1, test size 800/1333).
    """
    return Config().merge_from_list(
        ["MODEL.MASK_ON", True, "MODEL.RESNETS.DEPTH", 50,
         "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"]
    )


def mask_rcnn_R_101_FPN_3x_config() -> Config:
    """``COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml`` (inference keys)."""
    return Config().merge_from_list(
        ["MODEL.MASK_ON", True, "MODEL.RESNETS.DEPTH", 101,
         "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-101.pkl"]
    )


def faster_rcnn_R_50_FPN_3x_config() -> Config:
    """``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml`` (inference keys): ``Base-RCNN-FPN.yaml`` with
    ``MASK_ON: False`` and ``RESNETS.DEPTH: 50`` (Mask R-CNN R50-FPN without its mask head)."""
    return Config().merge_from_list(
        ["MODEL.MASK_ON", False, "MODEL.RESNETS.DEPTH", 50,
         "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"]
    )


# Base-RetinaNet.yaml's anchor sizes: three octave scales per level, written as its YAML computes
# them (``x * 2**(1.0/3)``), so the floats are bit-identical to detectron2's config.
_RETINANET_ANCHOR_SIZES = tuple((x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)) for x in (32, 64, 128, 256, 512))


def retinanet_R_50_FPN_3x_config() -> Config:
    """detectron2's ``COCO-Detection/retinanet_R_50_FPN_3x.yaml`` (inference keys).

    That is ``Base-RetinaNet.yaml``: the ``RetinaNet`` meta-architecture on
    ``build_retinanet_resnet_fpn_backbone`` (ResNet-50 res3-res5, FPN P3-P5 and ``LastLevelP6P7``
    from C5), 3 sizes x 3 aspect ratios of anchors per level on P3-P7, ``RETINANET.*`` defaults
    (4-conv towers, score threshold 0.05, 1000 candidates per level, NMS 0.5) and the training-only
    ``IOU_THRESHOLDS``/``IOU_LABELS``/``SMOOTH_L1_LOSS_BETA`` of the YAML.
    """
    return Config().merge_from_list([
        "MODEL.META_ARCHITECTURE", "RetinaNet",
        "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
        "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
        "MODEL.RESNETS.DEPTH", 50,
        "MODEL.ANCHOR_GENERATOR.SIZES", _RETINANET_ANCHOR_SIZES,
        "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        "MODEL.RETINANET.IOU_THRESHOLDS", [0.4, 0.5],
        "MODEL.RETINANET.IOU_LABELS", [0, -1, 1],
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0,
        "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    ])
