"""Numeric policies shared by the layer modules (private): which dtype a layer computes in, and
how a float32 product is kept from being fused into a later add."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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
