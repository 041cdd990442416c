"""detectron2's ``StandardROIHeads`` at inference: multi-level ROI pooling, the box head and
``FastRCNNOutputLayers`` inference, and the mask head (``modeling/roi_heads/*.py``, ``poolers.py``).

Static shapes: every image carries a fixed number of ROI slots with a ``valid`` mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models import box_ops
from detlayers.models.config import Config, ROIBoxHeadConfig, ROIMaskHeadConfig
from detlayers.nms import batched_nms
from detlayers.roi_align import roi_align
from detlayers.wrappers import Conv2d, ConvTranspose2d, Linear

Array = jax.Array


def assign_boxes_to_levels(
    boxes: Array, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Array:
    """detectron2's ``assign_boxes_to_levels`` (FPN paper eq. 1): ``int32[...]`` level minus ``min_level``."""
    sizes = jnp.sqrt(box_ops.box_area(boxes))
    level = jnp.floor(canonical_level + jnp.log2(sizes / canonical_box_size + 1e-8))
    level = jnp.clip(level, min_level, max_level)
    return level.astype(jnp.int32) - min_level


def multilevel_roi_align(
    features: Sequence[Array],
    boxes: Array,
    valid: Array,
    output_size: int,
    strides: Sequence[int],
    sampling_ratio: int = 0,
    aligned: bool = True,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Array:
    """detectron2's ``ROIPooler`` (``ROIAlignV2`` when ``aligned``): ``[N*R, S, S, C]``.

    Args:
      features: per level ``[N, Hi, Wi, C]`` with strides ``strides`` (powers of 2, consecutive).
      boxes: ``[N, R, 4]`` in input-image pixels; valid: ``bool[N, R]`` (invalid slots pool to 0).
    Each ROI is pooled from the level ``assign_boxes_to_levels`` picks. Boxes must lie inside the
    (unpadded) image, as detectron2's clipped proposals and detections do.
    """
    levels = [int(round(math.log2(s))) for s in strides]
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"multilevel_roi_align: strides must be consecutive powers of 2, got {strides}")
    if len(features) != len(strides):
        raise ValueError(f"multilevel_roi_align: {len(features)} feature maps but {len(strides)} strides")
    n, r = boxes.shape[:2]
    flat = boxes.reshape(n * r, 4).astype(jnp.float32)
    flat_valid = valid.reshape(n * r)
    batch_index = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    if len(features) == 1:
        assigned = jnp.zeros((n * r,), jnp.int32)
    else:
        assigned = assign_boxes_to_levels(flat, levels[0], levels[-1], canonical_box_size, canonical_level)
    # One ROIAlign over all levels (one compiled pooling loop instead of one per level): the levels
    # are stacked along the batch axis, each edge-padded to the largest map, and every box is
    # pre-scaled to its level (1/stride is a power of 2, so the product is the one ROIAlign forms).
    # Boxes clipped to the image only sample rows/columns up to ``size - 0.5``, where edge padding
    # and ROIAlign's border clamp read the same values.
    height = max(int(f.shape[1]) for f in features)
    width = max(int(f.shape[2]) for f in features)
    packed = jnp.concatenate(
        [jnp.pad(f, ((0, 0), (0, height - f.shape[1]), (0, width - f.shape[2]), (0, 0)), mode="edge")
         for f in features],
        axis=0,
    )
    scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)[assigned]
    rois = jnp.concatenate([(assigned * n + batch_index).astype(jnp.float32)[:, None], flat * scales[:, None]], axis=1)
    rois = jnp.where(flat_valid[:, None], rois, jnp.array([-1.0, 0.0, 0.0, 0.0, 0.0], jnp.float32))
    pooled = roi_align(packed, rois, output_size, 1.0, sampling_ratio, aligned)
    return jnp.where(flat_valid[:, None, None, None], pooled, 0.0)


def _conv3x3_relu_stack(
    x: Array, channels: int, head: ROIBoxHeadConfig | ROIMaskHeadConfig, prefix: str
) -> tuple[Array, int]:
    """A head's ``NUM_CONV`` 3x3 ``Conv2d`` (``CONV_DIM`` wide, ``NORM``) + ReLU layers named
    ``{prefix}1``, ``{prefix}2``, ... (submodules of the calling compact method; biased only without
    a norm, as in detectron2's heads). Returns the output and its channel count."""
    for k in range(head.NUM_CONV):
        x = Conv2d(channels, head.CONV_DIM, 3, padding=1, bias=not head.NORM, norm=head.NORM or None,
                   activation=jax.nn.relu, name=f"{prefix}{k + 1}")(x)
        channels = head.CONV_DIM
    return x, channels


class FastRCNNConvFCHead(nn.Module):
    """``conv{k}`` 3x3 + ReLU, then flatten and ``fc{k}`` + ReLU, sized by ``cfg``
    (``MODEL.ROI_BOX_HEAD``: ``NUM_CONV``, ``CONV_DIM``, ``NORM``, ``NUM_FC``, ``FC_DIM``).

    detectron2 flattens NCHW ``[C, S, S]``; the NHWC input is transposed first so that ``fc1``
    takes detectron2's weight unchanged.
    """

    input_channels: int
    cfg: ROIBoxHeadConfig = ROIBoxHeadConfig()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x, _ = _conv3x3_relu_stack(x, self.input_channels, self.cfg, "conv")
        if self.cfg.NUM_FC:
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
            features = x.shape[-1]
            for k in range(self.cfg.NUM_FC):
                x = jax.nn.relu(Linear(features, self.cfg.FC_DIM, name=f"fc{k + 1}")(x))
                features = self.cfg.FC_DIM
        return x


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K+1 logits) and ``bbox_pred`` (4 per class, or 4 when class agnostic)."""

    input_dim: int
    num_classes: int
    cls_agnostic_bbox_reg: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        x = x.reshape(x.shape[0], -1)
        scores = Linear(x.shape[-1], self.num_classes + 1, name="cls_score")(x)
        num_reg = 1 if self.cls_agnostic_bbox_reg else self.num_classes
        deltas = Linear(x.shape[-1], num_reg * 4, name="bbox_pred")(x)
        return scores, deltas


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
    (``D = topk_per_image``; valid slots first, by decreasing score). Every (box, class) pair with
    score ``> score_thresh`` takes part in per-class NMS, exactly as detectron2 (pair order is
    detectron2's row-major ``nonzero`` order, which decides ties).
    """
    n, r, num_cols = scores.shape
    num_classes = num_cols - 1
    num_reg = boxes.shape[-1] // 4

    def per_image(boxes_n, scores_n, hw, valid_n):
        finite = jnp.all(jnp.isfinite(boxes_n), axis=1) & jnp.all(jnp.isfinite(scores_n), axis=1) & valid_n
        cls_scores = scores_n[:, :num_classes]
        clipped = box_ops.clip_boxes(boxes_n.reshape(r, num_reg, 4), hw[0], hw[1])
        if num_reg == 1:
            clipped = jnp.broadcast_to(clipped, (r, num_classes, 4))
        keep = (cls_scores > score_thresh) & finite[:, None]
        flat_boxes = jnp.where(keep[..., None], clipped, 0.0).reshape(r * num_classes, 4)
        flat_scores = jnp.where(keep, cls_scores, -jnp.inf).reshape(r * num_classes)
        flat_classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (r, num_classes)).reshape(-1)
        k = min(topk_per_image, r * num_classes)
        result = batched_nms(flat_boxes, flat_scores, flat_classes, nms_thresh, max_output_size=k)
        index = jnp.maximum(result.indices, 0)
        valid = (jnp.arange(k) < result.count) & keep.reshape(-1)[index]
        out_boxes = jnp.where(valid[:, None], flat_boxes[index], 0.0)
        out_scores = jnp.where(valid, flat_scores[index], 0.0)
        out_classes = jnp.where(valid, flat_classes[index], -1)
        return out_boxes, out_scores, out_classes, valid

    return jax.vmap(per_image)(boxes, scores, image_hw, proposal_valid)


class MaskRCNNConvUpsampleHead(nn.Module):
    """``mask_fcn{1..}`` 3x3 + ReLU, ``deconv`` 2x2/2 + ReLU, ``predictor`` 1x1: mask logits
    ``[M, 2S, 2S, num_classes]`` (one channel when class agnostic), sized by ``cfg``
    (``MODEL.ROI_MASK_HEAD``: ``NUM_CONV``, ``CONV_DIM``, ``NORM``, ``CLS_AGNOSTIC_MASK``)."""

    input_channels: int
    num_classes: int
    cfg: ROIMaskHeadConfig = ROIMaskHeadConfig()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x, channels = _conv3x3_relu_stack(x, self.input_channels, self.cfg, "mask_fcn")
        dim = self.cfg.CONV_DIM
        x = jax.nn.relu(ConvTranspose2d(channels, dim, 2, stride=2, name="deconv")(x))
        out = 1 if self.cfg.CLS_AGNOSTIC_MASK else self.num_classes
        return Conv2d(dim, out, 1, name="predictor")(x)


def mask_rcnn_inference(mask_logits: Array, classes: Array) -> Array:
    """detectron2's ``mask_rcnn_inference``: sigmoid of each instance's class channel.

    ``mask_logits [M, S, S, K]`` (K = 1: class agnostic), ``classes int[M]`` -> ``[M, S, S]``.
    """
    if mask_logits.shape[-1] == 1:
        picked = mask_logits[..., 0]
    else:
        index = jnp.clip(classes, 0, mask_logits.shape[-1] - 1)
        picked = jnp.take_along_axis(mask_logits, index[:, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked.astype(jnp.float32))


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


class StandardROIHeads(nn.Module):
    """Box head (``box_head``, ``box_predictor``) and, with ``MODEL.MASK_ON``, ``mask_head``.

    Configured by ``cfg``: ``MODEL.ROI_HEADS`` (classes, test thresholds, ``IN_FEATURES`` -> pooler
    strides), ``MODEL.ROI_BOX_HEAD`` and ``MODEL.ROI_MASK_HEAD`` (heads and their poolers),
    ``MODEL.FPN.OUT_CHANNELS`` (input channels) and ``TEST.DETECTIONS_PER_IMAGE``.

    ``__call__(features, proposals [N, R, 4], proposal_valid [N, R], image_hw int32[N, 2])`` returns
    ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes [N, D]``, ``valid [N, D]`` and, with masks,
    ``mask_probs [N, D, M, M]`` (sigmoid of the predicted class's mask, detectron2's ``pred_masks``).
    """

    cfg: Config

    @nn.compact
    def __call__(
        self, features: Sequence[Array], proposals: Array, proposal_valid: Array, image_hw: Array
    ) -> dict[str, Array]:
        model = self.cfg.MODEL
        heads, box, mask = model.ROI_HEADS, model.ROI_BOX_HEAD, model.ROI_MASK_HEAD
        strides = tuple(2 ** int(name[1:]) for name in heads.IN_FEATURES)
        n, r = proposals.shape[:2]
        pooled = _pool_for_head(features, proposals, proposal_valid, strides, box)
        x = FastRCNNConvFCHead(model.FPN.OUT_CHANNELS, box, name="box_head")(pooled)
        logits, deltas = FastRCNNOutputLayers(
            x.reshape(x.shape[0], -1).shape[-1], heads.NUM_CLASSES, box.CLS_AGNOSTIC_BBOX_REG, name="box_predictor"
        )(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, r, -1)
        decoded = box_ops.apply_deltas(
            deltas.reshape(n, r, -1), proposals, box.BBOX_REG_WEIGHTS
        )
        boxes, scores, classes, valid = fast_rcnn_inference(
            decoded, probs, image_hw, proposal_valid, score_thresh=heads.SCORE_THRESH_TEST,
            nms_thresh=heads.NMS_THRESH_TEST, topk_per_image=self.cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        out = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}
        if model.MASK_ON:
            d = boxes.shape[1]
            mask_features = _pool_for_head(features, boxes, valid, strides, mask)
            head = MaskRCNNConvUpsampleHead(model.FPN.OUT_CHANNELS, heads.NUM_CLASSES, mask, name="mask_head")
            out["mask_probs"] = _mask_probs_of_valid_slots(
                head, mask_features.reshape(n, d, *mask_features.shape[1:]), classes, valid,
                initializing=self.is_initializing(),
            )
        return out


def _pool_for_head(
    features: Sequence[Array], boxes: Array, valid: Array, strides: Sequence[int],
    head: ROIBoxHeadConfig | ROIMaskHeadConfig,
) -> Array:
    """:func:`multilevel_roi_align` with a head's pooler keys (``POOLER_RESOLUTION``,
    ``POOLER_SAMPLING_RATIO``; ``POOLER_TYPE`` ``"ROIAlignV2"`` is aligned, ``"ROIAlign"`` not)."""
    return multilevel_roi_align(
        features, boxes, valid, head.POOLER_RESOLUTION, strides, head.POOLER_SAMPLING_RATIO,
        head.POOLER_TYPE == "ROIAlignV2",
    )
