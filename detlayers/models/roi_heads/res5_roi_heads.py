"""detectron2's ``Res5ROIHeads`` (``modeling/roi_heads/roi_heads.py``): the ROI heads of the "C4"
R-CNN, where the ResNet's last stage runs per region (ResNet paper, appendix A).

Each proposal is pooled from the one backbone map (``res4``, stride 16) to ``POOLER_RESOLUTION``
(14), then goes through ``res5``: three ``BottleneckBlock``\\ s, the first with stride 2 (7x7 out)
and a projection shortcut; the average over the 7x7 cells feeds ``FastRCNNOutputLayers``.
Submodules ``res5_0``, ``res5_1``, ``res5_2`` and ``box_predictor`` carry detectron2's state-dict
names (``roi_heads.res5.0.conv1.weight``, ...), so a C4 checkpoint loads unchanged.

Inference only, boxes only: ``MODEL.MASK_ON`` (the C4 mask head on the shared ``res5`` features,
``mask_rcnn_R_50_C4_3x.yaml``) and training are refused with an error naming what is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.backbone.resnet import BottleneckBlock
from detlayers.models.poolers import POOLER_TYPES, ROIPooler
from detlayers.models.registry import ROI_HEADS_REGISTRY
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["Res5ROIHeads", "res5_stage"]

# detectron2's _build_res5_block: res5 is 8x as wide as res2, three blocks, stride 2 in the first.
_RES5_WIDTH_FACTOR = 8
_RES5_STRIDES = (2, 1, 1)


def res5_stage(
    x: Array,
    in_channels: int,
    out_channels: int,
    bottleneck_channels: int,
    *,
    num_groups: int,
    norm: str,
    stride_in_1x1: bool,
    prefix: str = "res5",
) -> Array:
    """detectron2's ``ResNet.make_stage(BottleneckBlock, 3, stride_per_block=[2, 1, 1], ...)`` as
    submodules ``{prefix}_0..2`` of the calling compact method.

    ``x [M, S, S, in_channels]`` -> ``[M, ceil(S/2), ceil(S/2), out_channels]``; the first block
    has the projection shortcut (stride 2) and puts its stride on ``conv1`` when
    ``stride_in_1x1`` (MSRA weights), else on the 3x3 ``conv2``.
    """
    for index, stride in enumerate(_RES5_STRIDES):
        x = BottleneckBlock(in_channels, out_channels, bottleneck_channels, stride, num_groups, norm, stride_in_1x1,
                            name=f"{prefix}_{index}")(x)
        in_channels = out_channels
    return x


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeads(nn.Module):
    """detectron2's ``Res5ROIHeads`` at inference (boxes).

    Fields: ``in_feature`` (the backbone map pooled, ``res4``), ``pooler``
    (:class:`detlayers.models.poolers.ROIPooler`, one level), the ``res5`` stage geometry
    (``in_channels``, ``out_channels``, ``bottleneck_channels``, ``num_groups``, ``norm``,
    ``stride_in_1x1``) and ``box_predictor``
    (:class:`detlayers.models.roi_heads.fast_rcnn.FastRCNNOutputLayers` over ``out_channels``).

    ``__call__(features {name: [N, H, W, C]}, proposals [N, R, 4], proposal_valid bool[N, R],
    image_hw int32[N, 2])`` returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes int32[N, D]``
    and ``valid bool[N, D]`` (valid slots first, by decreasing score), as ``StandardROIHeads``.
    """

    in_feature: str
    pooler: ROIPooler
    in_channels: int
    out_channels: int
    bottleneck_channels: int
    box_predictor: nn.Module
    num_groups: int = 1
    norm: str = "FrozenBN"
    stride_in_1x1: bool = True

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> Res5ROIHeads:
        """``MODEL.ROI_HEADS.IN_FEATURES`` (exactly one backbone output), its pooler
        ``MODEL.ROI_BOX_HEAD.{POOLER_RESOLUTION, POOLER_SAMPLING_RATIO, POOLER_TYPE}``, the
        ``res5`` stage from ``MODEL.RESNETS.{NUM_GROUPS, WIDTH_PER_GROUP, RES2_OUT_CHANNELS,
        STRIDE_IN_1X1, NORM}`` and the predictor's keys (``FastRCNNOutputLayers.from_config``).
        ``MODEL.MASK_ON``, ``MODEL.KEYPOINT_ON`` and a deformable res5
        (``MODEL.RESNETS.DEFORM_ON_PER_STAGE[3]``) raise ``ValueError`` naming the key."""
        model = cfg.MODEL
        in_features = tuple(model.ROI_HEADS.IN_FEATURES)
        if len(in_features) != 1:
            raise ValueError(f"Res5ROIHeads: MODEL.ROI_HEADS.IN_FEATURES must name one feature map, got "
                             f"{list(in_features)}")
        (in_feature,) = in_features
        if in_feature not in input_shape:
            raise ValueError(f"Res5ROIHeads: MODEL.ROI_HEADS.IN_FEATURES {in_feature!r} is not a backbone output "
                             f"{list(input_shape)}")
        if model.MASK_ON:
            raise ValueError("Res5ROIHeads: MODEL.MASK_ON True (the C4 mask head, mask_rcnn_R_50_C4_3x.yaml) is not "
                             "supported; only box detection (MODEL.MASK_ON False)")
        if model.KEYPOINT_ON:
            raise ValueError("Res5ROIHeads: MODEL.KEYPOINT_ON must be False (as detectron2 asserts)")
        resnets = model.RESNETS
        if bool(resnets.DEFORM_ON_PER_STAGE[-1]):
            raise ValueError("Res5ROIHeads: MODEL.RESNETS.DEFORM_ON_PER_STAGE[3] (a deformable res5 head) is not "
                             "supported, as in detectron2")
        box = model.ROI_BOX_HEAD
        if box.POOLER_TYPE not in POOLER_TYPES:
            raise ValueError(f"Res5ROIHeads: MODEL.ROI_BOX_HEAD.POOLER_TYPE {box.POOLER_TYPE!r} is not supported "
                             f"(only {sorted(POOLER_TYPES)})")
        out_channels = resnets.RES2_OUT_CHANNELS * _RES5_WIDTH_FACTOR
        in_channels = input_shape[in_feature].channels
        if in_channels != out_channels // 2:
            raise ValueError(f"Res5ROIHeads: the res5 head takes {out_channels // 2} channels "
                             f"(MODEL.RESNETS.RES2_OUT_CHANNELS {resnets.RES2_OUT_CHANNELS} x 4), but "
                             f"MODEL.ROI_HEADS.IN_FEATURES {in_feature!r} has {in_channels}")
        pooler = ROIPooler(output_size=box.POOLER_RESOLUTION, scales=(1.0 / input_shape[in_feature].stride,),
                           sampling_ratio=box.POOLER_SAMPLING_RATIO, pooler_type=box.POOLER_TYPE)
        return cls(
            in_feature=in_feature, pooler=pooler, in_channels=in_channels, out_channels=out_channels,
            bottleneck_channels=resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP * _RES5_WIDTH_FACTOR,
            box_predictor=FastRCNNOutputLayers.from_config(cfg, ShapeSpec(channels=out_channels, height=1, width=1)),
            num_groups=resnets.NUM_GROUPS, norm=resnets.NORM, stride_in_1x1=resnets.STRIDE_IN_1X1,
        )

    @property
    def proposal_append_gt(self) -> bool:
        """What ``GeneralizedRCNN`` reads before training the ROI heads: training is refused."""
        raise NotImplementedError("Res5ROIHeads: training is not supported (inference only)")

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Array],
        proposals: Array,
        proposal_valid: Array,
        image_hw: Array,
        *targets: Sequence[Array],
        train: bool = False,
    ) -> dict[str, Array]:
        if train or targets:
            raise NotImplementedError("Res5ROIHeads: training is not supported (inference only)")
        if self.in_feature not in features:
            raise ValueError(f"Res5ROIHeads: feature {self.in_feature!r} is not among {list(features)}")
        if proposals.ndim != 3 or proposals.shape[-1] != 4 or proposal_valid.shape != proposals.shape[:2]:
            raise ValueError(f"Res5ROIHeads: proposals must be [N, R, 4] and proposal_valid [N, R], got "
                             f"{proposals.shape} and {proposal_valid.shape}")
        pooled = self.pooler([features[self.in_feature]], proposals, proposal_valid)
        x = res5_stage(pooled, self.in_channels, self.out_channels, self.bottleneck_channels,
                       num_groups=self.num_groups, norm=self.norm, stride_in_1x1=self.stride_in_1x1)
        # detectron2: box_features.mean(dim=[2, 3]) over the res5 cells
        logits, deltas = self.box_predictor(jnp.mean(x, axis=(1, 2)))
        boxes, scores, classes, valid = self.box_predictor.inference(
            logits, deltas, proposals, proposal_valid, image_hw
        )
        return {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
