"""detectron2's ``DefaultAnchorGenerator`` and ``RotatedAnchorGenerator``
(``modeling/anchor_generator.py``), in NumPy.

Anchors depend only on static shapes, so they are computed on the host as float32 constants with
detectron2's arithmetic (cell anchors in float64 then cast; float32 shifts added to them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from detlayers.models.registry import ANCHOR_GENERATOR_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec

__all__ = [
    "DefaultAnchorGenerator", "RotatedAnchorGenerator", "generate_cell_anchors", "generate_rotated_cell_anchors",
    "grid_anchors", "grid_rotated_anchors", "build_anchor_generator",
]


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """``DefaultAnchorGenerator.generate_cell_anchors``: ``float32[len(sizes)*len(ratios), 4]``
    centred at 0 (size-major), computed in float64 (Python floats) and then cast, as detectron2."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(anchors, np.float64).astype(np.float32)


def grid_anchors(
    grid_hw: tuple[int, int], stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float], offset: float = 0.0
) -> np.ndarray:
    """The anchors of one feature map: ``float32[H*W*A, 4]`` ordered (y, x, anchor).

    Shifts are ``arange(offset*stride, W*stride, stride)`` in float32, added to the float32 cell
    anchors (``DefaultAnchorGenerator._grid_anchors``).
    """
    base = generate_cell_anchors(sizes, aspect_ratios)
    sx, sy = _grid_shifts(grid_hw, stride, offset)
    shifts = np.stack([sx, sy, sx, sy], axis=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4).astype(np.float32)


def generate_rotated_cell_anchors(
    sizes: Sequence[float], aspect_ratios: Sequence[float], angles: Sequence[float]
) -> np.ndarray:
    """``RotatedAnchorGenerator.generate_cell_anchors``: ``float32[len(sizes)*len(ratios)*len(angles), 5]``
    rows ``(0, 0, w, h, angle_degrees)``, ordered size, then ratio, then angle (angle fastest);
    ``w = sqrt(size**2 / ratio)``, ``h = ratio * w`` in float64, then cast, as detectron2."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            anchors.extend([0.0, 0.0, w, h, float(angle)] for angle in angles)
    return np.asarray(anchors, np.float64).reshape(-1, 5).astype(np.float32)


def _grid_shifts(grid_hw: tuple[int, int], stride: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's ``_create_grid_offsets``: float32 ``(x, y)`` of every cell, (y, x) order."""
    height, width = grid_hw
    shift_x = np.arange(offset * stride, width * stride, step=stride, dtype=np.float32)[:width]
    shift_y = np.arange(offset * stride, height * stride, step=stride, dtype=np.float32)[:height]
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    return sx.reshape(-1), sy.reshape(-1)


def grid_rotated_anchors(
    grid_hw: tuple[int, int], stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float],
    angles: Sequence[float], offset: float = 0.0,
) -> np.ndarray:
    """The rotated anchors of one feature map: ``float32[H*W*A, 5]`` ordered (y, x, anchor); the
    float32 cell centres ``(offset + j) * stride`` are added to the cell anchors' zero centres
    (``RotatedAnchorGenerator._grid_anchors``)."""
    base = generate_rotated_cell_anchors(sizes, aspect_ratios, angles)
    sx, sy = _grid_shifts(grid_hw, stride, offset)
    zeros = np.zeros_like(sx)
    shifts = np.stack([sx, sy, zeros, zeros, zeros], axis=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 5).astype(np.float32)


def _per_level(
    values: Sequence[Any], num_levels: int, name: str, owner: str = "DefaultAnchorGenerator"
) -> tuple[tuple[float, ...], ...]:
    """detectron2's ``_broadcast_params``: one entry for every level, or one for all of them."""
    values = [tuple(float(x) for x in v) for v in values]
    if len(values) == 1:
        values = values * num_levels
    if len(values) != num_levels:
        raise ValueError(f"{owner}: {name} needs 1 or {num_levels} entries, got {len(values)}")
    return tuple(values)


@ANCHOR_GENERATOR_REGISTRY.register()
@dataclasses.dataclass(frozen=True)
class DefaultAnchorGenerator:
    """Anchors of every feature level: ``sizes[i] x aspect_ratios[i]`` cell anchors at every
    ``strides[i]`` pixels, starting at ``offset * stride``.

    ``sizes``/``aspect_ratios`` hold one tuple per level, or one tuple for all levels (detectron2's
    broadcast). Immutable and hashable (a field of a Flax module); it has no weights (detectron2's
    ``cell_anchors`` buffers are not loaded from checkpoints).

    ``generator([(H1, W1), ...])`` returns per level ``float32[Hi*Wi*A_i, 4]`` in (y, x, anchor) order.
    """

    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    strides: tuple[int, ...]
    offset: float = 0.0

    def __post_init__(self) -> None:
        num_levels = len(self.strides)
        object.__setattr__(self, "sizes", _per_level(self.sizes, num_levels, "sizes"))
        object.__setattr__(self, "aspect_ratios", _per_level(self.aspect_ratios, num_levels, "aspect_ratios"))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if not 0.0 <= self.offset < 1.0:
            raise ValueError(f"DefaultAnchorGenerator: offset must be in [0, 1), got {self.offset}")

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> DefaultAnchorGenerator:
        """``MODEL.ANCHOR_GENERATOR.{SIZES, ASPECT_RATIOS, OFFSET}``; strides from ``input_shape``."""
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        return cls(sizes=anchors.SIZES, aspect_ratios=anchors.ASPECT_RATIOS,
                   strides=tuple(s.stride for s in input_shape), offset=anchors.OFFSET)

    @property
    def num_anchors(self) -> list[int]:
        """Cell anchors per location, per level (detectron2's ``num_cell_anchors``)."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @property
    def cell_anchors(self) -> list[np.ndarray]:
        """Per level ``float32[A_i, 4]`` centred at 0."""
        return [generate_cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def __call__(self, grid_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        if len(grid_sizes) != len(self.strides):
            raise ValueError(
                f"DefaultAnchorGenerator: {len(grid_sizes)} feature maps but {len(self.strides)} strides"
            )
        return [
            grid_anchors((int(hw[0]), int(hw[1])), stride, s, r, self.offset)
            for hw, stride, s, r in zip(grid_sizes, self.strides, self.sizes, self.aspect_ratios)
        ]


@ANCHOR_GENERATOR_REGISTRY.register()
@dataclasses.dataclass(frozen=True)
class RotatedAnchorGenerator:
    """detectron2's ``RotatedAnchorGenerator`` (RRPN): ``sizes[i] x aspect_ratios[i] x angles[i]``
    rotated cell anchors ``(xc, yc, w, h, angle_degrees)`` at every ``strides[i]`` pixels, starting
    at ``offset * stride``.

    ``sizes``/``aspect_ratios``/``angles`` hold one tuple per level, or one for all levels
    (detectron2's broadcast). No weights; immutable and hashable (a field of a Flax module).
    ``generator([(H1, W1), ...])`` returns per level ``float32[Hi*Wi*A_i, 5]`` in (y, x, anchor)
    order, anchors ordered size, ratio, angle (angle fastest).
    """

    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    strides: tuple[int, ...]
    angles: tuple[tuple[float, ...], ...] = ((-90.0, 0.0, 90.0),)
    offset: float = 0.0
    box_dim: int = dataclasses.field(default=5, init=False)

    def __post_init__(self) -> None:
        num_levels = len(self.strides)
        owner = "RotatedAnchorGenerator"
        object.__setattr__(self, "sizes", _per_level(self.sizes, num_levels, "sizes", owner))
        object.__setattr__(self, "aspect_ratios", _per_level(self.aspect_ratios, num_levels, "aspect_ratios", owner))
        object.__setattr__(self, "angles", _per_level(self.angles, num_levels, "angles", owner))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if not 0.0 <= self.offset < 1.0:
            raise ValueError(f"RotatedAnchorGenerator: offset must be in [0, 1), got {self.offset}")

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Sequence[ShapeSpec]) -> RotatedAnchorGenerator:
        """``MODEL.ANCHOR_GENERATOR.{SIZES, ASPECT_RATIOS, ANGLES, OFFSET}``; strides from ``input_shape``."""
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        return cls(sizes=anchors.SIZES, aspect_ratios=anchors.ASPECT_RATIOS, angles=anchors.ANGLES,
                   strides=tuple(s.stride for s in input_shape), offset=anchors.OFFSET)

    @property
    def num_anchors(self) -> list[int]:
        """Cell anchors per location, per level (sizes x ratios x angles)."""
        return [len(s) * len(r) * len(a) for s, r, a in zip(self.sizes, self.aspect_ratios, self.angles)]

    @property
    def cell_anchors(self) -> list[np.ndarray]:
        """Per level ``float32[A_i, 5]`` centred at 0."""
        return [generate_rotated_cell_anchors(s, r, a) for s, r, a in zip(self.sizes, self.aspect_ratios, self.angles)]

    def __call__(self, grid_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        if len(grid_sizes) != len(self.strides):
            raise ValueError(
                f"RotatedAnchorGenerator: {len(grid_sizes)} feature maps but {len(self.strides)} strides"
            )
        return [
            grid_rotated_anchors((int(hw[0]), int(hw[1])), stride, s, r, a, self.offset)
            for hw, stride, s, r, a in zip(grid_sizes, self.strides, self.sizes, self.aspect_ratios, self.angles)
        ]


def build_anchor_generator(cfg: Any, input_shape: Sequence[ShapeSpec]) -> Any:
    """The anchor generator ``MODEL.ANCHOR_GENERATOR.NAME`` names, for the levels ``input_shape``."""
    return build_from_registry(ANCHOR_GENERATOR_REGISTRY, cfg.MODEL.ANCHOR_GENERATOR.NAME, cfg, input_shape)


def head_input_geometry(cfg: Any, input_shape: Sequence[ShapeSpec], head: str) -> tuple[int, int]:
    """``(channels, anchors per location)`` of a head shared by every level (detectron2's
    ``StandardRPNHead`` and ``RetinaNetHead`` check both are equal across levels); a
    ``ValueError`` naming ``head`` otherwise."""
    channels = {s.channels for s in input_shape}
    if len(channels) != 1:
        raise ValueError(f"{head}: every input level must have the same channels, got {channels}")
    generator = build_anchor_generator(cfg, input_shape)
    num_anchors = set(generator.num_anchors)
    if len(num_anchors) != 1:
        raise ValueError(f"{head}: every level must have the same number of anchors "
                         "(MODEL.ANCHOR_GENERATOR.SIZES x ASPECT_RATIOS)")
    return channels.pop(), num_anchors.pop()
