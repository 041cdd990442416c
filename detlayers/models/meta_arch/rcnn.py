"""detectron2's ``GeneralizedRCNN`` (``modeling/meta_arch/rcnn.py``): Mask R-CNN / Faster R-CNN as a
backbone, a proposal generator and ROI heads, at inference and in training (the loss dict).

The submodule names are detectron2's (``backbone.bottom_up.res2.0...``,
``proposal_generator.rpn_head...``, ``roi_heads.box_head.fc1``...), so a detectron2 checkpoint
loads one to one (:func:`detlayers.models.checkpoint.load_detectron2_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.backbone.build import build_backbone
from detlayers.models.postprocessing import detector_postprocess
from detlayers.models.proposal_generator.build import build_proposal_generator
from detlayers.models.registry import META_ARCH_REGISTRY
from detlayers.models.roi_heads.roi_heads import build_roi_heads
from detlayers.models.sampling import draw_priorities

Array = jax.Array

__all__ = ["GeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN(nn.Module):
    """detectron2's ``GeneralizedRCNN``, NHWC, static shapes.

    Fields: ``backbone`` (``{name: [N, Hi, Wi, C]}`` feature maps), ``proposal_generator``,
    ``roi_heads`` (Flax modules, see :meth:`from_config`), and ``pixel_mean``/``pixel_std``: the
    normalisation the input images carry. detectron2 normalises inside the model; here the host
    does (:func:`detlayers.models.preprocess_image`), before the zero padding, as detectron2's
    ``ImageList`` pads normalised images.

    ``__call__(images, image_hw, output_hw, *, canvas_hw=None, return_intermediates=False)``:

    * ``images``: ``float32[N, Hp, Wp, 3]`` normalised, padded with 0 as detectron2 pads for the
      backbone (multiples of 32 for an FPN; :func:`detlayers.models.batch_images`); ``image_hw``:
      ``int32[N, 2]`` sizes before padding;
      ``output_hw``: ``int32[N, 2]`` original image sizes (detectron2's ``height``/``width``).
    * ``canvas_hw``: static ``(H, W)`` at least every ``output_hw``; masks are pasted into that
      canvas (crop ``[:h, :w]`` per image). ``None`` skips pasting.

    Returns a dict with ``pred_boxes [N, D, 4]`` (original-image pixels; ``[N, D, 5]`` rotated
    boxes ``(xc, yc, w, h, angle_degrees)`` with ``RRPN``/``RROIHeads``), ``scores [N, D]``,
    ``pred_classes int32[N, D]``, ``valid bool[N, D]`` (valid slots first, by decreasing score),
    ``num_instances int32[N]``, ``mask_probs [N, D, 28, 28]`` and ``pred_masks bool[N, D, H, W]``
    when masks are on (and a canvas is given); with ``return_intermediates`` also the backbone maps
    ``p2``... and ``proposal_boxes``/``proposal_logits``/``proposal_valid`` (input-image pixels).
    """

    backbone: nn.Module
    proposal_generator: nn.Module
    roi_heads: nn.Module
    pixel_mean: Sequence[float] = (103.530, 116.280, 123.675)
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, cfg: Any) -> GeneralizedRCNN:
        """The backbone ``MODEL.BACKBONE.NAME``, the proposal generator
        ``MODEL.PROPOSAL_GENERATOR.NAME`` and the ROI heads ``MODEL.ROI_HEADS.NAME`` over the
        backbone's ``output_shape()``; ``MODEL.PIXEL_MEAN``/``MODEL.PIXEL_STD``."""
        model = cfg.MODEL
        if len(model.PIXEL_MEAN) != len(model.PIXEL_STD):
            raise ValueError(f"GeneralizedRCNN: MODEL.PIXEL_MEAN {model.PIXEL_MEAN} and MODEL.PIXEL_STD "
                             f"{model.PIXEL_STD} differ in length")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return cls(
            backbone=backbone, proposal_generator=build_proposal_generator(cfg, shapes),
            roi_heads=build_roi_heads(cfg, shapes), pixel_mean=tuple(float(v) for v in model.PIXEL_MEAN),
            pixel_std=tuple(float(v) for v in model.PIXEL_STD),
        )

    def __call__(
        self,
        images: Array,
        image_hw: Array,
        *targets: Array,
        train: bool = False,
        canvas_hw: tuple[int, int] | None = None,
        return_intermediates: bool = False,
        sampling_priorities: dict[str, Array] | None = None,
    ) -> dict[str, Array]:
        if images.ndim != 4 or images.shape[-1] != len(self.pixel_mean):
            raise ValueError(f"GeneralizedRCNN: images must be [N, H, W, {len(self.pixel_mean)}], "
                             f"got shape {images.shape}")
        if train:
            if len(targets) != 4:
                raise TypeError("GeneralizedRCNN: training takes (images, image_hw, gt_boxes, gt_classes, gt_masks, "
                                f"gt_valid), got {2 + len(targets)} arguments")
            return self._losses(images, image_hw, *targets, sampling_priorities)
        if len(targets) != 1:
            raise TypeError("GeneralizedRCNN: inference takes (images, image_hw, output_hw), "
                            f"got {2 + len(targets)} arguments")
        (output_hw,) = targets
        n = images.shape[0]
        for name, value in (("image_hw", image_hw), ("output_hw", output_hw)):
            if tuple(value.shape) != (n, 2):
                raise ValueError(f"GeneralizedRCNN: {name} must be [N, 2] = [{n}, 2], got shape {value.shape}")
        image_hw = image_hw.astype(jnp.int32)
        output_hw = output_hw.astype(jnp.int32)
        features = self.backbone(images)
        proposals, proposal_logits, proposal_valid = self.proposal_generator(features, image_hw)
        det = self.roi_heads(features, proposals, proposal_valid, image_hw)
        out = detector_postprocess(det, image_hw, output_hw, canvas_hw)
        if return_intermediates:
            out.update(features)
            out.update(proposal_boxes=proposals, proposal_logits=proposal_logits, proposal_valid=proposal_valid)
        return out

    def _losses(self, images, image_hw, gt_boxes, gt_classes, gt_masks, gt_valid, priorities) -> dict[str, Array]:
        n = images.shape[0]
        g = gt_boxes.shape[1] if gt_boxes.ndim == 3 else -1
        for name, value, shape in (("image_hw", image_hw, (n, 2)), ("gt_boxes", gt_boxes, (n, g, 4)),
                                   ("gt_classes", gt_classes, (n, g)), ("gt_valid", gt_valid, (n, g))):
            if tuple(value.shape) != shape:
                raise ValueError(f"GeneralizedRCNN: {name} must be {list(shape)} (N images, G ground-truth rows), "
                                 f"got shape {value.shape}")
        if gt_masks.ndim != 4 or gt_masks.shape[:2] != (n, g):
            raise ValueError(f"GeneralizedRCNN: gt_masks must be [N, G, H, W] = [{n}, {g}, H, W], "
                             f"got shape {gt_masks.shape}")
        image_hw = image_hw.astype(jnp.int32)
        gt_valid = gt_valid.astype(bool)
        # batch-statistics norms (BN, SyncBN over the mapped axis) train; FrozenBN and GN ignore it
        features = self.backbone(images, train=True)
        rpn_priorities = None if priorities is None else priorities["rpn"]
        if rpn_priorities is None:
            num_anchors = sum(
                int(features[name].shape[1]) * int(features[name].shape[2]) * a
                for name, a in zip(self.proposal_generator.in_features,
                                   self.proposal_generator.anchor_generator.num_anchors)
            )
            rpn_priorities = draw_priorities(self.make_rng("sampling"), (n, num_anchors))
        (proposals, _, proposal_valid), losses = self.proposal_generator(
            features, image_hw, gt_boxes, gt_valid, rpn_priorities, train=True
        )
        roi_priorities = None if priorities is None else priorities["roi_heads"]
        if roi_priorities is None:
            extra = g if self.roi_heads.proposal_append_gt else 0
            roi_priorities = draw_priorities(self.make_rng("sampling"), (n, proposals.shape[1] + extra))
        losses.update(self.roi_heads(features, proposals, proposal_valid, image_hw, gt_boxes, gt_classes, gt_masks,
                                     gt_valid, roi_priorities, train=True))
        return losses
