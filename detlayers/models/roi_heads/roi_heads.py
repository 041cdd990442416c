"""detectron2's ``StandardROIHeads`` (``modeling/roi_heads/roi_heads.py``): the box branch (pooler,
head, predictor) and, with masks, the mask branch; at inference and in training (proposal
labelling and sampling, box and mask losses).

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.boxes import pairwise_iou
from detlayers.models.matcher import Matcher
from detlayers.models.poolers import POOLER_TYPES, ROIPooler
from detlayers.models.registry import ROI_HEADS_REGISTRY, build_from_registry
from detlayers.models.roi_heads.box_head import build_box_head
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detlayers.models.roi_heads.mask_head import (
    build_mask_head,
    crop_and_resize_masks,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detlayers.models.sampling import sampled_indices, subsample_labels
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["StandardROIHeads", "build_roi_heads", "label_and_sample_proposals", "MASK_HEAD_CHUNK"]


# Detections pass through the mask head this many slots (per image) at a time, and only while some
# image still has valid slots left: detectron2 runs the head on the detections alone, and so does
# this, up to one partial chunk.
MASK_HEAD_CHUNK = 10


def _mask_probs_of_valid_slots(
    head: nn.Module, features: Array, classes: Array, valid: Array, *, initializing: bool
) -> Array:
    """``mask_rcnn_inference(head(features))`` for the valid prefix of every image's slots.

    ``features [N, D, S, S, C]``, ``classes``/``valid [N, D]`` with valid slots first. Returns
    ``[N, D, 2S, 2S]``; slots after the last chunk that holds a valid one stay 0.
    """
    n, d = valid.shape
    if initializing or d == 0:
        logits = head(features.reshape(n * d, *features.shape[2:]))
        probs = mask_rcnn_inference(logits, classes.reshape(-1))
        return probs.reshape(n, d, *probs.shape[1:])
    chunk = min(MASK_HEAD_CHUNK, d)
    padded = -(-d // chunk) * chunk
    pad = padded - d
    features = jnp.pad(features, ((0, 0), (0, pad)) + ((0, 0),) * (features.ndim - 2))
    classes = jnp.pad(classes, ((0, 0), (0, pad)))
    num_chunks = (jnp.max(jnp.sum(valid, axis=1)) + chunk - 1) // chunk
    size = 2 * features.shape[2]
    init = (jnp.zeros((), jnp.int32), jnp.zeros((n, padded, size, size), jnp.float32))

    def cond_fn(_, carry):
        return carry[0] < num_chunks

    def body_fn(module, carry):
        index, probs = carry
        start = index * chunk
        x = jax.lax.dynamic_slice_in_dim(features, start, chunk, axis=1)
        c = jax.lax.dynamic_slice_in_dim(classes, start, chunk, axis=1)
        p = mask_rcnn_inference(module(x.reshape(n * chunk, *x.shape[2:])), c.reshape(-1))
        probs = jax.lax.dynamic_update_slice_in_dim(probs, p.reshape(n, chunk, size, size), start, axis=1)
        return index + 1, probs

    _, probs = nn.while_loop(cond_fn, body_fn, head, init)
    return probs[:, :d]


def label_and_sample_proposals(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    priorities: Array,
    *,
    matcher: Matcher,
    num_classes: int,
    batch_size_per_image: int,
    positive_fraction: float,
    append_gt: bool = True,
) -> dict[str, Array]:
    """detectron2's ``ROIHeads.label_and_sample_proposals`` with static shapes.

    Args:
      proposals: ``[N, P, 4]`` (gradients stopped), proposal_valid: ``bool[N, P]``.
      gt_boxes: ``[N, G, 4]``, gt_classes: ``int[N, G]`` in ``[0, num_classes)``, gt_valid: ``bool[N, G]``.
      priorities: ``float[N, P + G]`` with ``append_gt`` (detectron2's ``add_ground_truth_to_proposals``
        appends each image's ground truth after its proposals), else ``[N, P]``.

    Returns, for ``S = min(batch_size_per_image, P (+ G))`` slots per image (foreground first):
    ``boxes [N, S, 4]``, ``classes int32[N, S]`` (``num_classes`` is background), ``gt_boxes [N, S, 4]``
    (the matched ground truth), ``matches int32[N, S]`` (its index), ``valid bool[N, S]``.
    """
    n = proposals.shape[0]
    if append_gt:
        proposals = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)], axis=1)
        proposal_valid = jnp.concatenate([proposal_valid, gt_valid], axis=1)
    if priorities.shape != proposal_valid.shape or gt_classes.shape != gt_valid.shape or gt_boxes.shape[0] != n:
        raise ValueError(f"label_and_sample_proposals: priorities must be [N, P{' + G' if append_gt else ''}] = "
                         f"{proposal_valid.shape} and gt_classes [N, G] = {gt_valid.shape}, got "
                         f"{priorities.shape} and {gt_classes.shape}")

    def per_image(boxes, valid, gt, classes, gvalid, prio):
        matches, labels = matcher(pairwise_iou(gt, boxes), gvalid)
        cls = jnp.where(jnp.any(gvalid), classes[matches], num_classes)
        cls = jnp.where(labels == 0, num_classes, cls)
        cls = jnp.where((labels == -1) | ~valid, -1, cls)
        keep_pos, keep_neg = subsample_labels(cls, batch_size_per_image, positive_fraction, num_classes, prio)
        index, slot_valid = sampled_indices(keep_pos, keep_neg, prio, batch_size_per_image)
        return {"boxes": boxes[index], "classes": jnp.where(slot_valid, cls[index], -1).astype(jnp.int32),
                "gt_boxes": gt[matches[index]], "matches": matches[index], "valid": slot_valid}

    return jax.vmap(per_image)(proposals, proposal_valid, gt_boxes.astype(jnp.float32), gt_classes, gt_valid,
                               priorities)


@ROI_HEADS_REGISTRY.register()
class StandardROIHeads(nn.Module):
    """detectron2's ``StandardROIHeads`` at inference.

    Fields: the box branch ``box_in_features`` (feature maps pooled), ``box_pooler``
    (:class:`detlayers.models.poolers.ROIPooler`), ``box_head``, ``box_predictor``
    (:class:`detlayers.models.roi_heads.fast_rcnn.FastRCNNOutputLayers`); the mask branch
    ``mask_in_features``, ``mask_pooler``, ``mask_head`` (None: no masks).

    ``__call__(features {name: [N, Hi, Wi, C]}, proposals [N, R, 4], proposal_valid [N, R],
    image_hw int32[N, 2])`` returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes [N, D]``,
    ``valid [N, D]`` and, with masks, ``mask_probs [N, D, M, M]`` (sigmoid of the predicted class's
    mask, detectron2's ``pred_masks`` before pasting).

    Training: ``__call__(features, proposals, proposal_valid, image_hw, gt_boxes [N, G, 4],
    gt_classes int[N, G], gt_masks [N, G, H, W], gt_valid bool[N, G], priorities [N, P + G],
    train=True)`` labels and samples the proposals (:func:`label_and_sample_proposals`) and
    returns the loss dict ``loss_cls``, ``loss_box_reg`` and, with masks, ``loss_mask`` (mask head
    on the foreground slots, targets
    :func:`detlayers.models.roi_heads.mask_head.crop_and_resize_masks`). The mask head runs on the
    first ``int(batch_size_per_image * positive_fraction)`` slots, where the sampler puts every
    foreground ROI.
    """

    box_in_features: Sequence[str]
    box_pooler: ROIPooler
    box_head: nn.Module
    box_predictor: nn.Module
    mask_in_features: Sequence[str] = ()
    mask_pooler: ROIPooler | None = None
    mask_head: nn.Module | None = None
    proposal_matcher: Matcher = Matcher((0.5,), (0, 1), allow_low_quality_matches=False)
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    proposal_append_gt: bool = True

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> StandardROIHeads:
        """``MODEL.ROI_HEADS.IN_FEATURES`` over the backbone outputs ``input_shape``; the heads
        ``MODEL.ROI_BOX_HEAD.NAME`` / ``MODEL.ROI_MASK_HEAD.NAME`` (with ``MODEL.MASK_ON``) and
        their poolers (``POOLER_RESOLUTION``, ``POOLER_SAMPLING_RATIO``, ``POOLER_TYPE``); training:
        ``MODEL.ROI_HEADS.{IOU_THRESHOLDS, IOU_LABELS, BATCH_SIZE_PER_IMAGE, POSITIVE_FRACTION,
        PROPOSAL_APPEND_GT}``."""
        model = cfg.MODEL
        in_features = tuple(model.ROI_HEADS.IN_FEATURES)
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(
                f"StandardROIHeads: MODEL.ROI_HEADS.IN_FEATURES {missing} are not backbone outputs {list(input_shape)}"
            )
        channels = {input_shape[name].channels for name in in_features}
        if len(channels) != 1:
            raise ValueError(f"StandardROIHeads: the IN_FEATURES maps must have the same channels, got {channels}")
        in_channels = channels.pop()
        scales = tuple(1.0 / input_shape[name].stride for name in in_features)

        def pooler(key: str) -> ROIPooler:
            head = getattr(model, key)
            if head.POOLER_TYPE not in POOLER_TYPES:
                raise ValueError(f"StandardROIHeads: MODEL.{key}.POOLER_TYPE {head.POOLER_TYPE!r} is not supported "
                                 f"(only {sorted(POOLER_TYPES)})")
            return ROIPooler(output_size=head.POOLER_RESOLUTION, scales=scales,
                             sampling_ratio=head.POOLER_SAMPLING_RATIO, pooler_type=head.POOLER_TYPE)

        box_pooler = pooler("ROI_BOX_HEAD")
        size = box_pooler.output_size
        box_head = build_box_head(cfg, ShapeSpec(channels=in_channels, height=size, width=size))
        heads = model.ROI_HEADS
        kwargs: dict[str, Any] = dict(
            box_in_features=in_features, box_pooler=box_pooler, box_head=box_head,
            box_predictor=FastRCNNOutputLayers.from_config(cfg, box_head.output_shape()),
            proposal_matcher=Matcher(heads.IOU_THRESHOLDS, heads.IOU_LABELS, allow_low_quality_matches=False),
            batch_size_per_image=heads.BATCH_SIZE_PER_IMAGE, positive_fraction=heads.POSITIVE_FRACTION,
            proposal_append_gt=heads.PROPOSAL_APPEND_GT,
        )
        if model.MASK_ON:
            mask_pooler = pooler("ROI_MASK_HEAD")
            size = mask_pooler.output_size
            kwargs.update(mask_in_features=in_features, mask_pooler=mask_pooler,
                          mask_head=build_mask_head(cfg, ShapeSpec(channels=in_channels, height=size, width=size)))
        return cls(**kwargs)

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Array],
        proposals: Array,
        proposal_valid: Array,
        image_hw: Array,
        gt_boxes: Array | None = None,
        gt_classes: Array | None = None,
        gt_masks: Array | None = None,
        gt_valid: Array | None = None,
        priorities: Array | None = None,
        *,
        train: bool = False,
    ) -> dict[str, Array]:
        if train:
            if any(x is None for x in (gt_boxes, gt_classes, gt_valid, priorities)) or (
                    self.mask_head is not None and gt_masks is None):
                raise ValueError("StandardROIHeads: training needs gt_boxes, gt_classes, gt_valid, priorities "
                                 "and, with masks, gt_masks")
            return self._losses(features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks,
                                gt_valid, priorities)
        n = proposals.shape[0]
        pooled = self.box_pooler([features[name] for name in self.box_in_features], proposals, proposal_valid)
        logits, deltas = self.box_predictor(self.box_head(pooled))
        boxes, scores, classes, valid = self.box_predictor.inference(
            logits, deltas, proposals, proposal_valid, image_hw
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

    def _losses(self, features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks, gt_valid,
                priorities) -> dict[str, Array]:
        num_classes = self.box_predictor.num_classes
        sampled = label_and_sample_proposals(
            jax.lax.stop_gradient(proposals), proposal_valid, gt_boxes, gt_classes, gt_valid, priorities,
            matcher=self.proposal_matcher, num_classes=num_classes, batch_size_per_image=self.batch_size_per_image,
            positive_fraction=self.positive_fraction, append_gt=self.proposal_append_gt,
        )
        boxes, valid = sampled["boxes"], sampled["valid"]
        n, s = valid.shape
        pooled = self.box_pooler([features[name] for name in self.box_in_features], boxes, valid)
        logits, deltas = self.box_predictor(self.box_head(pooled))
        losses = self.box_predictor.losses(
            logits, deltas, boxes.reshape(n * s, 4), sampled["gt_boxes"].reshape(n * s, 4),
            sampled["classes"].reshape(-1), valid.reshape(-1),
        )
        if self.mask_head is not None:
            f = min(s, int(self.batch_size_per_image * self.positive_fraction))
            classes = sampled["classes"][:, :f]
            foreground = valid[:, :f] & (classes >= 0) & (classes < num_classes)
            fg_boxes = boxes[:, :f]
            mask_features = self.mask_pooler([features[name] for name in self.mask_in_features], fg_boxes, foreground)
            mask_logits = self.mask_head(mask_features)
            targets = crop_and_resize_masks(gt_masks, image_hw, fg_boxes, sampled["matches"][:, :f],
                                            mask_logits.shape[1])
            losses["loss_mask"] = mask_rcnn_loss(mask_logits, classes.reshape(-1),
                                                 targets.reshape(n * f, *targets.shape[2:]), foreground.reshape(-1))
        return losses


def build_roi_heads(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The ROI heads ``MODEL.ROI_HEADS.NAME`` names (detectron2's ``build_roi_heads``)."""
    return build_from_registry(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, cfg, input_shape)
