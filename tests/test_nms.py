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
kernels' per-thread steps (custom_calls/nms_bitmask.h) run sequentially on the host through
``DetlayersBitmaskNmsEmulation`` against the same fixtures.
"""

from __future__ import annotations

import ctypes
import os
import functools
import importlib
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
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec as P

import detlayers as L
from helpers import load_npz

nms_module = importlib.import_module("detlayers.nms")
ffi_module = importlib.import_module("detlayers._ffi")

HAS_CPU_KERNEL = ffi_module.has_target("cpu", "detlayers_nms")
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
    np.testing.assert_array_equal(got, case[f"keep{j}"])


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
    np.testing.assert_array_equal(got, case[f"keep{j}"])


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


@pytest.mark.skipif(not ffi_module.has_target("cuda", "detlayers_nms"), reason="CUDA custom call not built")
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
    # one launch for the 8 images: keep [8, 100], count [8], device mask [8, 300, 5, 2]
    assert "tensor<8x100xi32>, tensor<8xi32>, tensor<8x300x5x2xui32>" in calls[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_library_is_built_when_nvcc_exists():
    path = next((p for p in ffi_module.library_candidates("libdetlayers_cuda.so") if p.is_file()), None)
    assert path is not None, "nvcc is on PATH but libdetlayers_cuda.so was not built"
    lib = ctypes.CDLL(str(path))
    for symbol in ffi_module._CUDA_TARGETS.values():
        assert hasattr(lib, symbol), symbol


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


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ custom call not built")
@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(0.0, 1.0),
    classes=st.integers(1, 4),
    spread=st.floats(1.0, 100.0),
)
def test_cpp_and_pure_xla_agree_on_random_problems(seed, threshold, classes, spread):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (1, 2)) + rng.normal(0, spread, (256, 2))
    wh = rng.uniform(0.5, 40, (256, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.random(256).astype(np.float32)
    idxs = rng.integers(0, classes, 256).astype(np.int32)
    args = (boxes, scores, idxs, np.float32(threshold))
    a, b = _agree_fns["auto"](*args), _agree_fns["xla"](*args)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert int(a.count) == int(b.count)


def test_missing_library_falls_back_to_xla_and_warns_once():
    # A fresh interpreter that finds no compiled library: results still right, one warning.

    script = textwrap.dedent(
        """
        import warnings
        import numpy as np
        import detlayers._ffi as ffi
        ffi.library_candidates = lambda file_name: []
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


def _emulation():
    path = next((p for p in ffi_module.library_candidates("libdetlayers_cpu.so") if p.is_file()), None)
    if path is None:
        return None
    fn = getattr(ctypes.CDLL(str(path)), "DetlayersBitmaskNmsEmulation", None)
    if fn is not None:
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float,
                       ctypes.c_int64, ctypes.c_void_p]
    return fn


@pytest.mark.skipif(_emulation() is None, reason="C++ library not built")
@pytest.mark.parametrize(
    "family,name,j",
    [pytest.param("axis", *p.values, id="axis-" + p.id) for p in case_params(AXIS, lambda n: True)]
    + [pytest.param("rotated", *p.values, id="rotated-" + p.id) for p in case_params(ROTATED, lambda n: True, 400)],
)
def test_cuda_bitmask_algorithm_emulated_on_host_matches_references(family, name, j):
    # The CUDA kernels' per-thread steps (custom_calls/nms_bitmask.h), run sequentially on the host:
    # checks the GPU algorithm (tiling, diagonal words, on-device reduction, K limit) without a GPU.
    case = (AXIS if family == "axis" else ROTATED)[name]
    boxes, scores, idxs = case["boxes"], case["scores"], case.get("idxs")
    order = np.argsort(-scores, kind="stable")
    sorted_boxes = np.ascontiguousarray(boxes[order], np.float32)
    sorted_idxs = None if idxs is None else np.ascontiguousarray(idxs[order], np.int32)
    expected = case[f"keep{j}"]
    for k in sorted({len(boxes), max(len(expected) // 2, 1)}):
        keep = np.full((max(k, 1),), 7, np.int32)
        count = _emulation()(
            sorted_boxes.ctypes.data,
            None if sorted_idxs is None else sorted_idxs.ctypes.data,
            len(boxes),
            boxes.shape[1],
            float(f32_threshold(float(case["thresholds"][j]))),
            k,
            keep.ctypes.data,
        )
        want = expected[:k]
        assert count == len(want)
        np.testing.assert_array_equal(order[keep[:count]], want)
        assert (keep[count:k] == -1).all()
