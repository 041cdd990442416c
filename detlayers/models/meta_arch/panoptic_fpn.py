"""detectron2's ``PanopticFPN`` (``modeling/meta_arch/panoptic_fpn.py``): Mask R-CNN plus the
``SemSegFPNHead`` semantic head, and ``combine_semantic_and_instance_outputs`` (the panoptic
combination of panopticapi), NHWC, static shapes, inference only.

The submodules are ``GeneralizedRCNN``'s plus ``sem_seg_head``, so a detectron2 checkpoint loads
one to one (:func:`detlayers.models.checkpoint.load_detectron2_weights`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence  # noqa: F401 - the API docs resolve the inherited fields' annotations here
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detlayers.models.meta_arch.rcnn import GeneralizedRCNN
from detlayers.models.meta_arch.semantic_seg import build_sem_seg_head
from detlayers.models.postprocessing import sem_seg_postprocess
from detlayers.models.registry import META_ARCH_REGISTRY

Array = jax.Array

__all__ = ["PanopticFPN", "combine_semantic_and_instance_outputs", "segments_info"]

SEGMENT_KEYS = ("segment_id", "segment_category", "segment_isthing", "segment_score", "segment_instance",
                "segment_area")


def _combine_one(masks: Array, scores: Array, classes: Array, valid: Array, semantic: Array, in_image: Array,
                 num_semantic_classes: int, overlap_thresh: float | Array, stuff_area_thresh: float | Array,
                 instances_score_thresh: float | Array) -> dict[str, Array]:
    """:func:`combine_semantic_and_instance_outputs` for one image."""
    d = masks.shape[0]
    slots = d + num_semantic_classes
    empty = {"segment_category": jnp.full((slots,), -1, jnp.int32), "segment_score": jnp.zeros((slots,), jnp.float32),
             "segment_instance": jnp.full((slots,), -1, jnp.int32)}

    def add_instance(carry, inputs):
        panoptic, count, info = carry
        index, mask, score, category, ok = inputs
        mask = mask & in_image
        area = jnp.sum(mask, dtype=jnp.int32)
        intersect = jnp.sum(mask & (panoptic > 0), dtype=jnp.int32)
        # detectron2 stops at the first score below the threshold (the instances come by decreasing
        # score), skips empty masks and masks overlapping the segments so far by more than the threshold
        keep = ok & (score >= instances_score_thresh) & (area > 0)
        keep &= ~(intersect.astype(jnp.float32) / jnp.maximum(area, 1).astype(jnp.float32) > overlap_thresh)
        new_id = count + 1
        panoptic = jnp.where(keep & mask & (panoptic == 0), new_id, panoptic)
        slot = jnp.where(keep, count, slots)  # out of range when not kept: the update is dropped
        info = {
            "segment_category": info["segment_category"].at[slot].set(category, mode="drop"),
            "segment_score": info["segment_score"].at[slot].set(score, mode="drop"),
            "segment_instance": info["segment_instance"].at[slot].set(index, mode="drop"),
        }
        return (panoptic, jnp.where(keep, new_id, count), info), None

    panoptic = jnp.zeros(semantic.shape, jnp.int32)
    inputs = (jnp.arange(d, dtype=jnp.int32), masks, scores.astype(jnp.float32), classes.astype(jnp.int32), valid)
    (panoptic, num_things, info), _ = jax.lax.scan(add_instance, (panoptic, jnp.int32(0), empty), inputs)

    # Stuff: every semantic label present in the image but 0 (detectron2's "things" label), in
    # increasing label order, on the pixels no instance took, when at least stuff_area_thresh of them.
    labels = jnp.arange(num_semantic_classes, dtype=jnp.int32)
    flat = jnp.where(in_image, semantic, num_semantic_classes).reshape(-1)  # outside the image: no label
    present = jnp.zeros((num_semantic_classes,), bool).at[flat].set(True, mode="drop")
    free = (panoptic == 0).reshape(-1)
    area = jnp.zeros((num_semantic_classes,), jnp.int32).at[jnp.where(free, flat, num_semantic_classes)].add(
        1, mode="drop")
    stuff = present & (labels != 0) & ~(area < stuff_area_thresh)
    rank = jnp.cumsum(stuff, dtype=jnp.int32) - 1
    stuff_id = jnp.where(stuff, num_things + rank + 1, 0)
    take = in_image & (panoptic == 0)
    panoptic = jnp.where(take, stuff_id[jnp.clip(semantic, 0, num_semantic_classes - 1)], panoptic)
    slot = jnp.where(stuff, num_things + rank, slots)
    info = {
        "segment_category": info["segment_category"].at[slot].set(labels, mode="drop"),
        "segment_score": info["segment_score"],
        "segment_instance": info["segment_instance"],
    }
    num_segments = num_things + jnp.sum(stuff, dtype=jnp.int32)
    ids = jnp.arange(1, slots + 1, dtype=jnp.int32)
    used = ids <= num_segments
    segment_area = jnp.zeros((slots + 1,), jnp.int32).at[panoptic.reshape(-1)].add(1)[1:]
    return {
        "panoptic_seg": panoptic,
        "num_segments": num_segments,
        "segment_id": jnp.where(used, ids, 0),
        "segment_isthing": ids <= num_things,
        "segment_area": jnp.where(used, segment_area, 0),
        **info,
    }


def combine_semantic_and_instance_outputs(
    pred_masks: Array,
    scores: Array,
    pred_classes: Array,
    valid: Array,
    semantic: Array,
    output_hw: Array,
    num_semantic_classes: int,
    overlap_thresh: float | Array = 0.5,
    stuff_area_thresh: float | Array = 4096,
    instances_score_thresh: float | Array = 0.5,
) -> dict[str, Array]:
    """detectron2's ``combine_semantic_and_instance_outputs`` on a batch, static shapes.

    Args:
      pred_masks: ``bool[N, D, H, W]`` the instances' masks pasted at the original size (on an
        ``H x W`` canvas); scores: ``[N, D]``, by decreasing score among the valid slots;
        pred_classes: ``int[N, D]``; valid: ``bool[N, D]`` (valid slots first), as
        ``detector_postprocess`` gives them.
      semantic: ``int[N, H, W]`` the semantic labels (argmax of ``sem_seg``), label 0 standing
        for every "thing".
      output_hw: ``int32[N, 2]``: image ``i`` covers ``[:h_i, :w_i]`` of the canvas.
      num_semantic_classes: static, the semantic head's classes (labels ``0..C-1``).
      overlap_thresh, stuff_area_thresh, instances_score_thresh: ``MODEL.PANOPTIC_FPN.COMBINE.
        {OVERLAP_THRESH, STUFF_AREA_LIMIT, INSTANCES_CONFIDENCE_THRESH}`` (numbers, or traced
        float32 scalars).

    The instances are added by decreasing score while their score is at least
    ``instances_score_thresh``; one with an empty mask, or whose mask lies on the segments so far
    by more than ``overlap_thresh`` of its area, is skipped; otherwise its pixels not yet taken
    become the next segment. Then each semantic label but 0 present in the image, in increasing
    order, becomes a segment of its pixels no instance took, unless they are fewer than
    ``stuff_area_thresh``.

    Returns ``panoptic_seg int32[N, H, W]`` (0: no segment; past ``output_hw`` 0) and, per image,
    ``num_segments int32[N]`` and ``S = D + C`` segment slots in detectron2's ``segments_info``
    order (the used ones first): ``segment_id`` (1, 2, ...; 0 unused), ``segment_isthing``,
    ``segment_category`` (the instance's class or the semantic label; -1 unused),
    ``segment_score`` (things; 0 otherwise), ``segment_instance`` (the instance's slot; -1
    otherwise) and ``segment_area`` (pixels of the segment in ``panoptic_seg``).
    """
    n, d = valid.shape
    if pred_masks.ndim != 4 or pred_masks.shape[:2] != (n, d) or semantic.shape != (n, *pred_masks.shape[2:]):
        raise ValueError(f"combine_semantic_and_instance_outputs: pred_masks [N, D, H, W] = {pred_masks.shape} needs "
                         f"semantic [N, H, W], got {semantic.shape} (valid {valid.shape})")
    if scores.shape != (n, d) or pred_classes.shape != (n, d) or output_hw.shape != (n, 2):
        raise ValueError(f"combine_semantic_and_instance_outputs: scores and pred_classes must be [N, D] = [{n}, {d}] "
                         f"and output_hw [N, 2], got {scores.shape}, {pred_classes.shape}, {output_hw.shape}")
    height, width = semantic.shape[1:]
    in_image = ((jnp.arange(height)[None, :, None] < output_hw[:, 0, None, None])
                & (jnp.arange(width)[None, None, :] < output_hw[:, 1, None, None]))

    def one(masks, s, c, v, sem, inside):
        return _combine_one(masks.astype(bool), s, c, v.astype(bool), sem.astype(jnp.int32), inside,
                            int(num_semantic_classes), overlap_thresh, stuff_area_thresh, instances_score_thresh)

    return jax.vmap(one)(pred_masks, scores, pred_classes, valid, semantic, in_image)


def segments_info(out: dict[str, Any], image: int) -> list[dict[str, Any]]:
    """detectron2's ``segments_info`` list of image ``image`` from the segment arrays of
    :func:`combine_semantic_and_instance_outputs` (host-side NumPy): a thing is ``{"id",
    "isthing": True, "score", "category_id", "instance_id"}``, a stuff segment ``{"id",
    "isthing": False, "category_id", "area"}``, in segment-id order."""
    k = int(np.asarray(out["num_segments"])[image])
    fields = {key: np.asarray(out[key])[image, :k] for key in SEGMENT_KEYS}
    info = []
    for j in range(k):
        if bool(fields["segment_isthing"][j]):
            info.append({"id": int(fields["segment_id"][j]), "isthing": True,
                         "score": float(fields["segment_score"][j]),
                         "category_id": int(fields["segment_category"][j]),
                         "instance_id": int(fields["segment_instance"][j])})
        else:
            info.append({"id": int(fields["segment_id"][j]), "isthing": False,
                         "category_id": int(fields["segment_category"][j]), "area": int(fields["segment_area"][j])})
    return info


@META_ARCH_REGISTRY.register()
class PanopticFPN(GeneralizedRCNN):
    """detectron2's ``PanopticFPN``: ``GeneralizedRCNN`` (backbone, proposal generator, ROI heads
    with masks) plus ``sem_seg_head`` on the same FPN features, and the panoptic combination.

    Fields: ``GeneralizedRCNN``'s, ``sem_seg_head`` (``SemSegFPNHead``) and the combination's
    ``combine_overlap_thresh``, ``combine_stuff_area_thresh``, ``combine_instances_score_thresh``.

    ``__call__(images, image_hw, output_hw, *, canvas_hw=None, return_intermediates=False)``: the
    arguments of ``GeneralizedRCNN``. Returns its outputs (instances, ``pred_masks`` pasted on the
    canvas) plus, with a ``canvas_hw``: ``sem_seg float32[N, H, W, C]`` (detectron2's per-image
    ``sem_seg [C, h, w]`` logits at the original size, NHWC on the canvas), ``sem_seg_map
    int32[N, H, W]`` (its argmax), ``panoptic_seg int32[N, H, W]`` and the segment arrays of
    :func:`combine_semantic_and_instance_outputs` (:func:`segments_info` makes detectron2's
    list). Without a canvas: ``sem_seg_logits [N, Hp, Wp, C]`` at the padded input size only.
    ``return_intermediates`` adds the FPN maps and proposals, and ``sem_seg_logits``.
    """

    sem_seg_head: nn.Module | None = None
    combine_overlap_thresh: float = 0.5
    combine_stuff_area_thresh: float = 4096
    combine_instances_score_thresh: float = 0.5

    @classmethod
    def from_config(cls, cfg: Any) -> PanopticFPN:
        """``GeneralizedRCNN``'s keys, ``MODEL.SEM_SEG_HEAD.NAME`` over the backbone's outputs and
        ``MODEL.PANOPTIC_FPN.COMBINE.{OVERLAP_THRESH, STUFF_AREA_LIMIT,
        INSTANCES_CONFIDENCE_THRESH}``. ``MODEL.MASK_ON`` must be True (the combination needs
        masks). ``COMBINE.ENABLED`` False only warns, as in detectron2 (which no longer reads it:
        the combination always runs); ``INSTANCE_LOSS_WEIGHT`` weighs the training loss only."""
        if not cfg.MODEL.MASK_ON:
            raise ValueError("PanopticFPN: MODEL.MASK_ON must be True (the panoptic combination needs masks)")
        combine = cfg.MODEL.PANOPTIC_FPN.COMBINE
        if not combine.ENABLED:
            warnings.warn("PanopticFPN: MODEL.PANOPTIC_FPN.COMBINE.ENABLED is no longer used (as in detectron2): "
                          "the panoptic combination still runs", stacklevel=2)
        rcnn = GeneralizedRCNN.from_config(cfg)
        return cls(
            backbone=rcnn.backbone, proposal_generator=rcnn.proposal_generator, roi_heads=rcnn.roi_heads,
            pixel_mean=rcnn.pixel_mean, pixel_std=rcnn.pixel_std,
            sem_seg_head=build_sem_seg_head(cfg, rcnn.backbone.output_shape()),
            combine_overlap_thresh=float(combine.OVERLAP_THRESH),
            combine_stuff_area_thresh=float(combine.STUFF_AREA_LIMIT),
            combine_instances_score_thresh=float(combine.INSTANCES_CONFIDENCE_THRESH),
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
        if train:
            raise NotImplementedError(
                "PanopticFPN: training is not implemented (inference only); train the instance part as "
                "MODEL.META_ARCHITECTURE 'GeneralizedRCNN' (Mask R-CNN) and load its weights here")
        if self.sem_seg_head is None:
            raise ValueError("PanopticFPN: sem_seg_head is required (build it with PanopticFPN.from_config)")
        out = super().__call__(images, image_hw, *targets, canvas_hw=canvas_hw, return_intermediates=True)
        features = {name: out[name] for name in self.backbone.output_shape()}
        if not return_intermediates:
            for name in (*features, "proposal_boxes", "proposal_logits", "proposal_valid"):
                out.pop(name)
        if canvas_hw is None:
            out["sem_seg_logits"] = self.sem_seg_head(features)
            return out
        (output_hw,) = targets
        out.update(self.segment(features, out, image_hw, output_hw, canvas_hw=canvas_hw,
                                return_logits=return_intermediates))
        return out

    def segment(self, features: dict[str, Array], instances: dict[str, Array], image_hw: Array, output_hw: Array,
                *, canvas_hw: tuple[int, int], return_logits: bool = False) -> dict[str, Array]:
        """The semantic head on ``features`` (the FPN maps), ``sem_seg_postprocess`` onto the
        ``canvas_hw`` canvas, its argmax, and the panoptic combination with ``instances`` (the
        ``pred_masks``, ``scores``, ``pred_classes`` and ``valid`` of ``detector_postprocess`` on
        the same canvas). Returns ``sem_seg``, ``sem_seg_map``, ``panoptic_seg`` and the segment
        arrays (see the class docstring); ``return_logits`` adds ``sem_seg_logits``."""
        logits = self.sem_seg_head(features)
        output_hw = output_hw.astype(jnp.int32)
        sem_seg = sem_seg_postprocess(logits, image_hw.astype(jnp.int32), output_hw, canvas_hw)
        semantic = jnp.argmax(sem_seg, axis=-1).astype(jnp.int32)
        out = {"sem_seg": sem_seg, "sem_seg_map": semantic}
        if return_logits:
            out["sem_seg_logits"] = logits
        out.update(combine_semantic_and_instance_outputs(
            instances["pred_masks"], instances["scores"], instances["pred_classes"], instances["valid"], semantic,
            output_hw, self.sem_seg_head.num_classes, self.combine_overlap_thresh, self.combine_stuff_area_thresh,
            self.combine_instances_score_thresh))
        return out
