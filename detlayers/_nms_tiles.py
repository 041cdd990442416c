"""Tiling shared by the pure-XLA NMS loops (private)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
