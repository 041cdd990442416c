"""Non-maximum suppression (``detectron2.layers.nms``): axis-aligned and rotated, plain and per class.

All four functions return :class:`NMSResult` ``(indices, count)`` with static shapes, so they work
under ``jit``, ``vmap`` (one custom-call launch for the whole batch), ``pmap`` and ``shard_map``:

* ``indices``: int32 ``[K]``, ``K = N`` or ``min(N, max_output_size)``: positions in the input of
  the kept boxes, by decreasing score; slots ``>= count`` hold ``-1``.
* ``count``: int32 ``[]``, the number of kept boxes (at most ``K``).

Semantics (torchvision's ``nms`` / detectron2's ``nms_rotated``):

* Boxes are visited by decreasing score; a box is kept unless its IoU with an already kept box is
  **greater than** ``iou_threshold``. The IoU is computed in float32 with the kept (higher-scoring)
  box as the first argument, in exactly torchvision's / detectron2's arithmetic, so the decision
  is bit-identical to theirs. ``iou_threshold`` given as a Python number is compared as the float64
  value torchvision compares with (the float32 comparison uses the largest float32 not above it,
  which decides every float32 IoU identically). detectron2's *CPU* rotated kernel suppresses at
  IoU ``>=`` threshold while its CUDA kernel (and the spec) use ``>``; the two differ only when an
  IoU equals the threshold exactly. We use ``>`` everywhere.
* ``batched_nms`` / ``batched_nms_rotated`` never let boxes of different ``idxs`` interact: the
  kernels compare the class before the IoU (no coordinate-offset trick, so no float32 rounding of
  shifted coordinates can change an IoU). The result equals running ``nms`` on each class
  separately and merging by score.
* Ties: boxes with equal scores are visited in input order (a stable sort); torchvision's unstable
  ``sort`` may order them differently, so results are only guaranteed identical for distinct
  scores (the spec's promise).
* NaN scores rank below every number (below ``-inf`` scores as well, since they are ranked as
  ``-inf`` and the stable sort keeps input order). A box with a NaN coordinate is treated as an
  empty box: it never suppresses another box and is never suppressed.
* ``iou_threshold`` must lie in ``[0, 1]`` (``ValueError`` for a Python number outside). A traced
  threshold is not checked; the comparison rule above still applies.

Backends (all give identical indices; the sort by score always runs in XLA before the kernel):

* CPU: a C++ XLA custom call (``custom_calls/nms_cpu.cc``) that tests each candidate against the
  boxes kept so far and stops at ``max_output_size``.
* GPU (CUDA): a CUDA custom call (``custom_calls/nms_cuda.cu``): 64-box tiles of IoU bitmasks,
  then a one-block-per-image reduction on the device. Nothing is copied to the host and nothing
  synchronizes the stream.
* Everywhere else (TPU, or when no library was built): a pure-XLA version that walks the sorted
  boxes in tiles of 256 inside a ``while_loop``, comparing each tile only with the boxes kept so
  far (memory ``O(N + tile^2)``, no ``N x N`` matrix; work ``O(N * kept)``). For rotated boxes the
  exact polygon IoU (:func:`detlayers.rotated_boxes.pairwise_iou_rotated`) is evaluated only for
  pairs whose bounding discs meet: other pairs have detectron2 IoU exactly 0.

The pure-XLA path can be forced anywhere, as a reference or for debugging: pass ``backend="xla"``,
call :func:`set_backend` ``("xla")``, or set the environment variable ``DETLAYERS_NMS_BACKEND=xla``
(read at trace time: a function already traced keeps the backend it was traced with). The
platform is chosen when the computation is lowered (``jax.lax.platform_dependent``), so one jitted
function runs the right kernel on each device.

No gradient flows through NMS (its outputs are integers; inputs pass through ``stop_gradient``),
but ``jax.grad`` of a model that uses the indices works.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers import _ffi
from detlayers._checks import f32_at_or_below
from detlayers._numerics import round_product as _round_product
from detlayers._sharding import varying_axes as _varying_axes

Array = jax.Array

BACKEND_ENV = "DETLAYERS_NMS_BACKEND"
BACKENDS = ("auto", "xla")
XLA_TILE = 256  # boxes per step of the pure-XLA loop
CUDA_TILE = 64  # boxes per mask word in the CUDA kernel (must match nms_cuda.cu)

_backend_override: str | None = None


class NMSResult(NamedTuple):
    """Kept boxes: ``indices`` int32 ``[K]`` (by decreasing score, ``-1`` padded), ``count`` int32 ``[]``."""

    # jax.Array, not the module's alias: documentation tools evaluate these names outside the module.
    indices: jax.Array
    count: jax.Array


def set_backend(backend: str | None) -> None:
    """Selects the NMS implementation for later traces: ``"auto"`` (default), ``"xla"``, or ``None``
    to defer to the ``DETLAYERS_NMS_BACKEND`` environment variable again."""
    global _backend_override
    if backend is not None:
        _check_backend(backend)
    _backend_override = backend


def get_backend() -> str:
    """The backend used when a call passes none: :func:`set_backend`, else the env var, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    return _check_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"NMS backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def nms(
    boxes: Array,
    scores: Array,
    iou_threshold: float | Array,
    *,
    max_output_size: int | None = None,
    backend: str | None = None,
) -> NMSResult:
    """Greedy NMS of axis-aligned boxes (``torchvision.ops.nms``).

    Args:
      boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, any real dtype (computed in float32).
      scores: ``[N]`` scores.
      iou_threshold: suppress boxes whose IoU with a kept box is ``> iou_threshold``, in ``[0, 1]``.
      max_output_size: keep at most this many boxes (static); ``None`` keeps up to ``N``.
      backend: ``"auto"`` or ``"xla"``; default :func:`get_backend`.

    Returns:
      :class:`NMSResult` with ``indices`` int32 ``[K]`` and ``count`` int32 ``[]``.
    """
    return _suppress(boxes, scores, None, iou_threshold, max_output_size, backend, rotated=False)


def batched_nms(
    boxes: Array,
    scores: Array,
    idxs: Array,
    iou_threshold: float | Array,
    *,
    max_output_size: int | None = None,
    backend: str | None = None,
) -> NMSResult:
    """Per-class NMS (``torchvision.ops.batched_nms``): boxes with different ``idxs[N]`` (integer
    class ids, compared as int32) never suppress each other. Exact per class: equivalent to
    :func:`nms` on each class, merged by decreasing score. Otherwise as :func:`nms`."""
    return _suppress(boxes, scores, idxs, iou_threshold, max_output_size, backend, rotated=False)


def nms_rotated(
    boxes: Array,
    scores: Array,
    iou_threshold: float | Array,
    *,
    max_output_size: int | None = None,
    backend: str | None = None,
) -> NMSResult:
    """Greedy NMS of rotated boxes ``[N, 5]`` ``(xc, yc, w, h, angle_degrees)``
    (``detectron2.layers.nms_rotated``), with detectron2's exact rotated IoU. Otherwise as
    :func:`nms`."""
    return _suppress(boxes, scores, None, iou_threshold, max_output_size, backend, rotated=True)


def batched_nms_rotated(
    boxes: Array,
    scores: Array,
    idxs: Array,
    iou_threshold: float | Array,
    *,
    max_output_size: int | None = None,
    backend: str | None = None,
) -> NMSResult:
    """Per-class rotated NMS (``detectron2.layers.batched_nms_rotated``), exact per class (no
    coordinate offsets). Otherwise as :func:`nms_rotated`."""
    return _suppress(boxes, scores, idxs, iou_threshold, max_output_size, backend, rotated=True)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _threshold_f32(iou_threshold: float | Array) -> Array:
    """The float32 threshold whose ``iou > t`` equals torchvision's float-vs-double comparison."""
    if isinstance(iou_threshold, jax.core.Tracer):
        if iou_threshold.shape != ():
            raise ValueError(f"iou_threshold must be a scalar, got shape {iou_threshold.shape}")
        return jnp.asarray(iou_threshold, jnp.float32)
    value = np.asarray(iou_threshold)
    if value.shape != () or not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise ValueError(f"iou_threshold must be a real scalar, got {iou_threshold!r}")
    as_double = float(value)
    if not 0.0 <= as_double <= 1.0:  # also rejects NaN
        raise ValueError(f"iou_threshold must be in [0, 1], got {as_double}")
    return jnp.asarray(f32_at_or_below(as_double), jnp.float32)


def _check_inputs(boxes, scores, idxs, box_dim: int, name: str) -> tuple[Array, Array, Array | None]:
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != box_dim:
        raise ValueError(f"{name}: boxes must be [N, {box_dim}], got shape {boxes.shape}")
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{name}: scores must be [N] with N = {boxes.shape[0]} (boxes {boxes.shape}), got {scores.shape}"
        )
    for arr, arg in ((boxes, "boxes"), (scores, "scores")):
        if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
            raise TypeError(f"{name}: {arg} must be real-valued, got dtype {arr.dtype}")
    if idxs is not None:
        idxs = jnp.asarray(idxs)
        if idxs.ndim != 1 or idxs.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"{name}: idxs must be [N] with N = {boxes.shape[0]} (boxes {boxes.shape}), got {idxs.shape}"
            )
        if not (jnp.issubdtype(idxs.dtype, jnp.integer) or idxs.dtype == jnp.bool_):
            raise TypeError(f"{name}: idxs must hold integer class ids, got dtype {idxs.dtype}")
    return boxes, scores, idxs


def _output_size(n: int, max_output_size: int | None) -> int:
    if max_output_size is None:
        return n
    if isinstance(max_output_size, bool) or not isinstance(max_output_size, (int, np.integer)):
        raise TypeError(f"max_output_size must be a static int or None, got {max_output_size!r}")
    if max_output_size < 0:
        raise ValueError(f"max_output_size must be >= 0, got {max_output_size}")
    return min(n, int(max_output_size))


# --------------------------------------------------------------------------------------------
# shared driver: sort in XLA, suppress with the platform's kernel, map back to input positions
# --------------------------------------------------------------------------------------------
def _suppress(boxes, scores, idxs, iou_threshold, max_output_size, backend, *, rotated: bool) -> NMSResult:
    box_dim = 5 if rotated else 4
    name = ("batched_" if idxs is not None else "") + ("nms_rotated" if rotated else "nms")
    backend = _check_backend(backend) if backend is not None else get_backend()
    boxes, scores, idxs = _check_inputs(boxes, scores, idxs, box_dim, name)
    threshold = _threshold_f32(iou_threshold)
    n = boxes.shape[0]
    k = _output_size(n, max_output_size)
    if k == 0:
        return NMSResult(jnp.full((0,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    boxes = lax.stop_gradient(boxes).astype(jnp.float32)
    scores = lax.stop_gradient(scores).astype(jnp.float32)
    # A box with a NaN coordinate becomes the empty box: IoU 0 (or 0/0 = NaN) with everything.
    boxes = jnp.where(jnp.isnan(boxes).any(axis=1, keepdims=True), 0.0, boxes)
    # Stable sort by decreasing score; NaN ranks as -inf; -0.0 and 0.0 tie.
    rank_key = -jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    rank_key = jnp.where(rank_key == 0, 0.0, rank_key)
    _, order = lax.sort((rank_key, lax.iota(jnp.int32, n)), num_keys=1, is_stable=True)
    sorted_boxes = boxes[order]
    args = [sorted_boxes]
    if idxs is not None:
        args.append(lax.stop_gradient(idxs).astype(jnp.int32)[order])
    args.append(threshold)

    target = "detlayers_" + name
    kernel_xla = functools.partial(_greedy_xla, max_kept=k, rotated=rotated, has_classes=idxs is not None)
    branches: dict[str, Callable] = {}
    if backend == "auto":
        if _ffi.has_target("cpu", target):
            branches["cpu"] = functools.partial(_call_cpu, target, k)
        else:
            _ffi.warn_if_missing(target)
        if _ffi.has_target("cuda", target):
            branches["cuda"] = functools.partial(_call_cuda, target, k)
    if branches:
        positions, count = lax.platform_dependent(*args, default=kernel_xla, **branches)
    else:
        positions, count = kernel_xla(*args)

    slot = jnp.arange(k, dtype=jnp.int32)
    indices = jnp.where(slot < count, order[jnp.clip(positions, 0, n - 1)], -1)
    return NMSResult(indices.astype(jnp.int32), count.astype(jnp.int32))


def _call_cpu(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    lead = args[0].shape[:-2]
    out_types = (jax.ShapeDtypeStruct(lead + (k,), jnp.int32), jax.ShapeDtypeStruct(lead, jnp.int32))
    # broadcast_all: a vmapped call is ONE custom call whose leading dims are the batch.
    outputs = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(*args)
    # inside shard_map the per-device result varies like its inputs (ffi_call does not say so)
    return _varying_like(tuple(outputs), *args)


def _call_cuda(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    lead = args[0].shape[:-2]
    n = args[0].shape[-2]
    tiles = -(-n // CUDA_TILE)
    out_types = (
        jax.ShapeDtypeStruct(lead + (k,), jnp.int32),
        jax.ShapeDtypeStruct(lead, jnp.int32),
        # device workspace: the [N, tiles] 64-bit suppression mask, as pairs of uint32
        jax.ShapeDtypeStruct(lead + (n, tiles, 2), jnp.uint32),
    )
    keep, count, _ = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(*args)
    return _varying_like((keep, count), *args)


# --------------------------------------------------------------------------------------------
# pure-XLA greedy NMS (the reference; used where no custom call exists)
# --------------------------------------------------------------------------------------------
def _axis_iou(first: Array, second: Array) -> Array:
    """IoU ``[P, Q]`` of ``first[P, 4]`` (the higher-scoring boxes) with ``second[Q, 4]``, in
    torchvision's operation order (bit-identical to custom_calls/nms_box_iou.h)."""
    area1 = _round_product((first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1]))
    area2 = _round_product((second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1]))
    xx1 = jnp.maximum(first[:, None, 0], second[None, :, 0])
    yy1 = jnp.maximum(first[:, None, 1], second[None, :, 1])
    xx2 = jnp.minimum(first[:, None, 2], second[None, :, 2])
    yy2 = jnp.minimum(first[:, None, 3], second[None, :, 3])
    w = jnp.maximum(0.0, xx2 - xx1)
    h = jnp.maximum(0.0, yy2 - yy1)
    inter = _round_product(w * h)
    return inter / ((area1[:, None] + area2[None, :]) - inter)


ROTATED_PAIR_BATCH = 1024  # exact rotated IoUs evaluated per step of the pure-XLA path


def _rotated_reach(boxes: Array) -> Array:
    """Radius beyond which a rotated box cannot touch another (see nms_cpu.cc's rotated_reach):
    circumradius with 0.1 % slack, plus room for detectron2's 1e-5 tolerances and float32
    rounding of large coordinates. Degenerate boxes get infinity (never skipped)."""
    w, h = jnp.abs(boxes[:, 2]), jnp.abs(boxes[:, 3])
    min_side = jnp.minimum(w, h)
    radius = 0.5 * jnp.sqrt(w * w + h * h)
    coord = jnp.abs(boxes[:, 0]) + jnp.abs(boxes[:, 1])
    reach = radius * 1.002 + 2e-4 / min_side + 2e-5 * coord + 1e-5
    return jnp.where((min_side > 0) & jnp.isfinite(reach), reach, jnp.inf)


def _rotated_overlaps(first: Array, second: Array, mask: Array, threshold: Array) -> Array:
    """``mask & (IoU(first[p], second[q]) > threshold)`` for rotated boxes, ``[P, Q]``.

    The exact (expensive) IoU is evaluated only for masked pairs whose bounding discs meet, in
    batches of ``ROTATED_PAIR_BATCH`` pairs. Pairs with disjoint discs have detectron2 IoU exactly
    0, which never exceeds a threshold >= 0.
    """
    from detlayers.rotated_boxes import rotated_iou_paired  # imported lazily: rotated NMS only

    dx = first[:, None, 0] - second[None, :, 0]
    dy = first[:, None, 1] - second[None, :, 1]
    reach = _rotated_reach(first)[:, None] + _rotated_reach(second)[None, :]
    pending = (mask & ~(dx * dx + dy * dy > reach * reach)).astype(jnp.uint8)
    hit = jnp.zeros(mask.shape, jnp.uint8)
    batch = min(ROTATED_PAIR_BATCH, mask.size)
    slot = jnp.arange(batch)

    def step(state):
        pending, hit = state
        rows, cols = jnp.nonzero(pending, size=batch, fill_value=0)
        real = slot < pending.sum()
        over = rotated_iou_paired(first[rows], second[cols]) > threshold
        hit = hit.at[rows, cols].max((real & over).astype(jnp.uint8))
        pending = pending.at[rows, cols].min((~real).astype(jnp.uint8))
        return pending, hit

    _, hit = lax.while_loop(
        lambda s: s[0].any(), step, _varying_like((pending, hit), first, second, mask, threshold)
    )
    return hit.astype(bool)


def _axis_overlaps(first: Array, second: Array, mask: Array, threshold: Array) -> Array:
    return mask & (_axis_iou(first, second) > threshold)


def _varying_like(tree, *refs: Array):
    """Marks loop-carry initial values as varying over the same ``shard_map`` axes as ``refs``
    (constants are not, and ``while_loop`` under ``shard_map(check_vma=True)`` needs the carry
    types to match the body's output)."""
    axes: set = set()
    for ref in refs:
        axes |= _varying_axes(ref)
    if not axes:
        return tree

    def cast(x):
        missing = axes - _varying_axes(x)
        return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _greedy_xla(*args: Array, max_kept: int, rotated: bool, has_classes: bool) -> tuple[Array, Array]:
    """Greedy NMS over score-sorted boxes; returns kept positions ``[max_kept]`` and their count.

    Tiles of ``T`` boxes are visited in order. A tile's box survives the boxes kept in earlier
    tiles if none of them overlaps it (checked chunk by chunk, only over the kept prefix); inside
    the tile the greedy rule "kept iff no kept earlier box in the tile overlaps it" is solved by
    fixed-point iteration, which reaches the unique greedy answer (position i is final once all
    positions before it are) and stops as soon as nothing changes.
    """
    if has_classes:
        boxes, classes, threshold = args
    else:
        (boxes, threshold), classes = args, None
    pair_overlaps = _rotated_overlaps if rotated else _axis_overlaps
    n, box_dim = boxes.shape
    tile = min(XLA_TILE, n)
    num_tiles = -(-n // tile)
    padded = num_tiles * tile
    boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))
    if classes is not None:
        classes = jnp.pad(classes, (0, padded - n))
    capacity = -(-max_kept // tile) * tile  # kept-box buffer, read in chunks of `tile`
    lane = jnp.arange(tile, dtype=jnp.int32)
    earlier = lane[:, None] < lane[None, :]

    def overlaps(first, first_cls, second, second_cls, mask):
        if classes is not None:
            mask &= first_cls[:, None] == second_cls[None, :]
        return pair_overlaps(first, second, mask, threshold)

    def tile_step(state):
        t, count, positions, kept_boxes, kept_cls = state
        start = t * tile
        cur = lax.dynamic_slice_in_dim(boxes, start, tile)
        cur_cls = None if classes is None else lax.dynamic_slice_in_dim(classes, start, tile)

        # Passes 0 .. num_chunks-1 test the tile against chunks of the kept boxes; the last pass
        # tests the tile against itself (earlier boxes only). One loop, so the (for rotated boxes
        # large) IoU computation appears once in the program.
        num_chunks = (count + tile - 1) // tile

        def pass_step(pass_state):
            c, suppressed, inner = pass_state
            is_self = c == num_chunks
            base = c * tile  # past the buffer only on the self pass, where it is unused
            kb = lax.dynamic_slice_in_dim(kept_boxes, base, tile)
            kc = None if classes is None else lax.dynamic_slice_in_dim(kept_cls, base, tile)
            live = (base + lane) < count
            first = jnp.where(is_self, cur, kb)
            first_cls = None if classes is None else jnp.where(is_self, cur_cls, kc)
            mask = jnp.where(is_self, earlier, live[:, None])
            hit = overlaps(first, first_cls, cur, cur_cls, mask)
            suppressed = suppressed | (hit.any(axis=0) & ~is_self)
            inner = jnp.where(is_self, hit, inner)
            return c + 1, suppressed, inner

        _, suppressed, inner = lax.while_loop(
            lambda s: s[0] <= num_chunks,
            pass_step,
            _varying_like((jnp.int32(0), jnp.zeros((tile,), bool), jnp.zeros((tile, tile), bool)), *args),
        )
        candidate = ((start + lane) < n) & ~suppressed

        def fixed_point_step(fp_state):
            keep, _ = fp_state
            new_keep = candidate & ~(keep[:, None] & inner).any(axis=0)
            return new_keep, (new_keep != keep).any()

        keep, _ = lax.while_loop(
            lambda s: s[1], fixed_point_step, _varying_like((candidate, jnp.bool_(True)), *args)
        )
        slot = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
        slot = jnp.where(keep & (slot < max_kept), slot, capacity)  # out of range: dropped
        positions = positions.at[slot].set(start + lane, mode="drop")
        kept_boxes = kept_boxes.at[slot].set(cur, mode="drop")
        if classes is not None:
            kept_cls = kept_cls.at[slot].set(cur_cls, mode="drop")
        count = jnp.minimum(count + keep.sum(dtype=jnp.int32), max_kept)
        return t + 1, count, positions, kept_boxes, kept_cls

    init = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.full((max_kept,), -1, jnp.int32),
        jnp.zeros((capacity, box_dim), jnp.float32),
        jnp.zeros((capacity if classes is not None else 0,), jnp.int32),
    )
    _, count, positions, _, _ = lax.while_loop(
        lambda s: (s[0] < num_tiles) & (s[1] < max_kept), tile_step, _varying_like(init, *args)
    )
    return positions, count
