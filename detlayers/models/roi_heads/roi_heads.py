"""detectron2's ``StandardROIHeads`` at inference (``modeling/roi_heads/roi_heads.py``): the box
branch (pooler, head, predictor) and, with masks, the mask branch.

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.poolers import POOLER_TYPES, ROIPooler
from detlayers.models.registry import ROI_HEADS_REGISTRY, build_from_registry
from detlayers.models.roi_heads.box_head import build_box_head
from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detlayers.models.roi_heads.mask_head import build_mask_head, mask_rcnn_inference
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["StandardROIHeads", "build_roi_heads", "MASK_HEAD_CHUNK"]


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
    """

    box_in_features: Sequence[str]
    box_pooler: ROIPooler
    box_head: nn.Module
    box_predictor: nn.Module
    mask_in_features: Sequence[str] = ()
    mask_pooler: ROIPooler | None = None
    mask_head: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> StandardROIHeads:
        """``MODEL.ROI_HEADS.IN_FEATURES`` over the backbone outputs ``input_shape``; the heads
        ``MODEL.ROI_BOX_HEAD.NAME`` / ``MODEL.ROI_MASK_HEAD.NAME`` (with ``MODEL.MASK_ON``) and
        their poolers (``POOLER_RESOLUTION``, ``POOLER_SAMPLING_RATIO``, ``POOLER_TYPE``)."""
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
        kwargs: dict[str, Any] = dict(
            box_in_features=in_features, box_pooler=box_pooler, box_head=box_head,
            box_predictor=FastRCNNOutputLayers.from_config(cfg, box_head.output_shape()),
        )
        if model.MASK_ON:
            mask_pooler = pooler("ROI_MASK_HEAD")
            size = mask_pooler.output_size
            kwargs.update(mask_in_features=in_features, mask_pooler=mask_pooler,
                          mask_head=build_mask_head(cfg, ShapeSpec(channels=in_channels, height=size, width=size)))
        return cls(**kwargs)

    @nn.compact
    def __call__(
        self, features: Mapping[str, Array], proposals: Array, proposal_valid: Array, image_hw: Array
    ) -> dict[str, Array]:
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


def build_roi_heads(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The ROI heads ``MODEL.ROI_HEADS.NAME`` names (detectron2's ``build_roi_heads``)."""
    return build_from_registry(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, cfg, input_shape)
