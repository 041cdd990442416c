"""Rotated-box IoU: ``detlayers.pairwise_iou_rotated`` (jnp) and ``custom_calls/rotated_iou.h``.

References:
  * ``tests/fixtures/rotated_iou.npz``: detectron2's CPU ``pairwise_iou_rotated`` on random,
    clustered, tiny, huge, far-away, right-angle, re-parameterised, near-identical, disjoint and
    degenerate boxes, plus the scenarios of detectron2's own tests
    (``tools/fixtures/make_rotated_iou.py``);
  * detectron2's published expected values (hard-coded tables of its test_rotated_boxes.py);
  * an independent float64 NumPy derivation (Sutherland-Hodgman clipping of the two rectangles).
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shapely
from helpers import load_npz
from hypothesis import given, settings
from hypothesis import strategies as st

import detlayers
from detlayers.rotated_boxes import (
    SOUND_TOLERANCE,
    pairwise_iou_rotated,
    rotated_box_areas,
    rotated_box_corners,
    rotated_iou_one_to_many,
    rotated_iou_paired,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADER_DIR = REPO / "custom_calls"
CPP_DIR = pathlib.Path(__file__).resolve().parent / "cpp"

_pairwise = jax.jit(pairwise_iou_rotated)
_pairwise_small_chunks = jax.jit(functools.partial(pairwise_iou_rotated, pairs_per_chunk=7))

SMALL = 8  # every small test pads its boxes to [SMALL, 5] x [SMALL, 5]: one compilation
_FILLER = np.array([1e6, 1e6, 1.0, 1.0, 0.0], np.float32)


def small_iou(boxes1, boxes2) -> np.ndarray:
    """pairwise_iou_rotated on up to SMALL x SMALL boxes through one compiled shape."""
    boxes1 = np.asarray(boxes1, np.float32).reshape(-1, 5)
    boxes2 = np.asarray(boxes2, np.float32).reshape(-1, 5)
    n, m = len(boxes1), len(boxes2)
    assert n <= SMALL and m <= SMALL
    pad1 = np.concatenate([boxes1, np.tile(_FILLER, (SMALL - n, 1))])
    pad2 = np.concatenate([boxes2, np.tile(_FILLER, (SMALL - m, 1))])
    return np.asarray(_pairwise(pad1, pad2))[:n, :m]


# --------------------------------------------------------------------------------------------
# detectron2 fixtures
# --------------------------------------------------------------------------------------------
def _load_cases(fixtures_dir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    data = load_npz(fixtures_dir / "rotated_iou.npz")
    names = sorted({key.split("/")[0] for key in data})
    return {n: (data[f"{n}/boxes1"], data[f"{n}/boxes2"], data[f"{n}/iou"]) for n in names}


@pytest.fixture(scope="module")
def cases(fixtures_dir):
    return _load_cases(fixtures_dir)


@pytest.fixture(scope="module")
def ours_on_cases(cases):
    """Our IoUs for every fixture case, from ONE compiled call on all boxes stacked together."""
    all1 = np.concatenate([b1 for b1, _, _ in cases.values()])
    all2 = np.concatenate([b2 for _, b2, _ in cases.values()])
    full = np.asarray(_pairwise(all1, all2))
    out, r, c = {}, 0, 0
    for name, (b1, b2, _) in cases.items():
        out[name] = full[r : r + len(b1), c : c + len(b2)]
        r, c = r + len(b1), c + len(b2)
    return out


CASE_NAMES = sorted(_load_cases(pathlib.Path(__file__).parent / "fixtures"))

# Agreement with the float64 reference expected of every result (detectron2's sound values are
# within SOUND_TOLERANCE of it, our exact values within a few float32 ulps of the union).
EXACT_ATOL = 3e-5


def shapely_iou(boxes1, boxes2) -> np.ndarray:
    """float64 IoU of ``boxes1[p]`` and ``boxes2[p]`` by shapely's polygon intersection (corners
    from the float64 angle in radians, relative to the midpoint of the two centres); IoU 0 when
    either area is below 1e-14 (the spec's rule)."""
    b1 = np.asarray(boxes1, np.float64).reshape(-1, 5)
    b2 = np.asarray(boxes2, np.float64).reshape(-1, 5)
    mid = (b1[:, :2] + b2[:, :2]) / 2

    def polygons(b):
        t = np.deg2rad(b[:, 4])
        u = np.stack([np.cos(t), -np.sin(t)], -1) * (b[:, 2:3] / 2)
        v = np.stack([np.sin(t), np.cos(t)], -1) * (b[:, 3:4] / 2)
        c = b[:, :2] - mid
        ring = np.stack([c + u + v, c + u - v, c - u - v, c - u + v], 1)
        return shapely.polygons(ring)

    area1, area2 = b1[:, 2] * b1[:, 3], b2[:, 2] * b2[:, 3]
    inter = shapely.area(shapely.intersection(polygons(b1), polygons(b2)))
    degenerate = (area1 < 1e-14) | (area2 < 1e-14)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area1 + area2 - inter)
    return np.where(degenerate, 0.0, iou)


def shapely_matrix(boxes1, boxes2) -> np.ndarray:
    n, m = len(boxes1), len(boxes2)
    rows, cols = np.divmod(np.arange(n * m), m)
    return shapely_iou(np.asarray(boxes1)[rows], np.asarray(boxes2)[cols]).reshape(n, m)


@pytest.fixture(scope="module")
def exact_on_cases(cases):
    return {name: shapely_matrix(b1, b2) for name, (b1, b2, _) in cases.items()}


def assert_sound_detectron2_or_exact(got, detectron2, exact, name=""):
    """The contract: ``clip(detectron2, 0, 1)`` bit for bit wherever detectron2's value is sound
    (well within SOUND_TOLERANCE of the exact IoU), close to the exact IoU everywhere, in [0, 1]."""
    assert got.dtype == np.float32 and got.shape == detectron2.shape
    assert np.all((got >= 0) & (got <= 1)), name
    np.testing.assert_allclose(got, exact, rtol=0, atol=EXACT_ATOL + SOUND_TOLERANCE, err_msg=name)
    sound = np.abs(detectron2.astype(np.float64) - exact) <= SOUND_TOLERANCE / 2
    np.testing.assert_array_equal(got[sound], np.clip(detectron2[sound], 0, 1), err_msg=name)
    # where detectron2's value is clearly unsound, ours is the exact one
    unsound = ~(np.abs(detectron2.astype(np.float64) - exact) <= 2 * SOUND_TOLERANCE)
    np.testing.assert_allclose(got[unsound], exact[unsound], rtol=0, atol=EXACT_ATOL, err_msg=name)
    return int(np.sum(sound)), int(np.sum(unsound))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_pairwise_iou_rotated_matches_detectron2_where_sound(name, cases, ours_on_cases,
                                                              exact_on_cases):
    _, _, expected = cases[name]
    got = ours_on_cases[name]
    chex.assert_shape(got, expected.shape)
    assert_sound_detectron2_or_exact(got, expected, exact_on_cases[name], name)


def test_fixture_has_both_sound_and_unsound_detectron2_values(cases, ours_on_cases, exact_on_cases):
    # detectron2's 1e-5 tolerances break down on tiny boxes and on degenerate re-parameterised
    # ones: those entries must take the exact path, all others detectron2's.
    totals = np.zeros(2, int)
    for name, (_, _, expected) in cases.items():
        totals += assert_sound_detectron2_or_exact(
            ours_on_cases[name], expected, exact_on_cases[name], name
        )
    sound, unsound = totals
    assert sound > 19000 and unsound >= 50, totals
    assert np.abs(cases["tiny"][2] - exact_on_cases["tiny"]).max() > 0.1  # detectron2 fails here


def test_detectron2_fixture_covers_the_hard_regimes(cases):
    # The fixture must keep exercising what it claims: exact ones, exact zeros, partial overlaps.
    near = cases["near_identical"][2]
    k = near.shape[0]
    np.testing.assert_allclose(np.diag(near[:, :k]), 1.0, atol=1e-6)  # a box with itself
    assert np.all(np.diag(near[:, k:]) > 0.99)  # and with a copy perturbed by ~1e-4
    assert np.all(cases["disjoint"][2] == 0.0)
    reps = cases["angle_representations"][2]
    for i in range(reps.shape[0]):
        np.testing.assert_allclose(reps[i, 8 * i : 8 * i + 8], 1.0, atol=1e-5)
    assert 0.05 < np.mean((cases["random"][2] > 0) & (cases["random"][2] < 1)) < 0.9


def test_chunked_evaluation_matches_detectron2(cases):
    # 64 pairs in chunks of 7 (the last one padded): the first cluster, all boxes overlapping.
    boxes1, boxes2, expected = cases["clustered"]
    got = np.asarray(_pairwise_small_chunks(boxes1[:SMALL], boxes2[:SMALL]))
    np.testing.assert_array_equal(got, small_iou(boxes1[:SMALL], boxes2[:SMALL]))
    np.testing.assert_allclose(got, expected[:SMALL, :SMALL], rtol=0, atol=1e-6)


def test_one_to_many_matches_detectron2_rows_under_vmap(cases):
    boxes1, boxes2, expected = cases["clustered"]
    rows = jax.jit(jax.vmap(rotated_iou_one_to_many, in_axes=(0, None)))(
        boxes1[:SMALL], boxes2[:SMALL]
    )
    chex.assert_shape(rows, (SMALL, SMALL))
    np.testing.assert_allclose(np.asarray(rows), expected[:SMALL, :SMALL], rtol=0, atol=1e-6)


def test_paired_iou_matches_pairwise_entries(cases, ours_on_cases, exact_on_cases):
    boxes1, boxes2, expected = cases["tiny_clustered"]
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(boxes1), 3 * SMALL)
    cols = np.where(np.arange(3 * SMALL) % 3 == 0, rows, rng.integers(0, len(boxes2), 3 * SMALL))
    got = np.asarray(jax.jit(rotated_iou_paired)(boxes1[rows], boxes2[cols]))
    chex.assert_shape(got, (3 * SMALL,))
    np.testing.assert_array_equal(got, ours_on_cases["tiny_clustered"][rows, cols])
    assert_sound_detectron2_or_exact(got, expected[rows, cols], exact_on_cases["tiny_clustered"][rows, cols])
    assert np.mean(got > 0) > 0.3  # the pairs really overlap
    chex.assert_shape(rotated_iou_paired(jnp.zeros((0, 5)), jnp.zeros((0, 5))), (0,))
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(4, 5\)"):
        rotated_iou_paired(jnp.zeros((3, 5)), jnp.zeros((4, 5)))


# --------------------------------------------------------------------------------------------
# detectron2's published expectations (tests/structures/test_rotated_boxes.py)
# --------------------------------------------------------------------------------------------
def _assert_d2_close(got, expected):
    # detectron2's tests use torch.allclose defaults.
    np.testing.assert_allclose(got, np.asarray(expected, np.float32), rtol=1e-5, atol=1e-8)


def test_published_half_overlap_precision_and_orthogonal_values():
    _assert_d2_close(small_iou([[0.5, 0.5, 1.0, 1.0, 0.0]], [[0.25, 0.5, 0.5, 1.0, 0.0]]), [[0.5]])
    _assert_d2_close(small_iou([[565, 565, 10, 10.0, 0]], [[565, 565, 10, 8.3, 0]]), [[8.3 / 10.0]])
    _assert_d2_close(
        small_iou([[5, 5, 10, 6, 55]], [[5, 5, 10, 6, -35]]), [[36.0 / (36.0 + 24.0 + 24.0)]]
    )
    _assert_d2_close(
        small_iou(
            [[299.5, 417.370422, 600.0, 364.259186, 27.1828]],
            [[299.5, 417.370422, 600.0, 364.259155, 27.1828]],
        ),
        [[364.259155 / 364.259186]],
    )


def test_published_0_and_45_degree_tables():
    boxes2 = [
        [0.5, 0.5, 1.0, 1.0, 0.0],
        [0.25, 0.5, 0.5, 1.0, 0.0],
        [0.5, 0.25, 1.0, 0.5, 0.0],
        [0.25, 0.25, 0.5, 0.5, 0.0],
        [0.75, 0.75, 0.5, 0.5, 0.0],
        [1.0, 1.0, 1.0, 1.0, 0.0],
    ]
    row = [1.0, 0.5, 0.5, 0.25, 0.25, 0.25 / (2 - 0.25)]
    _assert_d2_close(small_iou([[0.5, 0.5, 1.0, 1.0, 0.0]] * 2, boxes2), [row, row])
    s2 = np.sqrt(2.0)
    _assert_d2_close(
        small_iou([[1, 1, s2, s2, 45], [1, 1, 2 * s2, 2 * s2, -45]], [[1, 1, 2, 2, 0]]),
        [[0.5], [0.5]],
    )


def test_published_issue_cases_give_exact_zero_and_one():
    # issues 1207 (no overlap), 2154 and 2167 (the same box up to float noise)
    _assert_d2_close(small_iou([[3, 3, 8, 2, -45.0]], [[6, 0, 8, 2, -45.0]]), [[0.0]])
    _assert_d2_close(
        small_iou([[160.0, 153.0, 230.0, 23.0, -37.0]], [[190.0, 127.0, 80.0, 21.0, -46.0]]),
        [[0.0]],
    )
    _assert_d2_close(
        small_iou(
            [[296.6620178222656, 458.73883056640625, 23.515729904174805, 47.677001953125,
              0.08795166015625]],
            [[296.66201, 458.73882000000003, 23.51573, 47.67702, 0.087951]],
        ),
        [[1.0]],
    )
    _assert_d2_close(
        small_iou(
            [[2563.74462890625, 1436.7901611328125, 2174.703369140625, 214.09500122070312,
              115.11834716796875]],
            [[2563.74462890625, 1436.790283203125, 2174.702880859375, 214.09495544433594,
              115.11835479736328]],
        ),
        [[1.0]],
    )
    extreme = small_iou(
        [[160.0, 153.0, 230.0, 23.0, -37.0]],
        [[-1.117407639806935e17, 1.3858420478349148e18, 1000.0000610351562, 1000.0000610351562,
          1612.0]],
    )
    assert np.all(extreme >= 0) and np.all(np.isfinite(extreme))


def test_published_many_boxes_diagonal(cases, ours_on_cases):
    # detectron2: boxes on a diagonal, IoU (1 + 9 i / M) / 10 on the diagonal, 0 elsewhere.
    boxes1, boxes2, _ = cases["d2_many_boxes"]
    m = len(boxes2)
    expected = np.zeros((len(boxes1), m), np.float32)
    for i in range(len(boxes1)):
        expected[i, i] = (1 + 9 * i / m) / 10.0
    _assert_d2_close(ours_on_cases["d2_many_boxes"], expected)


# --------------------------------------------------------------------------------------------
# independent float64 geometry
# --------------------------------------------------------------------------------------------
def _corners_f64(box) -> np.ndarray:
    """Counter-clockwise-on-screen box: width axis (cos a, -sin a), height axis (sin a, cos a)."""
    xc, yc, w, h, a = (float(v) for v in box)
    t = np.deg2rad(a)
    u = np.array([np.cos(t), -np.sin(t)])
    v = np.array([np.sin(t), np.cos(t)])
    c = np.array([xc, yc])
    return np.array([c + w / 2 * u + h / 2 * v, c + w / 2 * u - h / 2 * v,
                     c - w / 2 * u - h / 2 * v, c - w / 2 * u + h / 2 * v])


def _shoelace(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _clip(subject: np.ndarray, clipper: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: part of convex polygon `subject` inside convex polygon `clipper`."""
    orient = np.sign(_signed_area(clipper)) or 1.0
    out = list(subject)
    for k in range(len(clipper)):
        a, b = clipper[k], clipper[(k + 1) % len(clipper)]

        def side(p, a=a, b=b):
            return orient * ((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]))

        pts, out = out, []
        for i in range(len(pts)):
            p, q = pts[i], pts[(i + 1) % len(pts)]
            sp, sq = side(p), side(q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                out.append(p + (q - p) * (sp / (sp - sq)))
        if not out:
            break
    return np.array(out).reshape(-1, 2)


def _signed_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def exact_iou(box1, box2) -> float:
    inter = _shoelace(_clip(_corners_f64(box1), _corners_f64(box2)))
    a1, a2 = float(box1[2]) * float(box1[3]), float(box2[2]) * float(box2[3])
    return inter / (a1 + a2 - inter)


_box = st.tuples(
    st.floats(-50, 50), st.floats(-50, 50), st.floats(1, 60), st.floats(1, 60), st.floats(-360, 360)
)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(_box, min_size=SMALL, max_size=SMALL), st.lists(_box, min_size=SMALL, max_size=SMALL)
)
def test_iou_matches_float64_polygon_clipping(boxes1, boxes2):
    b1 = np.array(boxes1, np.float32)
    b2 = np.array(boxes2, np.float32)
    got = small_iou(b1, b2)
    expected = np.array([[exact_iou(p, q) for q in b2] for p in b1])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_iou_is_symmetric_and_one_on_itself(ours_on_cases):
    iou = ours_on_cases["clustered"]  # the clustered boxes against themselves
    np.testing.assert_allclose(np.diag(iou), 1.0, atol=1e-6)
    np.testing.assert_allclose(iou, iou.T, atol=1e-5)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-6))


# --------------------------------------------------------------------------------------------
# transformations, shapes, dtypes, errors
# --------------------------------------------------------------------------------------------
def test_vmap_over_box_sets_matches_per_set_calls(cases):
    boxes1, boxes2, expected = cases["clustered"]
    batch1 = np.stack([boxes1[:SMALL], boxes1[SMALL : 2 * SMALL]])
    batch2 = np.stack([boxes2[:SMALL], boxes2[-SMALL:]])
    got = np.asarray(jax.jit(jax.vmap(pairwise_iou_rotated))(batch1, batch2))
    chex.assert_shape(got, (2, SMALL, SMALL))
    np.testing.assert_allclose(got[0], expected[:SMALL, :SMALL], atol=1e-6)
    np.testing.assert_allclose(got[1], expected[SMALL : 2 * SMALL, -SMALL:], atol=1e-6)


@pytest.mark.parametrize("n, m", [(0, 7), (4, 0), (0, 0)])
def test_empty_inputs_give_empty_matrix(n, m):
    out = jax.jit(pairwise_iou_rotated)(jnp.zeros((n, 5)), jnp.ones((m, 5)))
    chex.assert_shape(out, (n, m))
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(rotated_iou_one_to_many(jnp.ones(5), jnp.zeros((0, 5))), (0,))


def test_half_precision_inputs_compute_in_float32(cases):
    boxes1, boxes2, _ = cases["clustered"]
    b1 = jnp.asarray(boxes1[:SMALL]).astype(jnp.bfloat16)
    b2 = jnp.asarray(boxes2[:SMALL]).astype(jnp.float16)
    got = jax.jit(pairwise_iou_rotated)(b1, b2)
    chex.assert_type(got, jnp.float32)
    expected = small_iou(np.asarray(b1.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [((3, 4), (2, 5), r"boxes1 .*\(3, 4\)"), ((3, 5), (2, 2, 5), r"boxes2 .*\(2, 2, 5\)"),
     ((5,), (2, 5), r"boxes1 .*\(5,\)")],
)
def test_bad_shapes_raise_value_error(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        pairwise_iou_rotated(jnp.zeros(shape1), jnp.zeros(shape2))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"box .*\(2, 5\)"):
        rotated_iou_one_to_many(jnp.zeros((2, 5)), jnp.zeros((3, 5)))
    with pytest.raises(TypeError, match="boxes1"):
        pairwise_iou_rotated(jnp.zeros((2, 5), jnp.complex64), jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="pairs_per_chunk"):
        pairwise_iou_rotated(jnp.zeros((2, 5)), jnp.zeros((3, 5)), pairs_per_chunk=0)
    with pytest.raises(ValueError, match="boxes"):
        rotated_box_corners(jnp.zeros((3, 4)))


def test_public_export_is_this_function():
    assert detlayers.pairwise_iou_rotated is pairwise_iou_rotated


# --------------------------------------------------------------------------------------------
# corners and areas
# --------------------------------------------------------------------------------------------
def test_corners_turn_counter_clockwise_on_screen():
    # 90 degrees: the width axis points up the screen (-y), the height axis along +x.
    got = np.asarray(jax.jit(rotated_box_corners)(jnp.array([[0.0, 0.0, 4.0, 2.0, 90.0]])))[0]
    np.testing.assert_allclose(got, [[1, -2], [-1, -2], [-1, 2], [1, 2]], atol=1e-6)
    rng = np.random.default_rng(3)
    boxes = np.concatenate(
        [
            rng.uniform(-50, 50, (20, 2)),
            rng.uniform(1, 30, (20, 2)),
            rng.uniform(-360, 360, (20, 1)),
        ],
        axis=1,
    ).astype(np.float32)
    got = np.asarray(jax.jit(rotated_box_corners)(boxes))
    chex.assert_shape(got, (20, 4, 2))
    np.testing.assert_allclose(got, np.stack([_corners_f64(b) for b in boxes]), atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(jax.jit(rotated_box_areas)(boxes)),
        [_shoelace(_corners_f64(b)) for b in boxes],
        rtol=1e-5,
    )


# --------------------------------------------------------------------------------------------
# the C++ / CUDA header
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def header_harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("rotated_iou_cpp") / "rotated_iou_harness"
    # -ffp-contract=off: the kernels must round like detectron2's build (no fused multiply-add).
    subprocess.run(
        [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
         f"-I{HEADER_DIR}", str(CPP_DIR / "rotated_iou_harness.cc"), "-o", str(exe)],
        check=True, capture_output=True, timeout=300,
    )
    return exe


def run_header(exe: pathlib.Path, boxes1, boxes2, dtype=np.float32, mode=None) -> np.ndarray:
    workdir = exe.parent
    boxes1 = np.ascontiguousarray(boxes1, dtype)
    boxes2 = np.ascontiguousarray(boxes2, dtype)
    boxes1.tofile(workdir / "boxes1.bin")
    boxes2.tofile(workdir / "boxes2.bin")
    precision = mode or ("f32" if dtype == np.float32 else "f64")
    subprocess.run(
        [str(exe), precision, str(workdir / "boxes1.bin"), str(len(boxes1)),
         str(workdir / "boxes2.bin"), str(len(boxes2)), str(workdir / "iou.bin")],
        check=True, timeout=120,
    )
    return np.fromfile(workdir / "iou.bin", dtype).reshape(len(boxes1), len(boxes2))


def test_header_float_is_bitwise_the_xla_path(header_harness, cases, ours_on_cases,
                                              exact_on_cases):
    for name, (boxes1, boxes2, expected) in cases.items():
        got = run_header(header_harness, boxes1, boxes2)
        np.testing.assert_array_equal(got, ours_on_cases[name], err_msg=name)
        assert_sound_detectron2_or_exact(got, expected, exact_on_cases[name], name)


def test_header_double_matches_float64_geometry_and_published_values(header_harness, cases):
    boxes1, boxes2, _ = cases["random"]
    got = run_header(header_harness, boxes1[:16], boxes2[:24], np.float64)
    expected = np.array([[exact_iou(p, q) for q in boxes2[:24]] for p in boxes1[:16]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    got = run_header(
        header_harness,
        [[0.5, 0.5, 1.0, 1.0, 0.0], [5, 5, 10, 6, 55]],
        [[0.25, 0.5, 0.5, 1.0, 0.0], [5, 5, 10, 6, -35]],
        np.float64,
    )
    np.testing.assert_allclose(np.diag(got), [0.5, 36.0 / 84.0], rtol=1e-12)


def test_header_compiles_as_cuda_device_code(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    subprocess.run(
        [nvcc, "-x", "cu", "-c", "-std=c++17", "-arch=sm_80", f"-I{HEADER_DIR}",
         str(CPP_DIR / "rotated_iou_device_check.cu"), "-o", str(tmp_path / "check.o")],
        check=True, capture_output=True, timeout=300,
    )
    assert (tmp_path / "check.o").stat().st_size > 0


def _cuda_gpu_available() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    probe = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return probe.returncode == 0 and "GPU" in probe.stdout


def test_header_on_cuda_device_is_bitwise_the_xla_path(tmp_path, cases, ours_on_cases):
    nvcc = shutil.which("nvcc")
    if nvcc is None or not _cuda_gpu_available():
        pytest.skip("needs nvcc and a CUDA GPU")
    exe = tmp_path / "rotated_iou_device_check"
    subprocess.run(
        [nvcc, "-std=c++17", "-O2", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
         "arch=compute_90,code=sm_90", f"-I{HEADER_DIR}",
         str(CPP_DIR / "rotated_iou_device_check.cu"), "-o", str(exe)],
        check=True, capture_output=True, timeout=600,
    )
    for name, (boxes1, boxes2, _) in cases.items():
        got = run_header(exe, boxes1, boxes2)
        np.testing.assert_array_equal(got, ours_on_cases[name], err_msg=name)


def test_gradient_with_respect_to_boxes_raises_clearly():
    boxes = jnp.asarray([[0.0, 0.0, 2.0, 2.0, 10.0], [0.5, 0.0, 2.0, 1.0, 0.0]])
    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(lambda b: pairwise_iou_rotated(b, boxes).sum())(boxes)
    # With stop_gradient (the IoU only drives matching) tracing the gradient works.
    grad = jax.eval_shape(
        jax.grad(lambda b: (pairwise_iou_rotated(jax.lax.stop_gradient(b), boxes) * b[:, :1]).sum()),
        boxes,
    )
    chex.assert_shape(grad, boxes.shape)
    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(lambda b: rotated_iou_paired(b, boxes).sum())(boxes)


# --------------------------------------------------------------------------------------------
# where detectron2's float32 algorithm breaks down: exact, in [0, 1], identical C++ and XLA
# --------------------------------------------------------------------------------------------
_paired_jit = jax.jit(rotated_iou_paired)


def _rewrite_same_rectangle(box, how: int) -> list[float]:
    """The same rectangle written differently: angle + 180 k, or (h, w, angle + 90 + 180 k)."""
    xc, yc, w, h, a = box
    turns = [180.0, -180.0, 360.0, 540.0][how % 4]
    if how % 2:
        return [xc, yc, h, w, a + 90.0 + turns - 180.0]
    return [xc, yc, w, h, a + turns]


_side = st.floats(-2.0, 3.0).map(lambda e: float(10.0**e))  # 0.01 .. 1000 px


@st.composite
def hard_pairs(draw):
    """A box and a partner: the same rectangle re-parameterised, a near-identical copy, a nested
    or touching box, a tiny or thin one, or any box nearby."""
    xc, yc = draw(st.floats(-1e3, 1e3)), draw(st.floats(-1e3, 1e3))
    w, h = draw(_side), draw(_side)
    a = draw(st.floats(-360, 360))
    box = [xc, yc, w, h, a]
    kind = draw(st.integers(0, 5))
    if kind == 0:
        other = _rewrite_same_rectangle(box, draw(st.integers(0, 3)))
    elif kind == 1:
        rel = draw(st.floats(1e-7, 1e-3))
        other = [xc + rel * w, yc - rel * h, w * (1 + rel), h * (1 - rel), a + rel * 10]
    elif kind == 2:  # nested: a shrunk copy, possibly turned, near the centre
        s = draw(st.floats(0.05, 1.0))
        other = [xc, yc, w * s, h * s, a + draw(st.sampled_from([0.0, 90.0, 180.0, 0.5]))]
    elif kind == 3:  # touching along the width axis (edge to edge), or overlapping by a sliver
        t = np.deg2rad(a)
        shift = w * draw(st.sampled_from([1.0, 0.999, 0.9999999, 0.5]))
        other = [xc + shift * np.cos(t), yc - shift * np.sin(t), w, h, a]
    elif kind == 4:  # thin or tiny partner crossing the box
        other = [xc, yc, draw(_side), draw(st.floats(0.01, 0.1)), draw(st.floats(-360, 360))]
    else:
        other = [xc + draw(st.floats(-1, 1)) * w, yc + draw(st.floats(-1, 1)) * h, draw(_side),
                 draw(_side), draw(st.floats(-360, 360))]
    return box, other


@settings(max_examples=25, deadline=None)
@given(st.lists(hard_pairs(), min_size=SMALL, max_size=SMALL))
def test_hard_pairs_are_exact_in_unit_interval_and_identical_on_cpp_and_xla(
    header_harness, pairs
):
    boxes1 = np.array([p for p, _ in pairs], np.float32)
    boxes2 = np.array([q for _, q in pairs], np.float32)
    got = np.asarray(_paired_jit(boxes1, boxes2))
    assert np.all((got >= 0) & (got <= 1)), got
    cpp = np.diag(run_header(header_harness, boxes1, boxes2))
    np.testing.assert_array_equal(cpp, got)
    exact = shapely_iou(boxes1, boxes2)
    # float32 corners of a box with aspect ratio r are off by ~eps * r of its short side
    sides = np.abs(np.concatenate([boxes1[:, 2:4], boxes2[:, 2:4]], 1))
    aspect = sides.max(1) / sides.min(1)
    tolerance = EXACT_ATOL + SOUND_TOLERANCE + 1e-6 * aspect
    assert np.all(np.abs(got - exact) <= tolerance), (got, exact)


def test_same_rectangle_written_differently_has_iou_one(header_harness):
    # detectron2 gives 1/3, values above 1 or below 0 for some of these (its nms_rotated then
    # keeps exact duplicates); ours is 1 up to float rounding, identically on C++ and XLA.
    rng = np.random.default_rng(11)
    boxes = np.concatenate(
        [rng.uniform(0, 1000, (4000, 2)), rng.uniform(4, 300, (4000, 2)),
         rng.uniform(-180, 180, (4000, 1))], 1).astype(np.float32)
    rewritten = np.array([_rewrite_same_rectangle(b, k) for k, b in enumerate(boxes)], np.float32)
    got = np.asarray(_paired_jit(boxes, rewritten))
    np.testing.assert_allclose(got, 1.0, rtol=0, atol=1e-5)
    assert np.all(got <= 1)
    cpp = np.concatenate([np.diag(run_header(header_harness, boxes[k : k + 500], rewritten[k : k + 500]))
                          for k in range(0, 4000, 500)])
    np.testing.assert_array_equal(cpp, got)


# --------------------------------------------------------------------------------------------
# the reach rule: one definition in C++ (rotated_iou.h) and one in Python (rotated_boxes.py)
# --------------------------------------------------------------------------------------------
def _corner_to_corner(box, other_size, gap_fraction):
    """A partner box on the extension of ``box``'s diagonal, corner facing corner, whose centre
    is ``(1 + gap_fraction) * (r1 + r2)`` from ``box``'s (r = half diagonal): diagonals aligned,
    so the two touch near their corners when ``gap_fraction`` is slightly negative."""
    xc, yc, w, h, a = box
    w2, h2 = other_size
    t = np.deg2rad(a)
    u, v = np.array([np.cos(t), -np.sin(t)]), np.array([np.sin(t), np.cos(t)])
    direction = (w * u + h * v) / np.hypot(w, h)
    distance = (np.hypot(w, h) + np.hypot(w2, h2)) / 2 * (1 + gap_fraction)
    # the partner's diagonal lies on the same line: angle such that its (-w/2, -h/2) corner
    # points back at box
    a2 = a + np.rad2deg(np.arctan2(h2, w2) - np.arctan2(h, w))
    c = np.array([xc, yc]) + distance * direction
    return [c[0], c[1], w2, h2, a2]


def _reach_boxes(rng, n):
    boxes = np.concatenate(
        [rng.uniform(-2e4, 2e4, (n, 2)) * rng.choice([1e-3, 1.0], (n, 1)),
         10.0 ** rng.uniform(-3, 3, (n, 2)), rng.uniform(-180, 180, (n, 1))], 1)
    specials = [[0, 0, 0, 5, 0], [1, 1, 5, 0, 0], [0, 0, np.nan, 1, 0], [0, 0, np.inf, 1, 0],
                [3e38, 0, 1, 1, 0], [0, 0, -4, 3, 10], [5, 5, 1e-30, 1e-30, 0]]
    return np.concatenate([boxes, specials]).astype(np.float32)


def test_cpp_and_python_skip_the_same_pairs(header_harness):
    from detlayers.rotated_boxes import rotated_discs_apart, rotated_reach

    rng = np.random.default_rng(2)
    boxes = _reach_boxes(rng, 60)
    # partners right at the boundary of the rule, where float rounding decides
    partners = np.array(
        [_corner_to_corner(b, rng.uniform(1, 50, 2), g)
         for b in boxes[:40] for g in (-1e-3, -1e-6, 0.0, 1e-6, 2.5e-3)],
        np.float32,
    )
    everything = np.concatenate([boxes, partners])
    cpp = run_header(header_harness, everything, everything, mode="apart").astype(bool)
    reach = jax.jit(rotated_reach)(everything)
    python = np.asarray(jax.jit(rotated_discs_apart)(
        everything[:, None, 0], everything[:, None, 1], reach[:, None],
        everything[None, :, 0], everything[None, :, 1], reach[None, :]))
    np.testing.assert_array_equal(cpp, python)
    assert 0.2 < cpp.mean() < 0.98  # both outcomes are exercised
    assert not cpp[np.isnan(everything).any(1)].any() and not cpp[:, np.isinf(everything).any(1)].any()


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    gap=st.sampled_from([-1e-2, -1e-3, -1e-4]),
)
def test_pairs_that_touch_at_a_corner_are_never_skipped(seed, gap):
    # Corner-to-corner partners overlap by a sliver (IoU > 0 but tiny): the reach must not call
    # them apart, or NMS at a threshold of 0 would keep boxes it must suppress.
    from detlayers.rotated_boxes import rotated_discs_apart, rotated_reach

    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(-500, 500, (SMALL, 2)), rng.uniform(2, 80, (SMALL, 2)),
                            rng.uniform(-180, 180, (SMALL, 1))], 1).astype(np.float32)
    partners = np.array([_corner_to_corner(b, rng.uniform(2, 80, 2), gap) for b in boxes],
                        np.float32)
    exact = shapely_iou(boxes, partners)
    assert np.all(exact > 0)
    reach1, reach2 = rotated_reach(boxes), rotated_reach(partners)
    apart = np.asarray(rotated_discs_apart(boxes[:, 0], boxes[:, 1], reach1, partners[:, 0],
                                           partners[:, 1], reach2))
    assert not apart.any()
    got = np.asarray(_paired_jit(boxes, partners))
    np.testing.assert_allclose(got, exact, rtol=0, atol=EXACT_ATOL)
    assert np.all(got > 0)


def test_trig_tables_are_the_same_in_cpp_and_python():
    from detlayers import rotated_boxes as rb

    text = (HEADER_DIR / "rotated_iou.h").read_text()
    body = text[text.index("#define DETLAYERS_WHOLE_DEGREE_TABLE"):]
    body = body[: body.index("static constexpr")]
    import re

    rows = re.findall(r"\{([^{}]*)\}", body)
    table = np.array([[float.fromhex(v.strip().rstrip("f")) if "0x" in v else float(v.strip().rstrip("f"))
                       for v in row.split(",")] for row in rows], np.float32)
    np.testing.assert_array_equal(table, np.stack([rb._SIN_HI, rb._SIN_LO, rb._COS_HI, rb._COS_LO], 1))
