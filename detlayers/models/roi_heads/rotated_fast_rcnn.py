"""detectron2's rotated Fast R-CNN heads (``modeling/roi_heads/rotated_fast_rcnn.py``):
``RROIHeads`` with the ``ROIAlignRotated`` pooler, ``RotatedFastRCNNOutputLayers`` (5 deltas a
class, ``Box2BoxTransformRotated``) and ``fast_rcnn_inference_rotated``, at inference.

Rotated boxes are ``(x_center, y_center, width, height, angle_degrees)``. Static shapes: every
image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence  # noqa: F401 - Sequence: see nn below
from typing import Any

import flax.linen as nn  # noqa: F401 - names in the annotations of the parents' fields (the API docs resolve them here)
import jax
import jax.numpy as jnp

from detlayers.boxes import clip_rotated_boxes
from detlayers.models.box_regression import Box2BoxTransform, Box2BoxTransformRotated  # noqa: F401 - as nn
from detlayers.models.matcher import Matcher  # noqa: F401 - as nn above
from detlayers.models.poolers import ROTATED_POOLER_TYPE, ROIPooler
from detlayers.models.registry import ROI_HEADS_REGISTRY
from detlayers.models.roi_heads.box_head import build_box_head
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detlayers.models.roi_heads.roi_heads import StandardROIHeads
from detlayers.nms import batched_nms_rotated
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["RROIHeads", "RotatedFastRCNNOutputLayers", "fast_rcnn_inference_rotated"]

_TRAINING = ("training is not supported (inference only); train a rotated Faster R-CNN with detectron2 "
             "and load its checkpoint")


def fast_rcnn_inference_rotated(
    boxes: Array,
    scores: Array,
    image_hw: Array,
    proposal_valid: Array,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> tuple[Array, Array, Array, Array]:
    """detectron2's ``fast_rcnn_inference_single_image_rotated``, batched with static shapes.

    Args:
      boxes: ``[N, R, K*5]`` (or ``[N, R, 5]`` class agnostic) decoded rotated boxes;
        scores: ``[N, R, K+1]`` softmax probabilities (last column background);
        image_hw: ``int32[N, 2]``; proposal_valid: ``bool[N, R]``.

    Returns ``boxes [N, D, 5]``, ``scores [N, D]``, ``classes int32[N, D]``, ``valid [N, D]``
    (``D = min(topk_per_image, R*K)``; ``topk_per_image < 0``: ``D = R*K``; valid slots first, by
    decreasing score). Boxes are clipped as ``RotatedBoxes.clip`` (angles wrapped into
    ``[-180, 180)``, only nearly horizontal boxes clipped); every (box, class) pair with score
    ``> score_thresh`` takes part in per-class rotated NMS, in detectron2's row-major order.
    """
    n, r, num_cols = scores.shape
    num_classes = num_cols - 1
    num_reg = boxes.shape[-1] // 5

    def per_image(boxes_n, scores_n, hw, valid_n):
        finite = jnp.all(jnp.isfinite(boxes_n), axis=1) & jnp.all(jnp.isfinite(scores_n), axis=1) & valid_n
        cls_scores = scores_n[:, :num_classes]
        safe = jnp.where(finite[:, None], boxes_n, 0.0).reshape(r, num_reg, 5)
        clipped = clip_rotated_boxes(safe, hw[0], hw[1])
        if num_reg == 1:
            clipped = jnp.broadcast_to(clipped, (r, num_classes, 5))
        keep = (cls_scores > score_thresh) & finite[:, None]
        flat_boxes = jnp.where(keep[..., None], clipped, 0.0).reshape(r * num_classes, 5)
        flat_scores = jnp.where(keep, cls_scores, -jnp.inf).reshape(r * num_classes)
        flat_classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (r, num_classes)).reshape(-1)
        k = r * num_classes if topk_per_image < 0 else min(topk_per_image, r * num_classes)
        result = batched_nms_rotated(flat_boxes, flat_scores, flat_classes, nms_thresh, max_output_size=k)
        index = jnp.maximum(result.indices, 0)
        valid = (jnp.arange(k) < result.count) & keep.reshape(-1)[index]
        out_boxes = jnp.where(valid[:, None], flat_boxes[index], 0.0)
        out_scores = jnp.where(valid, flat_scores[index], 0.0)
        out_classes = jnp.where(valid, flat_classes[index], -1)
        return out_boxes, out_scores, out_classes, valid

    return jax.vmap(per_image)(boxes, scores, image_hw, proposal_valid)


class RotatedFastRCNNOutputLayers(FastRCNNOutputLayers):
    """detectron2's ``RotatedFastRCNNOutputLayers``: ``cls_score`` (K+1 logits) and ``bbox_pred``
    (5 deltas a class, or 5 class agnostic) decoded by ``Box2BoxTransformRotated``
    (``MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS``, 5 weights); :meth:`inference` is
    :func:`fast_rcnn_inference_rotated`. Inference only."""

    box_dim: int = 5

    @classmethod
    def transform_from_weights(cls, weights: tuple[float, ...]) -> Box2BoxTransformRotated:
        """``Box2BoxTransformRotated`` of ``MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS`` (5 weights)."""
        if len(weights) != 5:
            raise ValueError("RotatedFastRCNNOutputLayers: MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS must hold 5 weights "
                             f"(dx, dy, dw, dh, da), got {weights}")
        return Box2BoxTransformRotated(weights=weights)

    def inference(
        self, logits: Array, deltas: Array, proposals: Array, proposal_valid: Array, image_hw: Array
    ) -> tuple[Array, Array, Array, Array]:
        """Softmax, rotated decoding and :func:`fast_rcnn_inference_rotated` with the test
        thresholds: ``logits [N*R, K+1]``, ``deltas [N*R, K*5 or 5]``, ``proposals [N, R, 5]``,
        ``proposal_valid bool[N, R]``, ``image_hw int32[N, 2]`` -> ``(boxes [N, D, 5], scores,
        classes, valid [N, D])``."""
        n, r = proposals.shape[:2]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, r, -1)
        decoded = self.box2box_transform.apply_deltas(deltas.reshape(n, r, -1), proposals)
        return fast_rcnn_inference_rotated(
            decoded, probs, image_hw, proposal_valid, score_thresh=self.test_score_thresh,
            nms_thresh=self.test_nms_thresh, topk_per_image=self.test_topk_per_image,
        )

    def losses(self, *args: Any, **kwargs: Any) -> dict[str, Array]:
        raise NotImplementedError(f"RotatedFastRCNNOutputLayers: {_TRAINING}")


@ROI_HEADS_REGISTRY.register()
class RROIHeads(StandardROIHeads):
    """detectron2's ``RROIHeads`` at inference: rotated proposals ``[N, R, 5]`` pooled by
    ``ROIAlignRotated`` (:class:`detlayers.models.poolers.ROIPooler`), the box head, and
    :class:`RotatedFastRCNNOutputLayers`. Boxes only (no mask or keypoint branch, as detectron2).

    ``__call__(features {name: [N, Hi, Wi, C]}, proposals [N, R, 5], proposal_valid [N, R],
    image_hw int32[N, 2])`` returns ``boxes [N, D, 5]``, ``scores [N, D]``, ``classes [N, D]``,
    ``valid [N, D]``. Training raises ``NotImplementedError``.
    """

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> RROIHeads:
        """``MODEL.ROI_HEADS.IN_FEATURES`` over ``input_shape``; ``MODEL.ROI_BOX_HEAD.{NAME,
        POOLER_RESOLUTION, POOLER_SAMPLING_RATIO, POOLER_TYPE}`` (the type must be
        ``"ROIAlignRotated"``) and the predictor's keys. ``MODEL.MASK_ON`` / ``MODEL.KEYPOINT_ON``
        are refused, as detectron2 asserts."""
        model = cfg.MODEL
        for key in ("MASK_ON", "KEYPOINT_ON"):
            if getattr(model, key):
                raise ValueError(f"RROIHeads: MODEL.{key} is not supported (rotated heads predict boxes only)")
        box = model.ROI_BOX_HEAD
        if box.POOLER_TYPE != ROTATED_POOLER_TYPE:
            raise ValueError(f"RROIHeads: MODEL.ROI_BOX_HEAD.POOLER_TYPE {box.POOLER_TYPE!r} is not supported "
                             f"(only {ROTATED_POOLER_TYPE!r})")
        in_features = tuple(model.ROI_HEADS.IN_FEATURES)
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(f"RROIHeads: MODEL.ROI_HEADS.IN_FEATURES {missing} are not backbone outputs "
                             f"{list(input_shape)}")
        # detectron2 takes the first level's channels (the FPN levels share them)
        in_channels = input_shape[in_features[0]].channels
        pooler = ROIPooler(output_size=box.POOLER_RESOLUTION,
                           scales=tuple(1.0 / input_shape[name].stride for name in in_features),
                           sampling_ratio=box.POOLER_SAMPLING_RATIO, pooler_type=ROTATED_POOLER_TYPE)
        size = pooler.output_size
        box_head = build_box_head(cfg, ShapeSpec(channels=in_channels, height=size, width=size))
        return cls(box_in_features=in_features, box_pooler=pooler, box_head=box_head,
                   box_predictor=RotatedFastRCNNOutputLayers.from_config(cfg, box_head.output_shape()))

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
            raise NotImplementedError(f"RROIHeads: {_TRAINING}")
        if proposals.ndim != 3 or proposals.shape[-1] != 5 or proposal_valid.shape != proposals.shape[:2]:
            raise ValueError(f"RROIHeads: proposals must be rotated boxes [N, R, 5] with proposal_valid [N, R], got "
                             f"{proposals.shape} and {proposal_valid.shape}")
        pooled = self.box_pooler([features[name] for name in self.box_in_features], proposals, proposal_valid)
        logits, deltas = self.box_predictor(self.box_head(pooled))
        boxes, scores, classes, valid = self.box_predictor.inference(
            logits, deltas, proposals, proposal_valid, image_hw
        )
        return {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
