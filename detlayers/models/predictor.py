"""detectron2's ``DefaultPredictor`` on detlayers: host-side resize and normalisation
(:func:`preprocess_image`, :func:`batch_images`), then one jitted function for the batch (backbone,
RPN, ROI heads, rescaling to the original size) and one that pastes the masks into a canvas
rounded up to a size bucket (:func:`bucket_size`), so a stream of photos of mixed sizes compiles
a bounded number of times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from detlayers._out_of_memory import out_of_memory_as
from detlayers.models.checkpoint import load_detectron2_weights
from detlayers.models.meta_arch.build import build_model
from detlayers.models.postprocessing import paste_instance_masks

Array = jax.Array
SizeBuckets = int | Sequence[int] | None

__all__ = [
    "Predictor", "PredictorOutOfMemoryError", "preprocess_image", "batch_images", "resize_shortest_edge_shape",
    "bucket_size", "check_input_config", "DEFAULT_SIZE_BUCKETS", "split_batch_outputs",
]

# The mask canvas of an image is rounded up to a multiple of this many pixels on each side.
DEFAULT_SIZE_BUCKETS = 128


class PredictorOutOfMemoryError(MemoryError):
    """The jitted inference ran out of memory (XLA's ``RESOURCE_EXHAUSTED``); the message says
    the image and padded sizes and what to lower."""


def check_input_config(cfg: Any) -> None:
    """``INPUT.MIN_SIZE_TEST`` (``>= 0``; 0 skips the resize, as detectron2) and, when resizing,
    ``INPUT.MAX_SIZE_TEST`` (``> 0``). Raises ValueError naming the key."""
    min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    if min_size < 0:
        raise ValueError(f"Predictor: INPUT.MIN_SIZE_TEST must be >= 0 (0: no resize), got {min_size}")
    if min_size > 0 and max_size <= 0:
        raise ValueError(f"Predictor: INPUT.MAX_SIZE_TEST must be positive, got {max_size}")


def bucket_size(size: int, buckets: SizeBuckets) -> int:
    """``size`` rounded up to a size bucket.

    ``buckets``: an int ``b`` (the next multiple of ``b``), an ascending sequence of sizes (the
    smallest one ``>= size``; past the last one, the next multiple of the last), or None
    (``size`` itself: no bucketing).
    """
    if buckets is None:
        return int(size)
    if isinstance(buckets, int):
        return -(-int(size) // buckets) * buckets
    for bucket in buckets:
        if bucket >= size:
            return int(bucket)
    return bucket_size(size, int(buckets[-1]))


def _check_size_buckets(buckets: SizeBuckets) -> SizeBuckets:
    if buckets is None:
        return None
    if isinstance(buckets, (bool, str)) or not isinstance(buckets, (int, Sequence)):
        raise TypeError(f"Predictor: size_buckets must be an int, a sequence of ints or None, got {buckets!r}")
    if isinstance(buckets, int):
        if buckets <= 0:
            raise ValueError(f"Predictor: size_buckets must be positive, got {buckets}")
        return buckets
    sizes = tuple(int(b) for b in buckets)
    if not sizes or sizes[0] <= 0 or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"Predictor: size_buckets must be positive and strictly ascending, got {buckets!r}")
    return sizes


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
    check_input_config(cfg)
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
    by ``size_divisibility`` (0 or 1: the largest image's size, as detectron2 pads for a backbone
    without FPN). Returns ``float32[N, Hp, Wp, 3]`` and the sizes ``int32[N, 2]``."""
    if not images:
        raise ValueError("batch_images: needs at least one image")
    if size_divisibility < 0:
        raise ValueError(f"batch_images: size_divisibility must be >= 0, got {size_divisibility}")
    divisor = max(int(size_divisibility), 1)
    hw = np.asarray([im.shape[:2] for im in images], np.int32)
    hp, wp = (-(-hw.max(axis=0) // divisor) * divisor).tolist()
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
    (original-image pixels; ``[K, 5]`` rotated boxes for the rotated Faster R-CNN),
    ``scores float32[K]``, ``pred_classes int64[K]`` and, with masks, ``pred_masks bool[K, H, W]``;
    a ``PanopticFPN`` adds detectron2's ``sem_seg`` and ``panoptic_seg`` (``(int32[H, W], segments_info)``);
    a ``SemanticSegmentor`` (DeepLab) returns only ``sem_seg``.
    ``sem_seg`` is ``float32[H, W, num_classes]``, the logits at the original size (detectron2's
    ``[C, H, W]``, NHWC here, as every map of the package). ``predict_batch(images)`` runs several
    images in ONE jitted call (padded to a common size, as detectron2 batches them) and returns one
    dict each (:func:`split_batch_outputs`).

    Compilation: the network is compiled once per (batch size, padded size); the padded size is
    detectron2's (for an FPN a multiple of 32 of the resized image, so at most ``MAX_SIZE_TEST / 32``
    values a side; for a plain ResNet backbone, the C4 and DC5 models, the largest resized image
    itself, as detectron2's ``size_divisibility`` 0 pads). Masks are pasted by a second jitted
    function into a canvas whose sides are the original size rounded up by :func:`bucket_size`
    with ``size_buckets`` (default: multiples of 128; None: the exact size, one compile per
    original size) and cropped on the host, which leaves every mask unchanged. The network input
    is NOT bucketed beyond detectron2's padding: extra padding adds anchors and moves the zero
    border the convolutions see, which changes detections. A ``SemanticSegmentor`` resizes its
    logits, and a ``PanopticFPN`` pastes its masks and resizes its semantic logits (the panoptic
    combination needs both), inside the network on that bucketed canvas, so they compile once per
    (batch size, padded size, canvas).

    Out of memory: a batch too large for the machine raises :class:`PredictorOutOfMemoryError`
    (a ``MemoryError``) naming the sizes, instead of failing later or hanging.
    """

    def __init__(self, cfg: Any, weights: Any, *, size_buckets: SizeBuckets = DEFAULT_SIZE_BUCKETS) -> None:
        check_input_config(cfg)
        self.size_buckets = _check_size_buckets(size_buckets)
        # A frozen copy: later edits of the caller's cfg do not reach the predictor.
        self.cfg = cfg.clone() if hasattr(cfg, "clone") else cfg
        if hasattr(self.cfg, "freeze"):
            self.cfg.freeze()
        self.model = build_model(self.cfg)
        if isinstance(weights, Mapping) and "params" in weights and isinstance(weights["params"], Mapping):
            self.variables = dict(weights)
        else:
            self.variables = load_detectron2_weights(self.model, weights)
        # detectron2 pads a batch for its backbone: multiples of 32 for an FPN, none for a plain ResNet
        self.size_divisibility = int(self.model.backbone.size_divisibility)
        # PanopticFPN and SemanticSegmentor resize their semantic logits inside the network onto the
        # mask canvas (PanopticFPN also combines them there with its instances)
        self.segments = hasattr(self.model, "sem_seg_head")
        self.panoptic = self.segments and hasattr(self.model, "roi_heads")
        self._forward = jax.jit(self.model.apply, static_argnames=("canvas_hw", "return_intermediates"))
        self._paste = jax.jit(paste_instance_masks, static_argnames=("canvas_hw",))

    def inputs(self, images_bgr: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Host preprocessing of a batch: ``(images, image_hw, output_hw, canvas_hw)``, the
        arguments of :meth:`run` / ``GeneralizedRCNN.__call__``."""
        if isinstance(images_bgr, np.ndarray) and images_bgr.ndim == 3:
            raise TypeError("predict_batch: pass a list of images (use predictor(image) for one image)")
        originals = np.asarray([np.shape(im)[:2] for im in images_bgr], np.int32)
        images, image_hw = batch_images([preprocess_image(im, self.cfg) for im in images_bgr],
                                        self.size_divisibility)
        return images, image_hw, originals, _canvas(originals)

    def run(self, images: np.ndarray, image_hw: np.ndarray, output_hw: np.ndarray,
            canvas_hw: tuple[int, int] | None, return_intermediates: bool = False) -> dict[str, Array]:
        """The jitted inference on preprocessed inputs (device arrays out, static shapes)."""
        return self._forward(self.variables, jnp.asarray(images), jnp.asarray(image_hw), jnp.asarray(output_hw),
                             canvas_hw=canvas_hw, return_intermediates=return_intermediates)

    def mask_canvas(self, output_hw: np.ndarray) -> tuple[int, int]:
        """The static mask canvas of a batch of original sizes ``int[N, 2]``: the largest height
        and width, each rounded up by :func:`bucket_size` with ``size_buckets``."""
        h, w = _canvas(np.asarray(output_hw))
        return bucket_size(h, self.size_buckets), bucket_size(w, self.size_buckets)

    @property
    def is_semantic(self) -> bool:
        """Whether the model only segments (``SemanticSegmentor``: per-pixel logits, no instances)."""
        return self.segments and not self.panoptic

    def _compute(self, images: np.ndarray, image_hw: np.ndarray, originals: np.ndarray) -> dict[str, np.ndarray]:
        """Network, then mask pasting on the bucketed canvas; blocks on both, so an out-of-memory
        error surfaces here (fetching the results of a failed computation can hang). A segmenter
        (``SemanticSegmentor``, ``PanopticFPN``) resizes its logits into the bucketed canvas itself,
        and a panoptic model pastes its masks there too: it combines them with the semantic map."""
        if self.segments:
            out = self.run(images, image_hw, originals, self.mask_canvas(originals))
            return jax.device_get(jax.block_until_ready(out))
        out = self.run(images, image_hw, originals, None)
        if "mask_probs" in out:
            out["pred_masks"] = self._paste(out["mask_probs"], out["pred_boxes"], out["valid"],
                                            canvas_hw=self.mask_canvas(originals))
        return jax.device_get(jax.block_until_ready(out))

    def predict_batch(self, images_bgr: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        images, image_hw, originals, _ = self.inputs(images_bgr)
        sizes = ", ".join(f"{h}x{w}" for h, w in originals.tolist())
        with out_of_memory_as(lambda xla: PredictorOutOfMemoryError(
                f"Predictor: out of memory running {len(originals)} image(s) of original size {sizes} "
                f"(resized to at most {int(image_hw[:, 0].max())}x{int(image_hw[:, 1].max())}, padded to "
                f"{images.shape[1]}x{images.shape[2]}; mask canvas {self.mask_canvas(originals)}). Lower "
                f"INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST (now {self.cfg.INPUT.MIN_SIZE_TEST} / "
                f"{self.cfg.INPUT.MAX_SIZE_TEST}) or pass fewer images per predict_batch call. XLA said: {xla}")):
            out = self._compute(images, image_hw, originals)
        return split_batch_outputs(out, originals)

    def __call__(self, image_bgr: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict_batch([image_bgr])[0]


def split_batch_outputs(out: Mapping[str, Any], originals: np.ndarray) -> list[dict[str, Any]]:
    """A batch's outputs (host arrays) as one dict per image of original size ``originals[i]``:
    for a detector the valid instances (``pred_boxes``, ``scores``, ``pred_classes`` and, with
    masks, ``pred_masks`` cut to the image); for a segmenter (``SemanticSegmentor``,
    ``PanopticFPN``) detectron2's ``sem_seg`` as ``float32[h, w, C]`` logits (NHWC; detectron2's
    ``[C, h, w]``); for a panoptic model also ``panoptic_seg`` (``(int32[h, w], segments_info)``)."""
    results = []
    for i, (h, w) in enumerate(np.asarray(originals).tolist()):
        result: dict[str, Any] = {}
        if "num_instances" in out:
            k = int(out["num_instances"][i])
            result["pred_boxes"] = np.asarray(out["pred_boxes"][i, :k], np.float32)
            result["scores"] = np.asarray(out["scores"][i, :k], np.float32)
            result["pred_classes"] = np.asarray(out["pred_classes"][i, :k], np.int64)
            if "pred_masks" in out:
                result["pred_masks"] = np.asarray(out["pred_masks"][i, :k, :h, :w], bool)
        if "sem_seg" in out:
            result["sem_seg"] = np.asarray(out["sem_seg"][i, :h, :w], np.float32)
        if "panoptic_seg" in out:
            from detlayers.models.meta_arch.panoptic_fpn import segments_info

            result["panoptic_seg"] = (np.asarray(out["panoptic_seg"][i, :h, :w], np.int32), segments_info(out, i))
        results.append(result)
    return results
