"""Mutation run: inject small, realistic bugs one at a time and check that a test catches each.

Not part of CI (each mutant runs a test selection; the full list takes an hour or more on a small
machine). Run it from anywhere with the Python environment the tests use:

    python tools/mutants.py                        # every mutant
    python tools/mutants.py --list                 # names only
    python tools/mutants.py --only paste --jobs 2  # mutants whose name contains "paste"
    python tools/mutants.py --check                # each mutant's text occurs exactly once

How it works. The working tree (tracked and untracked, non-ignored files, plus the built library in
``detlayers/_lib``) is copied to a scratch directory. Each mutant replaces one exact piece of text
in one file of that copy, runs its test selection there (``pytest -x``; ``PYTHONPATH`` is the copy),
and restores the file. A mutant is *killed* when the selection fails or times out, and *survives*
when it passes. Mutants of the CPU library's C++ sources (``CPU_LIBRARY_SOURCES``) rebuild it into
the copy's ``build/`` with CMake first (``DETLAYERS_CUDA=OFF``) and restore the unmutated library
after; mutants of the CUDA-only sources (``nms_cuda.cu``, ``nms_bitmask.h``) are judged by the host
CUDA simulator test, which compiles them itself. The score is killed / run.

A mutant whose text is no longer in its file is reported as ``stale`` (the code moved on: update
the list). Keep mutants *non-equivalent*: each must change an output some input can reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CPP_SUFFIXES = (".cc", ".h", ".cu")
# Sources of the CPU custom-call library (CMake target detlayers_cpu); a mutant of one of them
# rebuilds it. nms_cuda.cu and nms_bitmask.h are only compiled by the CUDA build and by the host
# CUDA simulator test (tests/test_cuda_simulation.py builds them itself with g++).
CPU_LIBRARY_SOURCES = ("custom_calls/nms_cpu.cc", "custom_calls/nms_box_iou.h",
                       "custom_calls/nms_ffi_shapes.h", "custom_calls/rotated_iou.h")


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One injected bug: replace ``old`` (must occur exactly once in ``path``) by ``new``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    select: str | None = None  # pytest -k expression narrowing the run

    @property
    def is_cpp(self) -> bool:
        return self.path.endswith(CPP_SUFFIXES)

    @property
    def rebuilds_library(self) -> bool:
        return self.path in CPU_LIBRARY_SOURCES


NMS = ("tests/test_nms.py",)
NMS_VALUES = "matches or agree or partial_last or threshold or max_output"
MASKS = ("tests/test_mask_ops.py",)
ROI = ("tests/test_roi_align.py",)
ROI_ROT = ("tests/test_roi_align_rotated.py",)
BN = ("tests/test_batch_norm.py", "tests/test_sync_batch_norm.py")
ROT_IOU = ("tests/test_rotated_iou.py",)
CUDA_SIM = ("tests/test_cuda_simulation.py",)
ROT_XLA = ("tests/test_nms_rotated_xla.py",)
EDGES = ("tests/test_sample_edges.py",)

MUTANTS: tuple[Mutant, ...] = (
    # ---- NMS: pure-XLA path -----------------------------------------------------------------
    Mutant("nms-xla-threshold-ge", "detlayers/nms.py",
           "return mask & (_axis_iou(first, second) > threshold)",
           "return mask & (_axis_iou(first, second) >= threshold)", NMS, NMS_VALUES),
    Mutant("nms-xla-drop-partial-last-tile", "detlayers/_nms_tiles.py",
           "    num_tiles = -(-n // tile)\n", "    num_tiles = n // tile\n", NMS, NMS_VALUES),
    Mutant("nms-xla-tile-start-off-by-one", "detlayers/nms.py",
           "candidate = ((start + lane) < n) & ~suppressed",
           "candidate = ((start + lane) < n - 1) & ~suppressed", NMS, NMS_VALUES),
    Mutant("nms-xla-self-pass-all-pairs", "detlayers/nms.py",
           "earlier = lane[:, None] < lane[None, :]", "earlier = lane[:, None] != lane[None, :]",
           NMS, NMS_VALUES),
    Mutant("nms-xla-kept-chunks-one-short", "detlayers/nms.py",
           "num_chunks = (count + tile - 1) // tile", "num_chunks = count // tile", NMS, NMS_VALUES),
    Mutant("nms-xla-tile-greedy-suppressed-suppress", "detlayers/_nms_tiles.py",
           "new_keep = candidate & ~(keep[:, None] & overlaps)",
           "new_keep = candidate & ~(candidate[:, None] & overlaps)", NMS + ROT_XLA),
    Mutant("nms-xla-ignore-classes", "detlayers/nms.py",
           "            mask &= first_cls[:, None] == second_cls[None, :]\n",
           "            mask &= True\n", NMS, NMS_VALUES),
    Mutant("nms-xla-rotated-reach-half-side", "detlayers/rotated_boxes.py",
           "radius = np.float32(0.5) * jnp.sqrt(_rounded(w * w) + _rounded(h * h))",
           "radius = np.float32(0.5) * jnp.maximum(w, h)", NMS + ROT_IOU, "rotated"),
    # ---- NMS: pure-XLA rotated path (spatial grid of kept boxes) ------------------------------
    Mutant("nms-xla-rotated-query-without-cut", "detlayers/_nms_rotated_xla.py",
           "half = cur_terms[:, _REACH] + r_cut", "half = cur_terms[:, _REACH]", ROT_XLA),
    Mutant("nms-xla-rotated-rows-exclusive", "detlayers/_nms_rotated_xla.py",
           "(row <= y1[:, None])", "(row < y1[:, None])", ROT_XLA),
    Mutant("nms-xla-rotated-columns-one-cell", "detlayers/_nms_rotated_xla.py",
           "cell_end[row * grid_cells + x1[:, None]]", "cell_end[row * grid_cells + x0[:, None]]", ROT_XLA),
    Mutant("nms-xla-rotated-large-boxes-in-grid", "detlayers/_nms_rotated_xla.py",
           "in_grid = finite & (terms[:, _REACH] <= r_cut)", "in_grid = finite", ROT_XLA),
    Mutant("nms-xla-rotated-grid-steps-floor", "detlayers/_nms_rotated_xla.py",
           "grid_steps = -(-segments[2][-1] // pairs_per_step)", "grid_steps = segments[2][-1] // pairs_per_step",
           ROT_XLA),
    Mutant("nms-xla-rotated-segment-offset", "detlayers/_nms_rotated_xla.py",
           "p - (seg_end[seg] - seg_len[seg])", "p - (seg_end[seg] - seg_len[seg]) + 1", ROT_XLA),
    Mutant("nms-xla-rotated-grid-insert-not-shifted", "detlayers/_nms_rotated_xla.py",
           "slot + shift[old_cell]", "slot", ROT_XLA),
    Mutant("nms-xla-rotated-grid-insert-rank", "detlayers/_nms_rotated_xla.py",
           "same_cell_before = (earlier & (added_cell", "same_cell_before = ((added_cell", ROT_XLA),
    Mutant("nms-xla-rotated-negative-threshold-grid", "detlayers/_nms_rotated_xla.py",
           "(threshold >= 0) & (num_finite > 0)", "(num_finite > 0)", ROT_XLA),
    Mutant("nms-nan-score-ranks-first", "detlayers/nms.py",
           "bits = lax.bitcast_convert_type(jnp.where(jnp.isnan(scores), -jnp.inf, scores), jnp.int32)",
           "bits = lax.bitcast_convert_type(jnp.where(jnp.isnan(scores), jnp.inf, scores), jnp.int32)",
           NMS, "nan or matches"),
    Mutant("nms-threshold-rounds-up", "detlayers/nms.py",
           "return jnp.asarray(f32_at_or_below(as_double), jnp.float32)",
           "return jnp.asarray(np.float32(as_double), jnp.float32)", NMS, "threshold"),
    Mutant("nms-valid-from-indices", "detlayers/nms.py",
           "valid = jnp.arange(indices.shape[-1], dtype=jnp.int32) < count[..., None]",
           "valid = jnp.arange(indices.shape[-1], dtype=jnp.int32) <= count[..., None]", NMS, "valid or result"),
    Mutant("nms-int64-ids-wrap", "detlayers/nms.py",
           "            idxs = np.unique(idxs, return_inverse=True)[1].reshape(idxs.shape)\n",
           "            pass\n", NMS, "int64"),
    Mutant("nms-int64-traced-ids-wrap", "detlayers/nms.py",
           "    ranks = jnp.searchsorted(jnp.sort(idxs), idxs, side=\"left\", method=\"sort\")\n",
           "    ranks = idxs\n", NMS, "int64"),
    # ---- NMS: C++ kernel, and the CUDA kernels run on the host CUDA simulator -------------------
    Mutant("nms-cpp-threshold-ge", "custom_calls/nms_cpu.cc",
           "hit |= static_cast<int>(iou > threshold);", "hit |= static_cast<int>(iou >= threshold);",
           NMS, NMS_VALUES),
    Mutant("nms-cpp-rotated-threshold-ge", "custom_calls/nms_cpu.cc",
           ": rotated_box_iou<float>(a, b) > threshold;",
           ": rotated_box_iou<float>(a, b) >= threshold;", NMS, "rotated and matches"),
    Mutant("nms-cpp-rotated-reach-half-side", "custom_calls/rotated_iou.h",
           "const float radius = 0.5f * sqrtf(rounded_product(w, w) + rounded_product(h, h));",
           "const float radius = 0.5f * (w > h ? w : h);", NMS + ROT_IOU, "rotated"),
    Mutant("nms-cuda-bitmask-threshold-ge", "custom_calls/nms_bitmask.h",
           "if (IoU::iou(box, col_boxes + j * kBoxDim) > threshold) bits |= Word{1} << j;",
           "if (IoU::iou(box, col_boxes + j * kBoxDim) >= threshold) bits |= Word{1} << j;",
           CUDA_SIM, "match"),
    Mutant("nms-cuda-missing-syncthreads", "custom_calls/nms_cuda.cu",
           "  __syncthreads();\n  if (t >= row_size) return;\n", "  if (t >= row_size) return;\n",
           CUDA_SIM),
    Mutant("nms-iou-union-order", "custom_calls/nms_box_iou.h",
           "return inter / (area_a + area_b - inter);", "return inter / (area_a + (area_b - inter));",
           NMS + CUDA_SIM, "matches or match or grid"),
    # ---- paste_masks_in_image: the windowed (tiled) path -------------------------------------
    Mutant("paste-swap-row-col-tile", "detlayers/mask_ops.py",
           "row_tile, col_tile = local // tiles_x[n], local % tiles_x[n]",
           "row_tile, col_tile = local % tiles_x[n], local // tiles_x[n]", MASKS),
    Mutant("paste-drop-window-offset", "detlayers/mask_ops.py",
           "left = jnp.minimum(x_lo[n] + col_tile * tile_w, width - tile_w)",
           "left = jnp.minimum(col_tile * tile_w, width - tile_w)", MASKS),
    Mutant("paste-window-start-plus-one", "detlayers/mask_ops.py",
           "top = jnp.minimum(y_lo[n] + row_tile * tile_h, height - tile_h)",
           "top = jnp.minimum(y_lo[n] + 1 + row_tile * tile_h, height - tile_h)", MASKS),
    Mutant("paste-no-move-back-at-edge", "detlayers/mask_ops.py",
           "left = jnp.minimum(x_lo[n] + col_tile * tile_w, width - tile_w)",
           "left = x_lo[n] + col_tile * tile_w", MASKS),
    Mutant("paste-tiles-one-short", "detlayers/mask_ops.py",
           "tiles_x = (x_hi - x_lo + tile_w - 1) // tile_w", "tiles_x = (x_hi - x_lo) // tile_w", MASKS),
    Mutant("paste-window-crop-off-by-one", "detlayers/mask_ops.py",
           "inside = (pixels >= jnp.floor(start) - 1.0) & (pixels < jnp.ceil(end) + 1.0)\n    low_weight",
           "inside = (pixels >= jnp.floor(start)) & (pixels < jnp.ceil(end) + 1.0)\n    low_weight", MASKS),
    Mutant("paste-tap-index-off-by-one", "detlayers/mask_ops.py",
           "-1.0, mask_size - 1.0).astype(jnp.int32) + 1\n", "-1.0, mask_size - 1.0).astype(jnp.int32)\n",
           MASKS),
    Mutant("paste-soft-rounds", "detlayers/mask_ops.py",
           "        return jnp.clip(values * 255.0, 0.0, 255.0).astype(jnp.uint8)\n\n    def body",
           "        return jnp.round(jnp.clip(values * 255.0, 0.0, 255.0)).astype(jnp.uint8)\n\n    def body",
           MASKS),
    Mutant("paste-whole-image-crop", "detlayers/mask_ops.py",
           "        inside = (pixels >= jnp.floor(start) - 1.0) & (pixels < jnp.ceil(end) + 1.0)\n        left_weight",
           "        inside = (pixels >= jnp.floor(start) - 1.0) & (pixels < jnp.ceil(end))\n        left_weight",
           MASKS),
    # ---- ROIAlign ------------------------------------------------------------------------------
    Mutant("roi-bilinear-valid-low", "detlayers/_roi_sampling.py",
           "valid = (y >= -1.0) & (y <= length)", "valid = (y > -1.0) & (y <= length)", ROI),
    Mutant("roi-bilinear-valid-high", "detlayers/_roi_sampling.py",
           "valid = (y >= -1.0) & (y <= length)", "valid = (y >= -1.0) & (y < length)", ROI),
    Mutant("roi-bilinear-at-end", "detlayers/_roi_sampling.py",
           "at_end = low >= length - 1", "at_end = low >= length", ROI),
    Mutant("roi-adaptive-grid-floor", "detlayers/_roi_sampling.py",
           "grid = jnp.ceil(per_bin(roi_extent, bins))", "grid = jnp.floor(per_bin(roi_extent, bins))", ROI),
    Mutant("roi-max-adaptive-grid-one-short", "detlayers/_roi_sampling.py",
           "jnp.clip(grid, 0, MAX_ADAPTIVE_GRID)", "jnp.clip(grid, 0, MAX_ADAPTIVE_GRID - 1)", ROI),
    Mutant("roi-min-size-not-aligned", "detlayers/roi_align.py",
           "        roi_w = jnp.maximum(roi_w, 1.0)\n", "        roi_w = jnp.maximum(roi_w, 0.0)\n", ROI),
    Mutant("roi-aligned-offset", "detlayers/roi_align.py",
           "offset = jnp.asarray(0.5 if aligned else 0.0, dtype)",
           "offset = jnp.asarray(0.5 if aligned else 0.5, dtype)", ROI),
    Mutant("roi-batch-index-clamp", "detlayers/_roi_sampling.py",
           "valid = (column >= 0) & (column < batch)", "valid = (column >= 0) & (column <= batch)",
           ROI + ROI_ROT, "batch or index"),
    Mutant("roi-invalid-rows-not-zeroed", "detlayers/_roi_sampling.py",
           "return jnp.where(live[:, None, None, None], out, 0.0), residuals",
           "return out, residuals", ROI + ROI_ROT, "batch or index"),
    # ---- sample coordinates on the borders, eager = jit (float32 arithmetic kept as written) ----
    Mutant("edges-no-optimization-barrier", "detlayers/_numerics.py",
           "return lax.optimization_barrier(jnp.asarray(x))", "return jnp.asarray(x)",
           EDGES, "bit_for_bit or (roi_align and under_jit)"),
    Mutant("edges-divide-by-broadcast", "detlayers/_numerics.py",
           "numerator.astype(dtype) / opaque(jnp.broadcast_to(denominator.astype(dtype), shape))",
           "numerator.astype(dtype) / opaque(denominator.astype(dtype))", EDGES, "under_jit"),
    Mutant("edges-bin-size-by-reciprocal", "detlayers/_roi_sampling.py",
           "return divide(roi_extent, jnp.asarray(bins, roi_extent.dtype))", "return roi_extent / bins",
           EDGES, "bit_for_bit or (roi_align and under_jit)"),
    Mutant("edges-grid-division-folded", "detlayers/_roi_sampling.py",
           "offset = divide(centre * bin_size, grid.astype(dtype))",
           "offset = centre * bin_size / grid.astype(dtype)", EDGES, "bit_for_bit or (roi_align and under_jit)"),
    Mutant("edges-sample-product-contracted", "detlayers/_roi_sampling.py",
           "return (start + rounded(jnp.asarray(bin_index, dtype) * bin_size)) + offset",
           "return (start + jnp.asarray(bin_index, dtype) * bin_size) + offset", EDGES,
           "bit_for_bit or (roi_align and under_jit)"),
    Mutant("edges-paste-positions-unpinned", "detlayers/mask_ops.py",
           "normalized = opaque(divide(centres - start, end - start) * 2.0 - 1.0)",
           "normalized = (centres - start) / (end - start) * 2.0 - 1.0", EDGES, "paste"),
    # ---- batch norm ----------------------------------------------------------------------------
    Mutant("bn-biased-running-var", "detlayers/batch_norm.py",
           "var = var * (count / jnp.maximum(count - 1.0, 1.0))", "var = var * (count / jnp.maximum(count, 1.0))",
           BN),
    Mutant("bn-naive-unbiased-running-var", "detlayers/batch_norm.py",
           "            unbiased_running_var=False,\n", "            unbiased_running_var=True,\n", BN),
    Mutant("bn-equal-device-weights-only-unmasked", "detlayers/batch_norm.py",
           'if axis_name is not None and stats_mode == "":',
           'if axis_name is not None and stats_mode == "" and mask is None:', BN),
    Mutant("bn-equal-device-weights-by-count", "detlayers/batch_norm.py",
           "jnp.concatenate([local_mean * has_real, jnp.stack([has_real, count])])",
           "jnp.concatenate([total, jnp.stack([count, count])])", BN),
    Mutant("bn-update-when-empty", "detlayers/batch_norm.py",
           "step = jnp.where(count > 0, momentum, 0.0).astype(running_mean.dtype)",
           "step = jnp.asarray(momentum).astype(running_mean.dtype)", BN),
    Mutant("bn-eps-dropped", "detlayers/batch_norm.py",
           "inv = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(eps, dtype))",
           "inv = jax.lax.rsqrt(var.astype(dtype))", BN),
    Mutant("bn-count-unmasked", "detlayers/batch_norm.py",
           "count = jnp.sum(mask.astype(dtype)) * per_row",
           "count = jnp.asarray(x.shape[0] * per_row, dtype)", BN),
    # ---- rotated IoU: detectron2's value where sound, else the exact one --------------------------
    Mutant("rotiou-sound-tolerance-x10", "detlayers/rotated_boxes.py",
           "SOUND_TOLERANCE = 1e-4\n", "SOUND_TOLERANCE = 1e-3\n", ROT_IOU + NMS, "rotated or sound or exact"),
    Mutant("rotiou-cpp-sound-tolerance-x10", "custom_calls/rotated_iou.h",
           "constexpr float kSoundTolerance = 1e-4f;", "constexpr float kSoundTolerance = 1e-3f;",
           ROT_IOU + NMS, "rotated or sound or exact"),
    Mutant("rotiou-exact-band-drops-above", "detlayers/rotated_boxes.py",
           "height = _rounded(inside * mean_inside) + _rounded(above * (half_h + half_h))",
           "height = _rounded(inside * mean_inside)", ROT_IOU),
    # ---- weights and checkpoints ------------------------------------------------------------------
    Mutant("weights-unpickler-admits-any-global", "detlayers/torch_weights.py",
           '        raise _RefusedGlobal(f"{module}.{name}")\n',
           "        return super().find_class(module, name)\n", ("tests/test_torch_weights.py",)),
    Mutant("ckpt-digests-not-checked", "detlayers/demo/train_checkpoints.py",
           "        _check_digests(restored.state, meta.pop(DIGESTS_KEY, None), path)\n",
           "        meta.pop(DIGESTS_KEY, None)\n", ("tests/test_train_checkpoints.py",)),
    # ---- Mask R-CNN (slow: minutes) -----------------------------------------------------------------
    Mutant("maskrcnn-box-head-flatten-nhwc", "detlayers/models/roi_heads.py",
           "x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)", "x = x.reshape(x.shape[0], -1)",
           ("tests/test_mask_rcnn.py",)),
    # ---- losses ------------------------------------------------------------------------------------
    Mutant("loss-overlap-ge", "detlayers/losses.py",
           "overlaps = (inter_w > 0) & (inter_h > 0)", "overlaps = (inter_w >= 0) | (inter_h > 0)",
           ("tests/test_losses.py",)),
    Mutant("loss-diagonal-eps", "detlayers/losses.py",
           "diagonal_sq = enclose_w**2 + enclose_h**2 + eps", "diagonal_sq = enclose_w**2 + enclose_h**2",
           ("tests/test_losses.py",)),
)


def _copy_tree(dest: pathlib.Path) -> None:
    """Tracked and untracked non-ignored files of the repository, and its built library."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    lib = REPO / "detlayers" / "_lib"
    if lib.is_dir():
        shutil.copytree(lib, dest / "detlayers" / "_lib", dirs_exist_ok=True)


def _build_cpu_library(root: pathlib.Path) -> None:
    """CMake build of the CPU custom-call library of ``root`` into ``root/detlayers/_lib``."""
    build = root / "build" / "mutants"
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release", "-DDETLAYERS_CUDA=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "detlayers_cpu"], check=True,
                   capture_output=True)
    (root / "detlayers" / "_lib").mkdir(parents=True, exist_ok=True)
    for lib in build.glob("libdetlayers_*.so"):
        shutil.copy2(lib, root / "detlayers" / "_lib" / lib.name)


def _first_failure(output: str) -> str:
    """pytest's first ``FAILED``/``ERROR`` summary line: which test killed the mutant."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line
    return ""


def _run_tests(root: pathlib.Path, mutant: Mutant, jobs: int, timeout: float) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "pytest", *mutant.tests, "-x", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "-n", str(jobs)]
    if mutant.select:
        cmd += ["-k", mutant.select]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "survived", seconds
    if proc.returncode == 5:
        return "error (no tests selected)", seconds
    failure = _first_failure(proc.stdout)
    return "killed" + (f" by {failure}" if failure else ""), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check every mutant's text and exit")
    parser.add_argument("--jobs", type=int, default=1, help="pytest-xdist workers per run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutant (then killed)")
    parser.add_argument("--scratch", default=None, help="scratch directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.path}  [{' '.join(m.tests)}{' -k ' + repr(m.select) if m.select else ''}]")
        return 0
    stale = [m for m in mutants if (REPO / m.path).read_text().count(m.old) != 1]
    for m in stale:
        print(f"stale: {m.name}: its text occurs {(REPO / m.path).read_text().count(m.old)} times in {m.path}")
    if args.check:
        print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
        return 1 if stale else 0
    mutants = [m for m in mutants if m not in stale]

    scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="detlayers-mutants-"))
    print(f"scratch copy: {scratch}", flush=True)
    _copy_tree(scratch)
    saved_lib = scratch / "build" / "unmutated_lib"
    if any(m.rebuilds_library for m in mutants):
        if not (scratch / "detlayers" / "_lib").is_dir():
            _build_cpu_library(scratch)
        shutil.copytree(scratch / "detlayers" / "_lib", saved_lib, dirs_exist_ok=True)

    results: list[tuple[Mutant, str]] = []
    for m in mutants:
        target = scratch / m.path
        original = target.read_text()
        target.write_text(original.replace(m.old, m.new, 1))
        try:
            if m.rebuilds_library:
                try:
                    _build_cpu_library(scratch)
                except subprocess.CalledProcessError:
                    outcome, seconds = "killed (does not build)", 0.0
                else:
                    outcome, seconds = _run_tests(scratch, m, args.jobs, args.timeout)
            else:
                outcome, seconds = _run_tests(scratch, m, args.jobs, args.timeout)
        finally:
            target.write_text(original)
            if m.rebuilds_library:
                shutil.copytree(saved_lib, scratch / "detlayers" / "_lib", dirs_exist_ok=True)
        results.append((m, outcome))
        verdict, _, detail = outcome.partition(" by ")
        print(f"{verdict:26s} {m.name:40s} ({seconds:.0f} s){'  ' + detail[:160] if detail else ''}", flush=True)

    run = [r for r in results if not r[1].startswith("error")]
    killed = sum(r[1].startswith("killed") for r in run)
    print(f"\nscore: {killed} / {len(run)} killed"
          + (f" ({100 * killed / len(run):.0f} %)" if run else "")
          + (f"; {len(stale)} stale" if stale else ""))
    for m, outcome in results:
        if outcome == "survived" or outcome.startswith("error"):
            print(f"  {outcome}: {m.name} ({m.path})")
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if killed == len(run) else 1


if __name__ == "__main__":
    sys.exit(main())
