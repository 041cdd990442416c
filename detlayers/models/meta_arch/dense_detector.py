"""Test-time decoding of dense (per-anchor) predictions: detectron2's
``DenseDetector._decode_per_level_predictions`` / ``_decode_multi_level_predictions``
(``modeling/meta_arch/dense_detector.py``), batched with static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers.models.box_regression import Box2BoxTransform

Array = jax.Array

__all__ = ["decode_per_level_predictions", "decode_multi_level_predictions"]


def decode_per_level_predictions(
    anchors: np.ndarray,
    scores: Array,
    deltas: Array,
    *,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
) -> tuple[Array, Array, Array, Array]:
    """The candidates of ONE feature level: every (anchor, class) pair scoring ``> score_thresh``,
    at most ``topk_candidates`` of them (the best), with its box decoded from its anchor.

    Args:
      anchors: ``float32[M, 4]`` the level's anchors, (y, x, anchor) order.
      scores: ``[N, M, K]`` class probabilities; deltas: ``[N, M, 4]`` box deltas.

    Returns ``boxes [N, T, 4]`` (not clipped), ``scores [N, T]``, ``classes int32[N, T]`` and
    ``valid bool[N, T]`` with ``T = min(topk_candidates, M*K)``, by decreasing score; the slots
    past the pairs above the threshold are invalid (score -1, as they rank last).
    """
    n, m, k = scores.shape
    flat = scores.reshape(n, m * k).astype(jnp.float32)
    num = min(int(topk_candidates), m * k)
    # Pairs at or below the threshold rank after every probability: the top-k of the rest is
    # detectron2's top-k among the pairs above the threshold.
    ranked = jnp.where(flat > score_thresh, flat, -1.0)
    top_scores, index = lax.top_k(ranked, num)
    valid = top_scores > score_thresh
    anchor_index = index // k
    classes = (index % k).astype(jnp.int32)
    picked_deltas = jnp.take_along_axis(deltas.astype(jnp.float32), anchor_index[..., None], axis=1)
    picked_anchors = jnp.take(jnp.asarray(anchors, jnp.float32), anchor_index, axis=0)
    boxes = box2box_transform.apply_deltas(picked_deltas, picked_anchors)
    return boxes, top_scores, classes, valid


def decode_multi_level_predictions(
    anchors: Sequence[np.ndarray],
    scores: Sequence[Array],
    deltas: Sequence[Array],
    *,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
) -> tuple[Array, Array, Array, Array]:
    """:func:`decode_per_level_predictions` on every level (``topk_candidates`` per level), the
    levels concatenated in order: ``boxes [N, C, 4]``, ``scores [N, C]``, ``classes [N, C]``,
    ``valid [N, C]``."""
    if not (len(anchors) == len(scores) == len(deltas)):
        raise ValueError(f"decode_multi_level_predictions: {len(anchors)} anchor levels, {len(scores)} score "
                         f"levels and {len(deltas)} delta levels differ")
    levels = [
        decode_per_level_predictions(a, s, d, box2box_transform=box2box_transform, score_thresh=score_thresh,
                                     topk_candidates=topk_candidates)
        for a, s, d in zip(anchors, scores, deltas)
    ]
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(*levels))  # type: ignore[return-value]
