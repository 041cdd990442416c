"""The optional ``norm`` submodule of the conv layers (private), shared by ``Conv2d`` and the
deformable convolutions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn


def make_norm(norm: Any, channels: int) -> nn.Module | None:
    """Builds the ``norm`` submodule inside a compact method (so Flax names it ``norm``)."""
    if norm is None or (isinstance(norm, str) and norm == ""):
        return None
    if isinstance(norm, nn.Module):
        # An unbound module given as a field is adopted by the parent under the field name.
        return norm
    from detlayers.batch_norm import get_norm  # imported lazily: norm-free convs don't need it

    return get_norm(norm, channels, name="norm")
