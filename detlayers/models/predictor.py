"""detectron2's ``DefaultPredictor`` on detlayers: host-side resize and normalisation
(:func:`preprocess_image`, :func:`batch_images`), then ONE jitted function for the batch (backbone,
RPN, ROI heads, rescaling to the original size, mask pasting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from detlayers.models.checkpoint import load_detectron2_weights
from detlayers.models.meta_arch.build import build_model

Array = jax.Array

__all__ = ["Predictor", "preprocess_image", "batch_images", "resize_shortest_edge_shape"]


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


def preprocess_image(image_bgr: np.ndarray, cfg: Any) -> np.ndarray:
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


def _canvas(hw: np.ndarray) -> tuple[int, int]:
    return int(hw[:, 0].max()), int(hw[:, 1].max())


class Predictor:
    """detectron2's ``DefaultPredictor`` on detlayers: ``Predictor(cfg, weights)(image_bgr)``.

    Args:
      cfg: a detlayers.models config (e.g. ``mask_rcnn_R_50_FPN_3x_config()``).
      weights: a detectron2 ``.pkl``/``.pth`` path, a ``{detectron2 name: array}`` dict, or the Flax
        variables ``{"params": ..., "batch_stats": ...}`` themselves.

    ``predictor(image_bgr)`` takes ``uint8[H, W, 3]`` in BGR (cv2) order and returns a dict of NumPy
    arrays with only the valid instances, by decreasing score: ``pred_boxes float32[K, 4]``
    (original-image pixels), ``scores float32[K]``, ``pred_classes int64[K]`` and, with masks,
    ``pred_masks bool[K, H, W]``. ``predict_batch(images)`` runs several images in ONE jitted call
    (padded to a common size, as detectron2 batches them) and returns one dict each.

    The jitted function is compiled once per (batch size, padded size, mask canvas) and cached.
    """

    def __init__(self, cfg: Any, weights: Any) -> None:
        # A frozen copy: later edits of the caller's cfg do not reach the predictor.
        self.cfg = cfg.clone() if hasattr(cfg, "clone") else cfg
        if hasattr(self.cfg, "freeze"):
            self.cfg.freeze()
        self.model = build_model(self.cfg)
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
