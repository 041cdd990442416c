"""Benchmarks: each op timed against its PyTorch counterpart in the same run.

``python -m detlayers.bench [family ...] [--json FILE]``.  A family is a module of this package
(``detlayers/bench/<family>.py``) with ``cases(platform: str) -> Iterable[Case]``; ``platform`` is
``jax.default_backend()`` ("cpu", "gpu", ...).  Each case gives a zero-argument callable for our
op (already jitted and warmed by the runner) and, when torch is importable, one for the PyTorch
counterpart on the matching device.  Times are medians of repeated calls after warm-up; the ratio
is ours / PyTorch, so below 1.0 means detlayers is faster.
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

# family name -> module under detlayers.bench
FAMILIES: dict[str, str] = {
    "nms": "detlayers.bench.nms",
    "roi_align": "detlayers.bench.roi_align",
    "paste_masks": "detlayers.bench.paste_masks",
    "deform_conv": "detlayers.bench.deform_conv",
    "sync_bn": "detlayers.bench.sync_bn",
    "mask_rcnn": "detlayers.bench.mask_rcnn",
    "panoptic_fpn": "detlayers.bench.panoptic_fpn",
    "mask_rcnn_train": "detlayers.bench.mask_rcnn_train",
    "predictor_mixed_sizes": "detlayers.bench.predictor_mixed_sizes",
    "deeplab": "detlayers.bench.deeplab",
    "models": "detlayers.bench.models",
}


@dataclasses.dataclass
class Case:
    """One benchmark row.

    Attributes:
      family: op family (a key of ``FAMILIES``).
      name: what is timed, with its sizes, e.g. ``"nms N=5000 iou=0.5"``.
      ours: runs our op once and returns its outputs (JAX arrays; the runner blocks on them).
      torch: runs the PyTorch counterpart once (the runner synchronizes CUDA), or None.
      warmup, min_repeats: calls before timing and timed calls at least (fewer for cases that
        take minutes, e.g. NMS over 200k boxes on a CPU).
      summary: called after timing with the seconds per call of ours and of PyTorch (None
        without a counterpart); returns named values (e.g. images per second, compilations)
        that the runner prints on a line under the row and stores in the JSON row.
    """

    family: str
    name: str
    ours: Callable[[], Any]
    torch: Callable[[], Any] | None = None
    warmup: int = 2
    min_repeats: int = 5
    summary: Callable[[float, float | None], dict[str, Any]] | None = None


def _block(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def _torch_sync() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_callable(
    fn: Callable[[], Any],
    sync: Callable[[Any], None],
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    min_seconds: float = 1.0,
    max_repeats: int = 200,
) -> float:
    """Median wall time of ``fn()`` in seconds, synchronizing after every call."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
        len(times) < min_repeats or time.perf_counter() - start < min_seconds
    ):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_cases(families: Iterable[str], platform: str) -> list[Case]:
    cases: list[Case] = []
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown benchmark family {family!r}; known: {sorted(FAMILIES)}")
        module = importlib.import_module(FAMILIES[family])
        cases.extend(module.cases(platform))
    return cases
