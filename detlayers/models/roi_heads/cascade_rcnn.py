"""detectron2's ``CascadeROIHeads`` (``modeling/roi_heads/cascade_rcnn.py``, the Cascade R-CNN paper):
a chain of box stages, each refining the boxes of the stage before, then the mask head on the
final boxes. Inference only.

Stage ``k`` pools the current boxes (stage 0: the RPN proposals), runs its own box head
``box_head_k`` and class-agnostic predictor ``box_predictor_k`` (detectron2's ``box_head.{k}`` and
``box_predictor.{k}``: a cascade checkpoint loads unchanged), and decodes its deltas with its own
``MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS[k]``; the decoded boxes, clipped to the image, are
the next stage's proposals (empty ones are kept at inference, so every stage scores the same
slots). The class scores are the softmax probabilities averaged over the stages, the boxes those
of the last stage, and ``fast_rcnn_inference`` with the last predictor's thresholds picks the
detections.

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes
from detlayers.models.box_regression import Box2BoxTransform
from detlayers.models.poolers import ROIPooler
from detlayers.models.registry import ROI_HEADS_REGISTRY
from detlayers.models.roi_heads.box_head import build_box_head
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detlayers.models.roi_heads.roi_heads import StandardROIHeads, _mask_probs_of_valid_slots
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["CascadeROIHeads", "cascade_stage_boxes"]

_TRAINING_REFUSED = ("CascadeROIHeads: training is not supported (inference only); train a "
                     "StandardROIHeads model (MODEL.ROI_HEADS.NAME 'StandardROIHeads') instead")


def cascade_stage_boxes(
    box2box_transform: Box2BoxTransform, deltas: Array, boxes: Array, valid: Array, image_hw: Array
) -> Array:
    """One stage's refined boxes, clipped to the image: the next stage's proposals.

    ``deltas [N, R, 4]`` (class agnostic), ``boxes [N, R, 4]`` the stage's input boxes,
    ``valid bool[N, R]``, ``image_hw int32[N, 2]``. Returns ``[N, R, 4]``: detectron2's
    ``predict_boxes`` then ``Boxes.clip`` (no empty box is dropped, as at detectron2's inference);
    invalid slots hold zeros.
    """
    decoded = box2box_transform.apply_deltas(deltas, boxes)
    clipped = clip_boxes(decoded, image_hw[:, 0, None], image_hw[:, 1, None])
    return jnp.where(valid[..., None], clipped, 0.0)


@ROI_HEADS_REGISTRY.register()
class CascadeROIHeads(nn.Module):
    """detectron2's ``CascadeROIHeads`` at inference.

    Fields: ``box_in_features`` (feature maps pooled), ``box_pooler`` (shared by the stages),
    ``box_head`` and ``box_predictor`` (one per stage, the same length; each predictor a
    class-agnostic :class:`detlayers.models.roi_heads.fast_rcnn.FastRCNNOutputLayers` with its
    stage's ``box2box_transform``), and the mask branch ``mask_in_features``, ``mask_pooler``,
    ``mask_head`` (None: no masks) as in ``StandardROIHeads``.

    ``__call__(features {name: [N, Hi, Wi, C]}, proposals [N, R, 4], proposal_valid bool[N, R],
    image_hw int32[N, 2])`` returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes int32[N, D]``,
    ``valid bool[N, D]`` (valid slots first, by decreasing score) and, with masks,
    ``mask_probs [N, D, M, M]``, as ``StandardROIHeads``.
    """

    box_in_features: Sequence[str]
    box_pooler: ROIPooler
    box_head: Sequence[nn.Module]
    box_predictor: Sequence[nn.Module]
    mask_in_features: Sequence[str] = ()
    mask_pooler: ROIPooler | None = None
    mask_head: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> CascadeROIHeads:
        """``StandardROIHeads.from_config``'s keys (in features, poolers, mask head), one box head
        (``MODEL.ROI_BOX_HEAD.NAME``) and one predictor per entry of
        ``MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS`` (its box weights; ``IOUS``, the training
        matchers' thresholds, must have the same length and start with
        ``MODEL.ROI_HEADS.IOU_THRESHOLDS[0]``, as detectron2 asserts).
        ``MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG`` must be True, ``USE_SIGMOID_CE`` and
        ``MODEL.KEYPOINT_ON`` False."""
        model = cfg.MODEL
        cascade = model.ROI_BOX_CASCADE_HEAD
        weights, ious = tuple(cascade.BBOX_REG_WEIGHTS), tuple(cascade.IOUS)
        if not weights:
            raise ValueError("CascadeROIHeads: MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS needs at least one stage")
        if len(weights) != len(ious):
            raise ValueError(f"CascadeROIHeads: MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS ({len(weights)} stages) "
                             f"and MODEL.ROI_BOX_CASCADE_HEAD.IOUS ({len(ious)}) must have the same length")
        if float(ious[0]) != float(model.ROI_HEADS.IOU_THRESHOLDS[0]):
            raise ValueError(f"CascadeROIHeads: MODEL.ROI_BOX_CASCADE_HEAD.IOUS[0] {ious[0]} must equal "
                             f"MODEL.ROI_HEADS.IOU_THRESHOLDS[0] {model.ROI_HEADS.IOU_THRESHOLDS[0]}")
        if not model.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise ValueError("CascadeROIHeads: MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG must be True "
                             "(detectron2's cascade supports class-agnostic regression only)")
        if model.KEYPOINT_ON:
            raise ValueError("CascadeROIHeads: MODEL.KEYPOINT_ON True is not supported (no keypoint head)")
        if model.ROI_BOX_HEAD.USE_SIGMOID_CE:
            # detectron2 then averages per-class sigmoids; the stages here average softmax probabilities
            raise ValueError("CascadeROIHeads: MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True is not supported (softmax "
                             "class scores only)")
        # The pooler, the in-feature checks and the mask branch are StandardROIHeads'.
        base = StandardROIHeads.from_config(cfg, input_shape)
        size = base.box_pooler.output_size
        pooled = ShapeSpec(channels=input_shape[base.box_in_features[0]].channels, height=size, width=size)
        heads, predictors = [], []
        for stage, stage_weights in enumerate(weights):
            if len(stage_weights) != 4:
                raise ValueError(f"CascadeROIHeads: MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS[{stage}] must hold 4 "
                                 f"weights, got {stage_weights}")
            head = build_box_head(cfg, pooled)
            predictor = FastRCNNOutputLayers.from_config(cfg, head.output_shape())
            heads.append(head)
            predictors.append(predictor.clone(
                box2box_transform=Box2BoxTransform(weights=tuple(float(w) for w in stage_weights))))
        return cls(box_in_features=base.box_in_features, box_pooler=base.box_pooler, box_head=tuple(heads),
                   box_predictor=tuple(predictors), mask_in_features=base.mask_in_features,
                   mask_pooler=base.mask_pooler, mask_head=base.mask_head)

    @property
    def num_cascade_stages(self) -> int:
        return len(self.box_head)

    @property
    def proposal_append_gt(self) -> bool:
        """What ``GeneralizedRCNN`` reads before training the ROI heads: training is refused."""
        raise NotImplementedError(_TRAINING_REFUSED)

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Array],
        proposals: Array,
        proposal_valid: Array,
        image_hw: Array,
        *targets: Array,
        train: bool = False,
    ) -> dict[str, Array]:
        if train or targets:
            raise NotImplementedError(_TRAINING_REFUSED)
        if len(self.box_predictor) != len(self.box_head) or not self.box_head:
            raise ValueError(f"CascadeROIHeads: {len(self.box_head)} box heads and {len(self.box_predictor)} "
                             "predictors: one of each per stage, at least one stage")
        if proposals.ndim != 3 or proposals.shape[-1] != 4 or proposal_valid.shape != proposals.shape[:2]:
            raise ValueError(f"CascadeROIHeads: proposals must be [N, R, 4] and proposal_valid [N, R], got "
                             f"{proposals.shape} and {proposal_valid.shape}")
        n, r = proposals.shape[:2]
        box_features = [features[name] for name in self.box_in_features]
        boxes = proposals
        probs_sum = None
        for stage, (head, predictor) in enumerate(zip(self.box_head, self.box_predictor)):
            logits, flat_deltas = predictor(head(self.box_pooler(box_features, boxes, proposal_valid)))
            if flat_deltas.shape[-1] != 4:
                raise ValueError(f"CascadeROIHeads: stage {stage}'s predictor must be class agnostic (4 deltas a "
                                 f"box), got {flat_deltas.shape[-1]}")
            deltas = flat_deltas.reshape(n, r, 4)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, r, -1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            if stage + 1 < self.num_cascade_stages:
                # This stage's boxes, clipped, are the next stage's proposals.
                boxes = cascade_stage_boxes(predictor.box2box_transform, deltas, boxes, proposal_valid, image_hw)
        last = self.box_predictor[-1]
        scores = probs_sum * (1.0 / self.num_cascade_stages)
        final_boxes = last.box2box_transform.apply_deltas(deltas, boxes)
        boxes, scores, classes, valid = fast_rcnn_inference(
            final_boxes, scores, image_hw, proposal_valid, score_thresh=last.test_score_thresh,
            nms_thresh=last.test_nms_thresh, topk_per_image=last.test_topk_per_image,
        )
        out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
        if self.mask_head is not None:
            d = boxes.shape[1]
            mask_features = self.mask_pooler([features[name] for name in self.mask_in_features], boxes, valid)
            out["mask_probs"] = _mask_probs_of_valid_slots(
                self.mask_head, mask_features.reshape(n, d, *mask_features.shape[1:]), classes, valid,
                initializing=self.is_initializing(),
            )
        return out
