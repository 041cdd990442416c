"""Tiling shared by the pure-XLA NMS loops (private)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from detlayers._sharding import varying_like

Array = jax.Array


def pad_to_tiles(boxes: Array, classes: Array | None, tile: int, max_kept: int):
    """Pads score-sorted ``boxes [N, D]`` (and ``classes [N]``) to whole tiles of ``min(tile, N)``.

    Returns ``(boxes, classes, tile, num_tiles, capacity)``: ``capacity`` is ``max_kept`` rounded
    up to whole tiles, the size of kept-box buffers read in chunks of ``tile``.
    """
    n = boxes.shape[0]
    tile = min(tile, n)
    num_tiles = -(-n // tile)
    padded = num_tiles * tile
    boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))
    if classes is not None:
        classes = jnp.pad(classes, (0, padded - n))
    return boxes, classes, tile, num_tiles, -(-max_kept // tile) * tile


def greedy_within_tile(candidate: Array, overlaps: Array, *refs: Array) -> Array:
    """The greedy rule inside one tile: box ``j`` is kept iff it is a ``candidate`` and no kept
    box ``i`` before it has ``overlaps[i, j]`` (``[T, T]``, only ``i < j`` set).

    Solved by fixed-point iteration, which reaches the unique greedy answer (position ``j`` is
    final once all positions before it are) and stops as soon as nothing changes. ``refs``: the
    arrays the loop carry must vary like under ``shard_map``.
    """

    def step(state):
        keep, _ = state
        new_keep = candidate & ~(keep[:, None] & overlaps).any(axis=0)
        return new_keep, (new_keep != keep).any()

    keep, _ = lax.while_loop(lambda s: s[1], step, varying_like((candidate, jnp.bool_(True)), *refs))
    return keep
