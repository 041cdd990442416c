"""The pure-XLA rotated NMS (the TPU path): its spatial grid of kept boxes, the kept boxes it holds
outside the grid and its chunked pair steps must give the greedy result of the spec's IoU.

The reference is a NumPy greedy NMS over the ``pairwise_iou_rotated`` matrix (itself checked
against detectron2 and shapely in test_rotated_iou.py). Small tiles, grids and pair batches put
300 boxes through every path: many tiles with a partial last one, several grid steps per tile,
boxes too large for the grid, non-finite and degenerate boxes, and negative thresholds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detlayers import _nms_rotated_xla as rotated_xla
from detlayers.rotated_boxes import pairwise_iou_rotated

N = 300  # 19 tiles of 16, the last one partial


@functools.cache
def _compiled(tile: int, grid_cells: int, max_kept: int):
    return jax.jit(
        functools.partial(
            rotated_xla.greedy_rotated_xla, max_kept=max_kept, tile=tile, grid_cells=grid_cells,
            pair_batch=64,
        )
    )


_iou_matrix = jax.jit(pairwise_iou_rotated)


def _greedy_reference(boxes: np.ndarray, classes: np.ndarray, threshold: float, max_kept: int) -> np.ndarray:
    """Positions kept by greedy NMS of boxes already in score order, on the spec's IoU."""
    iou = np.asarray(_iou_matrix(boxes, boxes))
    thr = np.float32(threshold)
    kept: list[int] = []
    for j in range(len(boxes)):
        if len(kept) == max_kept:
            break
        if not any(iou[i, j] > thr and classes[i] == classes[j] for i in kept):
            kept.append(j)
    return np.array(kept, np.int32)


def _problem(seed: int, kind: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``N`` rotated boxes (in score order) and class ids."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 200, (8, 2))
    xy = centres[rng.integers(0, 8, N)] + rng.normal(0, 6, (N, 2))
    # sides over two decades: a tail of boxes whose reach is above the grid's quantile
    sides = 10.0 ** rng.uniform(0.3, 1.6, (N, 2))
    sides[rng.random(N) < 0.04] *= 8
    boxes = np.concatenate([xy, sides, rng.uniform(-180, 180, (N, 1))], 1)
    if kind == "hostile":
        boxes[rng.random(N) < 0.03, 0] = np.inf
        boxes[rng.random(N) < 0.03, 1] = -np.inf
        boxes[rng.random(N) < 0.03, 2] = 0.0  # a zero side: infinite reach
        boxes[rng.random(N) < 0.03, :2] += 1e6  # far away, where float32 spacing is 0.06
        boxes[rng.random(N) < 0.03, 3] = np.inf
        duplicated = rng.random(N) < 0.05
        boxes[duplicated] = boxes[0]
    elif kind == "stacked":  # every box on one spot: few kept, long suppression lists
        boxes[:, :2] = 100.0 + rng.normal(0, 1, (N, 2))
    return boxes.astype(np.float32), rng.integers(0, classes, N).astype(np.int32)


def _run(tile, grid_cells, boxes, classes, threshold, max_kept=N):
    positions, count = _compiled(tile, grid_cells, max_kept)(boxes, classes, jnp.float32(threshold))
    positions, count = np.asarray(positions), int(count)
    assert np.all(positions[count:] == -1)
    return positions[:count]


@pytest.mark.parametrize("tile,grid_cells", [(16, 4), (64, 64)])
@pytest.mark.parametrize("kind", ["clustered", "hostile", "stacked"])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.7])
def test_greedy_result_of_the_spec_iou_for_every_grid_and_tile(tile, grid_cells, kind, threshold):
    boxes, classes = _problem(11, kind, 3)
    got = _run(tile, grid_cells, boxes, classes, threshold)
    expected = _greedy_reference(boxes, classes, threshold, N)
    np.testing.assert_array_equal(got, expected)
    assert 0 < len(expected) < N  # something was suppressed


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(-0.2, 1.0),
    kind=st.sampled_from(["clustered", "hostile", "stacked"]),
    classes=st.integers(1, 4),
)
def test_property_matches_the_greedy_reference(seed, threshold, kind, classes):
    boxes, ids = _problem(seed, kind, classes)
    np.testing.assert_array_equal(_run(16, 4, boxes, ids, threshold), _greedy_reference(boxes, ids, threshold, N))


@pytest.mark.parametrize("threshold", [-0.25, -1e-6])
def test_negative_threshold_keeps_the_best_box_of_each_class(threshold):
    # Pairs too far apart to overlap have IoU 0 > threshold: every later box of a class is
    # suppressed, far-apart ones included (detectron2's rule), so no box may use the grid.
    boxes, classes = _problem(5, "clustered", 3)
    boxes[:5, :2] += 1e4
    got = _run(16, 4, boxes, classes, threshold)
    first_of_each_class = np.sort(np.unique(classes, return_index=True)[1])
    np.testing.assert_array_equal(got, first_of_each_class)


def test_stops_at_max_kept():
    max_kept = 17
    boxes, classes = _problem(3, "clustered", 2)
    np.testing.assert_array_equal(
        _run(16, 4, boxes, classes, 0.3, max_kept), _greedy_reference(boxes, classes, 0.3, max_kept)
    )


def test_vmap_inside_shard_map_gives_each_image_its_own_result():
    # The public function on the pure-XLA path, batched by vmap (the loops' switch and gathers
    # are batched) inside shard_map (loop carries must vary like the inputs).
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from detlayers.nms import batched_nms_rotated

    images = [_problem(20 + k, ("clustered", "hostile")[k % 2], 2) for k in range(4)]
    boxes = np.stack([b for b, _ in images])
    classes = np.stack([c for _, c in images])
    scores = np.stack([np.random.default_rng(k).permutation(N).astype(np.float32) for k in range(4)])
    per_image = jax.vmap(lambda b, s, c: batched_nms_rotated(b, s, c, 0.3, backend="xla").indices)
    mesh = Mesh(np.array(jax.devices()[:2]), ("i",))
    sharded = jax.jit(jax.shard_map(per_image, mesh=mesh, in_specs=(P("i"),) * 3, out_specs=P("i")))
    got = np.asarray(sharded(boxes, scores, classes))
    for k in range(4):
        order = np.argsort(-scores[k], kind="stable")
        kept = order[_greedy_reference(boxes[k][order], classes[k][order], 0.3, N)]
        np.testing.assert_array_equal(got[k, : len(kept)], kept)
        assert np.all(got[k, len(kept):] == -1)
