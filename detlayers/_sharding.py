"""``shard_map`` and mapped-axis helpers shared by the layer modules (private)."""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset:
    """The manual (``shard_map``) mesh axes ``x`` varies over; empty outside ``shard_map``."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()) or ())  # older jax


def varying_like(tree, *refs: jax.Array):
    """Marks the arrays of ``tree`` as varying over the ``shard_map`` axes that ``refs`` vary over.

    Loop-carry initial values built from constants are not, and ``while_loop`` under
    ``shard_map(check_vma=True)`` needs the carry types to match the body's output; likewise the
    outputs of a custom call, which do not say how they vary.
    """
    axes: set = set()
    for ref in refs:
        axes |= varying_axes(ref)
    if not axes:
        return tree

    def cast(x):
        missing = axes - varying_axes(x)
        return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jax.tree.map(cast, tree)


def axis_is_bound(axis_name) -> bool:
    """Whether ``axis_name`` (a name or tuple of names; None: False) names mapped axes (``pmap``,
    ``shard_map``, named ``vmap``) bound at this point of the trace.

    JAX raises ``NameError("unbound axis name: ...")`` for collectives over an unknown axis; asking
    for its size is the cheapest such query and costs nothing at run time.
    """
    if axis_name is None:
        return False
    try:
        jax.lax.axis_size(axis_name)
    except NameError:
        return False
    return True
