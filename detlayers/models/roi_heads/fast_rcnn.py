"""detectron2's ``FastRCNNOutputLayers`` and ``fast_rcnn_inference`` (``modeling/roi_heads/fast_rcnn.py``).

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes
from detlayers.models.box_regression import Box2BoxTransform
from detlayers.nms import batched_nms
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Linear

Array = jax.Array

__all__ = ["FastRCNNOutputLayers", "fast_rcnn_inference"]


def fast_rcnn_inference(
    boxes: Array,
    scores: Array,
    image_hw: Array,
    proposal_valid: Array,
    *,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> tuple[Array, Array, Array, Array]:
    """detectron2's ``fast_rcnn_inference_single_image``, batched with static shapes.

    Args:
      boxes: ``[N, R, K*4]`` (or ``[N, R, 4]`` class agnostic) decoded boxes; scores: ``[N, R, K+1]``
        softmax probabilities (last column background); image_hw: ``int32[N, 2]``;
      proposal_valid: ``bool[N, R]``.

    Returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes int32[N, D]``, ``valid [N, D]``
    (``D = min(topk_per_image, R*K)``; ``topk_per_image < 0`` is detectron2's "no limit":
    ``D = R*K``, every candidate; valid slots first, by decreasing score). Every (box, class) pair with
    score ``> score_thresh`` takes part in per-class NMS, exactly as detectron2 (pair order is
    detectron2's row-major ``nonzero`` order, which decides ties).
    """
    n, r, num_cols = scores.shape
    num_classes = num_cols - 1
    num_reg = boxes.shape[-1] // 4

    def per_image(boxes_n, scores_n, hw, valid_n):
        finite = jnp.all(jnp.isfinite(boxes_n), axis=1) & jnp.all(jnp.isfinite(scores_n), axis=1) & valid_n
        cls_scores = scores_n[:, :num_classes]
        clipped = clip_boxes(boxes_n.reshape(r, num_reg, 4), hw[0], hw[1])
        if num_reg == 1:
            clipped = jnp.broadcast_to(clipped, (r, num_classes, 4))
        keep = (cls_scores > score_thresh) & finite[:, None]
        flat_boxes = jnp.where(keep[..., None], clipped, 0.0).reshape(r * num_classes, 4)
        flat_scores = jnp.where(keep, cls_scores, -jnp.inf).reshape(r * num_classes)
        flat_classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (r, num_classes)).reshape(-1)
        k = r * num_classes if topk_per_image < 0 else min(topk_per_image, r * num_classes)
        result = batched_nms(flat_boxes, flat_scores, flat_classes, nms_thresh, max_output_size=k)
        index = jnp.maximum(result.indices, 0)
        valid = (jnp.arange(k) < result.count) & keep.reshape(-1)[index]
        out_boxes = jnp.where(valid[:, None], flat_boxes[index], 0.0)
        out_scores = jnp.where(valid, flat_scores[index], 0.0)
        out_classes = jnp.where(valid, flat_classes[index], -1)
        return out_boxes, out_scores, out_classes, valid

    return jax.vmap(per_image)(boxes, scores, image_hw, proposal_valid)


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K+1 logits) and ``bbox_pred`` (4 per class, or 4 when class agnostic) over
    the box head's output ``input_shape``, and their test-time :meth:`inference`.

    ``__call__(x [M, ...]) -> (logits [M, K+1], deltas [M, K*4 or 4])``.
    """

    input_shape: ShapeSpec
    num_classes: int
    box2box_transform: Box2BoxTransform
    cls_agnostic_bbox_reg: bool = False
    test_score_thresh: float = 0.05
    test_nms_thresh: float = 0.5
    test_topk_per_image: int = 100

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec) -> FastRCNNOutputLayers:
        """``MODEL.ROI_HEADS.{NUM_CLASSES, SCORE_THRESH_TEST, NMS_THRESH_TEST}``,
        ``MODEL.ROI_BOX_HEAD.{BBOX_REG_WEIGHTS, CLS_AGNOSTIC_BBOX_REG}``, ``TEST.DETECTIONS_PER_IMAGE``
        (negative: no limit, as detectron2; 0 is refused)."""
        heads, box = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
        if cfg.TEST.DETECTIONS_PER_IMAGE == 0:
            # detectron2 would return no detection at all; a zero-size output is surely a mistake.
            raise ValueError("FastRCNNOutputLayers: TEST.DETECTIONS_PER_IMAGE 0 keeps no detection; "
                             "use a positive limit, or a negative value for no limit (detectron2's -1)")
        return cls(
            input_shape=input_shape, num_classes=heads.NUM_CLASSES,
            box2box_transform=Box2BoxTransform(weights=tuple(box.BBOX_REG_WEIGHTS)),
            cls_agnostic_bbox_reg=box.CLS_AGNOSTIC_BBOX_REG, test_score_thresh=heads.SCORE_THRESH_TEST,
            test_nms_thresh=heads.NMS_THRESH_TEST, test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    @property
    def input_dim(self) -> int:
        shape = self.input_shape
        return math.prod(d or 1 for d in (shape.channels, shape.height, shape.width))

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        x = x.reshape(x.shape[0], -1)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"FastRCNNOutputLayers: input has {x.shape[-1]} features per box, "
                             f"input_shape {self.input_shape} says {self.input_dim}")
        scores = Linear(self.input_dim, self.num_classes + 1, name="cls_score")(x)
        num_reg = 1 if self.cls_agnostic_bbox_reg else self.num_classes
        deltas = Linear(self.input_dim, num_reg * 4, name="bbox_pred")(x)
        return scores, deltas

    def inference(
        self, logits: Array, deltas: Array, proposals: Array, proposal_valid: Array, image_hw: Array
    ) -> tuple[Array, Array, Array, Array]:
        """Softmax, box decoding and :func:`fast_rcnn_inference` with the test thresholds.

        ``logits [N*R, K+1]``, ``deltas [N*R, K*4 or 4]`` (this module's outputs for the ``R``
        proposal slots of each image), ``proposals [N, R, 4]``, ``proposal_valid bool[N, R]``,
        ``image_hw int32[N, 2]``. Returns ``(boxes [N, D, 4], scores [N, D], classes [N, D],
        valid [N, D])``.
        """
        n, r = proposals.shape[:2]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, r, -1)
        decoded = self.box2box_transform.apply_deltas(deltas.reshape(n, r, -1), proposals)
        return fast_rcnn_inference(
            decoded, probs, image_hw, proposal_valid, score_thresh=self.test_score_thresh,
            nms_thresh=self.test_nms_thresh, topk_per_image=self.test_topk_per_image,
        )
