"""What the conv layers share (private): their leading PyTorch arguments (``Conv2d``,
``ConvTranspose2d`` and the deformable convolutions) and the optional ``norm`` submodule (``Conv2d``
and the deformable convolutions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from detlayers._checks import IntOrPair


class ConvGeometry(nn.Module):
    """The fields every conv layer starts with, in PyTorch's positional order (``nn.Conv2d``,
    ``nn.ConvTranspose2d``, detectron2's ``DeformConv``): ``in_channels, out_channels, kernel_size,
    stride=1, padding=0``. A layer adds its own fields after these (or redeclares one to widen its
    type, keeping its position)."""

    in_channels: int
    out_channels: int
    kernel_size: IntOrPair
    stride: IntOrPair = 1
    padding: IntOrPair = 0


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
