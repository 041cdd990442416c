"""Non-maximum suppression (``detectron2.layers.nms``): axis-aligned and rotated, plain and per class.

All four functions return an :class:`NMSResult` with static shapes, so they work under ``jit``,
``vmap`` (one custom-call launch for the whole batch), ``pmap`` and ``shard_map``:

* ``indices``: int32 ``[K]``, ``K = N`` or ``min(N, max_output_size)``: positions in the input of
  the kept boxes, by decreasing score; slots ``>= count`` hold ``-1``.
* ``count``: int32 ``[]``, the number of kept boxes (at most ``K``).
* ``valid``: bool ``[K]``, ``arange(K) < count``.

detectron2 returns a tensor of kept indices and its code writes ``boxes[keep]``; an
:class:`NMSResult` is not an index (it is a pytree, not a tuple or array), and every such use
raises ``TypeError`` saying to write ``boxes[keep.indices[:keep.count]]``.

Semantics (torchvision's ``nms`` / detectron2's ``nms_rotated``):

* Boxes are visited by decreasing score; a box is kept unless its IoU with an already kept box is
  **greater than** ``iou_threshold``. The IoU is computed in float32 with the kept (higher-scoring)
  box as the first argument, in exactly torchvision's arithmetic (axis-aligned: the decision is
  bit-identical to theirs) or as :func:`detlayers.rotated_boxes.pairwise_iou_rotated` (rotated:
  detectron2's value wherever it is sound, else the exact IoU; identical on every backend). ``iou_threshold`` given as a Python number is compared as the float64
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
  ``-inf`` and the stable sort keeps input order); subnormal scores rank by their value. A box
  with a NaN coordinate is treated as an empty box: it never suppresses another box and is never
  suppressed.
* Subnormal box areas (below ``1.2e-38``) take part in the IoU as in torchvision, except on the
  pure-XLA path on CPU, where XLA flushes subnormals to zero (IoU ``0/0``: such a box suppresses
  nothing). The C++ and CUDA kernels keep them.
* ``iou_threshold`` must lie in ``[0, 1]`` (``ValueError`` for a Python number outside). A traced
  threshold is not checked; the comparison rule above still applies (for rotated boxes, pairs
  too far apart to overlap have IoU 0, so a negative threshold suppresses them, as in
  detectron2).

Backends (all give identical indices; the sort by score always runs in XLA before the kernel):

* CPU: a C++ XLA custom call (``custom_calls/nms_cpu.cc``) that tests each candidate against the
  boxes kept so far and stops at ``max_output_size``.
* GPU (CUDA): a CUDA custom call (``custom_calls/nms_cuda.cu``): 64-box tiles of IoU bitmasks,
  then a one-block-per-image reduction on the device. Nothing is copied to the host and nothing
  synchronizes the stream. Its scratch bitmask takes about ``N**2 / 16`` bytes per image (the
  packed upper triangle, :func:`cuda_mask_bytes`) and at most ``CUDA_MAX_MASK_BYTES`` = 1 GiB per
  call: images with more than 131008 boxes take the pure-XLA path, and a vmapped batch whose
  scratch would exceed it is processed in sequential chunks of images.
* Everywhere else (TPU, or when no library was built): a pure-XLA version that walks the sorted
  boxes in tiles of 256 inside a ``while_loop``, comparing each tile only with the boxes kept so
  far (memory ``O(N + tile^2)``, no ``N x N`` matrix). Axis-aligned: every kept box, ``O(N *
  kept)`` work. Rotated: kept boxes are held in a spatial grid, so a tile meets only the kept
  boxes near it, and the polygon IoU is evaluated only for pairs whose bounding discs meet
  (:func:`detlayers.rotated_boxes.rotated_reach`, the rule every backend uses; other pairs have
  IoU exactly 0) and whose IoU bound can exceed the threshold (docs/design/rotated_iou.md).

The pure-XLA path can be forced anywhere, as a reference or for debugging: pass ``backend="xla"``,
call :func:`set_backend` ``("xla")``, or set the environment variable ``DETLAYERS_NMS_BACKEND=xla``
(read at trace time: a function already traced keeps the backend it was traced with). The
platform is chosen when the computation is lowered (``jax.lax.platform_dependent``), so one jitted
function runs the right kernel on each device.

No gradient flows through NMS (its outputs are integers; inputs pass through ``stop_gradient``),
but ``jax.grad`` of a model that uses the indices works.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers import _ffi
from detlayers._checks import f32_at_or_below
from detlayers._nms_rotated_xla import greedy_rotated_xla
from detlayers._nms_tiles import greedy_within_tile, pad_to_tiles
from detlayers._numerics import round_product as _round_product
from detlayers._sharding import varying_like as _varying_like

Array = jax.Array

BACKEND_ENV = "DETLAYERS_NMS_BACKEND"
BACKENDS = ("auto", "xla")
XLA_TILE = 256  # boxes per step of the pure-XLA loop
# Mirrors of custom_calls/nms_bitmask.h (kTile, kMaxMaskBytes), checked by tests/test_cuda_simulation.py.
CUDA_TILE = 64  # boxes per 64-bit mask word in the CUDA kernel
# Largest scratch bitmask of one CUDA custom call (1 GiB): images with more than 131008 boxes run
# the pure-XLA path on the GPU instead, and a vmapped batch that would need more runs as a
# sequence of calls (lax.map over chunks of images) that each stay within it.
CUDA_MAX_MASK_BYTES = 1 << 30

_backend_override: str | None = None


_NOT_AN_INDEX = (
    "an NMSResult is not an index array (detectron2's nms returns one; ours has a static, "
    "-1 padded length). Write boxes[keep.indices[:keep.count]] (outside jit), or keep the static "
    "shape with keep.indices (-1 padded), keep.valid (bool mask) and keep.count."
)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["indices", "count", "valid"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class NMSResult:
    """Kept boxes of an NMS call, a pytree (not a tuple), batched like its fields under ``vmap``.

    Attributes:
      indices: int32 ``[..., K]``: kept positions by decreasing score, ``-1`` after ``count``.
      count: int32 ``[...]``: number of kept boxes.
      valid: bool ``[..., K]``: ``arange(K) < count``.

    Using the result itself as an index (``boxes[keep]``, ``keep[:k]``, ``jnp.take(x, keep)``,
    ``np.asarray(keep)``, ``len(keep)``, ``i, c = keep``) raises ``TypeError``. Equality and hash are
    by identity, like other pytrees holding arrays. Build one with :meth:`from_indices`.
    """

    # jax.Array, not the module's alias: documentation tools evaluate these names outside the module.
    indices: jax.Array
    count: jax.Array
    valid: jax.Array

    @classmethod
    def from_indices(cls, indices: Array, count: Array) -> NMSResult:
        """The result for ``-1``-padded ``indices[..., K]`` and ``count[...]``; derives ``valid``."""
        indices = jnp.asarray(indices, jnp.int32)
        count = jnp.asarray(count, jnp.int32)
        valid = jnp.arange(indices.shape[-1], dtype=jnp.int32) < count[..., None]
        return cls(indices, count, valid)

    def _not_an_index(self, *args, **kwargs) -> NoReturn:
        raise TypeError(_NOT_AN_INDEX)

    # Every protocol through which Python, NumPy or JAX would read this object as an index or an
    # array (or unpack it, as a tuple could be) refuses with the same message.
    __index__ = __array__ = __iter__ = __len__ = __getitem__ = _not_an_index

    @property
    def __jax_array__(self) -> NoReturn:
        # A property, because JAX probes for it with getattr before calling it (jnp.take,
        # jnp.asarray): the probe itself raises the message.
        raise TypeError(_NOT_AN_INDEX)


# JAX's indexing takes an object it does not know for a nested index sequence only when it is a
# Sequence, and then asks for its length: registering makes `jnp_array[keep]` reach __len__ and
# raise the message above (otherwise JAX raises a generic IndexError).
collections.abc.Sequence.register(NMSResult)


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
    boxes: Array, scores: Array, iou_threshold: float | Array,
    *, max_output_size: int | None = None, backend: str | None = None,
) -> NMSResult:
    """Greedy NMS of axis-aligned boxes (``torchvision.ops.nms``).

    Args:
      boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, any real dtype (computed in float32).
      scores: ``[N]`` scores.
      iou_threshold: suppress boxes whose IoU with a kept box is ``> iou_threshold``, in ``[0, 1]``.
      max_output_size: keep at most this many boxes (static); ``None`` keeps up to ``N``.
      backend: ``"auto"`` or ``"xla"``; default :func:`get_backend`.

    Returns:
      :class:`NMSResult` with ``indices`` int32 ``[K]``, ``count`` int32 ``[]`` and ``valid`` bool
      ``[K]``. Index boxes with ``boxes[result.indices[:result.count]]``, not ``boxes[result]``.
    """
    return _suppress(boxes, scores, None, iou_threshold, max_output_size, backend, rotated=False)


def batched_nms(
    boxes: Array, scores: Array, idxs: Array, iou_threshold: float | Array,
    *, max_output_size: int | None = None, backend: str | None = None,
) -> NMSResult:
    """Per-class NMS (``torchvision.ops.batched_nms``): boxes with different ``idxs[N]`` (integer
    class ids of any integer dtype, compared exactly) never suppress each other. Exact per class:
    equivalent to :func:`nms` on each class, merged by decreasing score. Otherwise as :func:`nms`.

    64-bit ids (torchvision keeps int64) are mapped to int32 group numbers without collisions:
    NumPy input on the host, JAX arrays by a sort. With ``jax_enable_x64`` off, JAX itself wraps an
    int64 array to int32 when it becomes a JAX array (e.g. a ``jit`` argument), before this
    function sees it: pass the NumPy array directly, enable x64, or remap the ids to int32."""
    return _suppress(boxes, scores, idxs, iou_threshold, max_output_size, backend, rotated=False)


def nms_rotated(
    boxes: Array, scores: Array, iou_threshold: float | Array,
    *, max_output_size: int | None = None, backend: str | None = None,
) -> NMSResult:
    """Greedy NMS of rotated boxes ``[N, 5]`` ``(xc, yc, w, h, angle_degrees)``
    (``detectron2.layers.nms_rotated``), with detectron2's exact rotated IoU. Otherwise as
    :func:`nms`."""
    return _suppress(boxes, scores, None, iou_threshold, max_output_size, backend, rotated=True)


def batched_nms_rotated(
    boxes: Array, scores: Array, idxs: Array, iou_threshold: float | Array,
    *, max_output_size: int | None = None, backend: str | None = None,
) -> NMSResult:
    """Per-class rotated NMS (``detectron2.layers.batched_nms_rotated``), exact per class (no
    coordinate offsets; class ids as in :func:`batched_nms`). Otherwise as :func:`nms_rotated`."""
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
        # Host data stays NumPy until its ids are mapped: converting 64-bit ids to a JAX array
        # with jax_enable_x64 off would wrap them to int32 first.
        idxs = idxs if isinstance(idxs, jax.Array) else np.asarray(idxs)
        if idxs.ndim != 1 or idxs.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"{name}: idxs must be [N] with N = {boxes.shape[0]} (boxes {boxes.shape}), got {idxs.shape}"
            )
        if not (jnp.issubdtype(idxs.dtype, jnp.integer) or idxs.dtype == jnp.bool_):
            raise TypeError(f"{name}: idxs must hold integer class ids, got dtype {idxs.dtype}")
        idxs = _class_groups(idxs)
    return boxes, scores, idxs


def _class_groups(idxs: Array | np.ndarray) -> Array:
    """int32 ``[N]`` group numbers with exactly the equalities of the class ids ``idxs[N]``.

    Ids of at most 32 bits convert one to one (uint32 wraps, which keeps distinct ids distinct).
    64-bit ids become their rank among the sorted ids (no two distinct ids share a number): on the
    host for NumPy input, else with a sort in XLA (static shapes, works under ``jit``/``vmap``).
    """
    if np.dtype(idxs.dtype).itemsize <= 4:
        return jnp.asarray(idxs).astype(jnp.int32)
    if isinstance(idxs, np.ndarray):
        info = np.iinfo(np.int32)
        if idxs.size and (idxs.min() < info.min or idxs.max() > info.max):
            idxs = np.unique(idxs, return_inverse=True)[1].reshape(idxs.shape)
        return jnp.asarray(idxs.astype(np.int32))
    ranks = jnp.searchsorted(jnp.sort(idxs), idxs, side="left", method="sort")
    return ranks.astype(jnp.int32)


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
        return NMSResult.from_indices(jnp.full((0,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    boxes = lax.stop_gradient(boxes).astype(jnp.float32)
    scores = lax.stop_gradient(scores).astype(jnp.float32)
    # A box with a NaN coordinate becomes the empty box: IoU 0 (or 0/0 = NaN) with everything.
    boxes = jnp.where(jnp.isnan(boxes).any(axis=1, keepdims=True), 0.0, boxes)
    _, order = lax.sort((_descending_score_key(scores), lax.iota(jnp.int32, n)), num_keys=1, is_stable=True)
    sorted_boxes = boxes[order]
    args = [sorted_boxes]
    if idxs is not None:
        args.append(lax.stop_gradient(idxs)[order])
    args.append(threshold)

    target = "detlayers_" + name
    if rotated:
        kernel_xla = functools.partial(_greedy_rotated_xla, max_kept=k, has_classes=idxs is not None)
    else:
        kernel_xla = functools.partial(_greedy_xla, max_kept=k, has_classes=idxs is not None)
    branches: dict[str, Callable] = {}
    if backend == "auto":
        if _ffi.has_target("cpu", target):
            branches["cpu"] = functools.partial(_call_cpu, target, k)
        else:
            _ffi.warn_if_missing(target)
        if _ffi.has_target("cuda", target) and cuda_mask_bytes(n) <= CUDA_MAX_MASK_BYTES:
            branches["cuda"] = functools.partial(_call_cuda, target, k)
    if branches:
        positions, count = lax.platform_dependent(*args, default=kernel_xla, **branches)
    else:
        positions, count = kernel_xla(*args)

    slot = jnp.arange(k, dtype=jnp.int32)
    indices = jnp.where(slot < count, order[jnp.clip(positions, 0, n - 1)], -1)
    return NMSResult.from_indices(indices, count)


def _call_cpu(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    lead = args[0].shape[:-2]
    out_types = (jax.ShapeDtypeStruct(lead + (k,), jnp.int32), jax.ShapeDtypeStruct(lead, jnp.int32))
    # broadcast_all: a vmapped call is ONE custom call whose leading dims are the batch.
    outputs = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(*args)
    # inside shard_map the per-device result varies like its inputs (ffi_call does not say so)
    return _varying_like(tuple(outputs), *args)


def _descending_score_key(scores: Array) -> Array:
    """int32 sort key whose ascending order is decreasing score: NaN ranks as ``-inf`` and
    ``-0.0`` ties with ``0.0``, the documented order. An integer key compared with a plain
    less-than is what XLA's GPU sort hands to its radix sort (CUB), instead of a comparison sort
    on a float key with a NaN-aware total-order comparator."""
    bits = lax.bitcast_convert_type(jnp.where(jnp.isnan(scores), -jnp.inf, scores), jnp.int32)
    # -0.0 -> 0.0 on the bits: a float `== 0` would also catch subnormals where XLA flushes them
    bits = jnp.where(bits == jnp.iinfo(jnp.int32).min, 0, bits)
    # Flipping the magnitude bits of negative floats makes the int32 order the float order ...
    ascending = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return ~ascending  # ... and ~x = -1 - x reverses it without overflow


def cuda_mask_words(n: int) -> int:
    """64-bit words of the CUDA kernel's scratch bitmask for one image of ``n`` boxes: the packed
    upper triangle, ``CUDA_TILE`` rows for each pair of 64-box tiles on or right of the diagonal
    (custom_calls/nms_bitmask.h, ``mask_words``)."""
    tiles = -(-n // CUDA_TILE)
    return CUDA_TILE * (tiles * (tiles + 1) // 2)


def cuda_mask_bytes(n: int) -> int:
    """Bytes of scratch the CUDA custom call allocates per image of ``n`` boxes; images above
    :data:`CUDA_MAX_MASK_BYTES` use the pure-XLA path."""
    return 8 * cuda_mask_words(n)


def _call_cuda(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    keep, count = _cuda_custom_call(target, k)(*args)
    return _varying_like((keep, count), *args)


def _cuda_ffi(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    lead = args[0].shape[:-2]
    n = args[0].shape[-2]
    out_types = (
        jax.ShapeDtypeStruct(lead + (k,), jnp.int32),
        jax.ShapeDtypeStruct(lead, jnp.int32),
        # device workspace: the packed 64-bit suppression mask, as pairs of uint32
        jax.ShapeDtypeStruct(lead + (cuda_mask_words(n), 2), jnp.uint32),
    )
    keep, count, _ = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(*args)
    return keep, count


@functools.cache
def _cuda_custom_call(target: str, k: int) -> Callable:
    """The CUDA custom call, batched under ``vmap`` as ONE call whose leading dims are the batch,
    in sequential chunks (``lax.map``) when the whole batch's scratch would exceed
    :data:`CUDA_MAX_MASK_BYTES`: the scratch of a call is bounded whatever the batch size."""

    @jax.custom_batching.custom_vmap
    def call(*args: Array) -> tuple[Array, Array]:
        return _cuda_ffi(target, k, *args)

    @call.def_vmap
    def call_vmap(axis_size: int, in_batched, *args: Array):
        args = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched))
        boxes = args[0]  # [axis_size, ..., N, D]
        per_slice = cuda_mask_bytes(boxes.shape[-2]) * int(np.prod(boxes.shape[1:-2], dtype=np.int64))
        chunk = max(1, CUDA_MAX_MASK_BYTES // max(per_slice, 1))
        if axis_size <= chunk:
            return call(*args), (True, True)
        num_chunks = -(-axis_size // chunk)
        pad = num_chunks * chunk - axis_size  # padding problems (all-zero boxes): results dropped
        chunks = tuple(
            jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((num_chunks, chunk) + a.shape[1:]) for a in args
        )
        keep, count = lax.map(lambda xs: call(*xs), chunks)
        keep = keep.reshape((num_chunks * chunk,) + keep.shape[2:])[:axis_size]
        count = count.reshape((num_chunks * chunk,) + count.shape[2:])[:axis_size]
        return (keep, count), (True, True)

    return call


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


def _axis_overlaps(first: Array, second: Array, mask: Array, threshold: Array) -> Array:
    return mask & (_axis_iou(first, second) > threshold)


def _greedy_rotated_xla(*args: Array, max_kept: int, has_classes: bool) -> tuple[Array, Array]:
    boxes, classes, threshold = args if has_classes else (args[0], None, args[1])
    return greedy_rotated_xla(boxes, classes, threshold, max_kept=max_kept, tile=XLA_TILE)


def _greedy_xla(*args: Array, max_kept: int, has_classes: bool) -> tuple[Array, Array]:
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
    n, box_dim = boxes.shape
    boxes, classes, tile, num_tiles, capacity = pad_to_tiles(boxes, classes, XLA_TILE, max_kept)
    lane = jnp.arange(tile, dtype=jnp.int32)
    earlier = lane[:, None] < lane[None, :]

    def overlaps(first, first_cls, second, second_cls, mask):
        if classes is not None:
            mask &= first_cls[:, None] == second_cls[None, :]
        return _axis_overlaps(first, second, mask, threshold)

    def tile_step(state):
        t, count, positions, kept_boxes, kept_cls = state
        start = t * tile
        cur = lax.dynamic_slice_in_dim(boxes, start, tile)
        cur_cls = None if classes is None else lax.dynamic_slice_in_dim(classes, start, tile)

        # Passes 0 .. num_chunks-1 test the tile against chunks of the kept boxes; the last pass
        # tests the tile against itself (earlier boxes only).
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
            # Boxes already suppressed need no further test, nor suppress others in the tile
            # (the self pass comes last, when `suppressed` is final).
            mask = jnp.where(is_self, earlier & ~suppressed[:, None], live[:, None])
            mask &= ~suppressed[None, :]
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
        keep = greedy_within_tile(candidate, inner, *args)
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
