"""detectron2's ``Matcher`` (``modeling/matcher.py``) with static shapes and padded ground truth."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Matcher"]


@dataclasses.dataclass(frozen=True)
class Matcher:
    """``Matcher(thresholds, labels, allow_low_quality_matches)``: each prediction (column of an
    IoU matrix) gets the ground truth it overlaps most and a label from the interval its best IoU
    falls in.

    ``thresholds`` (increasing) split ``[-inf, inf)`` into ``len(thresholds) + 1`` intervals, each
    closed on the left; ``labels`` (one per interval, each -1 ignore, 0 negative or 1 positive) are
    their labels. With ``allow_low_quality_matches`` every prediction whose IoU with some ground
    truth equals that ground truth's best IoU (ties included) becomes positive (Faster R-CNN's RPN
    rule (i)); its match stays its own best ground truth, as in detectron2.

    ``matcher(iou [G, A], valid bool[G])`` returns ``(matches int32[A], labels int32[A])``. Rows
    with ``valid`` False (padding) never match and take no part in the low-quality rule; with no
    valid row every prediction is matched to 0 with label ``labels[0]``, as detectron2 does for an
    image without ground truth. Ties between ground truths go to the lower index (``torch.max``).
    Immutable and hashable (a field of a Flax module).
    """

    thresholds: Sequence[float]
    labels: Sequence[int]
    allow_low_quality_matches: bool = False

    def __post_init__(self) -> None:
        thresholds = tuple(float(t) for t in self.thresholds)
        labels = tuple(int(v) for v in self.labels)
        if any(a > b for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"Matcher: thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher: {len(thresholds)} thresholds need {len(thresholds) + 1} labels, got {labels}")
        if any(v not in (-1, 0, 1) for v in labels):
            raise ValueError(f"Matcher: labels must be -1, 0 or 1, got {labels}")
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "labels", labels)

    def __call__(self, iou: Array, valid: Array) -> tuple[Array, Array]:
        if iou.ndim != 2 or tuple(valid.shape) != (iou.shape[0],):
            raise ValueError(f"Matcher: iou must be [G, A] and valid [G], got shapes {iou.shape} and {valid.shape}")
        iou = jnp.asarray(iou, jnp.float32)
        valid = jnp.asarray(valid, bool)
        # Padded rows sit below every real IoU (all >= 0), so they never win the max.
        quality = jnp.where(valid[:, None], iou, -1.0)
        matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
        best = jnp.max(quality, axis=0)
        bounds = (-math.inf,) + self.thresholds + (math.inf,)
        labels = jnp.ones(best.shape, jnp.int32)
        for label, low, high in zip(self.labels, bounds[:-1], bounds[1:]):
            labels = jnp.where((best >= low) & (best < high), label, labels)
        if self.allow_low_quality_matches:
            best_per_gt = jnp.max(quality, axis=1, keepdims=True)
            is_best = jnp.any((quality == best_per_gt) & valid[:, None], axis=0)
            labels = jnp.where(is_best, 1, labels)
        any_valid = jnp.any(valid)
        return jnp.where(any_valid, matches, 0), jnp.where(any_valid, labels, self.labels[0])
