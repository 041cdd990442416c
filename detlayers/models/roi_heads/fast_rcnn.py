"""detectron2's ``FastRCNNOutputLayers``, ``fast_rcnn_inference`` and the box losses
(``modeling/roi_heads/fast_rcnn.py``).

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.boxes import clip_boxes
from detlayers.models.box_regression import Box2BoxTransform, smooth_l1_loss
from detlayers.nms import batched_nms
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Linear

Array = jax.Array

__all__ = ["FastRCNNOutputLayers", "fast_rcnn_inference", "fast_rcnn_losses"]


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


def fast_rcnn_losses(
    logits: Array,
    deltas: Array,
    proposals: Array,
    gt_boxes: Array,
    gt_classes: Array,
    valid: Array,
    *,
    box2box_transform: Box2BoxTransform,
    smooth_l1_beta: float,
) -> dict[str, Array]:
    """detectron2's ``FastRCNNOutputLayers.losses`` (smooth-L1 box loss), unweighted.

    Args:
      logits: ``[M, K+1]``; deltas: ``[M, K*4]`` (or ``[M, 4]`` class agnostic), for ``M`` sampled
        ROI slots (all images together).
      proposals: ``[M, 4]`` the sampled boxes; gt_boxes: ``[M, 4]`` their matched ground truth.
      gt_classes: ``int[M]`` in ``[0, K]`` (K: background); valid: ``bool[M]`` (unused slots False).

    Returns ``loss_cls`` (softmax cross-entropy averaged over the valid slots) and ``loss_box_reg``
    (smooth L1 between the ground-truth class's deltas and the targets, summed over foreground and
    divided by the number of valid slots, detectron2's normalizer); both 0 without valid slots.
    """
    m, num_cols = logits.shape
    num_classes = num_cols - 1
    for name, value, shape in (("deltas", deltas, (m,)), ("proposals", proposals, (m, 4)),
                               ("gt_boxes", gt_boxes, (m, 4)), ("gt_classes", gt_classes, (m,)),
                               ("valid", valid, (m,))):
        if tuple(value.shape[:len(shape)]) != shape:
            raise ValueError(f"fast_rcnn_losses: {name} must start with {shape} (logits are {logits.shape}), "
                             f"got {value.shape}")
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.clip(gt_classes, 0, num_classes)[:, None], axis=1)[:, 0]
    loss_cls = -jnp.sum(jnp.where(valid, picked, 0.0)) / count
    foreground = valid & (gt_classes >= 0) & (gt_classes < num_classes)
    per_class = deltas.reshape(m, -1, 4).astype(jnp.float32)
    if per_class.shape[1] == 1:
        fg_deltas = per_class[:, 0]
    else:
        fg_deltas = jnp.take_along_axis(per_class, jnp.clip(gt_classes, 0, num_classes - 1)[:, None, None], 1)[:, 0]
    # Background and unused slots may hold empty boxes: their targets are replaced by 0 so that no
    # NaN reaches the (masked) gradient.
    targets = box2box_transform.get_deltas(proposals, gt_boxes)
    targets = jnp.where(foreground[:, None], targets, 0.0)
    loss = jnp.sum(smooth_l1_loss(fg_deltas, targets, smooth_l1_beta), axis=1)
    loss_box_reg = jnp.sum(jnp.where(foreground, loss, 0.0)) / count
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K+1 logits) and ``bbox_pred`` (``box_dim`` = 4 per class, or 4 when class agnostic) over
    the box head's output ``input_shape``, their test-time :meth:`inference` and training :meth:`losses`.

    ``__call__(x [M, ...]) -> (logits [M, K+1], deltas [M, K*4 or 4])``.
    """

    input_shape: ShapeSpec
    num_classes: int
    box2box_transform: Box2BoxTransform
    cls_agnostic_bbox_reg: bool = False
    test_score_thresh: float = 0.05
    test_nms_thresh: float = 0.5
    test_topk_per_image: int = 100
    smooth_l1_beta: float = 0.0
    box_reg_loss_weight: float = 1.0
    box_dim: int = 4  # deltas a class: 5 for rotated boxes (RotatedFastRCNNOutputLayers)

    @classmethod
    def from_config(cls, cfg: Any, input_shape: ShapeSpec) -> FastRCNNOutputLayers:
        """``MODEL.ROI_HEADS.{NUM_CLASSES, SCORE_THRESH_TEST, NMS_THRESH_TEST}``,
        ``MODEL.ROI_BOX_HEAD.{BBOX_REG_WEIGHTS, CLS_AGNOSTIC_BBOX_REG, SMOOTH_L1_BETA,
        BBOX_REG_LOSS_WEIGHT}``, ``TEST.DETECTIONS_PER_IMAGE`` (negative: no limit, as detectron2;
        0 is refused). ``MODEL.ROI_BOX_HEAD.{USE_SIGMOID_CE, USE_FED_LOSS}`` True raise (not
        implemented; detectron2 would score with sigmoids / train with the federated loss)."""
        heads, box = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
        if cfg.TEST.DETECTIONS_PER_IMAGE == 0:
            # detectron2 would return no detection at all; a zero-size output is surely a mistake.
            raise ValueError("FastRCNNOutputLayers: TEST.DETECTIONS_PER_IMAGE 0 keeps no detection; "
                             "use a positive limit, or a negative value for no limit (detectron2's -1)")
        for key in ("USE_SIGMOID_CE", "USE_FED_LOSS"):
            # sigmoid scores change inference, the federated loss training: refused, not ignored
            if box.get(key, False):
                raise ValueError(f"FastRCNNOutputLayers: MODEL.ROI_BOX_HEAD.{key} True is not supported "
                                 "(softmax cross-entropy scores only); set it to False")
        if box.BBOX_REG_LOSS_TYPE != "smooth_l1":
            raise ValueError(f"FastRCNNOutputLayers: MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {box.BBOX_REG_LOSS_TYPE!r} "
                             "is not supported (only 'smooth_l1')")
        return cls(
            input_shape=input_shape, num_classes=heads.NUM_CLASSES,
            box2box_transform=cls.transform_from_weights(tuple(box.BBOX_REG_WEIGHTS)),
            cls_agnostic_bbox_reg=box.CLS_AGNOSTIC_BBOX_REG, test_score_thresh=heads.SCORE_THRESH_TEST,
            test_nms_thresh=heads.NMS_THRESH_TEST, test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            smooth_l1_beta=float(box.SMOOTH_L1_BETA), box_reg_loss_weight=float(box.BBOX_REG_LOSS_WEIGHT),
        )

    @classmethod
    def transform_from_weights(cls, weights: tuple[float, ...]) -> Any:
        """The box transform of ``MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS`` (4 weights)."""
        if len(weights) != 4:
            raise ValueError(f"FastRCNNOutputLayers: MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS must hold 4 weights, "
                             f"got {weights}")
        return Box2BoxTransform(weights=weights)

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
        deltas = Linear(self.input_dim, num_reg * self.box_dim, name="bbox_pred")(x)
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

    def losses(
        self, logits: Array, deltas: Array, proposals: Array, gt_boxes: Array, gt_classes: Array, valid: Array
    ) -> dict[str, Array]:
        """:func:`fast_rcnn_losses` with this layer's transform and ``smooth_l1_beta``;
        ``loss_box_reg`` multiplied by ``box_reg_loss_weight``."""
        losses = fast_rcnn_losses(logits, deltas, proposals, gt_boxes, gt_classes, valid,
                                  box2box_transform=self.box2box_transform, smooth_l1_beta=self.smooth_l1_beta)
        return {"loss_cls": losses["loss_cls"], "loss_box_reg": losses["loss_box_reg"] * self.box_reg_loss_weight}
