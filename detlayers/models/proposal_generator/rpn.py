"""detectron2's RPN (``modeling/proposal_generator/rpn.py``, ``proposal_utils.py``): proposals and,
in training, its anchor labels and losses.

Static shapes throughout: each image gets exactly ``post_nms_topk`` proposal slots (fewer when the
pyramid has fewer candidates) with a ``valid`` mask; the valid slots come first, in detectron2's
order (decreasing objectness).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers.boxes import clip_boxes, nonempty, pairwise_iou
from detlayers.models.anchor_generator import DefaultAnchorGenerator, build_anchor_generator, head_input_geometry
from detlayers.models.box_regression import Box2BoxTransform, smooth_l1_loss
from detlayers.models.matcher import Matcher
from detlayers.models.registry import PROPOSAL_GENERATOR_REGISTRY, RPN_HEAD_REGISTRY, build_from_registry
from detlayers.models.sampling import subsample_labels
from detlayers.nms import batched_nms
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["StandardRPNHead", "RPN", "find_top_rpn_proposals", "rpn_losses", "build_rpn_head"]


@RPN_HEAD_REGISTRY.register()
class StandardRPNHead(nn.Module):
    """``conv`` 3x3 + ReLU shared by all levels, then 1x1 ``objectness_logits`` (A channels) and
    ``anchor_deltas`` (A*box_dim: 4, or 5 over rotated anchors). Returns per level
    ``logits [N, H*W*A]`` and ``deltas [N, H*W*A, box_dim]`` in detectron2's (y, x, anchor) order."""

    in_channels: int
    num_anchors: int
    box_dim: int = 4

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> StandardRPNHead:
        """Input channels from ``input_shape`` (equal on every level), anchors per location from
        the anchor generator (equal on every level); ``MODEL.RPN.CONV_DIMS`` must be ``[-1]``."""
        if tuple(cfg.MODEL.RPN.CONV_DIMS) != (-1,):
            raise ValueError("StandardRPNHead: MODEL.RPN.CONV_DIMS must be [-1] (one conv of the input width)")
        channels, num_anchors = head_input_geometry(cfg, input_shape, "StandardRPNHead")
        # 4 deltas an anchor, 5 for rotated anchors (detectron2 reads the generator's box_dim)
        box_dim = getattr(build_anchor_generator(cfg, input_shape), "box_dim", 4)
        return cls(in_channels=channels, num_anchors=num_anchors, box_dim=box_dim)

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
    clip: Callable[[Array, Array, Array], Array] = clip_boxes,
    is_nonempty: Callable[[Array, float], Array] = nonempty,
    nms: Callable[..., Any] = batched_nms,
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

    ``clip(boxes, height, width)``, ``is_nonempty(boxes, min_size)`` and ``nms`` (``batched_nms``'s
    arguments) are the box kind's operations: the axis-aligned ones by default, the rotated ones
    for :func:`detlayers.models.proposal_generator.rrpn.find_top_rrpn_proposals`.
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
        # (non-finite boxes are dropped below; zeroed first so no clip sees them)
        boxes_n = clip(jnp.where(finite[:, None], boxes_n, 0.0), hw[0], hw[1])
        keep = finite & is_nonempty(boxes_n, min_box_size)
        # Dropped candidates become empty boxes ranked last: they can neither suppress nor
        # precede a kept one, so the kept prefix is detectron2's.
        masked_scores = jnp.where(keep, scores_n, -jnp.inf)
        masked_boxes = jnp.where(keep[:, None], boxes_n, 0.0)
        result = nms(masked_boxes, masked_scores, levels, nms_thresh, max_output_size=num_out)
        index = jnp.maximum(result.indices, 0)
        valid = (jnp.arange(num_out) < result.count) & keep[index]
        out_boxes = jnp.where(valid[:, None], masked_boxes[index], 0.0)
        out_scores = jnp.where(valid, scores_n[index], -jnp.inf)
        return out_boxes, out_scores, valid

    return jax.vmap(per_image)(boxes, scores, image_hw)


def rpn_losses(
    anchors: Array,
    logits: Array,
    deltas: Array,
    gt_boxes: Array,
    gt_valid: Array,
    priorities: Array,
    *,
    matcher: Matcher,
    box2box_transform: Box2BoxTransform,
    batch_size_per_image: int,
    positive_fraction: float,
    smooth_l1_beta: float,
) -> dict[str, Array]:
    """detectron2's ``RPN.label_and_sample_anchors`` and ``RPN.losses`` (smooth-L1 box loss).

    Args:
      anchors: ``float32[A, 4]``, every level's anchors concatenated (detectron2's ``Boxes.cat``).
      logits: ``[N, A]``; deltas: ``[N, A, 4]`` (the head's outputs, levels concatenated).
      gt_boxes: ``[N, G, 4]``; gt_valid: ``bool[N, G]`` (padding rows are False).
      priorities: ``float[N, A]``: the sampler keeps the labelled anchors with the highest ones
        (:func:`detlayers.models.sampling.subsample_labels`).

    Returns ``loss_rpn_cls`` (binary cross-entropy with logits summed over the sampled anchors) and
    ``loss_rpn_loc`` (smooth L1 of the deltas to the matched ground truth, summed over the sampled
    positives), both divided by ``batch_size_per_image * N``; unweighted.
    """
    n, a = logits.shape
    if deltas.shape != (n, a, 4) or anchors.shape != (a, 4) or priorities.shape != (n, a):
        raise ValueError(f"rpn_losses: logits [N, A] = {logits.shape} needs anchors [A, 4], deltas [N, A, 4] and "
                         f"priorities [N, A], got {anchors.shape}, {deltas.shape} and {priorities.shape}")
    if gt_boxes.ndim != 3 or gt_boxes.shape[0] != n or gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(f"rpn_losses: gt_boxes must be [N, G, 4] and gt_valid [N, G] with N = {n}, got "
                         f"{gt_boxes.shape} and {gt_valid.shape}")
    anchors = jnp.asarray(anchors, jnp.float32)

    def per_image(boxes: Array, valid: Array, prio: Array) -> tuple[Array, Array, Array]:
        matches, labels = matcher(pairwise_iou(boxes, anchors), valid)
        positive, negative = subsample_labels(labels, batch_size_per_image, positive_fraction, 0, prio)
        return positive, negative, boxes[matches]

    positive, negative, matched = jax.vmap(per_image)(gt_boxes.astype(jnp.float32), gt_valid, priorities)
    matched = lax.stop_gradient(matched)
    logits = logits.astype(jnp.float32)
    # binary cross-entropy with logits, target 1 on positives and 0 on negatives
    bce = jnp.maximum(logits, 0.0) - logits * positive + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    cls_loss = jnp.sum(jnp.where(positive | negative, bce, 0.0))
    # Only positives' targets count; the others (any matched box, possibly padding) are replaced
    # by 0 so that no NaN reaches the masked gradient.
    targets = box2box_transform.get_deltas(jnp.broadcast_to(anchors, matched.shape), matched)
    targets = jnp.where(positive[..., None], targets, 0.0)
    loc = jnp.sum(smooth_l1_loss(deltas, targets, smooth_l1_beta), axis=-1)
    loc_loss = jnp.sum(jnp.where(positive, loc, 0.0))
    normalizer = batch_size_per_image * n
    return {"loss_rpn_cls": cls_loss / normalizer, "loss_rpn_loc": loc_loss / normalizer}


@PROPOSAL_GENERATOR_REGISTRY.register()
class RPN(nn.Module):
    """detectron2's ``RPN``: ``rpn_head``, anchors, proposal selection and, in training, losses.

    Fields: ``in_features`` (the feature maps used, e.g. ``("p2", ..., "p6")``), ``rpn_head``
    (a Flax module: features -> per-level logits and deltas), ``anchor_generator``,
    ``box2box_transform``, the test-time selection ``pre_nms_topk`` (per level),
    ``post_nms_topk`` (per image), ``nms_thresh``, ``min_box_size``; the training-time selection
    ``pre_nms_topk_train``/``post_nms_topk_train``; and the training targets: ``anchor_matcher``,
    ``batch_size_per_image``, ``positive_fraction``, ``smooth_l1_beta`` and ``loss_weight``
    (``(cls, loc)`` multipliers, detectron2's ``LOSS_WEIGHT`` and ``BBOX_REG_LOSS_WEIGHT * LOSS_WEIGHT``).

    ``__call__(features {name: [N, Hi, Wi, C]}, image_hw int32[N, 2])`` returns
    ``(boxes [N, P, 4], logits [N, P], valid [N, P])`` (see :func:`find_top_rpn_proposals`).
    ``__call__(features, image_hw, gt_boxes [N, G, 4], gt_valid bool[N, G], priorities [N, A],
    train=True)`` returns the training proposals (top-k of the ``*_train`` fields, gradients
    stopped, as detectron2 detaches them) and the loss dict of :func:`rpn_losses`, weighted;
    ``priorities`` hold one value per anchor, levels concatenated in ``in_features`` order.
    """

    in_features: Sequence[str]
    rpn_head: nn.Module
    anchor_generator: DefaultAnchorGenerator
    box2box_transform: Box2BoxTransform
    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    nms_thresh: float = 0.7
    min_box_size: float = 0.0
    pre_nms_topk_train: int = 2000
    post_nms_topk_train: int = 1000
    anchor_matcher: Matcher = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 0.0
    loss_weight: tuple[float, float] = (1.0, 1.0)

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> RPN:
        """``MODEL.RPN.*`` (top-k, NMS, matching, sampling, loss), ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE``,
        the head ``MODEL.RPN.HEAD_NAME`` and the anchor generator, over ``MODEL.RPN.IN_FEATURES``."""
        fields = cls.fields_from_config(cfg, input_shape)
        return cls(box2box_transform=Box2BoxTransform(weights=tuple(cfg.MODEL.RPN.BBOX_REG_WEIGHTS)), **fields)

    @classmethod
    def fields_from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> dict[str, Any]:
        """Every field :meth:`from_config` reads except ``box2box_transform`` (which the rotated
        RPN makes from the same key)."""
        rpn = cfg.MODEL.RPN
        in_features = tuple(rpn.IN_FEATURES)
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(f"RPN: MODEL.RPN.IN_FEATURES {missing} are not backbone outputs {list(input_shape)}")
        for key in ("PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TEST"):
            if getattr(rpn, key) <= 0:
                raise ValueError(f"RPN: MODEL.RPN.{key} must be positive (proposals kept per "
                                 f"{'level' if key.startswith('PRE') else 'image'}), got {getattr(rpn, key)}")
        if rpn.BOUNDARY_THRESH >= 0:
            raise ValueError(f"RPN: MODEL.RPN.BOUNDARY_THRESH {rpn.BOUNDARY_THRESH} is not supported (only -1)")
        if rpn.BBOX_REG_LOSS_TYPE != "smooth_l1":
            raise ValueError(f"RPN: MODEL.RPN.BBOX_REG_LOSS_TYPE {rpn.BBOX_REG_LOSS_TYPE!r} is not supported "
                             "(only 'smooth_l1')")
        shapes = [input_shape[name] for name in in_features]
        return dict(
            in_features=in_features, rpn_head=build_rpn_head(cfg, shapes),
            anchor_generator=build_anchor_generator(cfg, shapes),
            pre_nms_topk=rpn.PRE_NMS_TOPK_TEST, post_nms_topk=rpn.POST_NMS_TOPK_TEST, nms_thresh=rpn.NMS_THRESH,
            min_box_size=float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE),
            pre_nms_topk_train=rpn.PRE_NMS_TOPK_TRAIN, post_nms_topk_train=rpn.POST_NMS_TOPK_TRAIN,
            anchor_matcher=Matcher(rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=True),
            batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE, positive_fraction=rpn.POSITIVE_FRACTION,
            smooth_l1_beta=float(rpn.SMOOTH_L1_BETA),
            loss_weight=(float(rpn.LOSS_WEIGHT), float(rpn.BBOX_REG_LOSS_WEIGHT * rpn.LOSS_WEIGHT)),
        )

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Array],
        image_hw: Array,
        gt_boxes: Array | None = None,
        gt_valid: Array | None = None,
        priorities: Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[Array, Array, Array] | tuple[tuple[Array, Array, Array], dict[str, Array]]:
        maps = [features[name] for name in self.in_features]
        logits, deltas = self.rpn_head(maps)
        anchors = self.anchor_generator([(int(f.shape[1]), int(f.shape[2])) for f in maps])
        pre, post = (self.pre_nms_topk_train, self.post_nms_topk_train) if train else (
            self.pre_nms_topk, self.post_nms_topk)
        select = [lax.stop_gradient(x) for x in deltas], [lax.stop_gradient(x) for x in logits]
        proposals = find_top_rpn_proposals(
            anchors, *select, image_hw,
            box2box_transform=self.box2box_transform, nms_thresh=self.nms_thresh,
            pre_nms_topk=pre, post_nms_topk=post, min_box_size=self.min_box_size,
        )
        if not train:
            return proposals
        if gt_boxes is None or gt_valid is None or priorities is None:
            raise ValueError("RPN: training needs gt_boxes, gt_valid and priorities")
        losses = rpn_losses(
            jnp.asarray(np.concatenate(anchors)), jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1),
            gt_boxes, gt_valid, priorities, matcher=self.anchor_matcher, box2box_transform=self.box2box_transform,
            batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        losses = {"loss_rpn_cls": losses["loss_rpn_cls"] * self.loss_weight[0],
                  "loss_rpn_loc": losses["loss_rpn_loc"] * self.loss_weight[1]}
        return proposals, losses


def build_rpn_head(cfg: Any, input_shape: Sequence[ShapeSpec]) -> nn.Module:
    """The RPN head ``MODEL.RPN.HEAD_NAME`` names (detectron2's ``build_rpn_head``)."""
    return build_from_registry(RPN_HEAD_REGISTRY, cfg.MODEL.RPN.HEAD_NAME, cfg, input_shape)
