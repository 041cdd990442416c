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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._nms_tiles import TiledBoxes, greedy_within_tile, pad_to_tiles
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

# Columns of the per-box terms of the IoU bound and of the disc test (_bound_terms), gathered once
# per pair. (Prefixed: rotated_boxes.py has column constants of its own, at other positions.)
_TERM_X, _TERM_Y, _TERM_REACH, _TERM_HALF_X, _TERM_HALF_Y, _TERM_AREA, _TERM_ASPECT = range(7)


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
    # the columns, in the order of the _TERM_* constants
    x1, y1, reach1, half_x1, half_y1, area1, aspect1 = (first[..., k] for k in range(7))
    x2, y2, reach2, half_x2, half_y2, area2, aspect2 = (second[..., k] for k in range(7))
    apart = rotated_discs_apart(x1, y1, reach1, x2, y2, reach2)
    overlap_x = jnp.minimum(x1 + half_x1, x2 + half_x2) - jnp.maximum(x1 - half_x1, x2 - half_x2)
    overlap_y = jnp.minimum(y1 + half_y1, y2 + half_y2) - jnp.maximum(y1 - half_y1, y2 - half_y2)
    overlap = jnp.maximum(overlap_x, 0.0) * jnp.maximum(overlap_y, 0.0)
    most = jnp.minimum(overlap, jnp.minimum(area1, area2)) * np.float32(1.001)
    bound = most / (area1 + area2 - most)
    margin = np.float32(2e-3 + SOUND_TOLERANCE) + np.float32(1e-5) * (aspect1 + aspect2)
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


class _Problem(NamedTuple):
    """One call's score-sorted boxes, padded to whole tiles, and what every step reads (constant
    for the call: closed over by the loops, never carried)."""

    tiled: TiledBoxes
    terms: Array  # float32 [P, 7]: _bound_terms of tiled.boxes
    threshold: Array  # float32 []
    max_kept: int
    pair_batch: int  # exact IoUs per batch
    lane: Array  # int32 [T]: 0 .. T - 1
    earlier: Array  # bool [T, T]: [i, j] = i < j
    refs: tuple[Array, ...]  # the inputs: loop carries vary like them under shard_map

    @property
    def pairs_per_step(self) -> int:
        return self.tiled.tile * self.tiled.tile


class _GridLayout(NamedTuple):
    """Which boxes the spatial grid holds and in which cells (constant for the call)."""

    in_grid: Array  # bool [P]
    cell: Array  # int32 [P]: row-major cell of each box's centre (used where in_grid)
    r_cut: Array  # float32 []: reach bound of the grid boxes; -inf when the grid holds none
    origin_x: Array  # float32 []: the grid's lower corner ...
    origin_y: Array
    size_x: Array  # float32 []: ... and cell size
    size_y: Array
    cells_per_axis: int

    def cell_x(self, value: Array, *, upper: bool) -> Array:
        return _cell_coordinate(value, self.origin_x, self.size_x, self.cells_per_axis, upper=upper)

    def cell_y(self, value: Array, *, upper: bool) -> Array:
        return _cell_coordinate(value, self.origin_y, self.size_y, self.cells_per_axis, upper=upper)


class _Kept(NamedTuple):
    """Carry of the loop over tiles: the boxes kept so far, split between the grid and the others."""

    next_tile: Array  # int32 []: the tile to visit
    count: Array  # int32 []: boxes kept so far (at most max_kept)
    positions: Array  # int32 [max_kept]: their positions, -1 past count
    grid_boxes: Array  # int32 [capacity]: positions of the kept grid boxes, cell by cell (row-major)
    grid_per_cell: Array  # int32 [cells]: kept grid boxes per cell
    other_boxes: Array  # int32 [capacity]: positions of the other kept boxes, in the order kept
    other_count: Array  # int32 []


class _Candidates(NamedTuple):
    """The boxes of the tile being visited."""

    start: Array  # int32 []: position of the first
    boxes: Array  # float32 [T, 5]
    terms: Array  # float32 [T, 7]
    classes: Array | None  # int32 [T]
    live: Array  # bool [T]: real boxes (not padding)
    in_grid: Array  # bool [T]
    cell: Array  # int32 [T]


class _Segments(NamedTuple):
    """Runs of the kept grid boxes, one per (candidate, cell row) ``[T * cells_per_axis]``: the
    cells of a row that a candidate's square covers are adjacent in the cell-by-cell buffer."""

    start: Array  # int32: first slot in _Kept.grid_boxes
    length: Array  # int32: slots (0 outside the candidate's rows)
    end: Array  # int32: inclusive prefix sum of length, numbering the pairs of all segments


class _Pairs(NamedTuple):
    """The pairs of one step ``[M]`` (``M = T * T``): a first box against a candidate."""

    first: Array  # float32 [M, 5]: the kept (or earlier) box
    second: Array  # int32 [M]: lane of the candidate in the tile
    pending: Array  # bool [M]: decided by the exact IoU
    direct: Array  # bool [M]: suppresses without it (discs apart under a negative threshold)


class _TileTests(NamedTuple):
    """Carry of the loop over the steps of one tile."""

    step: Array  # int32 []: grid steps, then chunks of the other kept boxes, then the tile itself
    suppressed: Array  # bool [T]: overlapped by a box kept in an earlier tile
    inner: Array  # bool [T, T]: [i, j] where earlier box i of the tile overlaps j (last step)


class _IouBatches(NamedTuple):
    """Carry of the exact-IoU loop of one step."""

    done: Array  # int32 []: pending pairs evaluated so far
    hit: Array  # bool [M]: pairs whose IoU exceeds the threshold


# --- the grid ----------------------------------------------------------------------------------
def _grid_layout(problem: _Problem, grid_cells: int) -> _GridLayout:
    """Which boxes go into the grid (finite reach at most the ``REACH_QUANTILE`` quantile, none
    under a negative threshold), and a ``grid_cells x grid_cells`` grid over their centres."""
    terms, threshold, tiled = problem.terms, problem.threshold, problem.tiled
    real = jnp.arange(tiled.num_tiles * tiled.tile) < tiled.n
    finite = (
        real & jnp.isfinite(terms[:, _TERM_X]) & jnp.isfinite(terms[:, _TERM_Y]) & jnp.isfinite(terms[:, _TERM_REACH])
    )
    num_finite = finite.sum(dtype=jnp.int32)
    sorted_reach = jnp.sort(jnp.where(finite, terms[:, _TERM_REACH], jnp.inf))
    quantile_index = ((num_finite - 1) * int(REACH_QUANTILE * 1000)) // 1000
    r_cut = jnp.where(
        (threshold >= 0) & (num_finite > 0), sorted_reach[jnp.maximum(quantile_index, 0)], -jnp.inf
    )
    in_grid = finite & (terms[:, _TERM_REACH] <= r_cut)
    x_lo = jnp.min(jnp.where(in_grid, terms[:, _TERM_X], jnp.inf))
    y_lo = jnp.min(jnp.where(in_grid, terms[:, _TERM_Y], jnp.inf))
    x_hi = jnp.max(jnp.where(in_grid, terms[:, _TERM_X], -jnp.inf))
    y_hi = jnp.max(jnp.where(in_grid, terms[:, _TERM_Y], -jnp.inf))
    tiny = np.float32(np.finfo(np.float32).tiny)
    any_in_grid = in_grid.any()
    x_lo, y_lo = jnp.where(any_in_grid, x_lo, 0.0), jnp.where(any_in_grid, y_lo, 0.0)
    size_x = jnp.where(any_in_grid, jnp.maximum((x_hi - x_lo) / grid_cells, tiny), 1.0)
    size_y = jnp.where(any_in_grid, jnp.maximum((y_hi - y_lo) / grid_cells, tiny), 1.0)
    cell = (
        _cell_coordinate(terms[:, _TERM_Y], y_lo, size_y, grid_cells, upper=False) * grid_cells
        + _cell_coordinate(terms[:, _TERM_X], x_lo, size_x, grid_cells, upper=False)
    )
    return _GridLayout(in_grid, cell, r_cut, x_lo, y_lo, size_x, size_y, grid_cells)


def _query_segments(layout: _GridLayout, kept: _Kept, cand: _Candidates) -> _Segments:
    """Each candidate's square of cells, as one contiguous segment of the kept grid boxes per
    cell row."""
    grid_cells = layout.cells_per_axis
    cell_start = _exclusive_cumsum(kept.grid_per_cell)
    cell_end = cell_start + kept.grid_per_cell
    # A grid box overlaps the candidate only if its centre lies within the sum of the reaches, at
    # most `half`, on each axis. No margin is needed: float rounding is monotone and a centre is
    # a float, so a centre inside [x - half, x + half] falls in a cell inside
    # [cell(x - half), cell(x + half)] (the reach itself covers rounding of the disc test).
    half = cand.terms[:, _TERM_REACH] + layout.r_cut
    x, y = cand.terms[:, _TERM_X], cand.terms[:, _TERM_Y]
    x0, x1 = layout.cell_x(x - half, upper=False), layout.cell_x(x + half, upper=True)
    y0, y1 = layout.cell_y(y - half, upper=False), layout.cell_y(y + half, upper=True)
    row = jnp.arange(grid_cells, dtype=jnp.int32)[None, :]
    active = cand.live[:, None] & (row >= y0[:, None]) & (row <= y1[:, None])
    seg_start = cell_start[row * grid_cells + x0[:, None]]
    seg_len = jnp.where(active, cell_end[row * grid_cells + x1[:, None]] - seg_start, 0).reshape(-1)
    return _Segments(seg_start.reshape(-1), seg_len, jnp.cumsum(seg_len))


def _insert_into_grid(
    problem: _Problem, layout: _GridLayout, kept: _Kept, added: Array, cand: _Candidates
) -> tuple[Array, Array]:
    """The grid after adding the candidates ``added`` (bool ``[T]``): ``(grid_boxes,
    grid_per_cell)``, the buffer still ordered cell by cell (kept boxes in score order in a cell)."""
    capacity = problem.tiled.capacity
    added_cell = cand.cell
    added_per_cell = jnp.zeros((layout.cells_per_axis**2,), jnp.int32).at[added_cell].add(added.astype(jnp.int32))
    shift = _exclusive_cumsum(added_per_cell)  # new boxes in the cells before each cell
    slot = jnp.arange(capacity, dtype=jnp.int32)
    old_cell = layout.cell[kept.grid_boxes]
    moved = jnp.where(slot < kept.grid_per_cell.sum(), slot + shift[old_cell], capacity)
    new_per_cell = kept.grid_per_cell + added_per_cell
    same_cell_before = (problem.earlier & (added_cell[:, None] == added_cell[None, :]) & added[:, None]).sum(0)
    new_slot = _exclusive_cumsum(new_per_cell)[added_cell] + kept.grid_per_cell[added_cell] + same_cell_before
    new_slot = jnp.where(added, new_slot, capacity)
    buffer = jnp.zeros((capacity,), jnp.int32).at[moved].set(kept.grid_boxes, mode="drop")
    buffer = buffer.at[new_slot].set(cand.start + problem.lane, mode="drop")
    return buffer, new_per_cell


def _append_other(problem: _Problem, kept: _Kept, added: Array, cand: _Candidates) -> tuple[Array, Array]:
    """The other kept boxes after appending the candidates ``added``: ``(other_boxes, other_count)``."""
    capacity = problem.tiled.capacity
    slot = kept.other_count + jnp.cumsum(added, dtype=jnp.int32) - 1
    other_boxes = kept.other_boxes.at[jnp.where(added, slot, capacity)].set(cand.start + problem.lane, mode="drop")
    return other_boxes, jnp.minimum(kept.other_count + added.sum(dtype=jnp.int32), capacity)


# --- the pairs of one step -----------------------------------------------------------------------
def _grid_pairs(
    problem: _Problem, layout: _GridLayout, kept: _Kept, segments: _Segments, cand: _Candidates,
    suppressed: Array, step: Array,
) -> _Pairs:
    """Pairs ``step * M .. (step + 1) * M - 1`` of the segments: kept grid boxes near a candidate."""
    tiled, threshold, pairs_per_step = problem.tiled, problem.threshold, problem.pairs_per_step
    p = step * pairs_per_step + jnp.arange(pairs_per_step, dtype=jnp.int32)
    valid = p < segments.end[-1]
    seg = jnp.minimum(jnp.searchsorted(segments.end, p, side="right"), segments.end.shape[0] - 1)
    second = seg // layout.cells_per_axis  # segments are numbered candidate by candidate
    slot = segments.start[seg] + p - (segments.end[seg] - segments.length[seg])
    first_pos = kept.grid_boxes[jnp.clip(slot, 0, tiled.capacity - 1)]
    apart, may = _may_overlap(problem.terms[first_pos], cand.terms[second], threshold)
    mask = valid & ~suppressed[second]
    if tiled.classes is not None:
        mask &= tiled.classes[first_pos] == cand.classes[second]
    return _Pairs(tiled.boxes[first_pos], second, mask & ~apart & may, mask & apart & (np.float32(0) > threshold))


def _dense_pairs(
    problem: _Problem, first: Array, first_terms: Array, first_cls: Array | None, mask: Array,
    cand: _Candidates, suppressed: Array,
) -> _Pairs:
    """Every pair of ``first[T, 5]`` with a candidate, where ``mask [T, T]`` allows it."""
    tile, threshold = problem.tiled.tile, problem.threshold
    mask = mask & ~suppressed[None, :]
    if first_cls is not None:
        mask &= first_cls[:, None] == cand.classes[None, :]
    apart, may = _may_overlap(first_terms[:, None], cand.terms[None, :], threshold)
    first = jnp.broadcast_to(first[:, None], (tile, tile, 5)).reshape(-1, 5)
    second = jnp.broadcast_to(problem.lane[None, :], (tile, tile)).reshape(-1)
    pending = (mask & ~apart & may).reshape(-1)
    return _Pairs(first, second, pending, (mask & apart & (np.float32(0) > threshold)).reshape(-1))


def _other_pairs(problem: _Problem, kept: _Kept, cand: _Candidates, suppressed: Array, chunk: Array) -> _Pairs:
    """The candidates against chunk ``chunk`` of the kept boxes outside the grid."""
    tiled = problem.tiled
    chunk_pos = lax.dynamic_slice_in_dim(kept.other_boxes, chunk * tiled.tile, tiled.tile)
    chunk_cls = None if tiled.classes is None else tiled.classes[chunk_pos]
    live = (chunk * tiled.tile + problem.lane) < kept.other_count
    return _dense_pairs(
        problem, tiled.boxes[chunk_pos], problem.terms[chunk_pos], chunk_cls, live[:, None], cand, suppressed
    )


def _self_pairs(problem: _Problem, cand: _Candidates, suppressed: Array) -> _Pairs:
    """The candidates against the earlier candidates of the tile. Boxes already suppressed by
    earlier tiles neither need a test nor suppress others."""
    mask = problem.earlier & ~suppressed[:, None]
    return _dense_pairs(problem, cand.boxes, cand.terms, cand.classes, mask, cand, suppressed)


def _exact_hits(problem: _Problem, pairs: _Pairs, cand: _Candidates) -> Array:
    """bool ``[M]``: the pending pairs whose exact rotated IoU exceeds the threshold, evaluated
    ``pair_batch`` at a time (the only place the IoU computation appears in the program)."""
    pairs_per_step, pair_batch = problem.pairs_per_step, problem.pair_batch
    order = jnp.nonzero(pairs.pending, size=pairs_per_step + pair_batch, fill_value=0)[0]
    total = pairs.pending.sum(dtype=jnp.int32)

    def evaluate(state: _IouBatches) -> _IouBatches:
        idx = lax.dynamic_slice_in_dim(order, state.done, pair_batch)
        live = state.done + jnp.arange(pair_batch, dtype=jnp.int32) < total
        over = rotated_iou_paired(pairs.first[idx], cand.boxes[pairs.second[idx]]) > problem.threshold
        return _IouBatches(state.done + pair_batch, state.hit.at[idx].max(live & over))

    init = varying_like(_IouBatches(jnp.int32(0), jnp.zeros((pairs_per_step,), bool)), *problem.refs)
    return lax.while_loop(lambda state: state.done < total, evaluate, init).hit


# --- one tile ----------------------------------------------------------------------------------
def _test_tile(problem: _Problem, layout: _GridLayout, kept: _Kept, cand: _Candidates) -> tuple[Array, Array]:
    """Tests the candidates against the kept boxes and each other: ``(suppressed [T], inner [T, T])``.

    Steps: the grid's pairs, then the other kept boxes chunk by chunk, then the tile against
    itself (last, when ``suppressed`` is final). Every step's pairs go through one exact-IoU loop.
    """
    tile, refs = problem.tiled.tile, problem.refs
    segments = _query_segments(layout, kept, cand)
    grid_steps = -(-segments.end[-1] // problem.pairs_per_step)
    other_steps = (kept.other_count + tile - 1) // tile

    def step(state: _TileTests) -> _TileTests:
        k, suppressed = state.step, state.suppressed
        phase = jnp.where(k < grid_steps, 0, jnp.where(k < grid_steps + other_steps, 1, 2))
        pairs = lax.switch(
            phase,
            (  # (under shard_map the branches must agree on what varies)
                lambda: varying_like(_grid_pairs(problem, layout, kept, segments, cand, suppressed, k), *refs),
                lambda: varying_like(_other_pairs(problem, kept, cand, suppressed, k - grid_steps), *refs),
                lambda: varying_like(_self_pairs(problem, cand, suppressed), *refs),
            ),
        )
        hit = _exact_hits(problem, pairs, cand) | pairs.direct
        is_self = phase == 2
        return _TileTests(
            step=k + 1,
            suppressed=suppressed.at[pairs.second].max(hit & ~is_self),
            inner=jnp.where(is_self, hit.reshape(tile, tile), state.inner),
        )

    init = varying_like(_TileTests(jnp.int32(0), ~cand.live, jnp.zeros((tile, tile), bool)), *refs)
    final = lax.while_loop(lambda state: state.step <= grid_steps + other_steps, step, init)
    return final.suppressed, final.inner


def _tile_step(problem: _Problem, layout: _GridLayout, kept: _Kept) -> _Kept:
    """Visits tile ``kept.next_tile``: its surviving boxes join the kept boxes (and the grid)."""
    tiled, max_kept = problem.tiled, problem.max_kept
    start = kept.next_tile * tiled.tile

    def window(values: Array) -> Array:
        return lax.dynamic_slice_in_dim(values, start, tiled.tile)

    cand = _Candidates(
        start=start,
        boxes=window(tiled.boxes),
        terms=window(problem.terms),
        classes=None if tiled.classes is None else window(tiled.classes),
        live=(start + problem.lane) < tiled.n,
        in_grid=window(layout.in_grid),
        cell=window(layout.cell),
    )
    suppressed, inner = _test_tile(problem, layout, kept, cand)
    keep = greedy_within_tile(cand.live & ~suppressed, inner, *problem.refs)
    slot = kept.count + jnp.cumsum(keep, dtype=jnp.int32) - 1
    slot = jnp.where(keep & (slot < max_kept), slot, max_kept)  # out of range: dropped
    grid_boxes, grid_per_cell = _insert_into_grid(problem, layout, kept, keep & cand.in_grid, cand)
    other_boxes, other_count = _append_other(problem, kept, keep & ~cand.in_grid, cand)
    return _Kept(
        next_tile=kept.next_tile + 1,
        count=jnp.minimum(kept.count + keep.sum(dtype=jnp.int32), max_kept),
        positions=kept.positions.at[slot].set(start + problem.lane, mode="drop"),
        grid_boxes=grid_boxes,
        grid_per_cell=grid_per_cell,
        other_boxes=other_boxes,
        other_count=other_count,
    )


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
    tiled = pad_to_tiles(boxes, classes, tile, max_kept)
    lane = varying_like(jnp.arange(tiled.tile, dtype=jnp.int32), *refs)
    problem = _Problem(
        tiled=tiled,
        terms=_bound_terms(tiled.boxes),
        threshold=threshold,
        max_kept=max_kept,
        pair_batch=pair_batch,
        lane=lane,
        earlier=lane[:, None] < lane[None, :],
        refs=refs,
    )
    layout = _grid_layout(problem, grid_cells)
    init = _Kept(
        next_tile=jnp.int32(0),
        count=jnp.int32(0),
        positions=jnp.full((max_kept,), -1, jnp.int32),
        grid_boxes=jnp.zeros((tiled.capacity,), jnp.int32),
        grid_per_cell=jnp.zeros((grid_cells * grid_cells,), jnp.int32),
        other_boxes=jnp.zeros((tiled.capacity,), jnp.int32),
        other_count=jnp.int32(0),
    )
    final = lax.while_loop(
        lambda kept: (kept.next_tile < tiled.num_tiles) & (kept.count < max_kept),
        functools.partial(_tile_step, problem, layout),
        varying_like(init, *refs),
    )
    return final.positions, final.count
