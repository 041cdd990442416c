"""detectron2's RPN at inference (``modeling/proposal_generator/rpn.py``, ``proposal_utils.py``).

Static shapes throughout: each image gets exactly ``post_nms_topk`` proposal slots (fewer when the
pyramid has fewer candidates) with a ``valid`` mask; the valid slots come first, in detectron2's
order (decreasing objectness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers.boxes import clip_boxes, nonempty
from detlayers.models.anchor_generator import DefaultAnchorGenerator, build_anchor_generator
from detlayers.models.box_regression import Box2BoxTransform
from detlayers.models.registry import PROPOSAL_GENERATOR_REGISTRY, RPN_HEAD_REGISTRY, build_from_registry
from detlayers.nms import batched_nms
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["StandardRPNHead", "RPN", "find_top_rpn_proposals", "build_rpn_head"]


@RPN_HEAD_REGISTRY.register()
class StandardRPNHead(nn.Module):
    """``conv`` 3x3 + ReLU shared by all levels, then 1x1 ``objectness_logits`` (A channels) and
    ``anchor_deltas`` (A*4). Returns per level ``logits [N, H*W*A]`` and ``deltas [N, H*W*A, 4]``
    in detectron2's (y, x, anchor) order."""

    in_channels: int
    num_anchors: int
    box_dim: int = 4

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> StandardRPNHead:
        """Input channels from ``input_shape`` (equal on every level), anchors per location from
        the anchor generator (equal on every level); ``MODEL.RPN.CONV_DIMS`` must be ``[-1]``."""
        if tuple(cfg.MODEL.RPN.CONV_DIMS) != (-1,):
            raise ValueError("StandardRPNHead: MODEL.RPN.CONV_DIMS must be [-1] (one conv of the input width)")
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"StandardRPNHead: every input level must have the same channels, got {channels}")
        num_anchors = set(build_anchor_generator(cfg, input_shape).num_anchors)
        if len(num_anchors) != 1:
            raise ValueError("StandardRPNHead: every level must have the same number of anchors "
                             "(MODEL.ANCHOR_GENERATOR.SIZES x ASPECT_RATIOS)")
        return cls(in_channels=channels.pop(), num_anchors=num_anchors.pop())

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
    box2box_transform: Box2BoxTransform,
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> tuple[Array, Array, Array]:
    """detectron2's ``find_top_rpn_proposals`` (inference), batched with static shapes.

    Args:
      anchors: per level ``float32[Hi*Wi*A, 4]`` (:class:`detlayers.models.anchor_generator.DefaultAnchorGenerator`).
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
        top_boxes.append(box2box_transform.apply_deltas(picked_deltas, picked_anchors))
        top_logits.append(scores_i)
        level_ids.append(np.full((k,), level, np.int32))
    boxes = jnp.concatenate(top_boxes, axis=1)
    scores = jnp.concatenate(top_logits, axis=1)
    levels = jnp.asarray(np.concatenate(level_ids))
    num_out = min(post_nms_topk, int(boxes.shape[1]))

    def per_image(boxes_n: Array, scores_n: Array, hw: Array) -> tuple[Array, Array, Array]:
        finite = jnp.all(jnp.isfinite(boxes_n), axis=1) & jnp.isfinite(scores_n)
        boxes_n = clip_boxes(boxes_n, hw[0], hw[1])
        keep = finite & nonempty(boxes_n, min_box_size)
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


@PROPOSAL_GENERATOR_REGISTRY.register()
class RPN(nn.Module):
    """detectron2's ``RPN`` at inference: ``rpn_head``, anchors, proposal selection.

    Fields: ``in_features`` (the feature maps used, e.g. ``("p2", ..., "p6")``), ``rpn_head``
    (a Flax module: features -> per-level logits and deltas), ``anchor_generator``,
    ``box2box_transform``, and the test-time selection: ``pre_nms_topk`` (per level),
    ``post_nms_topk`` (per image), ``nms_thresh``, ``min_box_size``.

    ``__call__(features {name: [N, Hi, Wi, C]}, image_hw int32[N, 2])`` returns
    ``(boxes [N, P, 4], logits [N, P], valid [N, P])`` (see :func:`find_top_rpn_proposals`).
    """

    in_features: Sequence[str]
    rpn_head: nn.Module
    anchor_generator: DefaultAnchorGenerator
    box2box_transform: Box2BoxTransform
    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    nms_thresh: float = 0.7
    min_box_size: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> RPN:
        """``MODEL.RPN.*`` (test-time top-k and NMS), ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE``, the head
        ``MODEL.RPN.HEAD_NAME`` and the anchor generator, over ``MODEL.RPN.IN_FEATURES``."""
        rpn = cfg.MODEL.RPN
        in_features = tuple(rpn.IN_FEATURES)
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(f"RPN: MODEL.RPN.IN_FEATURES {missing} are not backbone outputs {list(input_shape)}")
        for key in ("PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
            if getattr(rpn, key) <= 0:
                raise ValueError(f"RPN: MODEL.RPN.{key} must be positive (proposals kept per "
                                 f"{'level' if key.startswith('PRE') else 'image'}), got {getattr(rpn, key)}")
        shapes = [input_shape[name] for name in in_features]
        return cls(
            in_features=in_features, rpn_head=build_rpn_head(cfg, shapes),
            anchor_generator=build_anchor_generator(cfg, shapes),
            box2box_transform=Box2BoxTransform(weights=tuple(rpn.BBOX_REG_WEIGHTS)),
            pre_nms_topk=rpn.PRE_NMS_TOPK_TEST, post_nms_topk=rpn.POST_NMS_TOPK_TEST, nms_thresh=rpn.NMS_THRESH,
            min_box_size=float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE),
        )

    @nn.compact
    def __call__(self, features: Mapping[str, Array], image_hw: Array) -> tuple[Array, Array, Array]:
        maps = [features[name] for name in self.in_features]
        logits, deltas = self.rpn_head(maps)
        anchors = self.anchor_generator([(int(f.shape[1]), int(f.shape[2])) for f in maps])
        return find_top_rpn_proposals(
            anchors, deltas, logits, image_hw,
            box2box_transform=self.box2box_transform, nms_thresh=self.nms_thresh,
            pre_nms_topk=self.pre_nms_topk, post_nms_topk=self.post_nms_topk, min_box_size=self.min_box_size,
        )


def build_rpn_head(cfg: Any, input_shape: Sequence[ShapeSpec]) -> nn.Module:
    """The RPN head ``MODEL.RPN.HEAD_NAME`` names (detectron2's ``build_rpn_head``)."""
    return build_from_registry(RPN_HEAD_REGISTRY, cfg.MODEL.RPN.HEAD_NAME, cfg, input_shape)
