"""detlayers/_jax_internals.py, the one module that reads JAX internals (``jax._src``).

These tests fail with a message saying what moved when a JAX release moves what that module
reads; the reference for ``bound_axis_names`` is the axis names the test itself binds.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from detlayers import _jax_internals
from detlayers.batch_norm import _sync_axis

MOVED = (
    "JAX {version} moved {what}, which detlayers/_jax_internals.py reads (checked on jax 0.10.2, "
    "written against the 0.11.1 source): update that module"
)


def test_jax_still_has_the_axis_environment_detlayers_reads():
    message = MOVED.format(version=jax.__version__, what=_jax_internals.AXIS_ENV_SOURCE)
    try:
        from jax._src.core import get_axis_env
    except ImportError:
        pytest.fail(message)
    sizes = getattr(get_axis_env(), "axis_sizes", None)
    assert sizes is not None, message
    assert len(sizes) == 0, message  # outside any mapped axis


def test_bound_axis_names_lists_the_mapped_axes_outermost_first():
    assert _jax_internals.bound_axis_names() == ()
    seen = []

    def record(x):
        seen.append(_jax_internals.bound_axis_names())
        return x

    jax.vmap(jax.vmap(record, axis_name="inner"), axis_name="outer")(jnp.zeros((2, 3)))
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    jax.jit(jax.shard_map(record, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(jnp.zeros(4))
    assert seen == [("outer", "inner"), ("data",)]


def test_a_jax_without_the_axis_environment_skips_the_check_with_one_warning(monkeypatch):
    monkeypatch.setattr(_jax_internals, "_get_axis_env", None)
    monkeypatch.setattr(_jax_internals, "_warned_missing", False)
    results = []

    def resolve(x):
        results.append(_sync_axis("batch", "SyncBatchNorm"))
        return x

    with pytest.warns(RuntimeWarning, match=r"get_axis_env\(\)\.axis_sizes.*_jax_internals\.py"):
        jax.vmap(resolve, axis_name="data")(jnp.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        assert _jax_internals.bound_axis_names() is None
    # without the list of bound axes the layer falls back to local statistics
    assert results == [None]
