"""Items made ahead in a background thread (the training loops' batches)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(make: Callable[[int], T], first: int, stride: int = 1, depth: int = 2,
               failure: str | None = None) -> Iterator[tuple[int, T]]:
    """Endless ``(position, make(position))`` for ``position = first, first + stride, ...``, made
    by a daemon thread at most ``depth`` items ahead. An exception in ``make`` reaches the consumer
    at that item (as ``RuntimeError(failure)`` chained to it when ``failure`` is given, else as it
    is), never a consumer waiting forever; closing the iterator stops the thread."""
    out: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        position = first
        while not stop.is_set():
            try:
                item: Any = (position, make(position))
            except BaseException as err:  # handed to the consumer, which would wait forever
                item = err
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            position += stride

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                if failure is not None:
                    raise RuntimeError(failure) from item
                raise item
            yield item
    finally:
        stop.set()
