"""Every use of JAX internals (``jax._src``) in detlayers, in one place (private).

``bound_axis_names``: the names of the mapped axes (``pmap``, ``shard_map``, named ``vmap``)
bound at the current point of a trace. JAX has no public API for that list: ``jax.lax.axis_size``
answers for one given name only, and ``jax.extend.core.unsafe_get_axis_names_DO_NOT_USE`` is
marked as not for use. The synchronised batch norms need the list for one error message: a
training call inside mapped axes that do not include the layer's ``axis_name`` must name the axes
that *are* bound, rather than silently fall back to per-device statistics.

Read from ``jax._src.core.get_axis_env().axis_sizes`` (a mapping keyed by axis name). Checked on
jax 0.10.2; written against the jax 0.11.1 source (``jax/_src/core.py``: ``AxisEnv.axis_sizes``,
``get_axis_env``). ``tests/test_jax_internals.py`` fails with a message naming this module when
JAX moves it. If a JAX release does move it, :func:`bound_axis_names` returns None and the callers
skip the check that needs it (with one ``RuntimeWarning``) instead of failing every training step.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable

import jax

try:  # jax._src is JAX's private package: see the module docstring for why and which versions
    from jax._src.core import get_axis_env as _get_axis_env
except ImportError:  # pragma: no cover - depends on the installed JAX
    _get_axis_env = None

__all__ = ["AXIS_ENV_SOURCE", "bound_axis_names"]

# What bound_axis_names reads, for error messages and the test that guards it.
AXIS_ENV_SOURCE = "jax._src.core.get_axis_env().axis_sizes"

_warned_missing = False


def bound_axis_names() -> tuple[Hashable, ...] | None:
    """The mapped axis names bound at this point of the trace, outermost first; ``()`` outside any
    mapped axis. None (after one ``RuntimeWarning``) when this JAX no longer has
    ``jax._src.core.get_axis_env().axis_sizes``."""
    sizes = getattr(_get_axis_env(), "axis_sizes", None) if _get_axis_env is not None else None
    if sizes is None:
        _warn_missing()
        return None
    return tuple(sizes)


def _warn_missing() -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            f"detlayers: JAX {jax.__version__} has no {AXIS_ENV_SOURCE} (checked on jax 0.10.2 and "
            "0.11.1); synchronised batch norms cannot list the bound axes and skip their check that "
            "axis_name is one of them. Update detlayers/_jax_internals.py.",
            RuntimeWarning,
            stacklevel=3,
        )
