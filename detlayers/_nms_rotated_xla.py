"""Pure-XLA greedy rotated NMS whose work follows the overlapping pairs (private).

The pure-XLA path of :func:`detlayers.nms.nms_rotated` and ``batched_nms_rotated`` (the TPU path,
and the reference everywhere). It computes the same greedy result as the C++ and CUDA kernels;
what it adds is a spatial index of the kept boxes, so a candidate is tested only against kept
boxes near it, not against every kept box:

* Boxes are visited in tiles of ``tile`` by decreasing score. A tile's candidates are first
  tested against the boxes kept in earlier tiles, then against each other (earlier in the tile
  only), and the greedy rule inside the tile is solved by fixed-point iteration.
* Kept boxes whose reach (:func:`detlayers.rotated_boxes.rotated_reach`) is at most ``r_cut`` (the
  ``REACH_QUANTILE`` quantile of the finite reaches) go into a uniform grid of
  ``grid_cells x grid_cells`` cells over the centres of such boxes, stored cell by cell so that the
  kept boxes of a row of cells are contiguous. A candidate of reach ``r`` can only overlap a
  grid box whose centre lies within ``r + r_cut`` of its own (per axis), so it enumerates the kept
  boxes of the cell rows and columns of that square: work proportional to the kept boxes near it.
* The other kept boxes (larger reach, a non-finite centre or reach, and every box when the
  threshold is negative, where pairs too far apart to overlap still suppress) are few and are
  tested against the whole tile, chunk by chunk, as in the axis-aligned path.
* Each step gathers up to ``tile * tile`` candidate pairs, drops those whose bounding discs cannot
  meet or whose IoU bound (:func:`rotated_iou_may_exceed`) stays below the threshold, and
  evaluates the exact rotated IoU of the rest in batches of ``pair_batch``. All sources of pairs
  run through one loop, so the (large) IoU computation appears in the program once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._nms_tiles import greedy_within_tile, pad_to_tiles
from detlayers._sharding import varying_like
from detlayers.rotated_boxes import (
    SOUND_TOLERANCE,
    _cos_sin_degrees,
    rotated_discs_apart,
    rotated_iou_paired,
    rotated_reach,
)

Array = jax.Array

PAIR_BATCH = 512  # exact rotated IoUs evaluated per batch
GRID_CELLS = 64  # cells per axis of the spatial index of kept boxes
REACH_QUANTILE = 0.98  # boxes of larger reach are tested against every candidate instead

# The per-box terms of the IoU bound and of the disc test, gathered once per pair.
_X, _Y, _REACH, _HALF_X, _HALF_Y, _AREA, _ASPECT = range(7)


def _bound_terms(boxes: Array) -> Array:
    """``[K, 7]``: centre, reach, half extents of the axis-aligned bounding box, area and aspect
    ratio of rotated boxes ``[K, 5]``."""
    cos, sin = _cos_sin_degrees(boxes[:, 4], truncated=False)
    w, h = jnp.abs(boxes[:, 2]), jnp.abs(boxes[:, 3])
    half_x = 0.5 * (jnp.abs(w * cos) + jnp.abs(h * sin))
    half_y = 0.5 * (jnp.abs(w * sin) + jnp.abs(h * cos))
    aspect = jnp.maximum(w, h) / jnp.minimum(w, h)  # inf or NaN for a zero side
    reach = rotated_reach(boxes)
    return jnp.stack([boxes[:, 0], boxes[:, 1], reach, half_x, half_y, w * h, aspect], axis=-1)


def _may_overlap(first: Array, second: Array, threshold: Array) -> tuple[Array, Array]:
    """For bound terms ``first[..., 7]`` and ``second[..., 7]`` (broadcast): ``(apart, may)``.

    ``apart``: the bounding discs cannot meet (IoU exactly 0). ``may``: False only where the IoU
    certainly does not exceed ``threshold``. The intersection is at most the smaller area and
    the overlap of the axis-aligned bounding boxes; the IoU bound that follows is inflated by a
    margin far above the float32 error of the IoU (``SOUND_TOLERANCE``, rounding, and the
    ``eps * aspect ratio`` error of thin boxes), so culled pairs are ones every backend's exact
    evaluation would not suppress either.
    """
    f = [first[..., k] for k in range(7)]
    s = [second[..., k] for k in range(7)]
    apart = rotated_discs_apart(f[_X], f[_Y], f[_REACH], s[_X], s[_Y], s[_REACH])
    overlap_x = jnp.minimum(f[_X] + f[_HALF_X], s[_X] + s[_HALF_X]) - jnp.maximum(f[_X] - f[_HALF_X], s[_X] - s[_HALF_X])
    overlap_y = jnp.minimum(f[_Y] + f[_HALF_Y], s[_Y] + s[_HALF_Y]) - jnp.maximum(f[_Y] - f[_HALF_Y], s[_Y] - s[_HALF_Y])
    overlap = jnp.maximum(overlap_x, 0.0) * jnp.maximum(overlap_y, 0.0)
    most = jnp.minimum(overlap, jnp.minimum(f[_AREA], s[_AREA])) * np.float32(1.001)
    bound = most / (f[_AREA] + s[_AREA] - most)
    margin = np.float32(2e-3 + SOUND_TOLERANCE) + np.float32(1e-5) * (f[_ASPECT] + s[_ASPECT])
    return apart, ~(bound < threshold - margin)  # NaN anywhere: keep the pair


def rotated_iou_may_exceed(first: Array, second: Array, threshold: Array) -> Array:
    """``[P, Q]``: False only where the IoU of ``first[p]`` and ``second[q]`` (rotated boxes
    ``[P, 5]``, ``[Q, 5]``) certainly does not exceed ``threshold`` (see :func:`_may_overlap`)."""
    _, may = _may_overlap(_bound_terms(first)[:, None], _bound_terms(second)[None, :], threshold)
    return may


def _cell_coordinate(value: Array, origin: Array, cell_size: Array, cells: int, *, upper: bool) -> Array:
    """The grid cell (``0 .. cells - 1``) of a coordinate; a NaN coordinate maps to the first
    cell (``upper=False``) or the last one (``upper=True``), so a query range covers the grid."""
    t = (value - origin) / cell_size
    if upper:
        return jnp.where(t < cells - 1, jnp.floor(jnp.maximum(t, 0.0)), cells - 1).astype(jnp.int32)
    return jnp.where(t > 0, jnp.floor(jnp.minimum(t, cells - 1.0)), 0).astype(jnp.int32)


def _exclusive_cumsum(x: Array) -> Array:
    return jnp.cumsum(x) - x


def greedy_rotated_xla(
    boxes: Array,
    classes: Array | None,
    threshold: Array,
    *,
    max_kept: int,
    tile: int,
    grid_cells: int = GRID_CELLS,
    pair_batch: int = PAIR_BATCH,
) -> tuple[Array, Array]:
    """Greedy rotated NMS over score-sorted boxes ``[N, 5]`` (``classes`` int32 ``[N]`` or None,
    ``threshold`` float32 ``[]``); returns kept positions int32 ``[max_kept]`` (``-1`` past the
    count) and their count. See the module docstring for the algorithm."""
    refs = (boxes, threshold) if classes is None else (boxes, classes, threshold)
    # Under shard_map, everything the loops combine varies like the boxes (vmap of a switch
    # inside shard_map cannot insert that cast for a closed-over invariant value itself).
    threshold = varying_like(threshold, *refs)
    n = boxes.shape[0]
    boxes, classes, tile, num_tiles, capacity = pad_to_tiles(boxes, classes, tile, max_kept)
    padded = num_tiles * tile
    pairs_per_step = tile * tile
    cells = grid_cells * grid_cells
    lane = varying_like(jnp.arange(tile, dtype=jnp.int32), *refs)
    earlier = lane[:, None] < lane[None, :]

    # --- which boxes the grid holds, and the grid ------------------------------------------
    terms = _bound_terms(boxes)
    real = jnp.arange(padded) < n
    finite = real & jnp.isfinite(terms[:, _X]) & jnp.isfinite(terms[:, _Y]) & jnp.isfinite(terms[:, _REACH])
    num_finite = finite.sum(dtype=jnp.int32)
    sorted_reach = jnp.sort(jnp.where(finite, terms[:, _REACH], jnp.inf))
    quantile_index = ((num_finite - 1) * int(REACH_QUANTILE * 1000)) // 1000
    r_cut = jnp.where(
        (threshold >= 0) & (num_finite > 0), sorted_reach[jnp.maximum(quantile_index, 0)], -jnp.inf
    )
    in_grid = finite & (terms[:, _REACH] <= r_cut)
    x_lo = jnp.min(jnp.where(in_grid, terms[:, _X], jnp.inf))
    y_lo = jnp.min(jnp.where(in_grid, terms[:, _Y], jnp.inf))
    x_hi = jnp.max(jnp.where(in_grid, terms[:, _X], -jnp.inf))
    y_hi = jnp.max(jnp.where(in_grid, terms[:, _Y], -jnp.inf))
    tiny = np.float32(np.finfo(np.float32).tiny)
    any_in_grid = in_grid.any()
    x_lo, y_lo = jnp.where(any_in_grid, x_lo, 0.0), jnp.where(any_in_grid, y_lo, 0.0)
    size_x = jnp.where(any_in_grid, jnp.maximum((x_hi - x_lo) / grid_cells, tiny), 1.0)
    size_y = jnp.where(any_in_grid, jnp.maximum((y_hi - y_lo) / grid_cells, tiny), 1.0)
    cell_x = functools.partial(_cell_coordinate, origin=x_lo, cell_size=size_x, cells=grid_cells)
    cell_y = functools.partial(_cell_coordinate, origin=y_lo, cell_size=size_y, cells=grid_cells)
    cell = cell_y(terms[:, _Y], upper=False) * grid_cells + cell_x(terms[:, _X], upper=False)

    # --- the pairs of one step: (first boxes [M, 5], second lane [M], pending [M], direct [M]) --
    def grid_pairs(step, tile_state):
        cur_terms, cur_cls, suppressed, grid, segments = tile_state
        kept_in_grid, _ = grid
        seg_start, seg_len, seg_end = segments
        p = step * pairs_per_step + jnp.arange(pairs_per_step, dtype=jnp.int32)
        valid = p < seg_end[-1]
        seg = jnp.minimum(jnp.searchsorted(seg_end, p, side="right"), seg_end.shape[0] - 1)
        second = seg // grid_cells
        first_pos = kept_in_grid[jnp.clip(seg_start[seg] + p - (seg_end[seg] - seg_len[seg]), 0, capacity - 1)]
        apart, may = _may_overlap(terms[first_pos], cur_terms[second], threshold)
        mask = valid & ~suppressed[second]
        if classes is not None:
            mask &= classes[first_pos] == cur_cls[second]
        return boxes[first_pos], second, mask & ~apart & may, mask & apart & (np.float32(0) > threshold)

    def dense_pairs(first, first_terms, first_cls, mask, tile_state):
        cur_terms, cur_cls, suppressed, _, _ = tile_state
        mask = mask & ~suppressed[None, :]
        if classes is not None:
            mask &= first_cls[:, None] == cur_cls[None, :]
        apart, may = _may_overlap(first_terms[:, None], cur_terms[None, :], threshold)
        first = jnp.broadcast_to(first[:, None], (tile, tile, 5)).reshape(-1, 5)
        second = jnp.broadcast_to(lane[None, :], (tile, tile)).reshape(-1)
        return first, second, (mask & ~apart & may).reshape(-1), (mask & apart & (np.float32(0) > threshold)).reshape(-1)

    def other_pairs(chunk, kept_other, count_other, tile_state):
        chunk_pos = lax.dynamic_slice_in_dim(kept_other, chunk * tile, tile)
        chunk_cls = None if classes is None else classes[chunk_pos]
        live = (chunk * tile + lane) < count_other
        return dense_pairs(boxes[chunk_pos], terms[chunk_pos], chunk_cls, live[:, None], tile_state)

    def self_pairs(cur, tile_state):
        cur_terms, cur_cls, suppressed, _, _ = tile_state
        # Boxes already suppressed by earlier tiles neither need a test nor suppress others.
        return dense_pairs(cur, cur_terms, cur_cls, earlier & ~suppressed[:, None], tile_state)

    # --- exact IoU of the pending pairs of a step --------------------------------------------
    def exact_hits(first, second, pending, cur):
        order = jnp.nonzero(pending, size=pairs_per_step + pair_batch, fill_value=0)[0]
        total = pending.sum(dtype=jnp.int32)

        def evaluate(state):
            done, hit = state
            idx = lax.dynamic_slice_in_dim(order, done, pair_batch)
            live = done + jnp.arange(pair_batch, dtype=jnp.int32) < total
            over = rotated_iou_paired(first[idx], cur[second[idx]]) > threshold
            return done + pair_batch, hit.at[idx].max(live & over)

        init = varying_like((jnp.int32(0), jnp.zeros((pairs_per_step,), bool)), *refs)
        return lax.while_loop(lambda s: s[0] < total, evaluate, init)[1]

    # --- one tile ------------------------------------------------------------------------------
    def tile_step(state):
        t, count, positions, grid, kept_other, count_other = state
        start = t * tile
        cur = lax.dynamic_slice_in_dim(boxes, start, tile)
        cur_terms = lax.dynamic_slice_in_dim(terms, start, tile)
        cur_cls = None if classes is None else lax.dynamic_slice_in_dim(classes, start, tile)
        cur_in_grid = lax.dynamic_slice_in_dim(in_grid, start, tile)
        cur_cell = lax.dynamic_slice_in_dim(cell, start, tile)
        live = (start + lane) < n

        # Each candidate's square of cells, as one contiguous segment of the kept grid boxes
        # per cell row.
        kept_in_grid, kept_per_cell = grid
        cell_start = _exclusive_cumsum(kept_per_cell)
        cell_end = cell_start + kept_per_cell
        # A grid box overlaps the candidate only if its centre lies within the sum of the
        # reaches, at most `half`, on each axis. No margin is needed: float rounding is monotone
        # and a centre is a float, so a centre inside [x - half, x + half] falls in a cell inside
        # [cell(x - half), cell(x + half)] (the reach itself covers rounding of the disc test).
        half = cur_terms[:, _REACH] + r_cut
        x0, x1 = cell_x(cur_terms[:, _X] - half, upper=False), cell_x(cur_terms[:, _X] + half, upper=True)
        y0, y1 = cell_y(cur_terms[:, _Y] - half, upper=False), cell_y(cur_terms[:, _Y] + half, upper=True)
        row = jnp.arange(grid_cells, dtype=jnp.int32)[None, :]
        active = live[:, None] & (row >= y0[:, None]) & (row <= y1[:, None])
        seg_start = cell_start[row * grid_cells + x0[:, None]]
        seg_len = jnp.where(active, cell_end[row * grid_cells + x1[:, None]] - seg_start, 0).reshape(-1)
        segments = (seg_start.reshape(-1), seg_len, jnp.cumsum(seg_len))
        grid_steps = -(-segments[2][-1] // pairs_per_step)
        other_steps = (count_other + tile - 1) // tile

        # Steps: the grid's pairs, then the other kept boxes chunk by chunk, then the tile
        # against itself (last, when `suppressed` is final).
        def pass_step(pass_state):
            k, suppressed, inner = pass_state
            tile_state = (cur_terms, cur_cls, suppressed, grid, segments)
            phase = jnp.where(k < grid_steps, 0, jnp.where(k < grid_steps + other_steps, 1, 2))
            first, second, pending, direct = lax.switch(
                phase,
                (  # (under shard_map the branches must agree on what varies)
                    lambda: varying_like(grid_pairs(k, tile_state), *refs),
                    lambda: varying_like(other_pairs(k - grid_steps, kept_other, count_other, tile_state), *refs),
                    lambda: varying_like(self_pairs(cur, tile_state), *refs),
                ),
            )
            hit = exact_hits(first, second, pending, cur) | direct
            is_self = phase == 2
            suppressed = suppressed.at[second].max(hit & ~is_self)
            inner = jnp.where(is_self, hit.reshape(tile, tile), inner)
            return k + 1, suppressed, inner

        init = varying_like((jnp.int32(0), ~live, jnp.zeros((tile, tile), bool)), *refs)
        _, suppressed, inner = lax.while_loop(lambda s: s[0] <= grid_steps + other_steps, pass_step, init)
        keep = greedy_within_tile(live & ~suppressed, inner, *refs)
        slot = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
        slot = jnp.where(keep & (slot < max_kept), slot, max_kept)  # out of range: dropped
        positions = positions.at[slot].set(start + lane, mode="drop")
        count = jnp.minimum(count + keep.sum(dtype=jnp.int32), max_kept)
        return t + 1, count, positions, _add_to_grid(grid, keep & cur_in_grid, cur_cell, start), \
            *_add_to_other(kept_other, count_other, keep & ~cur_in_grid, start)

    def _add_to_grid(grid, added, added_cell, start):
        """Inserts the tile's kept grid boxes, keeping the buffer ordered cell by cell."""
        kept_in_grid, kept_per_cell = grid
        added_per_cell = jnp.zeros((cells,), jnp.int32).at[added_cell].add(added.astype(jnp.int32))
        shift = _exclusive_cumsum(added_per_cell)  # new boxes in the cells before each cell
        slot = jnp.arange(capacity, dtype=jnp.int32)
        old_cell = cell[kept_in_grid]
        moved = jnp.where(slot < kept_per_cell.sum(), slot + shift[old_cell], capacity)
        new_per_cell = kept_per_cell + added_per_cell
        same_cell_before = (earlier & (added_cell[:, None] == added_cell[None, :]) & added[:, None]).sum(0)
        new_slot = _exclusive_cumsum(new_per_cell)[added_cell] + kept_per_cell[added_cell] + same_cell_before
        new_slot = jnp.where(added, new_slot, capacity)
        buffer = jnp.zeros((capacity,), jnp.int32).at[moved].set(kept_in_grid, mode="drop")
        buffer = buffer.at[new_slot].set(start + lane, mode="drop")
        return buffer, new_per_cell

    def _add_to_other(kept_other, count_other, added, start):
        slot = count_other + jnp.cumsum(added, dtype=jnp.int32) - 1
        kept_other = kept_other.at[jnp.where(added, slot, capacity)].set(start + lane, mode="drop")
        return kept_other, jnp.minimum(count_other + added.sum(dtype=jnp.int32), capacity)

    init = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.full((max_kept,), -1, jnp.int32),
        (jnp.zeros((capacity,), jnp.int32), jnp.zeros((cells,), jnp.int32)),
        jnp.zeros((capacity,), jnp.int32),
        jnp.int32(0),
    )
    _, count, positions, _, _, _ = lax.while_loop(
        lambda s: (s[0] < num_tiles) & (s[1] < max_kept), tile_step, varying_like(init, *refs)
    )
    return positions, count
