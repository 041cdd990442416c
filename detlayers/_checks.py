"""Trace-time argument checks shared by the layer modules (private), and the float32 stand-ins
of double-precision comparison constants.

Each check raises ``TypeError``/``ValueError`` naming the argument and the shapes, so that a bad
call fails in Python at trace time instead of inside XLA.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IntOrPair = int | Sequence[int]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def as_pair(value: IntOrPair, name: str, minimum: int | None = None) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 1) -> (3, 1)``: PyTorch's int-or-pair arguments as a pair of ints.

    Anything else (bools, floats, strings, sequences of another length) raises ``TypeError``;
    with ``minimum``, an entry below it raises ``ValueError``.
    """
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_floating(x: jax.Array, name: str) -> None:
    """``TypeError`` unless ``x`` has a floating-point dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_nhwc(x: jax.Array, in_channels: int, layer: str) -> None:
    """``ValueError`` unless ``x`` is a rank-4 NHWC array with ``in_channels`` channels."""
    if x.ndim != 4:
        raise ValueError(f"{layer}: input must be NHWC [N, H, W, C] (rank 4), got shape {x.shape}")
    if x.shape[-1] != in_channels:
        raise ValueError(
            f"{layer}: input has {x.shape[-1]} channels (shape {x.shape}, NHWC) but "
            f"in_channels={in_channels}"
        )


def check_groups(in_channels: int, out_channels: int, groups: int, layer: str) -> None:
    """``ValueError`` unless both channel counts are divisible by ``groups``."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{layer}: in_channels={in_channels} and out_channels={out_channels} must both be "
            f"divisible by groups={groups}"
        )


def f32_at_or_below(c: float) -> np.float32:
    """Largest float32 <= c: for float32 x, ``x > c`` (compared in double, as the C++ references
    do) iff ``x > f32_at_or_below(c)``."""
    f = np.float32(c)
    return f if float(f) <= c else np.nextafter(f, np.float32(-np.inf))


def f32_at_or_above(c: float) -> np.float32:
    """Smallest float32 >= c: for float32 x, ``x < c`` (compared in double) iff
    ``x < f32_at_or_above(c)``."""
    f = np.float32(c)
    return f if float(f) >= c else np.nextafter(f, np.float32(np.inf))
