"""Synthetic shapes: filled circles, rectangles and rotated rectangles on noisy backgrounds.

Every example is a pure function of ``(seed, split, index)``: the image, its boxes, classes and
instance masks come from ``numpy.random.default_rng([seed, split, index])``.  A training stream is
therefore addressed by a position (the global example counter), which makes it resumable from a
checkpoint and shardable over processes without communication: process ``p`` of ``n`` reads the
examples ``position + p * local_batch ... `` of each global batch (see :func:`train_batch`).

Shapes never overlap (their boxes are at least one pixel apart), so every instance mask is the
full shape and boxes are the tight pixel extents of the masks, ``(x1, y1, x2, y2)`` with ``x2``/
``y2`` exclusive (a mask covering columns 3..9 has ``x1 = 3``, ``x2 = 10``), as COCO and detectron2
count pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "rotated rectangle")
NUM_CLASSES = len(CLASS_NAMES)

TRAIN_SPLIT = 0
EVAL_SPLIT = 1


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """How the synthetic images look.

    Attributes:
      image_size: images are square, ``image_size x image_size`` RGB.
      max_objects: at most this many shapes an image (at least one); ground truth is padded to it.
      min_size, max_size: shape extent in pixels (diameter, rectangle sides).
      noise: standard deviation of the per-pixel Gaussian noise (colours are in [0, 1]).
    """

    image_size: int = 64
    max_objects: int = 3
    min_size: int = 14
    max_size: int = 30
    noise: float = 0.08


@dataclasses.dataclass
class Example:
    """One image with its instances (unpadded).

    ``image`` float32 [H, W, 3] in [0, 1]; ``boxes`` float32 [G, 4] (x1, y1, x2, y2);
    ``classes`` int32 [G] in ``[0, NUM_CLASSES)``; ``masks`` bool [G, H, W].
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    masks: np.ndarray


def _shape_mask(kind: int, cx: float, cy: float, size: float, aspect: float, angle: float,
                ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Pixels (centres at ``p + 0.5``) covered by the shape."""
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    if kind == 0:  # circle
        return dx * dx + dy * dy <= (size / 2) ** 2
    half_w, half_h = size / 2, size * aspect / 2
    if kind == 2:  # rotate the pixel into the box frame; counter-clockwise on screen
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx - s * dy, s * dx + c * dy
    return (np.abs(dx) <= half_w) & (np.abs(dy) <= half_h)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.abs(colour - background).sum() > 0.9:
            return colour
    return 1.0 - background


def make_example(config: ShapesConfig, seed: int, split: int, index: int) -> Example:
    """The example number ``index`` of ``split`` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, split, index])
    size = config.image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)

    background = rng.uniform(0.0, 1.0, size=3)
    # a gentle colour gradient under the noise, so the background is not one flat colour
    tilt = rng.uniform(-0.15, 0.15, size=(2, 3))
    image = (background + tilt[0] * (xs[..., None] / size - 0.5)
             + tilt[1] * (ys[..., None] / size - 0.5))

    num_objects = int(rng.integers(1, config.max_objects + 1))
    boxes, classes, masks = [], [], []
    occupied = np.zeros((size, size), bool)  # union of placed boxes grown by one pixel
    for _ in range(num_objects):
        for _attempt in range(50):
            kind = int(rng.integers(0, NUM_CLASSES))
            extent = rng.uniform(config.min_size, config.max_size)
            aspect = rng.uniform(0.5, 0.9) if kind != 0 else 1.0
            # rotated rectangles turn far enough to be told apart from upright ones
            angle = np.deg2rad(rng.uniform(25, 65) * rng.choice([-1, 1])) if kind == 2 else 0.0
            margin = extent * 0.75
            cx, cy = rng.uniform(margin, size - margin, size=2)
            mask = _shape_mask(kind, cx, cy, extent, aspect, angle, ys, xs)
            if not mask.any():
                continue
            rows, cols = np.nonzero(mask)
            y1, y2, x1, x2 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            if occupied[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1].any():
                continue
            occupied[y1:y2, x1:x2] = True
            image = np.where(mask[..., None], _contrasting_colour(rng, background), image)
            boxes.append((x1, y1, x2, y2))
            classes.append(kind)
            masks.append(mask)
            break
    image = image + rng.normal(0.0, config.noise, size=image.shape)
    return Example(
        image=np.clip(image, 0.0, 1.0).astype(np.float32),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        classes=np.asarray(classes, np.int32),
        masks=np.asarray(masks, bool).reshape(-1, size, size),
    )


def collate(examples: list[Example], max_objects: int) -> dict[str, np.ndarray]:
    """Stacks examples into fixed shapes: ground truth padded to ``max_objects``.

    Returns ``image`` float32 [B, H, W, 3], ``boxes`` float32 [B, G, 4], ``classes`` int32 [B, G]
    (-1 for padding), ``masks`` bool [B, G, H, W] and ``valid`` bool [B, G].
    """
    batch = len(examples)
    size = examples[0].image.shape[0]
    out = dict(
        image=np.stack([e.image for e in examples]),
        boxes=np.zeros((batch, max_objects, 4), np.float32),
        classes=np.full((batch, max_objects), -1, np.int32),
        masks=np.zeros((batch, max_objects, size, size), bool),
        valid=np.zeros((batch, max_objects), bool),
    )
    for i, e in enumerate(examples):
        g = len(e.classes)
        out["boxes"][i, :g] = e.boxes
        out["classes"][i, :g] = e.classes
        out["masks"][i, :g] = e.masks
        out["valid"][i, :g] = True
    return out


def train_batch(config: ShapesConfig, seed: int, position: int, global_batch: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's share of the global training batch that starts at example ``position``.

    The global batch is the examples ``position .. position + global_batch - 1``; process ``p`` of
    ``n`` takes the ``p``-th contiguous slice of ``global_batch // n`` examples.  The next batch
    starts at ``position + global_batch``.
    """
    if global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} is not divisible by "
                         f"process_count={process_count}")
    local = global_batch // process_count
    start = position + process_index * local
    return collate([make_example(config, seed, TRAIN_SPLIT, start + i) for i in range(local)],
                   config.max_objects)


def eval_examples(config: ShapesConfig, seed: int, count: int) -> list[Example]:
    """Held-out images: a different split of the same seed, never seen in training."""
    return [make_example(config, seed, EVAL_SPLIT, i) for i in range(count)]
