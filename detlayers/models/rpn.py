"""detectron2's RPN at inference (``modeling/proposal_generator/rpn.py``, ``proposal_utils.py``).

Static shapes throughout: each image gets exactly ``post_nms_topk`` proposal slots (fewer when the
pyramid has fewer candidates) with a ``valid`` mask; the valid slots come first, in detectron2's
order (decreasing objectness).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers.models import box_ops
from detlayers.nms import batched_nms
from detlayers.wrappers import Conv2d

Array = jax.Array


class StandardRPNHead(nn.Module):
    """``conv`` 3x3 + ReLU shared by all levels, then 1x1 ``objectness_logits`` (A channels) and
    ``anchor_deltas`` (A*4). Returns per level ``logits [N, H*W*A]`` and ``deltas [N, H*W*A, 4]``
    in detectron2's (y, x, anchor) order."""

    in_channels: int
    num_anchors: int
    box_dim: int = 4

    @nn.compact
    def __call__(self, features: Sequence[Array]) -> tuple[list[Array], list[Array]]:
        conv = Conv2d(self.in_channels, self.in_channels, 3, padding=1, activation=jax.nn.relu, name="conv")
        objectness = Conv2d(self.in_channels, self.num_anchors, 1, name="objectness_logits")
        deltas = Conv2d(self.in_channels, self.num_anchors * self.box_dim, 1, name="anchor_deltas")
        logits_out, deltas_out = [], []
        for x in features:
            t = conv(x)
            n = x.shape[0]
            logits_out.append(objectness(t).reshape(n, -1))
            deltas_out.append(deltas(t).reshape(n, -1, self.box_dim))
        return logits_out, deltas_out


def find_top_rpn_proposals(
    anchors: Sequence[np.ndarray],
    deltas: Sequence[Array],
    logits: Sequence[Array],
    image_hw: Array,
    *,
    box_reg_weights: Sequence[float],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> tuple[Array, Array, Array]:
    """detectron2's ``find_top_rpn_proposals`` (inference), batched with static shapes.

    Args:
      anchors: per level ``float32[Hi*Wi*A, 4]`` (:func:`detlayers.models.box_ops.grid_anchors`).
      deltas: per level ``[N, Hi*Wi*A, 4]``; logits: per level ``[N, Hi*Wi*A]``.
      image_hw: ``int32[N, 2]`` image sizes before padding (boxes are clipped to them).

    Returns:
      ``boxes float32[N, P, 4]``, ``logits float32[N, P]``, ``valid bool[N, P]`` with
      ``P = min(post_nms_topk, sum_i min(Hi*Wi*A, pre_nms_topk))``. Per level the
      ``pre_nms_topk`` best logits are decoded; per image non-finite and empty boxes (after
      clipping, ``min_box_size``) are dropped, then NMS per level at ``nms_thresh``.
    """
    top_boxes, top_logits, level_ids = [], [], []
    for level, (anchors_i, deltas_i, logits_i) in enumerate(zip(anchors, deltas, logits)):
        k = min(int(logits_i.shape[1]), pre_nms_topk)
        scores_i, index = lax.top_k(logits_i.astype(jnp.float32), k)
        picked_deltas = jnp.take_along_axis(deltas_i.astype(jnp.float32), index[..., None], axis=1)
        picked_anchors = jnp.take(jnp.asarray(anchors_i), index, axis=0)
        top_boxes.append(box_ops.apply_deltas(picked_deltas, picked_anchors, box_reg_weights))
        top_logits.append(scores_i)
        level_ids.append(np.full((k,), level, np.int32))
    boxes = jnp.concatenate(top_boxes, axis=1)
    scores = jnp.concatenate(top_logits, axis=1)
    levels = jnp.asarray(np.concatenate(level_ids))
    num_out = min(post_nms_topk, int(boxes.shape[1]))

    def per_image(boxes_n: Array, scores_n: Array, hw: Array) -> tuple[Array, Array, Array]:
        finite = jnp.all(jnp.isfinite(boxes_n), axis=1) & jnp.isfinite(scores_n)
        boxes_n = box_ops.clip_boxes(boxes_n, hw[0], hw[1])
        keep = finite & box_ops.nonempty(boxes_n, min_box_size)
        # Dropped candidates become empty boxes ranked last: they can neither suppress nor
        # precede a kept one, so the kept prefix is detectron2's.
        masked_scores = jnp.where(keep, scores_n, -jnp.inf)
        masked_boxes = jnp.where(keep[:, None], boxes_n, 0.0)
        result = batched_nms(masked_boxes, masked_scores, levels, nms_thresh, max_output_size=num_out)
        index = jnp.maximum(result.indices, 0)
        valid = (jnp.arange(num_out) < result.count) & keep[index]
        out_boxes = jnp.where(valid[:, None], masked_boxes[index], 0.0)
        out_scores = jnp.where(valid, scores_n[index], -jnp.inf)
        return out_boxes, out_scores, valid

    return jax.vmap(per_image)(boxes, scores, image_hw)


class RPN(nn.Module):
    """detectron2's ``RPN`` at inference: head (``rpn_head``), anchors, proposal selection.

    ``__call__(features: list of [N, Hi, Wi, C] (p2..p6), image_hw int32[N, 2])`` returns
    ``(boxes [N, P, 4], logits [N, P], valid [N, P])`` (see :func:`find_top_rpn_proposals`).
    """

    in_channels: int
    strides: Sequence[int]
    anchor_sizes: Sequence[Sequence[float]]
    aspect_ratios: Sequence[Sequence[float]]
    anchor_offset: float = 0.0
    box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    nms_thresh: float = 0.7
    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    min_box_size: float = 0.0

    def _per_level(self, values: Sequence, name: str) -> list:
        values = list(values)
        if len(values) == 1:
            values = values * len(self.strides)
        if len(values) != len(self.strides):
            raise ValueError(f"RPN: {name} needs 1 or {len(self.strides)} entries, got {len(values)}")
        return values

    @nn.compact
    def __call__(self, features: Sequence[Array], image_hw: Array) -> tuple[Array, Array, Array]:
        sizes = self._per_level(self.anchor_sizes, "ANCHOR_GENERATOR.SIZES")
        ratios = self._per_level(self.aspect_ratios, "ANCHOR_GENERATOR.ASPECT_RATIOS")
        num_anchors = {len(s) * len(r) for s, r in zip(sizes, ratios)}
        if len(num_anchors) != 1:
            raise ValueError("RPN: every level must have the same number of anchors (StandardRPNHead)")
        head = StandardRPNHead(self.in_channels, num_anchors.pop(), name="rpn_head")
        logits, deltas = head(features)
        anchors = [
            box_ops.grid_anchors((int(f.shape[1]), int(f.shape[2])), stride, s, r, self.anchor_offset)
            for f, stride, s, r in zip(features, self.strides, sizes, ratios)
        ]
        return find_top_rpn_proposals(
            anchors, deltas, logits, image_hw,
            box_reg_weights=self.box_reg_weights, nms_thresh=self.nms_thresh,
            pre_nms_topk=self.pre_nms_topk, post_nms_topk=self.post_nms_topk, min_box_size=self.min_box_size,
        )
