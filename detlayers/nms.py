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
  detectron2's value wherever it is sound, else the exact IoU; identical on every backend).
  ``iou_threshold`` given as a Python number is compared as the float64 value torchvision
  compares with (the float32 comparison uses the largest float32 not above it, which decides
  every float32 IoU identically). detectron2's *CPU* rotated kernel suppresses at
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

This module holds the public functions, their argument checks and the choice of backend; the
kernels live in private modules: ``detlayers/_nms_xla.py`` and ``detlayers/_nms_rotated_xla.py``
(pure XLA), ``detlayers/_nms_custom_call.py`` (the CPU and CUDA custom calls) and
``detlayers/_nms_library.py`` (finding and registering the compiled libraries).

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

from detlayers import _nms_custom_call, _nms_library
from detlayers._checks import f32_at_or_below
from detlayers._nms_custom_call import CUDA_MAX_MASK_BYTES, CUDA_TILE, cuda_mask_bytes, cuda_mask_words
from detlayers._nms_rotated_xla import greedy_rotated_xla
from detlayers._nms_xla import greedy_xla

Array = jax.Array

__all__ = [
    "nms", "batched_nms", "nms_rotated", "batched_nms_rotated", "NMSResult", "set_backend", "get_backend",
    "BACKEND_ENV", "BACKENDS", "XLA_TILE", "CUDA_TILE", "CUDA_MAX_MASK_BYTES", "cuda_mask_bytes", "cuda_mask_words",
]

BACKEND_ENV = "DETLAYERS_NMS_BACKEND"
BACKENDS = ("auto", "xla")
XLA_TILE = 256  # boxes per step of the pure-XLA loops

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
    solver = greedy_rotated_xla if rotated else greedy_xla
    kernel_xla = functools.partial(_call_xla, solver, k, idxs is not None)
    branches: dict[str, Callable] = {}
    if backend == "auto":
        if _nms_library.has_target("cpu", target):
            branches["cpu"] = functools.partial(_nms_custom_call.call_cpu, target, k)
        else:
            _nms_library.warn_if_missing(target)
        if _nms_library.has_target("cuda", target) and _nms_custom_call.cuda_fits(n):
            branches["cuda"] = functools.partial(_nms_custom_call.call_cuda, target, k)
    if branches:
        positions, count = lax.platform_dependent(*args, default=kernel_xla, **branches)
    else:
        positions, count = kernel_xla(*args)

    slot = jnp.arange(k, dtype=jnp.int32)
    indices = jnp.where(slot < count, order[jnp.clip(positions, 0, n - 1)], -1)
    return NMSResult.from_indices(indices, count)


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


def _call_xla(solver: Callable, max_kept: int, has_classes: bool, *args: Array) -> tuple[Array, Array]:
    """The pure-XLA ``solver`` on the kernel arguments ``(sorted boxes, [classes], threshold)``."""
    boxes, classes, threshold = args if has_classes else (args[0], None, args[1])
    return solver(boxes, classes, threshold, max_kept=max_kept, tile=XLA_TILE)
