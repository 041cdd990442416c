"""Pure-XLA greedy NMS of axis-aligned boxes (private).

The path of :func:`detlayers.nms.nms` and ``batched_nms`` where no custom call exists (TPU, or no
library built), and the reference everywhere. Tiles of ``tile`` score-sorted boxes are visited
in order inside a ``while_loop``. A tile's box survives the boxes kept in earlier tiles if none
of them overlaps it, checked chunk by chunk over the kept prefix only (``O(N * kept)`` work,
memory ``O(N + tile^2)``, no ``N x N`` matrix); inside the tile the greedy rule is solved by
:func:`detlayers._nms_tiles.greedy_within_tile`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from detlayers._nms_tiles import TiledBoxes, greedy_within_tile, pad_to_tiles
from detlayers._numerics import round_product
from detlayers._sharding import varying_like

Array = jax.Array


def axis_iou(first: Array, second: Array) -> Array:
    """IoU ``[P, Q]`` of ``first[P, 4]`` (the higher-scoring boxes) with ``second[Q, 4]``, in
    torchvision's operation order (bit-identical to custom_calls/nms_box_iou.h)."""
    area1 = round_product((first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1]))
    area2 = round_product((second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1]))
    xx1 = jnp.maximum(first[:, None, 0], second[None, :, 0])
    yy1 = jnp.maximum(first[:, None, 1], second[None, :, 1])
    xx2 = jnp.minimum(first[:, None, 2], second[None, :, 2])
    yy2 = jnp.minimum(first[:, None, 3], second[None, :, 3])
    w = jnp.maximum(0.0, xx2 - xx1)
    h = jnp.maximum(0.0, yy2 - yy1)
    inter = round_product(w * h)
    return inter / ((area1[:, None] + area2[None, :]) - inter)


def _overlaps(
    first: Array, first_cls: Array | None, second: Array, second_cls: Array | None, mask: Array, threshold: Array
) -> Array:
    """bool ``[P, Q]``: ``mask``, the same class (when classes are given) and IoU ``> threshold``."""
    if first_cls is not None:
        mask &= first_cls[:, None] == second_cls[None, :]
    return mask & (axis_iou(first, second) > threshold)


class _Kept(NamedTuple):
    """Carry of the loop over tiles: the boxes kept so far."""

    next_tile: Array  # int32 []: the tile to visit
    count: Array  # int32 []: boxes kept so far (at most max_kept)
    positions: Array  # int32 [max_kept]: their positions, -1 past count
    boxes: Array  # float32 [capacity, 4]: their boxes, by slot
    classes: Array  # int32 [capacity] (by slot), or [0] without classes


class _TilePass(NamedTuple):
    """Carry of the loop over the passes of one tile."""

    index: Array  # int32 []: passes 0 .. num_chunks - 1 read chunks of the kept boxes, the last the tile
    suppressed: Array  # bool [T]: overlapped by a box kept in an earlier tile
    inner: Array  # bool [T, T]: [i, j] where earlier box i of the tile overlaps j (set by the last pass)


def _test_tile(
    cur: Array, cur_cls: Array | None, kept: _Kept, threshold: Array, refs: tuple[Array, ...]
) -> tuple[Array, Array]:
    """Tests the tile ``cur[T, 4]`` against the kept boxes, chunk by chunk over the kept prefix
    only, then against itself (earlier boxes only); returns ``(suppressed [T], inner [T, T])``."""
    tile = cur.shape[0]
    lane = jnp.arange(tile, dtype=jnp.int32)
    earlier = lane[:, None] < lane[None, :]
    num_chunks = (kept.count + tile - 1) // tile

    def pass_step(state: _TilePass) -> _TilePass:
        is_self = state.index == num_chunks
        base = state.index * tile  # past the buffer only on the self pass, where it is unused
        chunk = lax.dynamic_slice_in_dim(kept.boxes, base, tile)
        chunk_cls = None if cur_cls is None else lax.dynamic_slice_in_dim(kept.classes, base, tile)
        live = (base + lane) < kept.count
        first = jnp.where(is_self, cur, chunk)
        first_cls = None if cur_cls is None else jnp.where(is_self, cur_cls, chunk_cls)
        # Boxes already suppressed need no further test, nor suppress others in the tile (the
        # self pass comes last, when `suppressed` is final).
        mask = jnp.where(is_self, earlier & ~state.suppressed[:, None], live[:, None])
        mask &= ~state.suppressed[None, :]
        hit = _overlaps(first, first_cls, cur, cur_cls, mask, threshold)
        return _TilePass(
            index=state.index + 1,
            suppressed=state.suppressed | (hit.any(axis=0) & ~is_self),
            inner=jnp.where(is_self, hit, state.inner),
        )

    init = _TilePass(jnp.int32(0), jnp.zeros((tile,), bool), jnp.zeros((tile, tile), bool))
    final = lax.while_loop(lambda state: state.index <= num_chunks, pass_step, varying_like(init, *refs))
    return final.suppressed, final.inner


def _tile_step(
    tiled: TiledBoxes, threshold: Array, max_kept: int, refs: tuple[Array, ...], kept: _Kept
) -> _Kept:
    """Visits tile ``kept.next_tile``: appends its boxes that survive to the kept boxes."""
    tile = tiled.tile
    lane = jnp.arange(tile, dtype=jnp.int32)
    start = kept.next_tile * tile
    cur = lax.dynamic_slice_in_dim(tiled.boxes, start, tile)
    cur_cls = None if tiled.classes is None else lax.dynamic_slice_in_dim(tiled.classes, start, tile)
    suppressed, inner = _test_tile(cur, cur_cls, kept, threshold, refs)
    candidate = ((start + lane) < tiled.n) & ~suppressed
    keep = greedy_within_tile(candidate, inner, *refs)
    slot = kept.count + jnp.cumsum(keep, dtype=jnp.int32) - 1
    slot = jnp.where(keep & (slot < max_kept), slot, tiled.capacity)  # out of range: dropped
    return _Kept(
        next_tile=kept.next_tile + 1,
        count=jnp.minimum(kept.count + keep.sum(dtype=jnp.int32), max_kept),
        positions=kept.positions.at[slot].set(start + lane, mode="drop"),
        boxes=kept.boxes.at[slot].set(cur, mode="drop"),
        classes=kept.classes if cur_cls is None else kept.classes.at[slot].set(cur_cls, mode="drop"),
    )


def greedy_xla(
    boxes: Array, classes: Array | None, threshold: Array, *, max_kept: int, tile: int
) -> tuple[Array, Array]:
    """Greedy NMS over score-sorted boxes ``[N, 4]`` (``classes`` int32 ``[N]`` or None: boxes of
    different classes never interact; ``threshold`` float32 ``[]``) in tiles of ``tile`` boxes;
    returns the kept positions int32 ``[max_kept]`` (``-1`` past the count) and their count."""
    refs = (boxes, threshold) if classes is None else (boxes, classes, threshold)
    tiled = pad_to_tiles(boxes, classes, tile, max_kept)
    init = _Kept(
        next_tile=jnp.int32(0),
        count=jnp.int32(0),
        positions=jnp.full((max_kept,), -1, jnp.int32),
        boxes=jnp.zeros((tiled.capacity, boxes.shape[1]), jnp.float32),
        classes=jnp.zeros((tiled.capacity if classes is not None else 0,), jnp.int32),
    )
    final = lax.while_loop(
        lambda kept: (kept.next_tile < tiled.num_tiles) & (kept.count < max_kept),
        functools.partial(_tile_step, tiled, threshold, max_kept, refs),
        varying_like(init, *refs),
    )
    return final.positions, final.count
