"""The optional ``norm`` submodule of the conv layers (private), shared by ``Conv2d`` and the
deformable convolutions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax


def make_norm(norm: Any, channels: int) -> nn.Module | None:
    """Builds the ``norm`` submodule inside a compact method (so Flax names it ``norm``)."""
    if norm is None or (isinstance(norm, str) and norm == ""):
        return None
    if isinstance(norm, nn.Module):
        # An unbound module given as a field is adopted by the parent under the field name.
        return norm
    from detlayers.batch_norm import get_norm  # imported lazily: norm-free convs don't need it

    return get_norm(norm, channels, name="norm")


def norm_then_activation(y: jax.Array, norm: Any, channels: int,
                         activation: Callable[[jax.Array], jax.Array] | None, train: bool,
                         layer: str, mask: jax.Array | None = None) -> jax.Array:
    """What a conv layer applies after its convolution: the optional ``norm`` (built by
    :func:`make_norm`; ``mask`` is forwarded to it), then the optional ``activation``."""
    norm_module = make_norm(norm, channels)
    if mask is not None and norm_module is None:
        raise ValueError(f"{layer}: `mask` is forwarded to the norm, but this {layer} has no norm")
    if norm_module is not None:
        y = norm_module(y, train=train) if mask is None else norm_module(y, train=train, mask=mask)
    if activation is not None:
        y = activation(y)
    return y
