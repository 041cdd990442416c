"""Numeric policies shared by the layer modules (private): which dtype a layer computes in, and
how float32 arithmetic is kept exactly as written under ``jit`` (a product from being fused into
a later add, a division and its operands from XLA's algebraic simplifier)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype statistics and sums are accumulated in: float32 for float16/bfloat16/float32
    inputs, float64 for float64 (x64 mode)."""
    return jnp.promote_types(dtype, jnp.float32)


def operand_dtype(x: Array) -> Any:
    """Operand dtype of a conv/linear layer: the input's. Parameters are cast to it (so bf16
    inputs use bf16 operands, as ``torch.autocast`` does) while products accumulate in float32."""
    return x.dtype


def round_product(product: Array) -> Array:
    """``product``, but rounded to its dtype before any later add or subtract uses it.

    XLA's CPU and GPU backends contract ``a * b + c`` into a fused multiply-add, which rounds once
    instead of twice and so differs from torchvision and detectron2 (which round twice) in the
    last bit, enough to flip their tolerance tests in degenerate cases. A select on the product is
    an identity here (NaN stays NaN) that the compilers cannot fuse through.
    """
    return jnp.where(jnp.isnan(product), jnp.asarray(jnp.nan, product.dtype), product)


# Sample coordinates and ``jit``. The sampling ops (ROIAlign, rotated ROIAlign, deformable
# convolution, mask pasting) compute sample coordinates with the reference kernels' float32
# operations in their order, because a coordinate exactly on a border decides a whole sample
# (ROIAlign keeps ``x == W`` and reads 0 one ulp further). Two compiler rewrites change that
# rounding (fast-math flags are off and stay off; neither needs them). Both act on what is
# compiled together: under ``jit`` a whole function, eagerly a single jnp operation, which
# includes the broadcasting of its operands.
#   * LLVM contracts ``a * b + c`` into a fused multiply-add (one rounding instead of two):
#     :func:`round_product` prevents it.
#   * XLA's algebraic simplifier replaces a division by a constant *or by any broadcast operand*
#     (a Python int, a per-ROI grid broadcast over bins; so even eagerly ``x / y[:, None]``) by a
#     multiplication with the rounded reciprocal, and folds constant factors around it: under jit
#     ``(k + 0.5) * (extent / P) / s`` became ``extent * ((k + 0.5) / (P * s))``, so a sample
#     torchvision puts exactly on ``x == W`` landed one ulp outside and a whole bin read 0.
#     :func:`divide` and :func:`opaque` prevent it.


def opaque(x: Any) -> Array:
    """``x`` unchanged, but hidden from XLA's algebraic simplifier.

    An optimization barrier is an identity the compiler cannot look through: its output is
    neither a constant nor a broadcast, so no rewrite uses what produced it (a division by it
    stays a division, constant factors on either side are not folded across it). The arithmetic
    around it still fuses; only ``x`` itself is computed on its own.
    """
    return lax.optimization_barrier(jnp.asarray(x))


def divide(numerator: Any, denominator: Any) -> Array:
    """``numerator / denominator`` rounded as one IEEE division, also under ``jit``.

    The denominator is broadcast to the quotient's shape before :func:`opaque` hides it: hidden
    first and broadcast afterwards, it would be a broadcast again, and XLA would multiply by its
    rounded reciprocal.
    """
    numerator, denominator = jnp.asarray(numerator), jnp.asarray(denominator)
    shape = jnp.broadcast_shapes(numerator.shape, denominator.shape)
    dtype = jnp.result_type(numerator, denominator)
    return numerator.astype(dtype) / opaque(jnp.broadcast_to(denominator.astype(dtype), shape))
