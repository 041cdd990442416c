"""NMS family vs torchvision (axis-aligned) and detectron2 (rotated) fixtures, on every backend.

References: tests/fixtures/nms_axis.npz (``torchvision.ops.nms``; per-class results are
torchvision's nms run class by class and merged by score) and tests/fixtures/nms_rotated.npz
(detectron2's ``nms_rotated``, likewise per class), written by tools/fixtures/make_nms.py.

Backends: "auto" runs the C++ custom call here (CPU); "xla" forces the pure-XLA path. To keep the
number of compilations small, cases are padded to a few fixed sizes with boxes that cannot interact
(zero area, NaN score: documented to rank last and never suppress or be suppressed), and the
threshold is passed traced (as the float32 the documented rule derives from the Python float).

Without a GPU the CUDA path is checked three ways: the library builds whenever nvcc exists, its
lowering is one custom call over a vmapped batch (``jax.export`` for platform "cuda"), and the
real kernels run on the CPU under a thread-level simulator against a greedy reference and the
same fixtures (tests/test_cuda_simulation.py).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import expected_rotated_keep, load_npz
from helpers import shapely_iou_matrix as _shapely_iou_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import detlayers as L

nms_module = importlib.import_module("detlayers.nms")
library_module = importlib.import_module("detlayers._nms_library")
custom_call_module = importlib.import_module("detlayers._nms_custom_call")

HAS_CPU_KERNEL = library_module.has_target("cpu", "detlayers_nms")
BACKENDS = ["auto", "xla"]


def f32_threshold(thr: float) -> np.float32:
    """Largest float32 <= thr: for float32 x, x > thr (double) iff x > this (torchvision's rule)."""
    f = np.float32(thr)
    return f if float(f) <= thr else np.nextafter(f, np.float32(-np.inf))


def load_cases(path: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    data = load_npz(path)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in data:
        name, field = key.split("__")
        cases.setdefault(name, {})[field] = data[key]
    return cases


FIXTURES = pathlib.Path(__file__).parent / "fixtures"
AXIS = load_cases(FIXTURES / "nms_axis.npz")
ROTATED = load_cases(FIXTURES / "nms_rotated.npz")


def pad_problem(boxes, scores, idxs, size):
    """Pads to `size` boxes that are kept last and touch nothing (zero area, NaN score)."""
    n = len(boxes)
    pad = size - n
    assert pad >= 0
    boxes = np.concatenate([boxes, np.zeros((pad, boxes.shape[1]), np.float32)])
    scores = np.concatenate([scores, np.full((pad,), np.nan, np.float32)])
    if idxs is not None:
        idxs = np.concatenate([idxs, np.zeros((pad,), np.int32)])
    return boxes, scores, idxs


def bucket(n: int, sizes=(64, 512, 3072, 10240)) -> int:
    return next(s for s in sizes if s >= n)


@functools.cache
def jitted(fn_name: str, backend: str):
    fn = getattr(nms_module, fn_name)
    if fn_name.startswith("batched"):
        return jax.jit(lambda b, s, i, t: fn(b, s, i, t, backend=backend))
    return jax.jit(lambda b, s, t: fn(b, s, t, backend=backend))


def run_case(fn_name, backend, case, j, size):
    boxes, scores, idxs = case["boxes"], case["scores"], case.get("idxs")
    n = len(boxes)
    pb, ps, pi = pad_problem(boxes, scores, idxs, size)
    thr = jnp.asarray(f32_threshold(float(case["thresholds"][j])))
    args = (pb, ps, pi, thr) if idxs is not None else (pb, ps, thr)
    result = jitted(fn_name, backend)(*args)
    chex.assert_shape(result.indices, (size,))
    chex.assert_type(result.indices, jnp.int32)
    chex.assert_shape(result.count, ())
    indices, count = np.asarray(result.indices), int(result.count)
    # padding boxes come last, each kept
    np.testing.assert_array_equal(np.sort(indices[count - (size - n) : count]), np.arange(n, size))
    assert (indices[count:] == -1).all()
    return indices[: count - (size - n)]


def case_params(cases, prefix_filter, max_n=None):
    params = []
    for name, case in cases.items():
        if not prefix_filter(name) or (max_n is not None and len(case["boxes"]) > max_n):
            continue
        for j in range(len(case["thresholds"])):
            params.append(pytest.param(name, j, id=f"{name}-t{case['thresholds'][j]:.2f}"))
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,j", case_params(AXIS, lambda n: not n.startswith("batched")))
def test_nms_matches_torchvision(backend, name, j):
    case = AXIS[name]
    got = run_case("nms", backend, case, j, bucket(len(case["boxes"])))
    np.testing.assert_array_equal(got, case[f"keep{j}"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,j", case_params(AXIS, lambda n: n.startswith("batched")))
def test_batched_nms_matches_per_class_torchvision(backend, name, j):
    case = AXIS[name]
    got = run_case("batched_nms", backend, case, j, bucket(len(case["boxes"])))
    np.testing.assert_array_equal(got, case[f"keep{j}"])


def test_rotated_fixtures_differ_from_detectron2_only_where_its_iou_is_unsound():
    # The re-derived results equal detectron2's own output except in the "special" case, whose
    # tiny 1e-3 px boxes (9 and 10) detectron2's 1e-5 tolerance makes overlap by IoU > 0.7.
    differing = set()
    for name, case in ROTATED.items():
        for j in range(len(case["thresholds"])):
            if not np.array_equal(expected_rotated_keep(case, j), case[f"keep{j}"]):
                differing.add((name, float(case["thresholds"][j])))
    assert differing == {("special", 0.7), ("special", 0.95)}, differing
    iou = ROTATED["special"]["iou"]
    assert iou[9, 10] > 0.7 and _shapely_iou_matrix(ROTATED["special"]["boxes"])[9, 10] < 0.7


def rotated_backends(name):
    # The pure-XLA rotated IoU is slow to compile and run: it is checked on the cases up to 400
    # boxes (one padded size per function); the C++ kernel on all of them, up to 10 000.
    n = len(ROTATED[name]["boxes"])
    return ["auto", "xla"] if n <= 400 else ["auto"]


@pytest.mark.parametrize(
    "name,j,backend",
    [
        pytest.param(*p.values, backend, id=f"{p.id}-{backend}")
        for p in case_params(ROTATED, lambda n: not n.startswith("batched"))
        for backend in rotated_backends(p.values[0])
    ],
)
def test_nms_rotated_matches_detectron2(name, j, backend):
    case = ROTATED[name]
    size = 512 if len(case["boxes"]) <= 400 else bucket(len(case["boxes"]))
    got = run_case("nms_rotated", backend, case, j, size)
    np.testing.assert_array_equal(got, expected_rotated_keep(case, j))


@pytest.mark.parametrize(
    "name,j,backend",
    [
        pytest.param(*p.values, backend, id=f"{p.id}-{backend}")
        for p in case_params(ROTATED, lambda n: n.startswith("batched"))
        for backend in rotated_backends(p.values[0])
    ],
)
def test_batched_nms_rotated_matches_per_class_detectron2(name, j, backend):
    case = ROTATED[name]
    size = 512 if len(case["boxes"]) <= 400 else bucket(len(case["boxes"]))
    got = run_case("batched_nms_rotated", backend, case, j, size)
    np.testing.assert_array_equal(got, expected_rotated_keep(case, j))


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_float_threshold_compares_like_torchvision_double(backend):
    # Grid boxes have IoUs of exactly 1/3 and 2/3 in float32: float32(1/3) > 1/3 as doubles, so
    # torchvision suppresses them at threshold 1/3; a naive float32 threshold would not.
    case = AXIS["grid_exact_ties"]
    for j, thr in enumerate(case["thresholds"]):
        result = nms_module.nms(case["boxes"], case["scores"], float(thr), backend=backend)
        got = np.asarray(result.indices[: int(result.count)])
        np.testing.assert_array_equal(got, case[f"keep{j}"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_output_size_keeps_the_top_of_the_reference(backend):
    case = AXIS["clustered_500"]
    for k in (10, 10_000):
        result = nms_module.nms(case["boxes"], case["scores"], 0.5, max_output_size=k, backend=backend)
        expected = case["keep1"][:k]
        chex.assert_shape(result.indices, (min(k, 500),))
        assert int(result.count) == len(expected)
        np.testing.assert_array_equal(np.asarray(result.indices[: len(expected)]), expected)
        assert (np.asarray(result.indices[len(expected) :]) == -1).all()
    case = ROTATED["clustered_400"]
    result = nms_module.batched_nms_rotated(
        case["boxes"], case["scores"], np.zeros(400, np.int32), 0.5, max_output_size=7, backend="auto"
    )
    np.testing.assert_array_equal(np.asarray(result.indices), case["keep1"][:7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_images_and_thresholds_matches_per_image(backend):
    case = AXIS["clustered_500"]
    thresholds = np.array([f32_threshold(t) for t in case["thresholds"]], np.float32)
    boxes = np.stack([case["boxes"]] * 4)
    scores = np.stack([case["scores"], case["scores"][::-1], case["scores"], case["scores"]])
    fn = jax.jit(jax.vmap(lambda b, s, t: nms_module.nms(b, s, t, max_output_size=300, backend=backend)))
    result = fn(boxes, scores, thresholds)
    chex.assert_shape(result.indices, (4, 300))
    for i in (0, 2, 3):
        expected = case[f"keep{i}"][:300]
        assert int(result.count[i]) == len(expected)
        np.testing.assert_array_equal(np.asarray(result.indices[i, : len(expected)]), expected)
    single = nms_module.nms(boxes[1], scores[1], thresholds[1], max_output_size=300, backend=backend)
    np.testing.assert_array_equal(np.asarray(result.indices[1]), np.asarray(single.indices))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
def test_vmap_lowers_to_one_custom_call():
    fn = jax.jit(jax.vmap(jax.vmap(lambda b, s, i: L.batched_nms(b, s, i, 0.5))))
    text = fn.lower(
        jnp.zeros((2, 3, 50, 4)), jnp.zeros((2, 3, 50)), jnp.zeros((2, 3, 50), jnp.int32)
    ).as_text()
    assert text.count("custom_call @detlayers_batched_nms") == 1
    assert "tensor<2x3x50x4xf32>" in text


@pytest.mark.skipif(not library_module.has_target("cuda", "detlayers_nms"), reason="CUDA custom call not built")
@pytest.mark.parametrize("fn_name,box_dim", [("nms", 4), ("batched_nms_rotated", 5)])
def test_cuda_lowering_is_one_device_custom_call_over_the_batch(fn_name, box_dim):
    fn = getattr(nms_module, fn_name)
    if fn_name.startswith("batched"):
        per_image = lambda b, s, i: fn(b, s, i, 0.5, max_output_size=100)  # noqa: E731
        shapes = (
            jax.ShapeDtypeStruct((8, 300, box_dim), jnp.float32),
            jax.ShapeDtypeStruct((8, 300), jnp.float32),
            jax.ShapeDtypeStruct((8, 300), jnp.int32),
        )
    else:
        per_image = lambda b, s: fn(b, s, 0.5, max_output_size=100)  # noqa: E731
        shapes = (jax.ShapeDtypeStruct((8, 300, box_dim), jnp.float32), jax.ShapeDtypeStruct((8, 300), jnp.float32))
    target = "detlayers_" + fn_name
    exported = jax.export.export(
        jax.jit(jax.vmap(per_image)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
    )(*shapes)
    text = exported.mlir_module()
    calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
    assert len(calls) == 1
    # one launch for the 8 images: keep [8, 100], count [8], device mask [8, 960, 2]: the packed
    # upper triangle of 5 tiles, 64 * (5 * 6 / 2) words per image instead of 300 * 5
    assert nms_module.cuda_mask_words(300) == 960
    assert "tensor<8x100xi32>, tensor<8xi32>, tensor<8x960x2xui32>" in calls[0]


@pytest.mark.skipif(not library_module.has_target("cuda", "detlayers_nms"), reason="CUDA custom call not built")
def test_cuda_scratch_is_bounded_per_call():
    # Scratch grows as N**2 / 16 bytes per image; above CUDA_MAX_MASK_BYTES (N > 131008) the GPU
    # runs the pure-XLA path instead of allocating it, and vmapped batches are split into calls
    # that each stay within it.
    limit = nms_module.CUDA_MAX_MASK_BYTES
    assert nms_module.cuda_mask_bytes(131008) <= limit < nms_module.cuda_mask_bytes(131009)
    assert nms_module.cuda_mask_bytes(100_000) == 8 * 64 * (1563 * 1564 // 2)  # ~626 MB, not 1.25 GB

    def calls(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Scratch shapes of the custom calls in the CUDA lowering of NMS vmapped over shape[:-1]."""
        fn = lambda b, s: nms_module.nms(b, s, 0.5, max_output_size=10)  # noqa: E731
        for _ in shape[:-1]:
            fn = jax.vmap(fn)
        exported = jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("detlayers_nms")],
        )(jax.ShapeDtypeStruct(shape + (4,), jnp.float32), jax.ShapeDtypeStruct(shape, jnp.float32))
        lines = [line for line in exported.mlir_module().splitlines() if "custom_call @detlayers_nms(" in line]
        scratch = [line.rsplit("tensor<", 1)[1].split("xui32>")[0] for line in lines]
        return [tuple(int(d) for d in s.split("x")) for s in scratch]

    assert calls((131008,)) == [(nms_module.cuda_mask_words(131008), 2)]
    assert calls((131072,)) == []  # pure XLA
    words = nms_module.cuda_mask_words(60000)  # 225 MB per image: 4 images per call
    assert calls((8, 60000)) == [(4, words, 2)]
    assert calls((3, 100_000)) == [(1, nms_module.cuda_mask_words(100_000), 2)]
    assert calls((2, 3, 60000)) == [(1, 3, words, 2)]
    assert calls((8, 300)) == [(8, 960, 2)]  # small batches stay one call
    for shape in calls((8, 60000)) + calls((3, 100_000)) + calls((2, 3, 60000)):
        assert 4 * np.prod(shape) <= limit


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_library_is_built_when_nvcc_exists():
    path = next((p for p in library_module.library_candidates("libdetlayers_cuda.so") if p.is_file()), None)
    assert path is not None, "nvcc is on PATH but libdetlayers_cuda.so was not built"
    lib = ctypes.CDLL(str(path))
    for symbol in library_module._CUDA_TARGETS.values():
        assert hasattr(lib, symbol), symbol
    # The loader's driver/device check answers; without a usable GPU it says why.
    problem = library_module.cuda_runtime_problem(lib)
    assert (problem == "") == library_module._jax_has_cuda(), problem


def _cuda_library_path():
    return next((p for p in library_module.library_candidates("libdetlayers_cuda.so") if p.is_file()), None)


@pytest.mark.skipif(_cuda_library_path() is None, reason="CUDA custom call not built")
def test_cuda_library_that_cannot_run_here_is_not_registered(monkeypatch):
    # e.g. built with a newer CUDA than the driver supports: one warning, nothing registered, so
    # NMS lowers to the pure-XLA path instead of failing at the first launch.
    monkeypatch.setattr(library_module, "_jax_has_cuda", lambda: True)
    monkeypatch.setattr(library_module, "cuda_runtime_problem", lambda lib: "built with CUDA 13.0 but the driver ...")
    monkeypatch.setattr(library_module, "_warned", False)
    with pytest.warns(RuntimeWarning, match="cannot run here: built with CUDA 13.0.*pure-XLA"):
        assert library_module._load.__wrapped__("cuda") == frozenset()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_library_missing_a_handler_symbol_is_an_error(monkeypatch, tmp_path):
    # A stale library (built before a handler existed) must not silently lose that kernel.
    source = tmp_path / "stub.cc"
    source.write_text('extern "C" int DetlayersNmsCpu() { return 0; }\n')
    stub = tmp_path / "libdetlayers_cpu.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(stub)], check=True)
    monkeypatch.setattr(library_module, "_find", lambda file_name: stub)
    with pytest.raises(RuntimeError, match="does not export DetlayersBatchedNmsCpu, .*rebuild"):
        library_module._load.__wrapped__("cpu")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
@pytest.mark.parametrize(
    "out_shapes,args,message",
    [
        # keep's leading (batch) dim differs from boxes': would have written past keep
        (((3, 5), (2,)), ((2, 5, 4), (2,)), r"keep must be \[\.\.\., K\], got \[3, 5\]"),
        (((2, 6), (2,)), ((2, 5, 4), (2,)), r"K must be in \[0, N\]"),
        (((2, 5), (3,)), ((2, 5, 4), (2,)), r"count must be \[\.\.\.\], got \[3\]"),
        (((2, 5), (2,)), ((2, 5, 4), (1, 2)), r"threshold must be \[\.\.\.\], got \[1, 2\]"),
        (((2, 5), (2,)), ((2, 5, 4), (2,), (2, 4)), r"classes must be \[\.\.\., N\], got \[2, 4\]"),
        (((2, 5), (2,)), ((2, 5, 5), (2,)), r"boxes must be \[\.\.\., N, 4\]"),
    ],
)
def test_direct_ffi_call_with_mismatched_shapes_is_an_error(out_shapes, args, message):
    # The CPU and CUDA handlers share nms_ffi_shapes.h: every dim of every buffer is checked.
    target = "detlayers_batched_nms" if len(args) == 3 else "detlayers_nms"
    boxes, threshold = np.ones(args[0], np.float32), np.full(args[1], 0.5, np.float32)
    operands = (boxes, np.zeros(args[2], np.int32), threshold) if len(args) == 3 else (boxes, threshold)
    out_types = tuple(jax.ShapeDtypeStruct(shape, jnp.int32) for shape in out_shapes)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax.ffi.ffi_call(target, out_types)(*operands))


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_box_areas_are_not_flushed_to_zero(backend):
    # Two identical boxes of area 1e-40 (subnormal): torchvision's float32 IoU is 1e-40 / 1e-40 = 1,
    # so the second is suppressed (float64 NumPy gives the same). XLA's CPU compiler flushes
    # subnormals to zero (IoU 0/0 = NaN, nothing suppressed): the documented exception of the
    # pure-XLA path on CPU; the C++ kernel restores IEEE subnormals.
    boxes = np.array([[0, 0, 1e-20, 1e-20], [0, 0, 1e-20, 1e-20], [5, 5, 6, 6]], np.float32)
    area = np.float64(boxes[0, 2]) * np.float64(boxes[0, 3])
    assert 0 < area < np.finfo(np.float32).tiny and area / (area + area - area) == 1.0
    result = nms_module.nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5, backend=backend)
    if backend == "xla" or not HAS_CPU_KERNEL:
        np.testing.assert_array_equal(np.asarray(result.indices), [0, 1, 2])
    else:
        np.testing.assert_array_equal(np.asarray(result.indices), [0, 2, -1])


def test_sort_key_orders_like_the_documented_float_ranking():
    # One int32 key (radix-sortable on GPU) in place of the float key: decreasing score, NaN as
    # -inf, -0.0 == 0.0, ties in input order.
    tiny = np.finfo(np.float32).smallest_subnormal
    special = [np.nan, -np.inf, np.inf, 0.0, -0.0, tiny, -tiny, 1.0, 1.0, -1.0, np.nan, -np.inf, 3e38, -3e38]
    rng = np.random.default_rng(0)
    scores = np.concatenate([special, rng.normal(size=200), rng.integers(-3, 3, 100)]).astype(np.float32)
    key = np.asarray(nms_module._descending_score_key(jnp.asarray(scores)))
    assert key.dtype == np.int32
    got = np.argsort(key, kind="stable")
    ranked = np.where(np.isnan(scores), -np.inf, scores).astype(np.float64)
    want = np.lexsort((np.arange(len(scores)), -ranked))  # decreasing score, then input position
    np.testing.assert_array_equal(got, want)

@pytest.mark.parametrize("backend", BACKENDS)
def test_pmap_and_shard_map_run_per_device(backend):
    case = AXIS["clustered_37"]
    n_dev = min(8, jax.device_count())
    boxes = np.stack([case["boxes"]] * n_dev)
    scores = np.stack([np.roll(case["scores"], d) for d in range(n_dev)])
    per_image = lambda b, s: nms_module.nms(b, s, 0.5, backend=backend)  # noqa: E731
    expected = np.asarray(jax.jit(jax.vmap(per_image))(boxes, scores).indices)
    np.testing.assert_array_equal(expected[0][: len(case["keep1"])], case["keep1"])
    if backend == "auto":  # (pmap of the pure-XLA path adds a slow compile and nothing new)
        out = jax.pmap(per_image)(boxes, scores)
        np.testing.assert_array_equal(np.asarray(out.indices), expected)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("i",))
    sharded = jax.shard_map(jax.vmap(per_image), mesh=mesh, in_specs=(P("i"), P("i")), out_specs=P("i"))
    out = jax.jit(sharded)(boxes, scores)
    np.testing.assert_array_equal(np.asarray(out.indices), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_through_model_using_kept_indices(backend):
    case = AXIS["clustered_37"]
    boxes = jnp.asarray(case["boxes"])

    def loss(boxes, scale):
        scores = jnp.asarray(case["scores"]) * scale
        kept = nms_module.nms(boxes, scores, 0.5, backend=backend)
        valid = (jnp.arange(boxes.shape[0]) < kept.count)[:, None]
        return jnp.sum(jnp.where(valid, boxes[jnp.maximum(kept.indices, 0)] * scale, 0.0))

    grad_boxes, grad_scale = jax.jit(jax.grad(loss, argnums=(0, 1)))(boxes, 1.0)
    kept_rows = np.zeros(len(boxes), bool)
    kept_rows[case["keep1"]] = True
    # d/d boxes of sum(boxes[kept]) is 1 on kept rows, 0 elsewhere; d/d scale = sum(boxes[kept])
    np.testing.assert_array_equal(np.asarray(grad_boxes), np.broadcast_to(kept_rows[:, None], (len(boxes), 4)))
    np.testing.assert_allclose(float(grad_scale), case["boxes"][kept_rows].astype(np.float64).sum(), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_rank_last_and_nan_boxes_touch_nothing(backend):
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10], [np.nan, 0, 10, 10]], np.float32
    )
    scores = np.array([np.nan, 0.5, 0.4, 0.3, 0.9], np.float32)
    result = nms_module.nms(boxes, scores, 0.5, backend=backend)
    # order: 4 (NaN box: kept, suppresses nothing), 1, 2, 3 (IoU 9/11 with 1: suppressed), 0 (NaN
    # score ranks last; IoU 9/11 with box 1: suppressed)
    np.testing.assert_array_equal(np.asarray(result.indices), [4, 1, 2, -1, -1])
    assert int(result.count) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_scores_are_visited_in_input_order(backend):
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [100, 0, 110, 10], [100, 0, 110, 10]], np.float32)
    result = nms_module.nms(boxes, np.array([0.5, 0.5, 0.7, 0.7], np.float32), 0.5, backend=backend)
    np.testing.assert_array_equal(np.asarray(result.indices), [2, 0, -1, -1])


@pytest.mark.parametrize("fn_name", ["nms", "batched_nms", "nms_rotated", "batched_nms_rotated"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_gives_empty_result(fn_name, backend):
    box_dim = 5 if "rotated" in fn_name else 4
    args = [np.zeros((0, box_dim), np.float32), np.zeros((0,), np.float32)]
    if fn_name.startswith("batched"):
        args.append(np.zeros((0,), np.int32))
    result = jax.jit(lambda *a: getattr(nms_module, fn_name)(*a, 0.5, backend=backend))(*args)
    chex.assert_shape(result.indices, (0,))
    chex.assert_type(result.indices, jnp.int32)
    assert int(result.count) == 0
    result = getattr(nms_module, fn_name)(*args, 0.5, max_output_size=0)
    chex.assert_shape(result.indices, (0,))


def test_low_precision_inputs_run_in_float32():
    case = AXIS["clustered_37"]
    boxes = jnp.asarray(case["boxes"], jnp.bfloat16)
    scores = jnp.asarray(case["scores"], jnp.float16)
    result = L.nms(boxes, scores, 0.5)
    # the same (rounded) values given as float32
    reference = nms_module.nms(np.asarray(boxes, np.float32), np.asarray(scores, np.float32), 0.5, backend="xla")
    np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(reference.indices))


def test_bad_arguments_raise_clear_errors():
    boxes = np.zeros((5, 4), np.float32)
    scores = np.zeros((5,), np.float32)
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\].*\(5, 5\)"):
        L.nms(np.zeros((5, 5)), scores, 0.5)
    with pytest.raises(ValueError, match=r"boxes must be \[N, 5\]"):
        L.nms_rotated(boxes, scores, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        L.nms(boxes, np.zeros((4,)), 0.5)
    with pytest.raises(ValueError, match="idxs must be"):
        L.batched_nms(boxes, scores, np.zeros((6,), np.int32), 0.5)
    with pytest.raises(TypeError, match="idxs must hold integer"):
        L.batched_nms(boxes, scores, np.zeros((5,), np.float32), 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"iou_threshold must be in \[0, 1\]"):
            L.nms(boxes, scores, bad)
    with pytest.raises(ValueError, match="max_output_size must be >= 0"):
        L.nms(boxes, scores, 0.5, max_output_size=-1)
    with pytest.raises(ValueError, match="NMS backend"):
        L.nms(boxes, scores, 0.5, backend="tpu-magic")


def test_backend_switch_forces_pure_xla(monkeypatch):
    # the backend is read at trace time, so each check traces a fresh function
    def lowered() -> str:
        return jax.jit(lambda b, s: nms_module.nms(b, s, 0.5)).lower(jnp.zeros((8, 4)), jnp.zeros((8,))).as_text()

    monkeypatch.setenv(nms_module.BACKEND_ENV, "xla")
    assert "custom_call" not in lowered()
    monkeypatch.delenv(nms_module.BACKEND_ENV)
    if HAS_CPU_KERNEL:
        assert "custom_call @detlayers_nms" in lowered()
    nms_module.set_backend("xla")
    try:
        assert "custom_call" not in lowered()
    finally:
        nms_module.set_backend(None)


def test_package_attribute_stays_callable_after_submodule_import():
    # `import detlayers.nms` rebinds the package attribute to the module; it must still work.
    result = L.nms(np.array([[0, 0, 1, 1]], np.float32), np.array([1.0], np.float32), 0.5)
    np.testing.assert_array_equal(np.asarray(result.indices), [0])


_agree_fns = {
    backend: jax.jit(lambda b, s, i, t, backend=backend: nms_module.batched_nms(b, s, i, t, backend=backend))
    for backend in BACKENDS
}


# Sizes around and beyond the pure-XLA tile (XLA_TILE = 256 boxes): one box, one short of a tile,
# a tile and one, partial last tiles after one, two and three full tiles.
PARTIAL_TILE_SIZES = (1, 255, 257, 300, 513, 1000)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
@pytest.mark.parametrize("n", PARTIAL_TILE_SIZES)
@settings(max_examples=3, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(0.0, 1.0),
    classes=st.integers(1, 4),
    spread=st.floats(1.0, 100.0),
)
def test_cpp_and_pure_xla_agree_on_random_problems(n, seed, threshold, classes, spread):
    assert nms_module.XLA_TILE == 256  # the sizes above are chosen around it
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (1, 2)) + rng.normal(0, spread, (n, 2))
    wh = rng.uniform(0.5, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    idxs = rng.integers(0, classes, n).astype(np.int32)
    args = (boxes, scores, idxs, np.float32(threshold))
    a, b = _agree_fns["auto"](*args), _agree_fns["xla"](*args)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert int(a.count) == int(b.count)


@pytest.mark.parametrize(
    "fn_name,name",
    [("nms", "clustered_500"), ("nms", "grid_exact_ties"), ("nms", "dense_3000"), ("batched_nms", "batched_300")],
)
def test_pure_xla_unpadded_sizes_with_a_partial_last_tile_match_torchvision(fn_name, name):
    # No padding: 500, 300 and 3000 boxes end in a partial tile of the pure-XLA loop.
    case = AXIS[name]
    assert len(case["boxes"]) % nms_module.XLA_TILE
    for j, thr in enumerate(case["thresholds"]):
        args = (case["boxes"], case["scores"]) + ((case["idxs"],) if "idxs" in case else ())
        result = jitted(fn_name, "xla")(*args, jnp.asarray(f32_threshold(float(thr))))
        np.testing.assert_array_equal(np.asarray(result.indices[: result.count]), case[f"keep{j}"])
    # a kept-box buffer that ends in a partial tile too
    fn = getattr(nms_module, fn_name)
    result = fn(*args, float(case["thresholds"][0]), max_output_size=300, backend="xla")
    np.testing.assert_array_equal(np.asarray(result.indices[: result.count]), case["keep0"][:300])


def _random_rotated_problem(rng, n, spread):
    xy = rng.uniform(0, 300, (max(1, n // 20), 2))[rng.integers(0, max(1, n // 20), n)]
    xy = xy + rng.normal(0, spread, (n, 2))
    boxes = np.concatenate([xy, rng.uniform(3, 50, (n, 2)), rng.uniform(-180, 180, (n, 1))], 1)
    return boxes.astype(np.float32), rng.permutation(n).astype(np.float32)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(0.0, 0.1),
    classes=st.integers(1, 3),
    spread=st.floats(5.0, 60.0),
)
def test_cpp_and_pure_xla_rotated_agree_at_small_thresholds(seed, threshold, classes, spread):
    # Small thresholds are decided by barely overlapping pairs, the ones the disc culling must
    # not skip. 300 boxes: more than one 256-box tile of the pure-XLA loop, the last one partial.
    rng = np.random.default_rng(seed)
    boxes, scores = _random_rotated_problem(rng, 300, spread)
    idxs = rng.integers(0, classes, 300).astype(np.int32)
    pb, ps, pi = pad_problem(boxes, scores, idxs, 512)
    thr = jnp.float32(threshold)
    a = jitted("batched_nms_rotated", "auto")(pb, ps, pi, thr)
    b = jitted("batched_nms_rotated", "xla")(pb, ps, pi, thr)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert int(a.count) == int(b.count)
    assert int(a.count) < 300 + 212  # something was suppressed


def test_rotated_culling_bound_never_drops_a_pair_that_exceeds_the_threshold():
    # The pure-XLA path skips pairs whose IoU bound (areas, bounding-box overlap) is below the
    # threshold: the bound must hold for every pair, thin and tiny boxes included.
    from detlayers._nms_rotated_xla import rotated_iou_may_exceed
    from detlayers.rotated_boxes import pairwise_iou_rotated

    rng = np.random.default_rng(8)
    n = 400
    xy = rng.uniform(0, 60, (n, 2))
    sides = 10.0 ** rng.uniform(-1.5, 2, (n, 2))
    boxes = np.concatenate([xy, sides, rng.uniform(-180, 180, (n, 1))], 1).astype(np.float32)
    iou = np.asarray(jax.jit(pairwise_iou_rotated)(boxes, boxes))
    checked = 0
    for thr in (0.01, 0.05, 0.2, 0.5, 0.8, 0.95):
        may = np.asarray(jax.jit(rotated_iou_may_exceed)(boxes, boxes, jnp.float32(thr)))
        assert not np.any(~may & (iou > thr)), thr
        checked += int(np.sum(~may & (iou > 0)))
        assert np.mean(~may) > 0.3  # it culls
    assert checked > 1000  # overlapping pairs were culled, not only disjoint ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_traced_threshold_suppresses_every_later_rotated_box(backend):
    # detectron2's rule: boxes whose discs cannot meet have IoU 0, and 0 > t for t < 0, so each
    # class keeps only its best box, far-apart boxes included (as the CUDA kernel does).
    rng = np.random.default_rng(3)
    boxes, scores = _random_rotated_problem(rng, 300, 40.0)
    boxes[:10, :2] += np.arange(10)[:, None] * 1e4  # far from everything
    idxs = (np.arange(300) % 3).astype(np.int32)
    pb, ps, pi = pad_problem(boxes, scores, idxs, 512)
    got = jitted("batched_nms_rotated", backend)(pb, ps, pi, jnp.float32(-0.25))
    best = [int(np.flatnonzero(idxs == c)[np.argmax(scores[idxs == c])]) for c in range(3)]
    best = sorted(best, key=lambda i: -scores[i])
    assert int(got.count) == 3
    np.testing.assert_array_equal(np.asarray(got.indices)[:3], best)
    single = jitted("nms_rotated", backend)(pb, ps, jnp.float32(-1e-6))
    assert int(single.count) == 1 and int(single.indices[0]) == int(np.argmax(scores))


def test_missing_library_falls_back_to_xla_and_warns_once():
    # A fresh interpreter that finds no compiled library: results still right, one warning.

    script = textwrap.dedent(
        """
        import warnings
        import numpy as np
        import detlayers._nms_library as library
        library.library_candidates = lambda file_name: []
        import detlayers as L
        boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = L.nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5)
            b = L.batched_nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.zeros(3, np.int32), 0.5)
        print(sum(issubclass(w.category, RuntimeWarning) and "pure-XLA" in str(w.message) for w in caught))
        print(np.asarray(a.indices).tolist(), np.asarray(b.indices).tolist())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "1"
    assert lines[-1] == "[0, 2, -1] [0, 2, -1]"


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
def test_cuda_batch_chunking_gives_the_unchunked_result(monkeypatch):
    # The chunked vmap rule of the CUDA call (padding, lax.map, reshape, slicing), run on CPU by
    # standing the C++ custom call (same contract, without the scratch output) in for the CUDA one.
    monkeypatch.setattr(custom_call_module, "_cuda_ffi", custom_call_module.call_cpu)
    limit = 3 * custom_call_module.cuda_mask_bytes(50)
    monkeypatch.setattr(custom_call_module, "CUDA_MAX_MASK_BYTES", limit)  # 3 images a call
    custom_call_module._cuda_custom_call.cache_clear()
    try:
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, 50, (2, 7, 50, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (2, 7, 50, 2)).astype(np.float32)], -1)
        thresholds = rng.uniform(0.2, 0.8, (2, 7)).astype(np.float32)
        chunked = jax.jit(jax.vmap(jax.vmap(functools.partial(custom_call_module.call_cuda, "detlayers_nms", 20))))
        plain = jax.jit(jax.vmap(jax.vmap(functools.partial(custom_call_module.call_cpu, "detlayers_nms", 20))))
        text = chunked.lower(boxes, thresholds).as_text()
        assert "while" in text and "tensor<1x3x50x4xf32>" in text  # 7 images: 3 chunks of 3, padded
        for got, want in zip(chunked(boxes, thresholds), plain(boxes, thresholds)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    finally:
        custom_call_module._cuda_custom_call.cache_clear()


def _small_result():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    keep = L.nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5)
    return boxes, keep


@pytest.mark.parametrize(
    "pattern",
    [
        "boxes_jnp[keep]",
        "boxes_np[keep]",
        "boxes_jnp[keep, 0]",
        "boxes_jnp.at[keep].set(0)",
        "keep[:2]",
        "keep[0]",
        "jnp.take(boxes_jnp, keep, axis=0)",
        "np.take(boxes_np, keep, axis=0)",
        "np.asarray(keep)",
        "jnp.asarray(keep)",
        "len(keep)",
        "list(keep)",
        "[1, 2, 3][keep]",
    ],
)
def test_using_the_result_as_detectron2_keep_fails_with_what_to_write(pattern):
    boxes_np, keep = _small_result()
    boxes_jnp = jnp.asarray(boxes_np)
    scope = dict(boxes_np=boxes_np, boxes_jnp=boxes_jnp, keep=keep, jnp=jnp, np=np)
    with pytest.raises((TypeError, IndexError), match=r"boxes\[keep\.indices\[:keep\.count\]\]"):
        eval(pattern, scope)


def test_result_does_not_unpack_like_the_former_tuple():
    _, keep = _small_result()
    with pytest.raises(TypeError, match=r"keep\.indices"):
        indices, count = keep
    # under jit too (the pattern is refused at trace time)
    with pytest.raises(TypeError, match=r"keep\.indices"):
        jax.jit(lambda b, s: b[L.nms(b, s, 0.5)])(jnp.zeros((4, 4)), jnp.zeros((4,)))


def test_result_fields_and_the_written_alternative():
    boxes, keep = _small_result()
    np.testing.assert_array_equal(np.asarray(keep.indices), [0, 2, -1])
    np.testing.assert_array_equal(np.asarray(keep.valid), [True, True, False])
    np.testing.assert_array_equal(np.asarray(boxes[keep.indices[: keep.count]]), boxes[[0, 2]])
    assert not isinstance(keep, tuple)
    # hashable by identity, immutable (as pytrees of arrays are)
    assert keep == keep and hash(keep) == hash(keep)
    assert keep != L.NMSResult.from_indices(keep.indices, keep.count)
    with pytest.raises(Exception, match="cannot assign"):
        keep.count = 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_equals_slot_below_count_under_jit_vmap_and_pmap(backend):
    case = AXIS["clustered_37"]
    n_dev = min(4, jax.device_count())
    boxes = np.stack([case["boxes"]] * n_dev)
    scores = np.stack([np.roll(case["scores"], d) for d in range(n_dev)])
    # K = 30 slots for 28 kept boxes: valid has True and False entries (and slot `count` is False)
    per_image = lambda b, s: nms_module.nms(b, s, 0.5, max_output_size=30, backend=backend)  # noqa: E731
    results = {
        "jit": jax.jit(per_image)(boxes[0], scores[0]),
        "vmap": jax.jit(jax.vmap(per_image))(boxes, scores),
        "pmap": jax.pmap(per_image)(boxes, scores),
    }
    for how, result in results.items():
        assert type(result) is L.NMSResult, how
        indices, count, valid = (np.asarray(x) for x in (result.indices, result.count, result.valid))
        assert valid.dtype == bool and valid.shape == indices.shape, how
        assert (count < 30).all() and not valid[..., -1].any(), how
        np.testing.assert_array_equal(valid, np.arange(30) < count[..., None], err_msg=how)
        np.testing.assert_array_equal(valid, indices >= 0, err_msg=how)
    np.testing.assert_array_equal(np.asarray(results["vmap"].indices), np.asarray(results["pmap"].indices))
    np.testing.assert_array_equal(np.asarray(results["jit"].indices), np.asarray(results["vmap"].indices[0]))
    assert int(results["jit"].count) == len(case["keep1"])
    # a pytree: leaves are (indices, count, valid), and it round-trips through tree utilities
    leaves, treedef = jax.tree.flatten(results["vmap"])
    assert len(leaves) == 3
    again = jax.tree.unflatten(treedef, leaves)
    assert type(again) is L.NMSResult and again.valid is leaves[2]


# ------------------------------------------------------------------------------------------------
# 64-bit class ids: no two distinct ids may share a class (torchvision compares int64 ids)
# ------------------------------------------------------------------------------------------------
# Ids that wrap onto each other (and onto 0, 1, -1) in int32: 2**32 + 1 -> 1, -(2**40) -> 0, ...
WIDE_IDS = np.array([2**31, 2**32 + 1, -1, -(2**40), 1, 0, 2**32, 2**31, -1, 2**63 - 1], np.int64)


def _identical_boxes(n):
    boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (n, 1))
    scores = np.linspace(1.0, 0.1, n).astype(np.float32)
    return boxes, scores


def _expected_wide(ids):
    # identical boxes: the best box of each distinct id survives, in score order
    first = sorted({int(i): k for k, i in reversed(list(enumerate(ids.tolist())))}.values())
    return np.array(first)


def _wide_problem(fn_name):
    boxes, scores = _identical_boxes(len(WIDE_IDS))
    if fn_name == "batched_nms_rotated":
        boxes = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2],
                                np.zeros((len(boxes), 1), np.float32)], 1)
    return getattr(nms_module, fn_name), boxes, scores


@pytest.mark.parametrize("fn_name", ["batched_nms", "batched_nms_rotated"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_class_ids_never_merge_classes(fn_name, backend):
    fn, boxes, scores = _wide_problem(fn_name)
    expected = _expected_wide(WIDE_IDS)
    assert len(expected) == 8  # 2**31 and -1 repeat; everything else is distinct
    # NumPy int64 with x64 off: mapped on the host before JAX could wrap the ids
    result = fn(boxes, scores, WIDE_IDS, 0.5, backend=backend)
    np.testing.assert_array_equal(np.asarray(result.indices[: result.count]), expected)


# Not the rotated pure-XLA kernel: these mappings run before the kernel, in code shared by every
# case, and each call below would compile that loop again (minutes).
@pytest.mark.parametrize(
    "fn_name,backend", [("batched_nms", "auto"), ("batched_nms", "xla"), ("batched_nms_rotated", "auto")]
)
def test_int64_unsigned_and_traced_class_ids_never_merge_classes(fn_name, backend):
    fn, boxes, scores = _wide_problem(fn_name)
    expected = _expected_wide(WIDE_IDS)
    np.testing.assert_array_equal(  # unsigned 64-bit ids too
        np.asarray(fn(boxes, scores, WIDE_IDS.astype(np.uint64), 0.5, backend=backend).indices[:8]),
        _expected_wide(WIDE_IDS.astype(np.uint64)))
    # int64 JAX arrays (x64 on): mapped by a sort in XLA, traced under jit and under vmap
    with jax.enable_x64(True):
        ids = jnp.asarray(WIDE_IDS)
        assert ids.dtype == jnp.int64
        jitted_fn = jax.jit(lambda b, s, i: fn(b, s, i, 0.5, backend=backend))
        got = jitted_fn(boxes, scores, ids)
        np.testing.assert_array_equal(np.asarray(got.indices[: got.count]), expected)
        batched = jax.vmap(lambda b, s, i: fn(b, s, i, 0.5, backend=backend))(
            np.stack([boxes, boxes]), np.stack([scores, scores]), jnp.stack([ids, ids[::-1]]))
        np.testing.assert_array_equal(np.asarray(batched.indices[0, :8]), expected)
        assert int(batched.count[1]) == 8


def test_int64_ids_within_int32_range_and_uint32_ids_are_unchanged():
    boxes, scores = _identical_boxes(6)
    small = np.array([3, 3, -2, 7, 7, 0], np.int64)  # fits int32: converted as is
    np.testing.assert_array_equal(np.asarray(L.batched_nms(boxes, scores, small, 0.5).indices[:4]), [0, 2, 3, 5])
    wide_u32 = np.array([2**32 - 1, 2**31, 2**31 - 1, 0, 2**32 - 1, 5], np.uint32)  # wraps 1:1
    np.testing.assert_array_equal(np.asarray(L.batched_nms(boxes, scores, wide_u32, 0.5).indices[:5]), [0, 1, 2, 3, 5])


def test_pure_xla_rotated_nms_on_thousands_of_boxes_finishes_in_bounded_time():
    # The TPU path must scale: disc culling and the IoU bound keep the exact polygon IoU to the
    # few pairs that can matter. A subprocess with a timeout, so a regression fails, not hangs.
    script = textwrap.dedent(
        """
        import importlib, numpy as np, jax
        nms = importlib.import_module("detlayers.nms")
        rng = np.random.default_rng(7)
        n = 4000
        xy = rng.uniform(0, 1333, (n // 25, 2))[rng.integers(0, n // 25, n)] + rng.normal(0, 12, (n, 2))
        boxes = np.concatenate([xy, rng.uniform(8, 96, (n, 2)), rng.uniform(-180, 180, (n, 1))], 1)
        scores = rng.permutation(n).astype(np.float32)
        boxes = boxes.astype(np.float32)
        xla = nms.nms_rotated(boxes, scores, 0.5, backend="xla")
        auto = nms.nms_rotated(boxes, scores, 0.5, backend="auto")
        print(int(xla.count), int(auto.count), bool(np.array_equal(np.asarray(xla.indices), np.asarray(auto.indices))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr
    xla_count, auto_count, same = out.stdout.split()
    assert int(xla_count) == int(auto_count) > 1000 and same == "True"


@pytest.mark.parametrize("backend", BACKENDS)
def test_iou_union_is_rounded_in_torchvisions_order(backend):
    # float32 (a + b) - inter and a + (b - inter) differ in the last bit for this pair; torchvision
    # (torchvision.ops.nms, 0.29.1) suppresses box 1 at the lower threshold and keeps it at the
    # higher one, which only the (a + b) - inter order reproduces.
    boxes = np.array([[75.77288818359375, 49.742271423339844, 102.70918273925781, 89.24577331542969],
                      [74.06600189208984, 54.431941986083984, 109.91200256347656, 101.10286712646484]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    for threshold, expected in ((0.5211813449859619, [0]), (0.5211814045906067, [0, 1])):
        result = nms_module.nms(boxes, scores, threshold, backend=backend)
        np.testing.assert_array_equal(np.asarray(result.indices[: result.count]), expected)
