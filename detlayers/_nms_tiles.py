"""Tiling shared by the pure-XLA NMS loops (private)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from detlayers._sharding import varying_like

Array = jax.Array


class TiledBoxes(NamedTuple):
    """Score-sorted boxes padded to whole tiles, with the static sizes of the loops over them."""

    boxes: Array  # [num_tiles * tile, D], zeros past the n real boxes
    classes: Array | None  # int32 [num_tiles * tile] (zeros past n), or None without classes
    n: int  # real boxes
    tile: int  # boxes per tile
    num_tiles: int
    capacity: int  # max_kept rounded up to whole tiles: kept-box buffers are read in tile chunks


def pad_to_tiles(boxes: Array, classes: Array | None, tile: int, max_kept: int) -> TiledBoxes:
    """Pads score-sorted ``boxes [N, D]`` (and ``classes [N]``) to whole tiles of ``min(tile, N)``."""
    n = boxes.shape[0]
    tile = min(tile, n)
    num_tiles = -(-n // tile)
    padded = num_tiles * tile
    boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))
    if classes is not None:
        classes = jnp.pad(classes, (0, padded - n))
    return TiledBoxes(boxes, classes, n, tile, num_tiles, -(-max_kept // tile) * tile)


class _FixedPoint(NamedTuple):
    keep: Array  # bool [T]: the current guess
    changed: Array  # bool []: whether the last step changed it


def greedy_within_tile(candidate: Array, overlaps: Array, *refs: Array) -> Array:
    """The greedy rule inside one tile: box ``j`` is kept iff it is a ``candidate`` and no kept
    box ``i`` before it has ``overlaps[i, j]`` (``[T, T]``, only ``i < j`` set).

    Solved by fixed-point iteration, which reaches the unique greedy answer (position ``j`` is
    final once all positions before it are) and stops as soon as nothing changes. ``refs``: the
    arrays the loop carry must vary like under ``shard_map``.
    """

    def step(state: _FixedPoint) -> _FixedPoint:
        keep = state.keep
        new_keep = candidate & ~(keep[:, None] & overlaps).any(axis=0)
        return _FixedPoint(new_keep, (new_keep != keep).any())

    init = varying_like(_FixedPoint(candidate, jnp.bool_(True)), *refs)
    return lax.while_loop(lambda state: state.changed, step, init).keep
