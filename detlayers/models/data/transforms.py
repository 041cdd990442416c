"""detectron2's training augmentations (``data/transforms/augmentation_impl.py``):
``ResizeShortestEdge`` and ``RandomFlip``, split into drawing the random choice (a plain value,
so the host can plan a whole batch's shapes before reading any image) and applying it to an
image, its boxes and its masks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from detlayers.models.predictor import resize_shortest_edge_shape

__all__ = ["ResizeShortestEdge", "RandomFlip", "Geometry", "resize_image", "transform_boxes", "resize_mask",
           "flip_array"]

_SAMPLE_STYLES = ("range", "choice")
_FLIPS = ("none", "horizontal", "vertical")


@dataclasses.dataclass(frozen=True)
class ResizeShortestEdge:
    """``ResizeShortestEdge(short_edge_length, max_size, sample_style)``: the shorter side becomes
    a length drawn from ``short_edge_length`` (``"choice"``: one of them; ``"range"``: an integer
    in ``[min, max]``), the longer side at most ``max_size`` (detectron2's rounding); a drawn
    length of 0 keeps the image as it is."""

    short_edge_length: Sequence[int]
    max_size: int
    sample_style: str = "range"

    def __post_init__(self) -> None:
        if self.sample_style not in _SAMPLE_STYLES:
            raise ValueError(f"ResizeShortestEdge: INPUT.MIN_SIZE_TRAIN_SAMPLING must be one of {_SAMPLE_STYLES}, "
                             f"got {self.sample_style!r}")
        lengths = tuple(int(v) for v in self.short_edge_length)
        if not lengths or min(lengths) < 0:
            raise ValueError(f"ResizeShortestEdge: INPUT.MIN_SIZE_TRAIN must be non-negative lengths, got {lengths}")
        if self.sample_style == "range" and len(lengths) != 2:
            raise ValueError(f"ResizeShortestEdge: sample_style 'range' needs INPUT.MIN_SIZE_TRAIN (min, max), "
                             f"got {lengths}")
        object.__setattr__(self, "short_edge_length", lengths)

    def output_shape(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
        """The resized ``(h, w)`` of a ``height x width`` image, drawing the length from ``rng``."""
        if self.sample_style == "range":
            size = int(rng.integers(self.short_edge_length[0], self.short_edge_length[1] + 1))
        else:
            size = int(self.short_edge_length[int(rng.integers(len(self.short_edge_length)))])
        if size == 0:
            return height, width
        return resize_shortest_edge_shape(height, width, size, self.max_size)


@dataclasses.dataclass(frozen=True)
class RandomFlip:
    """``RandomFlip(prob=0.5, horizontal=..., vertical=...)`` from ``INPUT.RANDOM_FLIP``
    (``"none"``, ``"horizontal"``, ``"vertical"``)."""

    direction: str = "horizontal"
    prob: float = 0.5

    def __post_init__(self) -> None:
        if self.direction not in _FLIPS:
            raise ValueError(f"RandomFlip: INPUT.RANDOM_FLIP must be one of {_FLIPS}, got {self.direction!r}")

    def draw(self, rng: np.random.Generator) -> str:
        """``"horizontal"``/``"vertical"`` when this image is flipped, else ``"none"``."""
        if self.direction == "none":
            return "none"
        return self.direction if rng.random() < self.prob else "none"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One image's drawn augmentation: resized to ``(height, width)``, then ``flip``."""

    height: int
    width: int
    flip: str = "none"


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``uint8[H, W, C]`` resized with PIL's bilinear filter (detectron2's ``ResizeTransform``)."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``uint8[H, W]`` resized with PIL's nearest filter (``ResizeTransform.apply_segmentation``)."""
    if mask.shape == (height, width):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((width, height), Image.NEAREST))


def flip_array(array: np.ndarray, flip: str, image_axis: int = 0) -> np.ndarray:
    """``array`` mirrored: ``"horizontal"`` reverses axis ``image_axis + 1`` (width), ``"vertical"``
    axis ``image_axis`` (height), ``"none"`` returns it unchanged."""
    if flip == "horizontal":
        return np.ascontiguousarray(np.flip(array, axis=image_axis + 1))
    if flip == "vertical":
        return np.ascontiguousarray(np.flip(array, axis=image_axis))
    return array


def transform_boxes(boxes: np.ndarray, source_hw: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """``float[K, 4]`` XYXY boxes of a ``source_hw`` image through ``geometry``: scaled, mirrored
    (``x -> width - x``, the corners swapped), then clipped to the image as detectron2's
    ``transform_instance_annotations`` does."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sy, sx = geometry.height / source_hw[0], geometry.width / source_hw[1]
    out = boxes * np.array([sx, sy, sx, sy])
    if geometry.flip == "horizontal":
        out = np.stack([geometry.width - out[:, 2], out[:, 1], geometry.width - out[:, 0], out[:, 3]], axis=1)
    elif geometry.flip == "vertical":
        out = np.stack([out[:, 0], geometry.height - out[:, 3], out[:, 2], geometry.height - out[:, 1]], axis=1)
    out = np.clip(out, 0.0, None)
    out = np.minimum(out, np.array([geometry.width, geometry.height, geometry.width, geometry.height]))
    return out.astype(np.float32)
