"""A small two-stage detector with a mask head (Mask R-CNN in miniature), built from detlayers.

Layout is NHWC, boxes are ``(x1, y1, x2, y2)`` pixels.  All shapes are static: ground truth is
padded to ``max_objects`` with a ``valid`` mask, proposals to ``num_proposals`` per image and
detections to ``max_detections`` per image, each with its own validity mask.

Pieces (every detection layer comes from detlayers):

- **backbone** - ``Conv2d`` + ``get_norm("naiveSyncBN")`` (``NaiveSyncBatchNorm`` over the device
  axis ``"batch"``), strides 2-4-8, with a top-down ``interpolate`` merge into one stride-4 map;
- **proposal head** - an anchor-free dense head (FCOS-like: an objectness logit and log distances
  to the four box sides at every stride-4 cell), top-k cells per image, then ``batched_nms`` with
  the image index as the group, so one call suppresses within every image of the device batch;
- **box head** - ``ROIAlign`` (7x7, ``sampling_ratio=0``) and two ``Linear`` layers giving class
  logits (background + 3 shapes) and class-agnostic box deltas (detectron2's ``Box2BoxTransform``
  encoding, weights 10, 10, 5, 5); detections are per-class ``batched_nms``-ed;
- **mask head** - ``ROIAlign`` (14x14, ``sampling_ratio=0``), two ``Conv2d``, a ``ConvTranspose2d``
  to 28x28 and a 1x1 ``Conv2d``: one class-agnostic mask logit map per box; mask targets are cut
  from the ground-truth bitmaps with ``ROIAlign`` (detectron2's ``BitMasks.crop_and_resize``), and
  predicted masks go back into the image with ``paste_masks_in_image``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import detlayers as L
from detlayers.demo.data import NUM_CLASSES

# detectron2's ROI box head encoding (weights 10, 10, 5, 5; dw, dh clamped at log(1000 / 16))
BOX_TRANSFORM = L.Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
# stands in for padded and background ROIs when encoding: their targets are masked out of the
# loss, but get_deltas divides by the source width and padded ROIs are all-zero boxes
_UNIT_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Sizes of the detector; the defaults are tuned for 64x64 images on a few CPU cores."""

    image_size: int = 64
    max_objects: int = 3
    norm: str = "naiveSyncBN"
    widths: tuple[int, int, int] = (16, 32, 64)
    feature_channels: int = 64
    stride: int = 4                   # of the feature map used by every head
    pre_nms_topk: int = 32            # dense cells per image kept before proposal NMS
    proposal_nms: float = 0.6
    num_proposals: int = 10           # proposals per image after NMS
    gt_jitters: int = 1               # jittered copies of every GT box added to training ROIs
    fg_iou: float = 0.5
    box_head_dim: int = 256
    mask_head_dim: int = 32
    score_threshold: float = 0.05
    detection_nms: float = 0.5
    max_detections: int = 10


# ---------------------------------------------------------------------------------------------
# box helpers (the box arithmetic itself is detlayers.boxes)
# ---------------------------------------------------------------------------------------------
def rois_with_batch_index(boxes: jax.Array) -> jax.Array:
    """[B, R, 4] boxes -> [B*R, 5] ROI rows ``(b, x1, y1, x2, y2)`` for ROIAlign."""
    b, r = boxes.shape[:2]
    index = jnp.broadcast_to(jnp.arange(b, dtype=boxes.dtype)[:, None, None], (b, r, 1))
    return jnp.concatenate([index, boxes], axis=-1).reshape(b * r, 5)


def first_k_per_group(indices: jax.Array, group_of: jax.Array, num_groups: int,
                      k: int) -> jax.Array:
    """Splits one score-ordered, -1-padded index list (an ``NMSResult.indices``) into groups.

    ``group_of[i]`` is the group of candidate ``i`` (or ``num_groups`` to drop it).  Returns
    ``int32 [num_groups, k]``: each group's first ``k`` indices in the given order, -1 padded.
    """
    valid = indices >= 0
    safe = jnp.where(valid, indices, 0)
    group = jnp.where(valid, group_of[safe], num_groups)
    one_hot = group[:, None] == jnp.arange(num_groups + 1)[None, :]
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), group[:, None], axis=1)[:, 0] - 1
    keep = (group < num_groups) & (rank < k)
    table = jnp.full((num_groups + 1, k), -1, jnp.int32)
    table = table.at[jnp.where(keep, group, num_groups), jnp.where(keep, rank, 0)].set(
        jnp.where(keep, indices, -1).astype(jnp.int32), mode="drop")
    return table[:num_groups]


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """Strided ``Conv2d``+norm stages and a top-down merge: [B, S, S, 3] -> [B, S/4, S/4, C]."""

    config: DetectorConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        w1, w2, w3 = cfg.widths
        c = cfg.feature_channels

        def conv(cin, cout, stride, name, kernel=3):
            # Conv2d builds its norm with get_norm(cfg.norm, cout) as its own submodule "norm"
            # (detectron2's layout: "stem.norm.running_mean"); a module made here with get_norm
            # would belong to this backbone instead of the conv
            return L.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False,
                            norm=cfg.norm, activation=nn.relu, name=name)

        x = conv(3, w1, 2, "stem")(images, train=train)             # stride 2
        c4 = conv(w1, w2, 2, "res2a")(x, train=train)               # stride 4
        c4 = conv(w2, w2, 1, "res2b")(c4, train=train)
        c8 = conv(w2, w3, 2, "res3a")(c4, train=train)              # stride 8
        c8 = conv(w3, w3, 1, "res3b")(c8, train=train)
        top = L.Conv2d(w3, c, 1, name="top_lateral")(c8)
        lateral = L.Conv2d(w2, c, 1, name="fine_lateral")(c4)
        merged = lateral + L.interpolate(top, scale_factor=2, mode="nearest")
        return conv(c, c, 1, "fpn_output")(merged, train=train)


class DenseProposalHead(nn.Module):
    """Objectness logit and 4 log side distances per cell: [B, h, w, C] -> ([B, hw], [B, hw, 4])."""

    config: DetectorConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config.feature_channels
        x = L.Conv2d(c, c, 3, padding=1, activation=nn.relu, name="conv")(features)
        out = L.Conv2d(c, 5, 1, name="predict")(x)
        b = out.shape[0]
        # a -2 prior on the logit: most cells are background
        return out[..., 0].reshape(b, -1) - 2.0, out[..., 1:].reshape(b, -1, 4)


class BoxHead(nn.Module):
    """Pooled 7x7 ROI features -> 2 x Linear -> class logits [R, K+1], box deltas [R, 4].

    Like detectron2's ``FastRCNNConvFCHead``, the head sees pooled features; the ``ROIAlign``
    pooler lives in :class:`ShapesDetector`.
    """

    config: DetectorConfig

    @nn.compact
    def __call__(self, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = pooled.reshape(pooled.shape[0], -1)
        x = nn.relu(L.Linear(x.shape[-1], cfg.box_head_dim, name="fc1")(x))
        x = nn.relu(L.Linear(cfg.box_head_dim, cfg.box_head_dim, name="fc2")(x))
        logits = L.Linear(cfg.box_head_dim, NUM_CLASSES + 1, name="cls_score")(x)
        deltas = L.Linear(cfg.box_head_dim, 4, name="bbox_pred")(x)
        return logits, deltas


class MaskHead(nn.Module):
    """Pooled 14x14 ROI features -> 2 x Conv2d -> ConvTranspose2d (x2) -> 1x1 Conv2d.

    Returns class-agnostic mask logits [R, 28, 28] (detectron2's ``MaskRCNNConvUpsampleHead``,
    smaller).
    """

    config: DetectorConfig

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.mask_head_dim
        x = L.Conv2d(cfg.feature_channels, d, 3, padding=1, activation=nn.relu,
                     name="mask_fcn1")(pooled)
        x = L.Conv2d(d, d, 3, padding=1, activation=nn.relu, name="mask_fcn2")(x)
        x = nn.relu(L.ConvTranspose2d(d, d, 2, stride=2, name="deconv")(x))
        return L.Conv2d(d, 1, 1, name="predictor")(x)[..., 0]


class ShapesDetector(nn.Module):
    """The whole detector.  ``losses`` for training, ``predict`` for inference (see module doc)."""

    config: DetectorConfig = DetectorConfig()

    def setup(self) -> None:
        self.backbone = Backbone(self.config)
        self.proposal_head = DenseProposalHead(self.config)
        self.box_head = BoxHead(self.config)
        self.mask_head = MaskHead(self.config)
        scale = 1.0 / self.config.stride
        self.box_pooler = L.ROIAlign((7, 7), scale, 0, aligned=True)
        self.mask_pooler = L.ROIAlign((14, 14), scale, 0, aligned=True)
        # detectron2's BitMasks.crop_and_resize: mask targets are ROIAligned GT bitmaps
        self.mask_target_align = L.ROIAlign((28, 28), 1.0, 0, aligned=True)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Every layer with variables once, on zero ROI features (no NMS, no pooling): a cheap
        ``init`` that creates all variables; use :meth:`predict` and :meth:`losses` for work."""
        features = self.backbone(images, train=False)
        objectness, _ = self.proposal_head(features)
        c = self.config.feature_channels
        logits, _ = self.box_head(jnp.zeros((1, 7, 7, c), features.dtype))
        return objectness, logits, self.mask_head(jnp.zeros((1, 14, 14, c), features.dtype))

    # -- shared pieces -------------------------------------------------------------------------
    def _cell_centres(self) -> jax.Array:
        cfg = self.config
        n = cfg.image_size // cfg.stride
        c = (jnp.arange(n, dtype=jnp.float32) + 0.5) * cfg.stride
        ys, xs = jnp.meshgrid(c, c, indexing="ij")
        return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)  # [hw, 2] (x, y)

    def _decode_dense(self, log_distances: jax.Array) -> jax.Array:
        centres = self._cell_centres()
        d = jnp.exp(jnp.clip(log_distances, -4.0, 5.0)) * self.config.stride
        boxes = jnp.concatenate([centres - d[..., :2], centres + d[..., 2:]], axis=-1)
        return L.clip_boxes(boxes, self.config.image_size, self.config.image_size)

    def _proposals(self, objectness: jax.Array, log_distances: jax.Array):
        """Top-k cells, then ``batched_nms`` grouped by image -> [B, P, 4] boxes, [B, P] valid."""
        cfg = self.config
        b = objectness.shape[0]
        boxes = jax.lax.stop_gradient(self._decode_dense(log_distances))
        scores, top = jax.lax.top_k(jax.lax.stop_gradient(objectness), cfg.pre_nms_topk)
        boxes = jnp.take_along_axis(boxes, top[..., None], axis=1)
        flat_boxes = boxes.reshape(-1, 4)
        image_of = jnp.repeat(jnp.arange(b, dtype=jnp.int32), cfg.pre_nms_topk)
        kept = L.batched_nms(flat_boxes, scores.reshape(-1), image_of, cfg.proposal_nms)
        per_image = first_k_per_group(kept.indices, image_of, b, cfg.num_proposals)
        valid = per_image >= 0
        proposals = flat_boxes[jnp.maximum(per_image, 0)]
        return jnp.where(valid[..., None], proposals, 0.0), valid

    # -- training ------------------------------------------------------------------------------
    def losses(self, batch: dict[str, jax.Array], rng: jax.Array,
               train: bool = True) -> dict[str, jax.Array]:
        """Per-device losses of a batch (``image``, ``boxes``, ``classes``, ``masks``, ``valid``)."""
        features = self.backbone(batch["image"], train=train)
        objectness, log_distances = self.proposal_head(features)
        loss_objectness, loss_dense_box = self._dense_losses(batch, objectness, log_distances)
        proposals, proposal_valid = self._proposals(objectness, log_distances)
        loss_cls, loss_box, jittered = self._roi_losses(features, batch, rng, proposals,
                                                        proposal_valid)
        loss_mask = self._mask_loss(features, batch, jittered[:, 0])
        return dict(objectness=loss_objectness, dense_box=loss_dense_box, cls=loss_cls,
                    box=loss_box, mask=loss_mask)

    def _dense_losses(self, batch: dict[str, jax.Array], objectness: jax.Array,
                      log_distances: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Objectness and box-side losses of the dense (proposal) head."""
        cfg = self.config
        gt_boxes, gt_valid = batch["boxes"], batch["valid"]
        # dense head targets (FCOS centre sampling): cells inside a box, within 1.5 cells of its
        # centre.  Boxes never overlap in this data, so a cell belongs to at most one box.
        centres = self._cell_centres()
        cx, cy = centres[None, :, None, 0], centres[None, :, None, 1]
        x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))
        radius = 1.5 * cfg.stride
        assigned = ((cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
                    & (jnp.abs(cx - 0.5 * (x1 + x2)) <= radius)
                    & (jnp.abs(cy - 0.5 * (y1 + y2)) <= radius) & gt_valid[:, None, :])
        positive = assigned.any(-1)                                           # [B, hw]
        owner = jnp.take_along_axis(gt_boxes, jnp.argmax(assigned, -1)[..., None], axis=1)
        sides = jnp.stack([centres[None, :, 0] - owner[..., 0], centres[None, :, 1] - owner[..., 1],
                           owner[..., 2] - centres[None, :, 0], owner[..., 3] - centres[None, :, 1]],
                          axis=-1)
        side_targets = jnp.log(jnp.maximum(sides, 0.5) / cfg.stride)
        num_pos = jnp.maximum(positive.sum(), 1.0)
        loss_objectness = optax.sigmoid_binary_cross_entropy(objectness, positive).mean()
        loss_dense_box = (jnp.abs(log_distances - side_targets).sum(-1) * positive).sum() / num_pos
        return loss_objectness, loss_dense_box

    def _roi_losses(self, features: jax.Array, batch: dict[str, jax.Array], rng: jax.Array,
                    proposals: jax.Array, proposal_valid: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Classification and box losses of the second stage, and the jittered ground-truth
        boxes ``[B, gt_jitters, G, 4]`` (the mask head trains on the first jitter)."""
        cfg = self.config
        gt_boxes, gt_valid, gt_classes = batch["boxes"], batch["valid"], batch["classes"]
        b, g = gt_valid.shape
        # second-stage ROIs: proposals + ground truth + jittered ground truth
        wh = jnp.concatenate([gt_boxes[..., 2:] - gt_boxes[..., :2]] * 2, axis=-1)
        noise = jax.random.uniform(rng, (b, cfg.gt_jitters, g, 4), minval=-0.15, maxval=0.15)
        jittered = L.clip_boxes(gt_boxes[:, None] + noise * wh[:, None], cfg.image_size, cfg.image_size)
        rois = jnp.concatenate([proposals, gt_boxes, jittered.reshape(b, -1, 4)], axis=1)
        roi_valid = jnp.concatenate([proposal_valid, gt_valid,
                                     jnp.tile(gt_valid, (1, cfg.gt_jitters))], axis=1)
        iou = jnp.where(gt_valid[:, None, :], L.pairwise_iou(rois, gt_boxes), -1.0)  # [B, R, G]
        match = jnp.argmax(iou, axis=-1)
        foreground = (jnp.max(iou, axis=-1) >= cfg.fg_iou) & roi_valid
        labels = jnp.where(foreground, jnp.take_along_axis(gt_classes, match, axis=1) + 1, 0)
        matched_boxes = jnp.take_along_axis(gt_boxes, match[..., None], axis=1)

        logits, deltas = self.box_head(self.box_pooler(features, rois_with_batch_index(rois)))
        r = rois.shape[1]
        logits, deltas = logits.reshape(b, r, -1), deltas.reshape(b, r, 4)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        loss_cls = (ce * roi_valid).sum() / jnp.maximum(roi_valid.sum(), 1.0)
        encoded = foreground[..., None]
        delta_targets = BOX_TRANSFORM.get_deltas(jnp.where(encoded, rois, _UNIT_BOX),
                                                 jnp.where(encoded, matched_boxes, _UNIT_BOX))
        loss_box = ((jnp.abs(deltas - delta_targets).sum(-1) * foreground).sum()
                    / jnp.maximum(roi_valid.sum(), 1.0))
        return loss_cls, loss_box, jittered

    def _mask_loss(self, features: jax.Array, batch: dict[str, jax.Array],
                   mask_rois: jax.Array) -> jax.Array:
        """Mask loss on ``mask_rois`` ``[B, G, 4]`` (jittered ground-truth boxes); targets cut
        from the ground-truth bitmaps."""
        gt_valid = batch["valid"]
        b, g = gt_valid.shape
        mask_logits = self.mask_head(
            self.mask_pooler(features, rois_with_batch_index(mask_rois)))            # [B*G, 28, 28]
        bitmaps = batch["masks"].reshape(b * g, *batch["masks"].shape[2:], 1).astype(jnp.float32)
        own = jnp.arange(b * g, dtype=jnp.float32)[:, None]
        mask_targets = self.mask_target_align(
            bitmaps, jnp.concatenate([own, mask_rois.reshape(-1, 4)], axis=-1))[..., 0] >= 0.5
        mask_bce = optax.sigmoid_binary_cross_entropy(mask_logits, mask_targets).mean((1, 2))
        mask_weight = gt_valid.reshape(-1)
        return (mask_bce * mask_weight).sum() / jnp.maximum(mask_weight.sum(), 1.0)

    # -- inference -----------------------------------------------------------------------------
    def predict(self, images: jax.Array) -> dict[str, jax.Array]:
        """Detections padded to ``max_detections`` per image.

        Returns ``boxes`` [B, D, 4], ``scores`` [B, D], ``classes`` int32 [B, D], ``valid`` bool
        [B, D] and ``masks`` bool [B, D, H, W] (pasted into the image with threshold 0.5).
        """
        cfg = self.config
        b = images.shape[0]
        features = self.backbone(images, train=False)
        objectness, log_distances = self.proposal_head(features)
        proposals, proposal_valid = self._proposals(objectness, log_distances)
        p = proposals.shape[1]
        logits, deltas = self.box_head(self.box_pooler(features, rois_with_batch_index(proposals)))
        probs = jax.nn.softmax(logits.reshape(b, p, -1), axis=-1)[..., 1:]          # [B, P, K]
        boxes = L.clip_boxes(BOX_TRANSFORM.apply_deltas(deltas.reshape(b, p, 4), proposals),
                             cfg.image_size, cfg.image_size)

        # every (proposal, class) pair is a candidate; NMS within (image, class) groups
        k = NUM_CLASSES
        scores = jnp.where(proposal_valid[..., None], probs, 0.0).reshape(-1)
        cand_boxes = jnp.broadcast_to(boxes[:, :, None], (b, p, k, 4)).reshape(-1, 4)
        cand_class = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, p, k)).reshape(-1)
        cand_image = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None],
                                      (b, p, k)).reshape(-1)
        kept = L.batched_nms(cand_boxes, scores, cand_image * k + cand_class, cfg.detection_nms)
        group = jnp.where(scores >= cfg.score_threshold, cand_image, b)
        chosen = first_k_per_group(kept.indices, group, b, cfg.max_detections)        # [B, D]
        valid = chosen >= 0
        chosen = jnp.maximum(chosen, 0)
        det_boxes = jnp.where(valid[..., None], cand_boxes[chosen], 0.0)
        det_scores = jnp.where(valid, scores[chosen], 0.0)
        det_classes = jnp.where(valid, cand_class[chosen], -1)

        mask_logits = self.mask_head(self.mask_pooler(features, rois_with_batch_index(det_boxes)))
        d = cfg.max_detections
        masks = L.paste_masks_in_image(jax.nn.sigmoid(mask_logits), det_boxes.reshape(-1, 4),
                                       (cfg.image_size, cfg.image_size), threshold=0.5)
        masks = masks.reshape(b, d, cfg.image_size, cfg.image_size) & valid[..., None, None]
        return dict(boxes=det_boxes, scores=det_scores, classes=det_classes, valid=valid,
                    masks=masks)
