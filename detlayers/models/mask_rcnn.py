"""detectron2's ``GeneralizedRCNN`` (Mask R-CNN / Faster R-CNN with a ResNet-FPN) at inference.

:func:`build_model` turns a :class:`detlayers.models.config.Config` into the Flax module
:class:`GeneralizedRCNN`, whose submodule names are detectron2's (``backbone.bottom_up.res2.0...``,
``proposal_generator.rpn_head...``, ``roi_heads.box_head.fc1``...), so a detectron2 checkpoint loads
one to one. :class:`Predictor` is detectron2's ``DefaultPredictor``: host-side resize and
normalisation, then ONE jitted function for the batch (backbone, RPN, ROI heads, rescaling to the
original size, mask pasting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detlayers.models import box_ops
from detlayers.models.config import Config
from detlayers.models.fpn import ResNetFPN
from detlayers.models.roi_heads import StandardROIHeads
from detlayers.models.rpn import RPN

Array = jax.Array

__all__ = [
    "GeneralizedRCNN",
    "build_model",
    "Predictor",
    "resize_shortest_edge_shape",
    "preprocess_image",
    "batch_images",
    "load_detectron2_weights",
]

# Entries of detectron2 checkpoints that are not weights of the model: the pixel statistics
# (they come from the config) and the anchor buffers (computed from the config).
_NON_WEIGHT_KEYS = ("pixel_mean", "pixel_std")
_NON_WEIGHT_PREFIXES = ("proposal_generator.anchor_generator.",)


class GeneralizedRCNN(nn.Module):
    """detectron2's ``GeneralizedRCNN`` at inference, NHWC, static shapes.

    ``__call__(images, image_hw, output_hw, *, canvas_hw=None, return_intermediates=False)``:

    * ``images``: ``float32[N, Hp, Wp, 3]`` normalised, padded with 0 to multiples of 32
      (:func:`batch_images`); ``image_hw``: ``int32[N, 2]`` sizes before padding;
      ``output_hw``: ``int32[N, 2]`` original image sizes (detectron2's ``height``/``width``).
    * ``canvas_hw``: static ``(H, W)`` at least every ``output_hw``; masks are pasted into that
      canvas (crop ``[:h, :w]`` per image). ``None`` skips pasting.

    Returns a dict with ``pred_boxes [N, D, 4]`` (original-image pixels), ``scores [N, D]``,
    ``pred_classes int32[N, D]``, ``valid bool[N, D]`` (valid slots first, by decreasing score),
    ``num_instances int32[N]``, ``mask_probs [N, D, 28, 28]`` and ``pred_masks bool[N, D, H, W]``
    when masks are on (and a canvas is given); with ``return_intermediates`` also the FPN maps
    ``p2``... and ``proposal_boxes``/``proposal_logits``/``proposal_valid`` (input-image pixels).
    """

    cfg: Config

    def setup(self) -> None:
        cfg = self.cfg.MODEL
        if cfg.META_ARCHITECTURE != "GeneralizedRCNN":
            raise ValueError(f"GeneralizedRCNN: MODEL.META_ARCHITECTURE {cfg.META_ARCHITECTURE!r} is not supported")
        if cfg.BACKBONE.NAME != "build_resnet_fpn_backbone":
            raise ValueError(
                f"GeneralizedRCNN: MODEL.BACKBONE.NAME {cfg.BACKBONE.NAME!r} is not supported "
                "(only 'build_resnet_fpn_backbone')"
            )
        if any(cfg.RESNETS.DEFORM_ON_PER_STAGE):
            raise ValueError("GeneralizedRCNN: MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported (all False)")
        for key, value, allowed in (
            ("MODEL.ANCHOR_GENERATOR.NAME", cfg.ANCHOR_GENERATOR.NAME, "DefaultAnchorGenerator"),
            ("MODEL.RPN.HEAD_NAME", cfg.RPN.HEAD_NAME, "StandardRPNHead"),
            ("MODEL.ROI_HEADS.NAME", cfg.ROI_HEADS.NAME, "StandardROIHeads"),
            ("MODEL.ROI_BOX_HEAD.NAME", cfg.ROI_BOX_HEAD.NAME, "FastRCNNConvFCHead"),
            ("MODEL.ROI_MASK_HEAD.NAME", cfg.ROI_MASK_HEAD.NAME, "MaskRCNNConvUpsampleHead"),
        ):
            if value != allowed:
                raise ValueError(f"GeneralizedRCNN: {key} {value!r} is not supported (only {allowed!r})")
        if tuple(cfg.RPN.CONV_DIMS) != (-1,):
            raise ValueError("GeneralizedRCNN: MODEL.RPN.CONV_DIMS must be [-1] (one conv of the input width)")
        for key in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            pooler = cfg[key].POOLER_TYPE
            if pooler not in ("ROIAlignV2", "ROIAlign"):
                raise ValueError(f"GeneralizedRCNN: MODEL.{key}.POOLER_TYPE {pooler!r} is not supported")
        resnet = dict(
            depth=cfg.RESNETS.DEPTH, norm=cfg.RESNETS.NORM, num_groups=cfg.RESNETS.NUM_GROUPS,
            width_per_group=cfg.RESNETS.WIDTH_PER_GROUP, stem_out_channels=cfg.RESNETS.STEM_OUT_CHANNELS,
            res2_out_channels=cfg.RESNETS.RES2_OUT_CHANNELS, stride_in_1x1=cfg.RESNETS.STRIDE_IN_1X1,
            res5_dilation=cfg.RESNETS.RES5_DILATION, freeze_at=cfg.BACKBONE.FREEZE_AT,
            out_features=tuple(cfg.RESNETS.OUT_FEATURES),
        )
        if cfg.RESNETS.RES5_DILATION != 1:
            raise ValueError("GeneralizedRCNN: FPN needs MODEL.RESNETS.RES5_DILATION 1")
        self.backbone = ResNetFPN(
            tuple(resnet.items()), in_features=tuple(cfg.FPN.IN_FEATURES), out_channels=cfg.FPN.OUT_CHANNELS,
            norm=cfg.FPN.NORM, fuse_type=cfg.FPN.FUSE_TYPE,
        )
        self.proposal_generator = RPN(
            in_channels=cfg.FPN.OUT_CHANNELS,
            strides=tuple(2 ** int(name[1:]) for name in cfg.RPN.IN_FEATURES),
            anchor_sizes=cfg.ANCHOR_GENERATOR.SIZES, aspect_ratios=cfg.ANCHOR_GENERATOR.ASPECT_RATIOS,
            anchor_offset=cfg.ANCHOR_GENERATOR.OFFSET, box_reg_weights=cfg.RPN.BBOX_REG_WEIGHTS,
            nms_thresh=cfg.RPN.NMS_THRESH, pre_nms_topk=cfg.RPN.PRE_NMS_TOPK_TEST,
            post_nms_topk=cfg.RPN.POST_NMS_TOPK_TEST, min_box_size=cfg.PROPOSAL_GENERATOR.MIN_SIZE,
        )
        self.roi_heads = StandardROIHeads(self.cfg)

    def __call__(
        self,
        images: Array,
        image_hw: Array,
        output_hw: Array,
        *,
        canvas_hw: tuple[int, int] | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"GeneralizedRCNN: images must be [N, H, W, 3], got shape {images.shape}")
        n = images.shape[0]
        for name, value in (("image_hw", image_hw), ("output_hw", output_hw)):
            if tuple(value.shape) != (n, 2):
                raise ValueError(f"GeneralizedRCNN: {name} must be [N, 2] = [{n}, 2], got shape {value.shape}")
        image_hw = image_hw.astype(jnp.int32)
        output_hw = output_hw.astype(jnp.int32)
        features = self.backbone(images)
        rpn_features = [features[name] for name in self.cfg.MODEL.RPN.IN_FEATURES]
        proposals, proposal_logits, proposal_valid = self.proposal_generator(rpn_features, image_hw)
        roi_features = [features[name] for name in self.cfg.MODEL.ROI_HEADS.IN_FEATURES]
        det = self.roi_heads(roi_features, proposals, proposal_valid, image_hw)
        out = postprocess(det, image_hw, output_hw, canvas_hw)
        if return_intermediates:
            out.update(features)
            out.update(proposal_boxes=proposals, proposal_logits=proposal_logits, proposal_valid=proposal_valid)
        return out


def postprocess(
    det: Mapping[str, Array], image_hw: Array, output_hw: Array, canvas_hw: tuple[int, int] | None
) -> dict[str, Array]:
    """detectron2's ``detector_postprocess``: boxes scaled by ``output / input`` size, clipped to
    the output size, instances whose box became empty dropped, masks pasted (threshold 0.5)."""
    scale = output_hw.astype(jnp.float32) / image_hw.astype(jnp.float32)  # [N, (sy, sx)]
    boxes = det["boxes"] * jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=1)[:, None, :]
    boxes = box_ops.clip_boxes(boxes, output_hw[:, 0:1], output_hw[:, 1:2])
    valid = det["valid"] & box_ops.nonempty(boxes)
    # Move the surviving instances to the front, keeping their order.
    order = jnp.argsort(~valid, axis=1, stable=True)

    def take(x: Array) -> Array:
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    valid = take(valid)
    out = {
        "pred_boxes": jnp.where(valid[..., None], take(boxes), 0.0),
        "scores": jnp.where(valid, take(det["scores"]), 0.0),
        "pred_classes": jnp.where(valid, take(det["classes"]), -1),
        "valid": valid,
        "num_instances": jnp.sum(valid, axis=1, dtype=jnp.int32),
    }
    if "mask_probs" in det:
        probs = take(det["mask_probs"])
        out["mask_probs"] = probs
        if canvas_hw is not None:
            from detlayers.mask_ops import paste_masks_in_image

            n, d = valid.shape
            pasted = paste_masks_in_image(
                probs.reshape(n * d, *probs.shape[2:]), out["pred_boxes"].reshape(n * d, 4),
                (int(canvas_hw[0]), int(canvas_hw[1])), 0.5,
            )
            out["pred_masks"] = pasted.reshape(n, d, *pasted.shape[1:]) & valid[:, :, None, None]
    return out


def build_model(cfg: Config) -> GeneralizedRCNN:
    """The unbound Flax module for ``cfg`` (detectron2's ``build_model``, inference only)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"build_model: cfg must be a detlayers.models.CfgNode, got {type(cfg).__name__}")
    # The module keeps a frozen copy: hashable (jit caches key on it) and safe from later edits of cfg.
    frozen = cfg.clone()
    frozen.freeze()
    return GeneralizedRCNN(frozen)


# --------------------------------------------------------------------------------------------
# preprocessing (host side)


def resize_shortest_edge_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: the resized ``(h, w)``, in detectron2's arithmetic."""
    size = short_edge * 1.0
    scale = size / min(height, width)
    if height < width:
        newh, neww = size, scale * width
    else:
        newh, neww = scale * height, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def preprocess_image(image_bgr: np.ndarray, cfg: Config) -> np.ndarray:
    """detectron2's ``DefaultPredictor`` input: ``uint8[H, W, 3]`` BGR -> resized, normalised
    ``float32[h, w, 3]`` in ``cfg.INPUT.FORMAT`` channel order.

    The resize is ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` with PIL's bilinear filter
    on uint8, as detectron2's ``ResizeTransform`` (needs Pillow). ``MIN_SIZE_TEST == 0`` skips it.
    """
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Predictor: image must be uint8 [H, W, 3] (BGR), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) == 0:
        raise ValueError(f"Predictor: empty image, shape {image.shape}")
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    elif cfg.INPUT.FORMAT != "BGR":
        raise ValueError(f"Predictor: INPUT.FORMAT must be 'BGR' or 'RGB', got {cfg.INPUT.FORMAT!r}")
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        h, w = resize_shortest_edge_shape(image.shape[0], image.shape[1], cfg.INPUT.MIN_SIZE_TEST,
                                          cfg.INPUT.MAX_SIZE_TEST)
        if (h, w) != image.shape[:2]:
            from PIL import Image

            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))
    mean = np.asarray(cfg.MODEL.PIXEL_MEAN, np.float32)
    std = np.asarray(cfg.MODEL.PIXEL_STD, np.float32)
    return (image.astype(np.float32) - mean) / std


def batch_images(images: Sequence[np.ndarray], size_divisibility: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's ``ImageList.from_tensors``: pad bottom/right with 0 to a common size divisible
    by ``size_divisibility``. Returns ``float32[N, Hp, Wp, 3]`` and the sizes ``int32[N, 2]``."""
    if not images:
        raise ValueError("batch_images: needs at least one image")
    hw = np.asarray([im.shape[:2] for im in images], np.int32)
    hp, wp = (-(-hw.max(axis=0) // size_divisibility) * size_divisibility).tolist()
    out = np.zeros((len(images), hp, wp, 3), np.float32)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    return out, hw


# --------------------------------------------------------------------------------------------
# checkpoints


def _example_inputs(batch: int = 1, hw: tuple[int, int] = (64, 64)) -> tuple:
    images = jnp.zeros((batch, hw[0], hw[1], 3), jnp.float32)
    sizes = jnp.full((batch, 2), hw[0], jnp.int32)
    return images, sizes, sizes


def load_detectron2_weights(model: GeneralizedRCNN, weights: Any) -> dict:
    """Variables of ``model`` from detectron2 weights: a model-zoo ``.pkl``, a ``.pth`` or a
    ``{name: array}`` dict with ``GeneralizedRCNN.state_dict()`` names.

    ``pixel_mean``/``pixel_std`` and anchor buffers are ignored (they come from the config), as are
    ``num_batches_tracked``. Any missing, unexpected or mis-shaped key raises ONE ``ValueError``
    listing all of them (:func:`detlayers.load_torch_state_dict`).
    """
    from detlayers.torch_weights import load_torch_state_dict, read_state_dict

    state = read_state_dict(weights)
    state = {
        k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS and not k.startswith(_NON_WEIGHT_PREFIXES)
    }
    return load_torch_state_dict(model, state, *_example_inputs())


# --------------------------------------------------------------------------------------------
# predictor


def _canvas(hw: np.ndarray) -> tuple[int, int]:
    return int(hw[:, 0].max()), int(hw[:, 1].max())


class Predictor:
    """detectron2's ``DefaultPredictor`` on detlayers: ``Predictor(cfg, weights)(image_bgr)``.

    Args:
      cfg: a :class:`detlayers.models.config.Config` (e.g. ``mask_rcnn_R_50_FPN_3x_config()``).
      weights: a detectron2 ``.pkl``/``.pth`` path, a ``{detectron2 name: array}`` dict, or the Flax
        variables ``{"params": ..., "batch_stats": ...}`` themselves.

    ``predictor(image_bgr)`` takes ``uint8[H, W, 3]`` in BGR (cv2) order and returns a dict of NumPy
    arrays with only the valid instances, by decreasing score: ``pred_boxes float32[K, 4]``
    (original-image pixels), ``scores float32[K]``, ``pred_classes int64[K]`` and, with masks,
    ``pred_masks bool[K, H, W]``. ``predict_batch(images)`` runs several images in ONE jitted call
    (padded to a common size, as detectron2 batches them) and returns one dict each.

    The jitted function is compiled once per (batch size, padded size, mask canvas) and cached.
    """

    def __init__(self, cfg: Config, weights: Any) -> None:
        self.model = build_model(cfg)
        self.cfg = self.model.cfg  # frozen copy: later edits of the caller's cfg do not reach the predictor
        if isinstance(weights, Mapping) and "params" in weights and isinstance(weights["params"], Mapping):
            self.variables = dict(weights)
        else:
            self.variables = load_detectron2_weights(self.model, weights)
        self._forward = jax.jit(self.model.apply, static_argnames=("canvas_hw", "return_intermediates"))

    def inputs(self, images_bgr: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Host preprocessing of a batch: ``(images, image_hw, output_hw, canvas_hw)``, the
        arguments of :meth:`run` / ``GeneralizedRCNN.__call__``."""
        if isinstance(images_bgr, np.ndarray) and images_bgr.ndim == 3:
            raise TypeError("predict_batch: pass a list of images (use predictor(image) for one image)")
        originals = np.asarray([np.shape(im)[:2] for im in images_bgr], np.int32)
        images, image_hw = batch_images([preprocess_image(im, self.cfg) for im in images_bgr])
        return images, image_hw, originals, _canvas(originals)

    def run(self, images: np.ndarray, image_hw: np.ndarray, output_hw: np.ndarray,
            canvas_hw: tuple[int, int] | None, return_intermediates: bool = False) -> dict[str, Array]:
        """The jitted inference on preprocessed inputs (device arrays out, static shapes)."""
        return self._forward(self.variables, jnp.asarray(images), jnp.asarray(image_hw), jnp.asarray(output_hw),
                             canvas_hw=canvas_hw, return_intermediates=return_intermediates)

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        images, image_hw, originals, canvas = self.inputs(images_bgr)
        out = jax.device_get(self.run(images, image_hw, originals, canvas if self.cfg.MODEL.MASK_ON else None))
        results = []
        for i, (h, w) in enumerate(originals.tolist()):
            k = int(out["num_instances"][i])
            result = {
                "pred_boxes": np.asarray(out["pred_boxes"][i, :k], np.float32),
                "scores": np.asarray(out["scores"][i, :k], np.float32),
                "pred_classes": np.asarray(out["pred_classes"][i, :k], np.int64),
            }
            if "pred_masks" in out:
                result["pred_masks"] = np.asarray(out["pred_masks"][i, :k, :h, :w], bool)
            results.append(result)
        return results

    def __call__(self, image_bgr: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict_batch([image_bgr])[0]
