"""XLA's out-of-memory errors turned into one clear error of the caller's.

When an XLA computation fails for lack of memory, fetching its outputs (``jax.device_get``,
``float(x)``) can hang on the CPU backend instead of raising. Callers therefore block on the
outputs (``jax.block_until_ready``) inside :func:`out_of_memory_as`, which lets every other error
through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA's failure to allocate (``RESOURCE_EXHAUSTED`` / ``Out of memory``)."""
    text = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def xla_message(err: BaseException) -> str:
    """The first line of XLA's message (the rest is a C++ stack or allocator dump)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def out_of_memory_as(make_error: Callable[[str], BaseException]) -> Iterator[None]:
    """Inside the block, an XLA out-of-memory error becomes ``make_error(xla_message(err))``
    (chained to it); any other exception passes unchanged."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise make_error(xla_message(err)) from err
