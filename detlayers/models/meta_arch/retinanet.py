"""detectron2's ``RetinaNet`` and ``RetinaNetHead`` (``modeling/meta_arch/retinanet.py``) at
inference, NHWC, static shapes.

The submodule names are detectron2's (``backbone.bottom_up...``, ``backbone.top_block.p6``,
``head.cls_subnet.0``, ``head.cls_score``...), so a detectron2 checkpoint loads one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.batch_norm import get_norm
from detlayers.models.anchor_generator import DefaultAnchorGenerator, build_anchor_generator, head_input_geometry
from detlayers.models.backbone.build import build_backbone
from detlayers.models.box_regression import Box2BoxTransform
from detlayers.models.meta_arch.dense_detector import decode_multi_level_predictions
from detlayers.models.postprocessing import detector_postprocess
from detlayers.models.registry import META_ARCH_REGISTRY
from detlayers.nms import batched_nms
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["RetinaNet", "RetinaNetHead", "retinanet_inference"]

_normal_001 = nn.initializers.normal(stddev=0.01)
# detectron2's CycleBatchNormList (one BatchNorm per level, cycled) backs these in RetinaNetHead;
# the shared norms of get_norm back every other name.
_PER_LEVEL_NORMS = ("BN", "SyncBN")


class RetinaNetHead(nn.Module):
    """Two towers of ``len(conv_dims)`` 3x3 conv (+ ``norm``) + ReLU, shared by all levels: the
    class tower ends in ``cls_score`` (``num_anchors * num_classes`` logits), the box tower in
    ``bbox_pred`` (``num_anchors * 4`` deltas).

    ``__call__(features: list of [N, Hi, Wi, in_channels]) -> (logits, deltas)``: per level
    ``logits [N, Hi*Wi*A, K]`` and ``deltas [N, Hi*Wi*A, 4]`` in detectron2's (y, x, anchor) order
    (its ``permute_to_N_HWA_K``). Module names follow detectron2's ``nn.Sequential`` indices:
    ``cls_subnet_0`` (conv), ``cls_subnet_1`` (norm, if any), then the next conv. The init is
    detectron2's: every conv normal(0, 0.01) with bias 0, the ``cls_score`` bias
    ``-log((1 - prior_prob) / prior_prob)``.
    """

    in_channels: int
    num_classes: int
    num_anchors: int
    conv_dims: Sequence[int]
    norm: str = ""
    prior_prob: float = 0.01

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> RetinaNetHead:
        """``MODEL.RETINANET.{NUM_CLASSES, NUM_CONVS, NORM, PRIOR_PROB}`` over the levels
        ``input_shape`` (equal channels), anchors per location from the anchor generator."""
        retina = cfg.MODEL.RETINANET
        width, num_anchors = head_input_geometry(cfg, input_shape, "RetinaNetHead")
        if retina.NORM in _PER_LEVEL_NORMS:
            raise ValueError(f"RetinaNetHead: MODEL.RETINANET.NORM {retina.NORM!r} (detectron2's per-level "
                             "CycleBatchNormList) is not supported; use '', 'GN' or a shared norm")
        if retina.NUM_CONVS < 0:
            raise ValueError(f"RetinaNetHead: MODEL.RETINANET.NUM_CONVS must be >= 0, got {retina.NUM_CONVS}")
        return cls(in_channels=width, num_classes=retina.NUM_CLASSES, num_anchors=num_anchors,
                   conv_dims=(width,) * retina.NUM_CONVS, norm=retina.NORM, prior_prob=retina.PRIOR_PROB)

    def _tower(self, prefix: str) -> list[tuple[nn.Module, nn.Module | None]]:
        """``(conv, norm or None)`` per tower layer, named by detectron2's Sequential indices."""
        layers = []
        index = 0
        widths = [self.in_channels, *self.conv_dims]
        for in_channels, out_channels in zip(widths, widths[1:]):
            conv = Conv2d(in_channels, out_channels, 3, padding=1, kernel_init=_normal_001,
                          bias_init=nn.initializers.zeros, name=f"{prefix}_{index}")
            norm = get_norm(self.norm, out_channels, name=f"{prefix}_{index + 1}") if self.norm else None
            layers.append((conv, norm))
            index += 3 if self.norm else 2  # conv, [norm,] ReLU: detectron2's ReLU takes an index too
        return layers

    @nn.compact
    def __call__(self, features: Sequence[Array]) -> tuple[list[Array], list[Array]]:
        last = self.conv_dims[-1] if self.conv_dims else self.in_channels
        cls_tower, box_tower = self._tower("cls_subnet"), self._tower("bbox_subnet")
        bias_value = -math.log((1 - self.prior_prob) / self.prior_prob)
        cls_score = Conv2d(last, self.num_anchors * self.num_classes, 3, padding=1, kernel_init=_normal_001,
                           bias_init=nn.initializers.constant(bias_value), name="cls_score")
        bbox_pred = Conv2d(last, self.num_anchors * 4, 3, padding=1, kernel_init=_normal_001,
                           bias_init=nn.initializers.zeros, name="bbox_pred")
        logits, deltas = [], []
        for x in features:
            if x.shape[-1] != self.in_channels:
                raise ValueError(f"RetinaNetHead: features must have {self.in_channels} channels, got shape {x.shape}")
            n = x.shape[0]
            logits.append(cls_score(_run_tower(cls_tower, x)).reshape(n, -1, self.num_classes))
            deltas.append(bbox_pred(_run_tower(box_tower, x)).reshape(n, -1, 4))
        return logits, deltas


def _run_tower(layers: Sequence[tuple[nn.Module, nn.Module | None]], x: Array) -> Array:
    for conv, norm in layers:
        x = conv(x)
        if norm is not None:
            x = norm(x)
        x = jax.nn.relu(x)
    return x


def retinanet_inference(
    anchors: Sequence[Any],
    logits: Sequence[Array],
    deltas: Sequence[Array],
    *,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    max_detections: int,
) -> dict[str, Array]:
    """detectron2's ``RetinaNet.forward_inference``, batched with static shapes.

    Per level: sigmoid class probabilities, the ``topk_candidates`` best (anchor, class) pairs
    above ``score_thresh``, their boxes decoded from the anchors (not clipped, as detectron2);
    per image: NMS per class at ``nms_thresh`` over all levels, the best ``max_detections`` kept.

    Args:
      anchors: per level ``float32[Mi, 4]``; logits: per level ``[N, Mi, K]``; deltas: ``[N, Mi, 4]``.

    Returns ``boxes [N, D, 4]``, ``scores [N, D]``, ``classes int32[N, D]`` (-1 when invalid),
    ``valid bool[N, D]`` with ``D = min(max_detections, candidates)``: valid slots first, by
    decreasing score.
    """
    probs = [jax.nn.sigmoid(x.astype(jnp.float32)) for x in logits]
    boxes, scores, classes, valid = decode_multi_level_predictions(
        anchors, probs, deltas, box2box_transform=box2box_transform, score_thresh=score_thresh,
        topk_candidates=topk_candidates,
    )
    num_out = min(int(max_detections), int(boxes.shape[1]))

    def per_image(boxes_n: Array, scores_n: Array, classes_n: Array, valid_n: Array) -> tuple[Array, ...]:
        # Invalid candidates become empty boxes ranked last: they neither suppress nor precede a
        # valid one, so the valid prefix is detectron2's.
        masked_boxes = jnp.where(valid_n[:, None], boxes_n, 0.0)
        masked_scores = jnp.where(valid_n, scores_n, -jnp.inf)
        result = batched_nms(masked_boxes, masked_scores, classes_n, nms_thresh, max_output_size=num_out)
        index = jnp.maximum(result.indices, 0)
        keep = (jnp.arange(num_out) < result.count) & valid_n[index]
        return (jnp.where(keep[:, None], boxes_n[index], 0.0), jnp.where(keep, scores_n[index], 0.0),
                jnp.where(keep, classes_n[index], -1), keep)

    out_boxes, out_scores, out_classes, out_valid = jax.vmap(per_image)(boxes, scores, classes, valid)
    return {"boxes": out_boxes, "scores": out_scores, "classes": out_classes, "valid": out_valid}


@META_ARCH_REGISTRY.register()
class RetinaNet(nn.Module):
    """detectron2's ``RetinaNet`` at inference, NHWC, static shapes.

    Fields: ``backbone`` (``{name: [N, Hi, Wi, C]}``), ``head`` (:class:`RetinaNetHead`) over the
    maps ``head_in_features``, ``anchor_generator``, ``box2box_transform``, ``num_classes`` and
    the test-time selection (``test_score_thresh``, ``test_topk_candidates`` per level,
    ``test_nms_thresh``, ``max_detections_per_image``); ``pixel_mean``/``pixel_std`` as
    :class:`detlayers.models.GeneralizedRCNN` (the host normalises).

    ``__call__(images, image_hw, output_hw, *, canvas_hw=None, return_intermediates=False)``: the
    arguments of ``GeneralizedRCNN`` (``canvas_hw`` is accepted and unused: no masks). Returns
    ``pred_boxes [N, D, 4]`` (original-image pixels, clipped), ``scores [N, D]``,
    ``pred_classes int32[N, D]``, ``valid bool[N, D]`` (valid slots first, by decreasing score;
    boxes empty after clipping dropped, as detectron2's ``detector_postprocess``),
    ``num_instances int32[N]``; with ``return_intermediates`` also the backbone maps ``p3``...
    """

    backbone: nn.Module
    head: nn.Module
    head_in_features: Sequence[str]
    anchor_generator: DefaultAnchorGenerator
    box2box_transform: Box2BoxTransform
    num_classes: int
    test_score_thresh: float = 0.05
    test_topk_candidates: int = 1000
    test_nms_thresh: float = 0.5
    max_detections_per_image: int = 100
    pixel_mean: Sequence[float] = (103.530, 116.280, 123.675)
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, cfg: Any) -> RetinaNet:
        """The backbone ``MODEL.BACKBONE.NAME``, :class:`RetinaNetHead` and the anchor generator over
        ``MODEL.RETINANET.IN_FEATURES``, ``Box2BoxTransform(MODEL.RETINANET.BBOX_REG_WEIGHTS)``, the
        ``MODEL.RETINANET`` test keys, ``TEST.DETECTIONS_PER_IMAGE``, ``MODEL.PIXEL_MEAN``/``STD``."""
        model, retina = cfg.MODEL, cfg.MODEL.RETINANET
        if len(model.PIXEL_MEAN) != len(model.PIXEL_STD):
            raise ValueError(f"RetinaNet: MODEL.PIXEL_MEAN {model.PIXEL_MEAN} and MODEL.PIXEL_STD "
                             f"{model.PIXEL_STD} differ in length")
        if not 0.0 <= retina.NMS_THRESH_TEST <= 1.0:
            raise ValueError("RetinaNet: MODEL.RETINANET.NMS_THRESH_TEST must be in [0, 1], "
                             f"got {retina.NMS_THRESH_TEST}")
        if retina.TOPK_CANDIDATES_TEST < 1:
            raise ValueError("RetinaNet: MODEL.RETINANET.TOPK_CANDIDATES_TEST must be >= 1, "
                             f"got {retina.TOPK_CANDIDATES_TEST}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = tuple(retina.IN_FEATURES)
        missing = [name for name in in_features if name not in shapes]
        if missing:
            raise ValueError(f"RetinaNet: MODEL.RETINANET.IN_FEATURES {missing} are not backbone outputs "
                             f"{list(shapes)}")
        feature_shapes = [shapes[name] for name in in_features]
        return cls(
            backbone=backbone, head=RetinaNetHead.from_config(cfg, feature_shapes), head_in_features=in_features,
            anchor_generator=build_anchor_generator(cfg, feature_shapes),
            box2box_transform=Box2BoxTransform(weights=tuple(retina.BBOX_REG_WEIGHTS)),
            num_classes=retina.NUM_CLASSES, test_score_thresh=retina.SCORE_THRESH_TEST,
            test_topk_candidates=retina.TOPK_CANDIDATES_TEST, test_nms_thresh=retina.NMS_THRESH_TEST,
            max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            pixel_mean=tuple(float(v) for v in model.PIXEL_MEAN), pixel_std=tuple(float(v) for v in model.PIXEL_STD),
        )

    def __call__(
        self,
        images: Array,
        image_hw: Array,
        output_hw: Array,
        *,
        canvas_hw: tuple[int, int] | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Array]:
        if images.ndim != 4 or images.shape[-1] != len(self.pixel_mean):
            raise ValueError(f"RetinaNet: images must be [N, H, W, {len(self.pixel_mean)}], got shape {images.shape}")
        n = images.shape[0]
        for name, value in (("image_hw", image_hw), ("output_hw", output_hw)):
            if tuple(value.shape) != (n, 2):
                raise ValueError(f"RetinaNet: {name} must be [N, 2] = [{n}, 2], got shape {value.shape}")
        features = self.backbone(images)
        maps = [features[name] for name in self.head_in_features]
        logits, deltas = self.head(maps)
        anchors = self.anchor_generator([(int(f.shape[1]), int(f.shape[2])) for f in maps])
        det = retinanet_inference(
            anchors, logits, deltas, box2box_transform=self.box2box_transform, score_thresh=self.test_score_thresh,
            topk_candidates=self.test_topk_candidates, nms_thresh=self.test_nms_thresh,
            max_detections=self.max_detections_per_image,
        )
        out = detector_postprocess(det, image_hw.astype(jnp.int32), output_hw.astype(jnp.int32), None)
        if return_intermediates:
            out.update(features)
        return out
