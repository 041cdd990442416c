"""The compiled NMS kernels as XLA custom calls: the CPU and CUDA ``ffi_call`` wrappers (private).

Both take the score-sorted boxes ``[..., N, D]`` (then the class groups ``[..., N]`` for the
per-class targets, then the float32 threshold ``[...]``) and return the kept positions in that
order, int32 ``[..., K]`` (``-1`` past the count), and their count, int32 ``[...]``. Under
``vmap`` a call stays ONE custom call whose leading dims are the batch; the CUDA call, whose
scratch bitmask grows with the batch, is split into sequential chunks of images when one call
would need more than :data:`CUDA_MAX_MASK_BYTES`. The libraries themselves are found and
registered by :mod:`detlayers._nms_library`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._sharding import varying_like

Array = jax.Array

# Mirrors of custom_calls/nms_bitmask.h (kTile, kMaxMaskBytes), checked by tests/test_cuda_simulation.py.
CUDA_TILE = 64  # boxes per 64-bit mask word in the CUDA kernel
# Largest scratch bitmask of one CUDA custom call (1 GiB): images with more than 131008 boxes run
# the pure-XLA path on the GPU instead, and a vmapped batch that would need more runs as a
# sequence of calls (lax.map over chunks of images) that each stay within it.
CUDA_MAX_MASK_BYTES = 1 << 30


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


def cuda_fits(n: int) -> bool:
    """Whether one image of ``n`` boxes fits the CUDA call's scratch limit (else: pure XLA)."""
    return cuda_mask_bytes(n) <= CUDA_MAX_MASK_BYTES


def call_cpu(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    """The C++ custom call ``target`` keeping at most ``k`` boxes (arguments: module docstring)."""
    lead = args[0].shape[:-2]
    out_types = (jax.ShapeDtypeStruct(lead + (k,), jnp.int32), jax.ShapeDtypeStruct(lead, jnp.int32))
    # broadcast_all: a vmapped call is ONE custom call whose leading dims are the batch.
    outputs = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")(*args)
    # inside shard_map the per-device result varies like its inputs (ffi_call does not say so)
    return varying_like(tuple(outputs), *args)


def call_cuda(target: str, k: int, *args: Array) -> tuple[Array, Array]:
    """The CUDA custom call ``target`` keeping at most ``k`` boxes (arguments: module docstring)."""
    keep, count = _cuda_custom_call(target, k)(*args)
    return varying_like((keep, count), *args)


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
