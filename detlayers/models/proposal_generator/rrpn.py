"""detectron2's rotated RPN (``modeling/proposal_generator/rrpn.py``): proposals as rotated boxes
``(x_center, y_center, width, height, angle_degrees)``, at inference.

As :mod:`detlayers.models.proposal_generator.rpn`, with static shapes: each image gets exactly
``post_nms_topk`` proposal slots (fewer when the pyramid has fewer candidates) with a ``valid``
mask, the valid slots first in detectron2's order (decreasing objectness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn  # noqa: F401 - names in the annotations of RPN's fields (the API docs resolve them here)
import jax
import numpy as np

from detlayers.boxes import clip_rotated_boxes, nonempty_rotated
from detlayers.models.anchor_generator import DefaultAnchorGenerator  # noqa: F401 - as nn above
from detlayers.models.box_regression import Box2BoxTransform, Box2BoxTransformRotated  # noqa: F401 - as nn
from detlayers.models.matcher import Matcher  # noqa: F401 - as nn above
from detlayers.models.proposal_generator.rpn import RPN, find_top_rpn_proposals
from detlayers.models.registry import PROPOSAL_GENERATOR_REGISTRY
from detlayers.nms import batched_nms_rotated
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["RRPN", "find_top_rrpn_proposals"]


def find_top_rrpn_proposals(
    anchors: Sequence[np.ndarray],
    deltas: Sequence[Array],
    logits: Sequence[Array],
    image_hw: Array,
    *,
    box2box_transform: Box2BoxTransformRotated,
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> tuple[Array, Array, Array]:
    """detectron2's ``find_top_rrpn_proposals`` (inference), batched with static shapes.

    Args:
      anchors: per level ``float32[Hi*Wi*A, 5]`` rotated anchors
        (:class:`detlayers.models.anchor_generator.RotatedAnchorGenerator`).
      deltas: per level ``[N, Hi*Wi*A, 5]``; logits: per level ``[N, Hi*Wi*A]``.
      image_hw: ``int32[N, 2]`` image sizes before padding.

    Returns:
      ``boxes float32[N, P, 5]``, ``logits float32[N, P]``, ``valid bool[N, P]`` with
      ``P = min(post_nms_topk, sum_i min(Hi*Wi*A, pre_nms_topk))``. Per level the
      ``pre_nms_topk`` best logits are decoded (angles wrapped into ``[-180, 180)``); per image
      non-finite candidates are dropped, nearly horizontal boxes (``|angle| <= 1`` degree) are
      clipped to the image (``RotatedBoxes.clip``; the others are left as they are), boxes with a
      side ``<= min_box_size`` are dropped, then rotated NMS per level at ``nms_thresh``.
    """
    return find_top_rpn_proposals(
        anchors, deltas, logits, image_hw, box2box_transform=box2box_transform, nms_thresh=nms_thresh,
        pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk, min_box_size=min_box_size,
        clip=clip_rotated_boxes, is_nonempty=nonempty_rotated, nms=batched_nms_rotated,
    )


@PROPOSAL_GENERATOR_REGISTRY.register()
class RRPN(RPN):
    """detectron2's ``RRPN``: the :class:`detlayers.models.proposal_generator.rpn.RPN` head over rotated anchors
    (:class:`detlayers.models.anchor_generator.RotatedAnchorGenerator`, 5 deltas an anchor),
    decoded with ``Box2BoxTransformRotated`` and selected by :func:`find_top_rrpn_proposals`.

    ``__call__(features {name: [N, Hi, Wi, C]}, image_hw int32[N, 2])`` returns
    ``(boxes [N, P, 5], logits [N, P], valid [N, P])``. Inference only: training (detectron2's
    rotated anchor matching and losses) raises ``NotImplementedError``.
    """

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> RRPN:
        """As :meth:`detlayers.models.proposal_generator.rpn.RPN.from_config`, with
        ``Box2BoxTransformRotated(MODEL.RPN.BBOX_REG_WEIGHTS)`` (5 weights) and a rotated anchor
        generator (``MODEL.ANCHOR_GENERATOR.NAME`` ``"RotatedAnchorGenerator"``)."""
        weights = tuple(cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
        if len(weights) != 5:
            raise ValueError(f"RRPN: MODEL.RPN.BBOX_REG_WEIGHTS must hold 5 weights (dx, dy, dw, dh, da), "
                             f"got {weights}")
        fields = cls.fields_from_config(cfg, input_shape)
        if getattr(fields["anchor_generator"], "box_dim", 4) != 5:
            raise ValueError(f"RRPN: MODEL.ANCHOR_GENERATOR.NAME {cfg.MODEL.ANCHOR_GENERATOR.NAME!r} does not give "
                             "rotated anchors (use 'RotatedAnchorGenerator')")
        return cls(box2box_transform=Box2BoxTransformRotated(weights=weights), **fields)

    def __call__(
        self,
        features: Mapping[str, Array],
        image_hw: Array,
        gt_boxes: Array | None = None,
        gt_valid: Array | None = None,
        priorities: Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[Array, Array, Array]:
        if train or gt_boxes is not None:
            raise NotImplementedError("RRPN: training is not supported (inference only); train a rotated "
                                      "Faster R-CNN with detectron2 and load its checkpoint")
        maps = [features[name] for name in self.in_features]
        logits, deltas = self.rpn_head(maps)
        anchors = self.anchor_generator([(int(f.shape[1]), int(f.shape[2])) for f in maps])
        return find_top_rrpn_proposals(
            anchors, deltas, logits, image_hw,
            box2box_transform=self.box2box_transform, nms_thresh=self.nms_thresh,
            pre_nms_topk=self.pre_nms_topk, post_nms_topk=self.post_nms_topk, min_box_size=self.min_box_size,
        )
