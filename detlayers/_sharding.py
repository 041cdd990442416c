"""``shard_map`` helpers shared by the layer modules (private)."""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset:
    """The manual (``shard_map``) mesh axes ``x`` varies over; empty outside ``shard_map``."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()) or ())  # older jax
