"""Mutation run: inject small, realistic bugs one at a time and check that a test catches each.

The runs are not part of CI (each mutant runs a test selection; the full list takes an hour or more on a
small machine); ``--check`` is: CI fails when a mutant no longer applies to the code it mutates.
Run it from anywhere with the Python environment the tests use:

    python tools/mutants.py                        # every mutant
    python tools/mutants.py --list                 # names only
    python tools/mutants.py --only paste --jobs 2  # mutants whose name contains "paste"
    python tools/mutants.py --check                # each mutant still applies and selects a test (CI)

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
BENCH_TRAIN = ("tests/test_bench_mask_rcnn_train.py",)
BENCH_MODELS = ("tests/test_bench_models.py",)
CUDA_SIM = ("tests/test_cuda_simulation.py",)
ROT_XLA = ("tests/test_nms_rotated_xla.py",)
TRAIN_STEP = ("tests/test_mask_rcnn_train.py",)
TRAINER = ("tests/test_models_train.py",)
LAYOUT = ("tests/test_models_layout.py",)
CONFIG = ("tests/test_config.py",)
BOXES = ("tests/test_boxes.py",)
FREEZE = ("tests/test_freeze.py",)
C4 = ("tests/test_faster_rcnn_c4.py",)
CASCADE = ("tests/test_cascade_mask_rcnn.py",)
DEEPLAB = ("tests/test_deeplab.py",)
CKPT = ("tests/test_train_checkpoints.py",)
WEIGHTS = ("tests/test_torch_weights.py",)
ARTIFACT = ("tests/test_export_artifact.py",)
FLAGS = ("tests/test_demo_flags.py",)
RETINANET = ("tests/test_retinanet.py",)
BRANCHES = ("tests/test_models_branches.py",)
PANOPTIC = ("tests/test_panoptic_fpn.py",)
_PANOPTIC_PY = "detlayers/models/meta_arch/panoptic_fpn.py"
_SEM_SEG_PY = "detlayers/models/meta_arch/semantic_seg.py"
ROBUST = ("tests/test_predictor_robust.py",)
EDGES = ("tests/test_sample_edges.py",)

ROTATED = ("tests/test_rotated_faster_rcnn.py",)

MUTANTS: tuple[Mutant, ...] = (
    # ---- NMS: pure-XLA path -----------------------------------------------------------------
    Mutant("nms-xla-threshold-ge", "detlayers/_nms_xla.py",
           "return mask & (axis_iou(first, second) > threshold)",
           "return mask & (axis_iou(first, second) >= threshold)", NMS, NMS_VALUES),
    Mutant("nms-xla-drop-partial-last-tile", "detlayers/_nms_tiles.py",
           "    num_tiles = -(-n // tile)\n", "    num_tiles = n // tile\n", NMS, NMS_VALUES),
    Mutant("nms-xla-tile-start-off-by-one", "detlayers/_nms_xla.py",
           "candidate = ((start + lane) < tiled.n) & ~suppressed",
           "candidate = ((start + lane) < tiled.n - 1) & ~suppressed", NMS, NMS_VALUES),
    Mutant("nms-xla-self-pass-all-pairs", "detlayers/_nms_xla.py",
           "earlier = lane[:, None] < lane[None, :]", "earlier = lane[:, None] != lane[None, :]",
           NMS, NMS_VALUES),
    Mutant("nms-xla-kept-chunks-one-short", "detlayers/_nms_xla.py",
           "num_chunks = (kept.count + tile - 1) // tile", "num_chunks = kept.count // tile", NMS, NMS_VALUES),
    Mutant("nms-xla-tile-greedy-suppressed-suppress", "detlayers/_nms_tiles.py",
           "new_keep = candidate & ~(keep[:, None] & overlaps)",
           "new_keep = candidate & ~(candidate[:, None] & overlaps)", NMS + ROT_XLA),
    Mutant("nms-xla-ignore-classes", "detlayers/_nms_xla.py",
           "        mask &= first_cls[:, None] == second_cls[None, :]\n",
           "        mask &= True\n", NMS, NMS_VALUES),
    Mutant("nms-xla-rotated-reach-half-side", "detlayers/rotated_boxes.py",
           "radius = np.float32(0.5) * jnp.sqrt(_rounded(w * w) + _rounded(h * h))",
           "radius = np.float32(0.5) * jnp.maximum(w, h)", NMS + ROT_IOU, "rotated"),
    # ---- NMS: pure-XLA rotated path (spatial grid of kept boxes) ------------------------------
    Mutant("nms-xla-rotated-query-without-cut", "detlayers/_nms_rotated_xla.py",
           "half = cand.terms[:, _TERM_REACH] + layout.r_cut", "half = cand.terms[:, _TERM_REACH]", ROT_XLA),
    Mutant("nms-xla-rotated-rows-exclusive", "detlayers/_nms_rotated_xla.py",
           "(row <= y1[:, None])", "(row < y1[:, None])", ROT_XLA),
    Mutant("nms-xla-rotated-columns-one-cell", "detlayers/_nms_rotated_xla.py",
           "cell_end[row * grid_cells + x1[:, None]]", "cell_end[row * grid_cells + x0[:, None]]", ROT_XLA),
    Mutant("nms-xla-rotated-large-boxes-in-grid", "detlayers/_nms_rotated_xla.py",
           "in_grid = finite & (terms[:, _TERM_REACH] <= r_cut)", "in_grid = finite", ROT_XLA),
    Mutant("nms-xla-rotated-grid-steps-floor", "detlayers/_nms_rotated_xla.py",
           "grid_steps = -(-segments.end[-1] // problem.pairs_per_step)",
           "grid_steps = segments.end[-1] // problem.pairs_per_step",
           ROT_XLA),
    Mutant("nms-xla-rotated-segment-offset", "detlayers/_nms_rotated_xla.py",
           "p - (segments.end[seg] - segments.length[seg])", "p - (segments.end[seg] - segments.length[seg]) + 1",
           ROT_XLA),
    Mutant("nms-xla-rotated-grid-insert-not-shifted", "detlayers/_nms_rotated_xla.py",
           "slot + shift[old_cell]", "slot", ROT_XLA),
    Mutant("nms-xla-rotated-grid-insert-rank", "detlayers/_nms_rotated_xla.py",
           "same_cell_before = (problem.earlier & (added_cell", "same_cell_before = ((added_cell", ROT_XLA),
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
    Mutant("nms-library-first-package-entry-only", "detlayers/_nms_library.py",
           'dirs.extend(entry / "_lib" for entry in _package_dirs())',
           'dirs.extend(entry / "_lib" for entry in _package_dirs()[:1])', ("tests/test_build.py",),
           "three_documented"),
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
    Mutant("bn-biased-running-var", "detlayers/_norm_math.py",
           "var = var * (count / jnp.maximum(count - 1.0, 1.0))", "var = var * (count / jnp.maximum(count, 1.0))",
           BN),
    Mutant("bn-naive-unbiased-running-var", "detlayers/batch_norm.py",
           "            unbiased_running_var=False,\n", "            unbiased_running_var=True,\n", BN),
    Mutant("bn-equal-device-weights-only-unmasked", "detlayers/_norm_math.py",
           'if axis_name is not None and stats_mode == "":',
           'if axis_name is not None and stats_mode == "" and mask is None:', BN),
    Mutant("bn-equal-device-weights-by-count", "detlayers/_norm_math.py",
           "jnp.concatenate([local_mean * has_real, jnp.stack([has_real, count])])",
           "jnp.concatenate([total, jnp.stack([count, count])])", BN),
    Mutant("bn-update-when-empty", "detlayers/_norm_math.py",
           "step = jnp.where(count > 0, momentum, 0.0).astype(running_mean.dtype)",
           "step = jnp.asarray(momentum).astype(running_mean.dtype)", BN),
    Mutant("bn-eps-dropped", "detlayers/_norm_math.py",
           "inv = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(eps, dtype))",
           "inv = jax.lax.rsqrt(var.astype(dtype))", BN),
    Mutant("bn-count-unmasked", "detlayers/_norm_math.py",
           "count = jnp.sum(mask.astype(dtype)) * per_row",
           "count = jnp.asarray(x.shape[0] * per_row, dtype)", BN),
    Mutant("bn-backward-global-count-with-equal-device-weights", "detlayers/_norm_math.py",
           "BatchMoments(mean, var, global_count), devices * count, xf - mean)",
           "BatchMoments(mean, var, global_count), global_count, xf - mean)", BN, "equally"),
    Mutant("bn-naive-stats-mode-positional", "detlayers/batch_norm.py",
           '    stats_mode: str = _keyword_only("")\n', '    stats_mode: str = ""\n', BN, "keyword_only"),
    Mutant("bn-affine-type-unchecked", "detlayers/batch_norm.py",
           "            if not isinstance(value, (bool, np.bool_)):",
           "            if value is None:", BN, "keyword_only"),
    Mutant("jax-internals-no-bound-axes", "detlayers/_jax_internals.py",
           "    return tuple(sizes)\n", "    return ()\n",
           ("tests/test_jax_internals.py", "tests/test_sync_batch_norm.py"), "bound_axis or other_mapped_axes"),
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
    Mutant("weights-pickle-expansion-unchecked", "detlayers/torch_weights.py",
           "    _check_pickle_expansion(data, path, len(raw))\n", "", WEIGHTS, "pickle or nested or itself"),
    Mutant("weights-pickle-shared-counted-once", "detlayers/torch_weights.py",
           "sizes[key] = 1 + sum(sizes.get(id(child), 1) for child in _children(obj))",
           "sizes[key] = 1 + len(_children(obj))", WEIGHTS, "pickle or budget"),
    Mutant("weights-model-list-taken-as-weights", "detlayers/torch_weights.py",
           "        if not _is_array(inner):", "        if False:", WEIGHTS, "model_entry"),
    Mutant("ckpt-digests-not-checked", "detlayers/demo/train_checkpoints.py",
           "        _check_digests(restored.state, meta.pop(DIGESTS_KEY), path)\n",
           "        meta.pop(DIGESTS_KEY, None)\n", CKPT, "flipped or damaged"),
    Mutant("ckpt-meta-digest-not-checked", "detlayers/demo/train_checkpoints.py",
           "    if _meta_digest(meta) != recorded:", "    if False:", CKPT, "meta_field or damaged"),
    Mutant("ckpt-fit-checked-after-orbax-casts", "detlayers/demo/train_checkpoints.py",
           "        _check_fits(self._stored_arrays(step, path), abstract, path)\n", "", CKPT, "incompatible"),
    Mutant("ckpt-damaged-newest-not-skipped", "detlayers/demo/train_checkpoints.py",
           "            except DamagedCheckpointError as err:\n                damaged.append((candidate, err))\n"
           "                continue\n",
           "            except DamagedCheckpointError:\n                raise\n", CKPT, "falls_back"),
    Mutant("ckpt-damaged-step-left-in-rotation", "detlayers/demo/train_checkpoints.py",
           "                os.rename(self.step_path(step), target)\n", "", CKPT, "falls_back"),
    Mutant("ckpt-orbax-leftovers-printed", "detlayers/demo/train_checkpoints.py",
           "        _filter_orbax_leftovers()\n", "", CKPT, "leftovers"),
    Mutant("ckpt-directory-not-locked", "detlayers/demo/checkpoint_lock.py",
           "                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "                pass\n", CKPT,
           "second_run or another_process or cli_refuses"),
    Mutant("ckpt-stale-lock-taken-over-silently", "detlayers/demo/checkpoint_lock.py",
           "            if previous:\n", "            if False:\n", CKPT, "another_process"),
    # ---- export artifacts -------------------------------------------------------------------------
    Mutant("export-digest-not-checked", "detlayers/models/export.py",
           "    if hashlib.sha256(payload).digest() != digest:", "    if False:", ARTIFACT),
    Mutant("export-truncation-seen-as-modification", "detlayers/models/export.py",
           "    if len(payload) < length:", "    if len(payload) < 0:", ARTIFACT),
    Mutant("export-raw-jax-bytes-not-recognised", "detlayers/models/export.py",
           "        if _is_raw_jax_export(data):", "        if False:", ARTIFACT),
    # ---- demo flags --------------------------------------------------------------------------------
    Mutant("demo-steps-accept-any-int", "detlayers/demo/__main__.py",
           'parser.add_argument("--steps", type=positive_int,', 'parser.add_argument("--steps", type=int,', FLAGS),
    Mutant("demo-image-size-minimum-8", "detlayers/demo/arg_types.py",
           "MIN_IMAGE_SIZE = 48\n", "MIN_IMAGE_SIZE = 8\n", FLAGS),
    # the step not blocked on inside out_of_memory_as: XLA's error escapes when the loss is read
    Mutant("train-loop-out-of-memory-not-converted", "detlayers/models/engine/train_loop.py",
           "with out_of_memory_as(_out_of_memory(cfg, iteration, local)):", "if True:", TRAINER,
           "out_of_memory"),
    Mutant("demo-train-step-not-blocked", "detlayers/demo/train.py",
           "jax.block_until_ready(step_fn(", "(step_fn(", ("tests/test_demo_out_of_memory.py",)),
    # ---- the demo's shapes batches as the Mask R-CNN's inputs ------------------------------------
    Mutant("demo-images-not-scaled-by-pixel-std", "detlayers/demo/model.py",
           "PIXEL_STD = (0.25, 0.25, 0.25)", "PIXEL_STD = (1.0, 1.0, 1.0)", ("tests/test_demo.py",), "model_batch"),
    Mutant("demo-masks-padded-top-left", "detlayers/demo/model.py",
           'masks[:, :, :h, :w] = batch["masks"]', 'masks[:, :, -h:, -w:] = batch["masks"]',
           ("tests/test_demo.py",), "model_batch"),
    # ---- benchmark: the mixed-size stream and its summary -----------------------------------------
    Mutant("bench-mixed-crop-not-centered", "detlayers/bench/predictor_mixed_sizes.py",
           "top, left = (h - crop_h) // 2, (w - crop_w) // 2", "top, left = 0, 0", ("tests/test_bench.py",),
           "crop_and_resize"),
    Mutant("bench-mixed-ratio-inverted", "detlayers/bench/predictor_mixed_sizes.py",
           'summary["images/s ratio"] = round(theirs_s / ours_s, 3)',
           'summary["images/s ratio"] = round(ours_s / theirs_s, 3)',
           ("tests/test_bench.py",), "stream_summary"),
    Mutant("bench-summary-not-in-json", "detlayers/bench/__main__.py",
           '                row["summary"] = summary\n', "", ("tests/test_bench.py",), "summary"),
    # ---- benchmark: the models family (one row per architecture, built lazily) ---------------------
    Mutant("bench-models-row-left-out", "detlayers/bench/models.py",
           "            for arch in ARCHITECTURES]", "            for arch in ARCHITECTURES[1:]]", BENCH_MODELS,
           "one_row_per_zoo"),
    Mutant("bench-models-rebuilt-every-call", "detlayers/bench/models.py",
           "        if self.arch is not arch:", "        if True:", BENCH_MODELS, "rows_build"),
    Mutant("bench-models-previous-kept-while-building", "detlayers/bench/models.py",
           "            self.arch = self.predictors = None\n", "", BENCH_MODELS, "rows_build"),
    Mutant("bench-models-calibration-ignored", "detlayers/bench/models.py",
           "            return self.state_dict(*paths), True", "            return self.state_dict(), True",
           BENCH_MODELS, "rows_build"),
    Mutant("bench-models-detectron2-boxes-object", "detlayers/bench/models.py",
           'return getattr(value, "tensor", value).cpu()', "return value", BENCH_MODELS, "boxes_tensor"),
    Mutant("oom-any-xla-error-converted", "detlayers/_out_of_memory.py",
           ' and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)', "", ("tests/test_demo_out_of_memory.py",),
           "out_of_memory_as"),
    # ---- freeze ------------------------------------------------------------------------------------
    Mutant("freeze-only-fields-named-norm", "detlayers/freeze.py",
           'if isinstance(value, str) and "norm" in field_name.lower() and value in BATCH_NORM_NAMES:',
           'if isinstance(value, str) and field_name == "norm" and value in BATCH_NORM_NAMES:', FREEZE, "any_name"),
    Mutant("freeze-any-norm-name-becomes-frozen", "detlayers/freeze.py",
           'if isinstance(value, str) and "norm" in field_name.lower() and value in BATCH_NORM_NAMES:',
           'if isinstance(value, str) and "norm" in field_name.lower() and value:', FREEZE, "any_name"),
    Mutant("freeze-module-fields-need-norm-in-name", "detlayers/freeze.py",
           "    if isinstance(value, nn.Module):\n",
           '    if isinstance(value, nn.Module) and "norm" in field_name.lower():\n', FREEZE, "any_name or removed_up"),
    Mutant("freeze-tuple-field-becomes-list", "detlayers/freeze.py",
           'return type(value)(converted) if not hasattr(value, "_fields") else type(value)(*converted)',
           "return list(converted)", FREEZE, "any_name"),
    Mutant("freeze-frozen-bn-converted-again", "detlayers/freeze.py",
           'if leaves == {"mean", "var"}:', 'if {"mean", "var"} <= leaves:', FREEZE, "any_name"),
    Mutant("freeze-emptied-parents-kept", "detlayers/freeze.py",
           "for depth in range(len(path), 0, -1):", "for depth in range(len(path), 1, -1):", FREEZE, "removed_up"),
    Mutant("freeze-prefix-string-startswith", "detlayers/freeze.py",
           'return name == part or (name.startswith(part + "_")',
           'return name.startswith(part) or (name.startswith(part + "_")', FREEZE, "prefix"),
    Mutant("freeze-prefix-no-list-elements", "detlayers/freeze.py",
           '_LIST_SUFFIX = re.compile(r"(?:_\\d+)+")', '_LIST_SUFFIX = re.compile(r"(?!)")', FREEZE,
           "prefix or freeze_at"),
    Mutant("freeze-prefix-unanchored", "detlayers/freeze.py",
           "return not any(len(names) >= len(p) and all(map(matches, p, names)) for p in prefixes)",
           "return not any(any(all(map(matches, p, names[i:])) for i in range(len(names))) for p in prefixes)",
           FREEZE, "prefix"),
    Mutant("freeze-unmatched-prefix-silent", "detlayers/freeze.py",
           "    _check_every_prefix_matches(tree, prefixes)\n", "", FREEZE, "prefix"),
    Mutant("freeze-frozen-class-not-idempotent", "detlayers/freeze.py",
           '    if getattr(cls, "_detlayers_frozen_class", False):\n        return cls\n', "", FREEZE, "idempotent"),
    # ---- Mask R-CNN (slow: minutes) -----------------------------------------------------------------
    Mutant("maskrcnn-box-head-flatten-nhwc", "detlayers/models/roi_heads/box_head.py",
           "x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)", "x = x.reshape(x.shape[0], -1)",
           ("tests/test_mask_rcnn.py",)),
    # ---- Mask R-CNN variants: GroupNorm, deformable conv (slow: one R50 compile per variant) ----------
    Mutant("variants-gn-16-groups", "detlayers/batch_norm.py",
           "return GroupNorm(32, channels, name=name)", "return GroupNorm(16, channels, name=name)",
           ("tests/test_mask_rcnn_variants.py",), "parity and gn"),
    Mutant("variants-deform-offset-yx-swapped", "detlayers/models/backbone/resnet.py",
           "**geometry)(\n            out, offset_mask, train=train)",
           "**geometry)(\n            out, offset_mask.reshape(*offset_mask.shape[:-1], -1, 2)[..., ::-1]"
           ".reshape(offset_mask.shape), train=train)",
           ("tests/test_mask_rcnn_variants.py",), "parity and dconv and not mdconv"),
    Mutant("variants-modulated-offset-thirds-swapped", "detlayers/models/backbone/resnet.py",
           "offset = offset_mask[..., :2 * taps]",
           "offset = offset_mask[..., :2 * taps].reshape(*offset_mask.shape[:-1], 2, taps)[..., ::-1, :]"
           ".reshape(*offset_mask.shape[:-1], 2 * taps)",
           ("tests/test_mask_rcnn_variants.py",), "split_offset_mask"),
    Mutant("variants-modulated-mask-without-sigmoid", "detlayers/models/backbone/resnet.py",
           "return offset, jax.nn.sigmoid(offset_mask[..., 2 * taps:])", "return offset, offset_mask[..., 2 * taps:]",
           ("tests/test_mask_rcnn_variants.py",), "split_offset_mask"),
    Mutant("variants-deform-on-res2", "detlayers/models/backbone/resnet.py",
           "if self.depth >= 50 and self.deform_on_per_stage[stage_index]:",
           "if self.depth >= 50 and (self.deform_on_per_stage[stage_index] or stage == 2):",
           ("tests/test_mask_rcnn_variants.py",), "state_dict_names and mdconv"),
    # ---- detlayers.models parts (fast: no R50 compile) ----------------------------------------------
    Mutant("models-p6p7-p7-without-relu", "detlayers/models/backbone/fpn.py",
           "name=\"p7\")(jax.nn.relu(p6))", "name=\"p7\")(p6)", LAYOUT, "top_block"),
    Mutant("models-top-block-reads-p5-not-c5", "detlayers/models/backbone/fpn.py",
           "top_input = features[source]", "top_input = results[f\"p{top}\"]", LAYOUT, "top_block"),
    Mutant("models-resnet-dilated-res5-stride-32", "detlayers/models/backbone/resnet.py",
           "if stage > 2 and self._stage_dilation(stage) == 1:", "if stage > 2:", LAYOUT,
           "resnet_from_config"),
    Mutant("models-rpn-pre-nms-topk-from-post", "detlayers/models/proposal_generator/rpn.py",
           "pre_nms_topk=rpn.PRE_NMS_TOPK_TEST", "pre_nms_topk=rpn.POST_NMS_TOPK_TEST", LAYOUT, "rpn_and_anchor"),
    Mutant("models-get-deltas-dw-over-height", "detlayers/boxes.py",
           "dw = ww * jnp.log(target_widths / src_widths)", "dw = ww * jnp.log(target_widths / src_heights)",
           LAYOUT, "get_deltas"),
    Mutant("models-roi-pooler-scales-of-every-level", "detlayers/models/roi_heads/roi_heads.py",
           "1.0 / input_shape[name].stride for name in in_features",
           "1.0 / input_shape[name].stride for name in input_shape", LAYOUT, "roi_heads_from_config"),
    # ---- detectron2 configs -----------------------------------------------------------------------
    Mutant("config-no-literal-eval", "detlayers/models/config/node.py",
           "            value = ast.literal_eval(value)", "            return value", CONFIG),
    Mutant("config-no-list-to-tuple", "detlayers/models/config/node.py",
           "    if new_type is list and old_type is tuple:\n        return tuple(replacement)",
           "    if new_type is list and old_type is tuple:\n        return replacement", CONFIG),
    Mutant("config-int-widens-to-float", "detlayers/models/config/node.py",
           "    if new_type is old_type or (",
           "    if new_type is old_type or new_type is int and old_type is float or (", CONFIG),
    Mutant("config-unknown-key-skipped", "detlayers/models/config/node.py",
           '        elif not target.is_new_allowed():\n            raise KeyError(',

           "        elif not target.is_new_allowed():\n            continue\n            raise KeyError(", CONFIG),
    Mutant("config-merge-list-on-copy-only", "detlayers/models/config/node.py",
           "        _merge_pairs(pairs, self)\n", "\n", CONFIG),
    Mutant("config-base-replaces-nested-dicts", "detlayers/models/config/node.py",
           "        if isinstance(value, dict) and key in target:", "        if False:", CONFIG),
    Mutant("config-base-relative-to-cwd", "detlayers/models/config/node.py",
           "            base = os.path.join(os.path.dirname(filename), base)", "            pass", CONFIG),
    Mutant("config-bases-reversed", "detlayers/models/config/node.py",
           "    for base in bases:", "    for base in reversed(bases):", CONFIG),
    Mutant("config-freeze-not-recursive", "detlayers/models/config/node.py",
           "                value._set_frozen(frozen)", "                pass", CONFIG),
    Mutant("config-default-rpn-pre-nms", "detlayers/models/config/defaults.py",
           '"PRE_NMS_TOPK_TEST": 6000,', '"PRE_NMS_TOPK_TEST": 1000,', CONFIG),
    Mutant("config-default-tuple-as-list", "detlayers/models/config/defaults.py",
           '"MIN_SIZE_TRAIN": (800,),', '"MIN_SIZE_TRAIN": [800],', CONFIG),
    Mutant("config-deeplab-stem", "detlayers/models/config/deeplab.py",
           '("MODEL.RESNETS.STEM_TYPE", "deeplab"),', '("MODEL.RESNETS.STEM_TYPE", "basic"),', CONFIG),
    Mutant("config-zoo-post-nms-train", "detlayers/models/config/zoo.py",
           '"POST_NMS_TOPK_TRAIN": 1000,', '"POST_NMS_TOPK_TRAIN": 2000,', CONFIG),
    Mutant("config-eval-div-floors", "detlayers/models/config/yaml_loader.py",
           "ast.Div: _numbers(operator.truediv),", "ast.Div: _numbers(operator.floordiv),", CONFIG),
    Mutant("config-eval-names-leak", "detlayers/models/config/yaml_loader.py",
           '    "int": int, "float": float,', '    "int": int, "float": float, "open": open, "__import__": __import__,',
           CONFIG),
    # ---- box arithmetic ------------------------------------------------------------------------------
    Mutant("boxes-scale-clamp-dropped", "detlayers/boxes.py",
           "        dw = _clamp_scale(_over(d[..., 2], ww), self.scale_clamp)\n"
           "        dh = _clamp_scale(_over(d[..., 3], wh), self.scale_clamp)\n\n        pred_ctr_x",
           "        dw = _over(d[..., 2], ww)\n"
           "        dh = _clamp_scale(_over(d[..., 3], wh), self.scale_clamp)\n\n        pred_ctr_x",
           BOXES, "clamps"),
    Mutant("boxes-size-weights-swapped", "detlayers/boxes.py",
           "        wx, wy, ww, wh = self.weights\n        d = deltas",
           "        wx, wy, wh, ww = self.weights\n        d = deltas", BOXES, "apply_deltas_matches_float64"),
    Mutant("boxes-nonempty-ge", "detlayers/boxes.py",
           "return (widths > threshold) & (heights > threshold)",
           "return (widths >= threshold) & (heights >= threshold)", BOXES, "nonempty"),
    Mutant("boxes-division-by-reciprocal", "detlayers/boxes.py",
           "return x / jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), jnp.asarray(divisor, x.dtype))",
           "return x / divisor", BOXES, "bit_for_bit"),
    Mutant("boxes-get-deltas-divides-first", "detlayers/boxes.py",
           "dx = wx * (target_ctr_x - src_ctr_x) / src_widths",
           "dx = wx * ((target_ctr_x - src_ctr_x) / src_widths)", BOXES, "get_deltas_matches"),
    Mutant("boxes-rotated-angle-not-wrapped", "detlayers/boxes.py",
           "pred_angle = _wrap_degrees(_over(da * 180.0, math.pi) + angles)",
           "pred_angle = _over(da * 180.0, math.pi) + angles", BOXES, "rotated_apply"),
    Mutant("boxes-iou-no-empty-guard", "detlayers/boxes.py",
           "return jnp.where(overlaps, intersection / union, 0.0)",
           "return intersection / _union(b1, b2, intersection)", BOXES, "empty_boxes"),
    Mutant("boxes-clip-loses-negative-zero", "detlayers/boxes.py",
           "x = jnp.where(x < low, jnp.asarray(low, x.dtype), x)",
           "x = jnp.where(x <= low, jnp.asarray(low, x.dtype), x)", BOXES, "clip"),
    # ---- RetinaNet / Faster R-CNN (slow: one R50 compile each) ---------------------------------------
    Mutant("retinanet-softmax-not-sigmoid", "detlayers/models/meta_arch/retinanet.py",
           "probs = [jax.nn.sigmoid(x.astype(jnp.float32)) for x in logits]",
           "probs = [jax.nn.softmax(x.astype(jnp.float32), axis=-1) for x in logits]", RETINANET, "retinanet_256"),
    Mutant("retinanet-class-major-candidate-index", "detlayers/models/meta_arch/dense_detector.py",
           "anchor_index = index // k\n    classes = (index % k).astype(jnp.int32)",
           "anchor_index = index % m\n    classes = (index // m).astype(jnp.int32)", RETINANET, "retinanet_256"),
    Mutant("retinanet-class-agnostic-nms", "detlayers/models/meta_arch/retinanet.py",
           "batched_nms(masked_boxes, masked_scores, classes_n, nms_thresh",
           "batched_nms(masked_boxes, masked_scores, jnp.zeros_like(classes_n), nms_thresh", RETINANET,
           "retinanet_256"),
    Mutant("retinanet-topk-candidates-off-by-some", "detlayers/models/meta_arch/dense_detector.py",
           "num = min(int(topk_candidates), m * k)", "num = min(int(topk_candidates) + 5, m * k)", RETINANET,
           "thresholds"),
    Mutant("retinanet-bbox-reg-weights-ignored", "detlayers/models/meta_arch/retinanet.py",
           "box2box_transform=Box2BoxTransform(weights=tuple(retina.BBOX_REG_WEIGHTS))",
           "box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))", RETINANET, "thresholds"),
    Mutant("retinanet-score-thresh-from-roi-heads", "detlayers/models/meta_arch/retinanet.py",
           "test_score_thresh=retina.SCORE_THRESH_TEST", "test_score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST",
           RETINANET, "thresholds"),
    Mutant("retinanet-head-norm-skipped", "detlayers/models/meta_arch/retinanet.py",
           "            x = norm(x)\n", "            x = x\n", RETINANET, "head_256"),
    Mutant("retinanet-head-relu-before-norm-index", "detlayers/models/meta_arch/retinanet.py",
           "index += 3 if self.norm else 2", "index += 2", RETINANET, "head_256"),
    Mutant("retinanet-decode-from-the-next-anchor", "detlayers/models/meta_arch/dense_detector.py",
           "picked_anchors = jnp.take(jnp.asarray(anchors, jnp.float32), anchor_index, axis=0)",
           "picked_anchors = jnp.take(jnp.asarray(anchors, jnp.float32), jnp.minimum(anchor_index + 1, m - 1), axis=0)",
           RETINANET, "retinanet_256"),
    Mutant("faster-rcnn-mask-head-weights-kept", "detlayers/models/synthetic_weights.py",
           "    if not mask_on:\n        return\n", "", ("tests/test_faster_rcnn.py",)),
    # ---- Faster R-CNN C4 / DC5 (tests/test_faster_rcnn_c4.py: one R50 compile per case) -----------
    Mutant("c4-res5-head-stride-in-the-wrong-conv", "detlayers/models/roi_heads/res5_roi_heads.py",
           "bottleneck_channels, stride, num_groups, norm, stride_in_1x1,",
           "bottleneck_channels, stride, num_groups, norm, not stride_in_1x1,", C4, "c4_parity_with_detectron2"),
    Mutant("c4-res5-head-stride-always-in-1x1", "detlayers/models/roi_heads/res5_roi_heads.py",
           "num_groups=self.num_groups, norm=self.norm, stride_in_1x1=self.stride_in_1x1)",
           "num_groups=self.num_groups, norm=self.norm, stride_in_1x1=True)", C4, "non_default_keys"),
    Mutant("c4-res5-head-max-pool-not-mean", "detlayers/models/roi_heads/res5_roi_heads.py",
           "self.box_predictor(jnp.mean(x, axis=(1, 2)))", "self.box_predictor(jnp.max(x, axis=(1, 2)))", C4,
           "c4_parity_with_detectron2"),
    Mutant("c4-pooler-sampling-ratio-ignored", "detlayers/models/roi_heads/res5_roi_heads.py",
           "sampling_ratio=box.POOLER_SAMPLING_RATIO, pooler_type=box.POOLER_TYPE)",
           "sampling_ratio=0, pooler_type=box.POOLER_TYPE)", C4, "non_default_keys"),
    Mutant("dc5-res5-dilation-dropped", "detlayers/models/backbone/resnet.py",
           "padding=self.dilation, dilation=self.dilation, groups=self.num_groups, bias=False,",
           "padding=1, dilation=1, groups=self.num_groups, bias=False,", C4, "dc5_parity"),
    Mutant("c4-predictor-pads-to-32-whatever-the-backbone", "detlayers/models/predictor.py",
           "self.size_divisibility = int(self.model.backbone.size_divisibility)",
           "self.size_divisibility = 32", C4, "largest_image"),
    Mutant("c4-batch-padded-to-multiples-of-32", "detlayers/models/predictor.py",
           "divisor = max(int(size_divisibility), 1)", "divisor = max(int(size_divisibility), 32)", C4,
           "c4_parity_with_detectron2"),
    # ---- Panoptic FPN: the combination on boundary inputs (fast), the network against detectron2 -----
    Mutant("panoptic-overlap-at-threshold-skipped", _PANOPTIC_PY,
           "jnp.maximum(area, 1).astype(jnp.float32) > overlap_thresh)",
           "jnp.maximum(area, 1).astype(jnp.float32) >= overlap_thresh)", PANOPTIC, "combination"),
    Mutant("panoptic-score-at-threshold-dropped", _PANOPTIC_PY,
           "keep = ok & (score >= instances_score_thresh)", "keep = ok & (score > instances_score_thresh)",
           PANOPTIC, "combination"),
    Mutant("panoptic-stuff-area-at-limit-dropped", _PANOPTIC_PY,
           "~(area < stuff_area_thresh)", "(area > stuff_area_thresh)", PANOPTIC, "combination"),
    Mutant("panoptic-things-label-made-stuff", _PANOPTIC_PY,
           "stuff = present & (labels != 0) &", "stuff = present &", PANOPTIC, "combination"),
    Mutant("panoptic-canvas-past-the-image-counted", _PANOPTIC_PY,
           "flat = jnp.where(in_image, semantic, num_semantic_classes).reshape(-1)",
           "flat = semantic.reshape(-1)", PANOPTIC, "combination"),
    Mutant("sem-seg-head-keeps-only-the-last-level", _SEM_SEG_PY,
           "total = x if total is None else total + x", "total = x", PANOPTIC,
           "parity_with_detectron2 and not keys"),
    Mutant("sem-seg-final-upsampling-nearest", _SEM_SEG_PY,
           'scale_factor=float(self.common_stride), mode="bilinear", align_corners=False)',
           'scale_factor=float(self.common_stride), mode="nearest")', PANOPTIC,
           "parity_with_detectron2 and not keys"),
    Mutant("sem-seg-postprocess-without-the-crop", "detlayers/models/postprocessing.py",
           "crop_w = jnp.minimum(image_hw[1], logits.shape[1])", "crop_w = jnp.asarray(logits.shape[1])",
           PANOPTIC, "parity_with_detectron2 and not keys"),
    Mutant("panoptic-enabled-false-resets-the-stuff-limit", _PANOPTIC_PY,
           "combine_stuff_area_thresh=float(combine.STUFF_AREA_LIMIT)",
           "combine_stuff_area_thresh=float(combine.STUFF_AREA_LIMIT if combine.ENABLED else 4096)", PANOPTIC,
           "non_default_keys"),
    Mutant("panoptic-overlap-thresh-key-ignored", _PANOPTIC_PY,
           "combine_overlap_thresh=float(combine.OVERLAP_THRESH)", "combine_overlap_thresh=0.5", PANOPTIC,
           "non_default_keys"),
    Mutant("panoptic-instances-confidence-key-ignored", _PANOPTIC_PY,
           "combine_instances_score_thresh=float(combine.INSTANCES_CONFIDENCE_THRESH)",
           "combine_instances_score_thresh=0.5", PANOPTIC, "non_default_keys"),
    # ---- Cascade Mask R-CNN (tests/test_cascade_mask_rcnn.py: one R50 compile per case) ------------
    Mutant("cascade-scores-of-the-last-stage-only", "detlayers/models/roi_heads/cascade_rcnn.py",
           "probs_sum = probs if probs_sum is None else probs_sum + probs", "probs_sum = probs", CASCADE,
           "two_stages"),
    Mutant("cascade-stage-decodes-with-the-next-stages-weights", "detlayers/models/roi_heads/cascade_rcnn.py",
           "boxes = cascade_stage_boxes(predictor.box2box_transform, deltas,",
           "boxes = cascade_stage_boxes(self.box_predictor[stage + 1].box2box_transform, deltas,", CASCADE,
           "two_stages"),
    Mutant("cascade-stage-boxes-not-clipped", "detlayers/models/roi_heads/cascade_rcnn.py",
           "return jnp.where(valid[..., None], clipped, 0.0)", "return jnp.where(valid[..., None], decoded, 0.0)",
           CASCADE, "parity_with_detectron2 or clip_to_each_image"),
    Mutant("cascade-trainer-accepts-inference-only-heads", "detlayers/models/train.py",
           "if cfg.MODEL.ROI_HEADS.NAME in INFERENCE_ONLY_ROI_HEADS:",
           "if cfg.MODEL.ROI_HEADS.NAME in INFERENCE_ONLY_ROI_HEADS[1:]:", CASCADE, "training"),
    Mutant("cascade-final-boxes-not-refined-by-the-last-stage", "detlayers/models/roi_heads/cascade_rcnn.py",
           "final_boxes = last.box2box_transform.apply_deltas(deltas, boxes)", "final_boxes = boxes", CASCADE,
           "two_stages"),
    # ---- DeepLab (projects/DeepLab) -----------------------------------------------------------------
    Mutant("deeplab-res5-multi-grid-ignored", "detlayers/models/backbone/resnet.py",
           "return dilation * int(self.res5_multi_grid[block_index])", "return dilation", DEEPLAB,
           "zoo_backbone"),
    Mutant("deeplab-stem-stride-on-conv2", "detlayers/models/backbone/resnet.py",
           '(("conv1", self.in_channels, half, 2), ("conv2", half, half, 1),',
           '(("conv1", self.in_channels, half, 1), ("conv2", half, half, 2),', DEEPLAB, "zoo_backbone"),
    Mutant("deeplab-dilated-res4-still-strided", "detlayers/models/backbone/resnet.py",
           "first_stride = 1 if stage_index == 0 or self._stage_dilation(stage) > 1 else 2",
           "first_stride = 1 if stage_index == 0 or (stage == 5 and self._stage_dilation(stage) > 1) else 2",
           DEEPLAB, "non_default_keys"),
    Mutant("deeplab-decoder-concat-swapped", "detlayers/models/deeplab/semantic_seg.py",
           "y = jnp.concatenate([proj, y], axis=-1)", "y = jnp.concatenate([y, proj], axis=-1)",
           DEEPLAB, "zoo_backbone"),
    Mutant("deeplab-aspp-window-from-finest-stride", "detlayers/models/deeplab/semantic_seg.py",
           "aspp_pool_kernel=_aspp_pool_kernel(cfg, shapes[-1][1].stride, head),",
           "aspp_pool_kernel=_aspp_pool_kernel(cfg, shapes[0][1].stride, head),", DEEPLAB, "zoo_backbone"),
    Mutant("deeplab-head-upsamples-by-4-whatever-common-stride", "detlayers/models/deeplab/semantic_seg.py",
           "        return interpolate(y, scale_factor=self.common_stride, mode=\"bilinear\", align_corners=False)",
           "        return interpolate(y, scale_factor=4, mode=\"bilinear\", align_corners=False)", DEEPLAB,
           "non_default_keys"),
    Mutant("deeplab-v3-upsampled-with-aligned-corners", "detlayers/models/deeplab/semantic_seg.py",
           "        return interpolate(x, scale_factor=self.common_stride, mode=\"bilinear\", align_corners=False)",
           "        return interpolate(x, scale_factor=self.common_stride, mode=\"bilinear\", align_corners=True)",
           DEEPLAB, "v3_head"),
    Mutant("deeplab-v3-aspp-dilations-reversed", "detlayers/models/deeplab/semantic_seg.py",
           "            aspp_dilations=tuple(int(d) for d in sem.ASPP_DILATIONS), "
           "aspp_dropout=float(sem.ASPP_DROPOUT),\n"
           "            aspp_pool_kernel=_aspp_pool_kernel(cfg, int(sem.COMMON_STRIDE), head),",
           "            aspp_dilations=tuple(int(d) for d in sem.ASPP_DILATIONS)[::-1], "
           "aspp_dropout=float(sem.ASPP_DROPOUT),\n"
           "            aspp_pool_kernel=_aspp_pool_kernel(cfg, int(sem.COMMON_STRIDE), head),", DEEPLAB, "v3_head"),
    Mutant("deeplab-decoder-middle-stage-dropped", "detlayers/models/deeplab/semantic_seg.py",
           "for index in reversed(range(last + 1)):", "for index in sorted({last, 0}, reverse=True):", DEEPLAB,
           "non_default_keys"),
    Mutant("sem-seg-postprocess-crop-beyond-a-smaller-map", "detlayers/models/postprocessing.py",
           "crop_w = jnp.minimum(image_hw[1], logits.shape[1])", "crop_w = image_hw[1]", DEEPLAB, "non_default_keys"),
    Mutant("sem-seg-postprocess-resizes-the-padded-map", "detlayers/models/postprocessing.py",
           "crop_h = jnp.minimum(image_hw[0], logits.shape[0])", "crop_h = jnp.asarray(logits.shape[0])", DEEPLAB,
           "zoo_sem_seg"),
    Mutant("sem-seg-postprocess-without-half-pixel", "detlayers/models/postprocessing.py",
           "real = jnp.maximum(scale * (dst + jnp.float32(0.5)) - jnp.float32(0.5), jnp.float32(0))",
           "real = scale * dst", DEEPLAB, "zoo_sem_seg"),
    # ---- detlayers.models past the default config (fast: small synthetic inputs) -------------------
    Mutant("models-scale-clamp-dh-unclamped", "detlayers/boxes.py",
           "        dh = _clamp_scale(_over(d[..., 3], wh), self.scale_clamp)\n\n        pred_ctr_x",
           "        dh = _over(d[..., 3], wh)\n\n        pred_ctr_x", BRANCHES, "scale_clamp"),
    Mutant("models-anchor-offset-not-scaled-by-stride", "detlayers/models/anchor_generator.py",
           "shift_x = np.arange(offset * stride,", "shift_x = np.arange(offset,", BRANCHES, "offset"),
    Mutant("models-rpn-pre-nms-topk-is-post", "detlayers/models/proposal_generator/rpn.py",
           "k = min(int(logits_i.shape[1]), pre_nms_topk)", "k = min(int(logits_i.shape[1]), post_nms_topk)",
           BRANCHES, "rpn_top_k"),
    Mutant("models-rpn-min-size-ignored", "detlayers/models/proposal_generator/rpn.py",
           "keep = finite & is_nonempty(boxes_n, min_box_size)", "keep = finite & is_nonempty(boxes_n)", BRANCHES,
           "rpn_top_k"),
    Mutant("models-fast-rcnn-score-at-threshold-kept", "detlayers/models/roi_heads/fast_rcnn.py",
           "keep = (cls_scores > score_thresh)", "keep = (cls_scores >= score_thresh)", BRANCHES, "fast_rcnn"),
    Mutant("models-fast-rcnn-fixed-nms-thresh", "detlayers/models/roi_heads/fast_rcnn.py",
           "batched_nms(flat_boxes, flat_scores, flat_classes, nms_thresh,",
           "batched_nms(flat_boxes, flat_scores, flat_classes, 0.5,", BRANCHES, "fast_rcnn_inference"),
    Mutant("models-fast-rcnn-negative-topk-not-unlimited", "detlayers/models/roi_heads/fast_rcnn.py",
           "k = r * num_classes if topk_per_image < 0 else", "k = r * num_classes if topk_per_image < -1 else",
           BRANCHES, "fast_rcnn"),
    Mutant("models-agnostic-bbox-reg-per-class", "detlayers/models/roi_heads/fast_rcnn.py",
           "num_reg = 1 if self.cls_agnostic_bbox_reg else self.num_classes", "num_reg = self.num_classes",
           BRANCHES, "agnostic"),
    Mutant("models-fpn-avg-fuse-as-sum", "detlayers/models/backbone/fpn.py",
           "                prev = prev / 2\n", "                prev = prev\n", BRANCHES, "fpn_fuse"),
    Mutant("models-mask-chunks-floor", "detlayers/models/roi_heads/roi_heads.py",
           "num_chunks = (jnp.max(jnp.sum(valid, axis=1)) + chunk - 1) // chunk",
           "num_chunks = jnp.max(jnp.sum(valid, axis=1)) // chunk", BRANCHES, "mask_head_chunks"),
    Mutant("models-mask-channel-of-class-0", "detlayers/models/roi_heads/mask_head.py",
           "index = jnp.clip(classes, 0, mask_logits.shape[-1] - 1)\n        picked",
           "index = jnp.zeros_like(classes)\n        picked", BRANCHES, "mask_head_chunks"),
    Mutant("models-postprocess-keeps-empty-boxes", "detlayers/models/postprocessing.py",
           'valid = det["valid"] & nonempty(boxes)', 'valid = det["valid"]', BRANCHES, "postprocess"),
    Mutant("models-postprocess-scale-xy-swapped", "detlayers/models/postprocessing.py",
           "jnp.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=1)",
           "jnp.stack([scale[:, 0], scale[:, 1], scale[:, 0], scale[:, 1]], axis=1)", BRANCHES, "postprocess"),
    # ---- Predictor: config values, size buckets, out of memory -------------------------------------
    Mutant("predictor-rpn-topk-zero-accepted", "detlayers/models/proposal_generator/rpn.py",
           "if getattr(rpn, key) <= 0:", "if getattr(rpn, key) < 0:", ROBUST, "bad_config"),
    Mutant("predictor-negative-min-size-accepted", "detlayers/models/predictor.py",
           "if min_size < 0:", "if min_size < -1:", ROBUST, "bad_config"),
    Mutant("predictor-bucket-rounds-down", "detlayers/models/predictor.py",
           "return -(-int(size) // buckets) * buckets", "return max(1, int(size) // buckets) * buckets", ROBUST,
           "bucket"),
    Mutant("predictor-oom-not-recognised", "detlayers/_out_of_memory.py",
           'return isinstance(err, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text',
           'return isinstance(err, MemoryError) and ("RESOURCE_EXHAUSTED" in text', ROBUST,
           "out_of_memory"),
    # ---- training: matcher and sampler -------------------------------------------------------------
    Mutant("train-matcher-padded-gt-matches", "detlayers/models/matcher.py",
           "quality = jnp.where(valid[:, None], iou, -1.0)", "quality = iou", ("tests/test_matcher_sampling.py",)),
    Mutant("train-matcher-low-quality-off", "detlayers/models/matcher.py",
           "labels = jnp.where(is_best, 1, labels)", "labels = labels", ("tests/test_matcher_sampling.py",)),
    Mutant("train-sampler-ties-by-higher-index", "detlayers/models/sampling.py",
           "jnp.lexsort((index, -priorities, ~candidates))", "jnp.lexsort((-index, -priorities, ~candidates))",
           ("tests/test_matcher_sampling.py",)),
    Mutant("train-sampler-negatives-not-capped", "detlayers/models/sampling.py",
           "num_samples - num_pos)", "num_samples)", ("tests/test_matcher_sampling.py",)),
    # ---- training step (parity with detectron2; the R50 step compiles for minutes) ------------------
    Mutant("train-rpn-normalizer-per-image", "detlayers/models/proposal_generator/rpn.py",
           "normalizer = batch_size_per_image * n", "normalizer = batch_size_per_image", TRAIN_STEP),
    Mutant("train-rpn-low-quality-off", "detlayers/models/proposal_generator/rpn.py",
           "anchor_matcher=Matcher(rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=True)",
           "anchor_matcher=Matcher(rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=False)", TRAIN_STEP),
    Mutant("train-roi-gt-not-appended", "detlayers/models/roi_heads/roi_heads.py",
           "        proposals = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)], axis=1)\n",
           "", TRAIN_STEP),
    Mutant("train-box-beta-of-old-configs", "detlayers/models/roi_heads/fast_rcnn.py",
           "smooth_l1_beta=float(box.SMOOTH_L1_BETA)", "smooth_l1_beta=1.0", TRAIN_STEP),
    Mutant("train-box-reg-over-foreground", "detlayers/models/roi_heads/fast_rcnn.py",
           "loss_box_reg = jnp.sum(jnp.where(foreground, loss, 0.0)) / count",
           "loss_box_reg = jnp.sum(jnp.where(foreground, loss, 0.0)) / jnp.maximum(jnp.sum(foreground), 1)",
           TRAIN_STEP),
    # background ROIs scored against the last foreground class (off by one): only loss_cls sees it
    Mutant("train-cls-background-as-last-class", "detlayers/models/roi_heads/fast_rcnn.py",
           "jnp.clip(gt_classes, 0, num_classes)[:, None], axis=1)",
           "jnp.clip(gt_classes, 0, num_classes - 1)[:, None], axis=1)", TRAIN_STEP, "losses"),
    Mutant("train-mask-targets-not-aligned", "detlayers/models/roi_heads/mask_head.py",
           "out = roi_align(masks.reshape(n * g, h, w, 1), rois, mask_size, 1.0, 0, True)",
           "out = roi_align(masks.reshape(n * g, h, w, 1), rois, mask_size, 1.0, 0, False)", TRAIN_STEP),
    # the mask branch detached from the backbone: the losses are unchanged, only the FPN's and the
    # backbone's gradients (the mask loss's share of them) go wrong
    Mutant("train-mask-features-detached", "detlayers/models/roi_heads/roi_heads.py",
           "mask_features = self.mask_pooler([features[name] for name in self.mask_in_features], fg_boxes, foreground)",
           "mask_features = self.mask_pooler([jax.lax.stop_gradient(features[name]) for name in self.mask_in_features],"
           " fg_boxes, foreground)", TRAIN_STEP, "gradient"),
    # ---- losses ------------------------------------------------------------------------------------
    Mutant("loss-overlap-ge", "detlayers/losses.py",
           "overlaps = (inter_w > 0) & (inter_h > 0)", "overlaps = (inter_w >= 0) | (inter_h > 0)",
           ("tests/test_losses.py",)),
    Mutant("loss-diagonal-eps", "detlayers/losses.py",
           "diagonal_sq = enclose_w**2 + enclose_h**2 + eps", "diagonal_sq = enclose_w**2 + enclose_h**2",
           ("tests/test_losses.py",)),
    # ---- solver ------------------------------------------------------------------------------------
    Mutant("solver-steps-boundary-off-by-one", "detlayers/models/solver.py",
           "return values[bisect.bisect_right(milestones, iteration)]",
           "return values[bisect.bisect_left(milestones, iteration)]", ("tests/test_solver.py",), "lr_at_every"),
    Mutant("solver-warmup-ends-at-schedule-start", "detlayers/models/solver.py",
           "end = main(0.0) if rescale else main(warmup_length)", "end = main(0.0)",
           ("tests/test_solver.py",), "lr_at_every"),
    Mutant("solver-weight-decay-on-norms", "detlayers/models/solver.py",
           "if is_norm and solver.WEIGHT_DECAY_NORM is not None:", "if False:",
           ("tests/test_solver.py",), "sgd"),
    Mutant("solver-bias-decay-before-norm-decay", "detlayers/models/solver.py",
           "        if path[-1] == \"bias\":\n            lr_factor = solver.BIAS_LR_FACTOR\n"
           "            if solver.WEIGHT_DECAY_BIAS is not None:",
           "        if path[-1] == \"bias\":\n            lr_factor = solver.BIAS_LR_FACTOR\n"
           "            if solver.WEIGHT_DECAY_BIAS is not None and not is_norm:",
           ("tests/test_solver.py",), "sgd"),
    Mutant("solver-clip-global-norm", "detlayers/models/solver.py",
           "norms = jax.tree.map(tensor_norm, updates)",
           "norms = jax.tree.map(lambda _: optax.global_norm(updates), updates)", ("tests/test_solver.py",), "sgd"),
    Mutant("solver-clip-always-rescales", "detlayers/models/solver.py",
           "return (g * jnp.minimum(clip_value / (norm + 1e-6), 1.0)).astype(g.dtype)",
           "return (g * (clip_value / (norm + 1e-6))).astype(g.dtype)", ("tests/test_solver.py",), "sgd"),
    Mutant("solver-nesterov-ignored", "detlayers/models/solver.py",
           "nesterov=bool(solver.NESTEROV)", "nesterov=False", ("tests/test_solver.py",), "sgd"),
    # ---- trainer -----------------------------------------------------------------------------------
    Mutant("trainer-gradients-not-averaged", "detlayers/models/engine/step.py",
           "grads = jax.lax.pmean(grads, AXIS)", "grads = grads", TRAINER, "k_devices"),
    Mutant("trainer-flip-keeps-boxes", "detlayers/models/data/transforms.py",
           'if geometry.flip == "horizontal":\n        out = np.stack(', 'if False:\n        out = np.stack(',
           TRAINER, "mapper"),
    Mutant("trainer-crowd-annotations-kept", "detlayers/models/data/loader.py",
           'annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]',
           'annotations = list(record["annotations"])', TRAINER, "mapper"),
    Mutant("trainer-frozen-stem-uses-batch-statistics", "detlayers/models/backbone/resnet.py",
           "x, train and self.freeze_at < 1)", "x, train)", TRAINER, "frozen_stem"),
    Mutant("deconv-kernel-eq-stride-blocks-transposed", "detlayers/wrappers.py",
           'out = jnp.einsum("nijc,abco->niajbo", x,', 'out = jnp.einsum("nijc,abco->nibjao", x,',
           ("tests/test_wrappers.py",), "transpose"),
    # ---- benchmark of the training step (detlayers/bench/mask_rcnn_train.py) ---------------------------
    Mutant("bench-train-images-not-mean-subtracted", "detlayers/bench/mask_rcnn_train.py",
           "[(p.astype(np.float32) - mean) / std for p in bgr]", "[p.astype(np.float32) / std for p in bgr]",
           BENCH_TRAIN, "batch"),
    Mutant("bench-train-mask-radii-swapped", "detlayers/bench/mask_rcnn_train.py",
           "out[k] = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0",
           "out[k] = ((x - cx) / ry) ** 2 + ((y - cy) / rx) ** 2 <= 1.0", BENCH_TRAIN, "batch"),
    Mutant("bench-train-backward-share-from-backbone", "detlayers/bench/mask_rcnn_train.py",
           '"backward+SGD": (step - seconds["forward"]) / step', '"backward+SGD": (step - seconds["backbone"]) / step',
           BENCH_TRAIN, "shares"),
    Mutant("bench-train-state-not-carried", "detlayers/bench/mask_rcnn_train.py",
           "self.state = (params, batch_stats, opt_state)", "self.last = (params, batch_stats, opt_state)",
           BENCH_TRAIN, "tiny"),
    # ---- rotated Faster R-CNN (RRPN, RotatedAnchorGenerator, RROIHeads) -----------------------------
    Mutant("rotated-anchors-width-height-swapped", "detlayers/models/anchor_generator.py",
           "anchors.extend([0.0, 0.0, w, h, float(angle)] for angle in angles)",
           "anchors.extend([0.0, 0.0, h, w, float(angle)] for angle in angles)", ROTATED, "anchors or parity"),
    Mutant("rotated-anchors-offset-ignored", "detlayers/models/anchor_generator.py",
           "grid_rotated_anchors((int(hw[0]), int(hw[1])), stride, s, r, a, self.offset)",
           "grid_rotated_anchors((int(hw[0]), int(hw[1])), stride, s, r, a)", ROTATED, "non_default"),
    Mutant("rrpn-clips-tilted-boxes", "detlayers/models/proposal_generator/rrpn.py",
           "clip=clip_rotated_boxes,", "clip=lambda b, h, w: clip_rotated_boxes(b, h, w, 180.0),",
           ROTATED, "parity_with_detectron2 and not non_default"),
    Mutant("rrpn-min-size-ignored", "detlayers/models/proposal_generator/rrpn.py",
           "min_box_size=min_box_size,", "min_box_size=0.0,",
           ROTATED, "non_default"),
    Mutant("rotated-pooler-level-from-width", "detlayers/models/poolers.py",
           "sizes = jnp.sqrt(flat[:, 2] * flat[:, 3])", "sizes = flat[:, 2]", ROTATED,
           "parity_with_detectron2 and not non_default"),
    Mutant("rotated-postprocess-x-scaled-by-height", "detlayers/models/postprocessing.py",
           "boxes[..., 0] * scale_x,", "boxes[..., 0] * scale_y,", ROTATED,
           "parity_with_detectron2 and not non_default"),
    Mutant("rotated-box-predictor-weights-ignored", "detlayers/models/roi_heads/rotated_fast_rcnn.py",
           "return Box2BoxTransformRotated(weights=weights)",
           "return Box2BoxTransformRotated(weights=(1.0, 1.0, 1.0, 1.0, 1.0))", ROTATED,
           "non_default"),
    # ---- weights back to detectron2 ------------------------------------------------------------------
    Mutant("save-weights-linear-not-transposed", "detlayers/torch_weights.py",
           "    if value.ndim == 2:  # Linear: [in, out] -> [out, in]\n        return value.T",
           "    if value.ndim == 2:  # Linear: [in, out] -> [out, in]\n        return value",
           ("tests/test_torch_weights.py",), "torch_state_dict"),
    Mutant("save-weights-deconv-groups-swapped", "detlayers/torch_weights.py",
           "order = (n + 1, n, n + 2) + tuple(range(n))", "order = (n, n + 1, n + 2) + tuple(range(n))",
           ("tests/test_torch_weights.py",), "torch_state_dict"),
    Mutant("save-weights-conv-taps-flipped", "detlayers/torch_weights.py",
           "return value.transpose((n + 1, n) + tuple(range(n)))",
           "return value.transpose((n + 1, n) + tuple(reversed(range(n))))",
           ("tests/test_torch_weights.py",), "torch_state_dict"),
    Mutant("save-weights-drops-batch-stats", "detlayers/torch_weights.py",
           'given = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}',
           'given = {k: v for k, v in dict(variables).items() if k == "params"}',
           ("tests/test_torch_weights.py",), "torch_state_dict"),
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


def _static_problem(mutant: Mutant) -> str:
    """Why ``mutant`` can no longer run as written ("" when it can): its file or test files are gone, or
    its text does not occur exactly once."""
    path = REPO / mutant.path
    if not path.is_file():
        return f"{mutant.path} does not exist"
    missing = [t for t in mutant.tests if not (REPO / t.split("::")[0]).exists()]
    if missing:
        return f"test file(s) {missing} do not exist"
    count = path.read_text().count(mutant.old)
    return "" if count == 1 else f"its text occurs {count} times in {mutant.path}"


def _selection_problems(mutants: list[Mutant]) -> dict[str, str]:
    """Mutants whose tests and ``-k`` selection collect no test (a run would only report an error).

    Collects every mutant's test files once (``pytest --collect-only``) and evaluates each ``-k``
    expression with pytest's own expression parser, matching a name case-insensitively against the
    parts of a test's node id (file, class, function with its parameters), as ``-k`` does.
    """
    files = sorted({t.split("::")[0] for m in mutants for t in m.tests if (REPO / t.split("::")[0]).exists()})
    if not files:
        return {}
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-o", "addopts=", *files], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    node_ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not node_ids:
        return {m.name: f"collecting its tests failed: {proc.stdout[-400:]}{proc.stderr[-400:]}" for m in mutants}
    from _pytest.mark.expression import Expression  # pytest's -k grammar (and, or, not, parentheses)

    def selected(node_id: str, tests: tuple[str, ...], select: str | None) -> bool:
        if not any(node_id == t or node_id.startswith(t + "::") for t in tests):
            return False
        if select is None:
            return True
        parts = [pathlib.Path(node_id.split("::")[0]).name, *node_id.split("::")[1:]]
        return Expression.compile(select).evaluate(lambda name: any(name.lower() in p.lower() for p in parts))

    return {m.name: f"no test is selected by {list(m.tests)} -k {m.select!r}" for m in mutants
            if not any(selected(n, m.tests, m.select) for n in node_ids)}


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
    problems = {m.name: _static_problem(m) for m in mutants}
    if args.check:
        problems.update({name: problem for name, problem in _selection_problems(mutants).items()
                         if not problems.get(name)})
    stale = [m for m in mutants if problems[m.name]]
    for m in stale:
        print(f"stale: {m.name}: {problems[m.name]}")
    if args.check:
        names = [m.name for m in MUTANTS]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        for name in duplicates:
            print(f"duplicate mutant name: {name}")
        print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
        return 1 if stale or duplicates else 0
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
