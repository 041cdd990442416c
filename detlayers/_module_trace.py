"""Which submodules a Flax ``init`` runs, found by tracing it abstractly (private)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def trace_init(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict[tuple[str, ...], nn.Module]]:
    """``module.init(*args, **kwargs)`` under ``jax.eval_shape`` (shapes only, nothing computed).

    Returns the variables' ``jax.ShapeDtypeStruct`` tree and ``{scope path: bound module}`` for
    every module whose method ran (the first instance seen at each path). ``params`` and
    ``dropout`` rngs are provided, so models with dropout trace in training mode too.
    """
    modules: dict[tuple[str, ...], nn.Module] = {}

    def interceptor(next_fun, fargs, fkwargs, context):
        modules.setdefault(tuple(context.module.path), context.module)
        return next_fun(*fargs, **fkwargs)

    def run(rng):
        with nn.intercept_methods(interceptor):
            return module.init({"params": rng, "dropout": rng}, *args, **kwargs)

    shapes = jax.eval_shape(run, jax.random.key(0))
    return shapes, modules
