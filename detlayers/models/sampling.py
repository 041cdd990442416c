"""detectron2's ``subsample_labels`` (``modeling/sampling.py``) as a static-shape selection.

detectron2 keeps a uniformly random subset of the positives and negatives (``torch.randperm``).
Here every candidate carries a priority and the highest priorities win: with priorities drawn
uniformly in ``[0, 1)`` that is the same distribution, and with given priorities the selection is
reproducible across frameworks (the parity fixtures replace detectron2's sampler by this rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["subsample_labels", "sampled_indices", "draw_priorities"]


def draw_priorities(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform ``float32`` priorities in ``[0, 1)`` of ``shape`` from the PRNG ``key``."""
    return jax.random.uniform(key, shape, jnp.float32)


def _rank(candidates: Array, priorities: Array) -> Array:
    """Rank of each candidate among ``candidates`` by decreasing priority, ties by index
    (non-candidates rank after all candidates)."""
    index = jnp.arange(candidates.shape[0])
    order = jnp.lexsort((index, -priorities, ~candidates))
    return jnp.zeros_like(index).at[order].set(index)


def subsample_labels(
    labels: Array, num_samples: int, positive_fraction: float, bg_label: int, priorities: Array
) -> tuple[Array, Array]:
    """Which candidates detectron2's ``subsample_labels`` keeps, as masks.

    Args:
      labels: ``int[A]``: -1 ignore, ``bg_label`` negative, anything else positive.
      num_samples: how many candidates to keep at most; positive_fraction: the share of them that
        may be positive.
      priorities: ``float[A]``; the kept positives (negatives) are those with the highest
        priorities, ties by lower index.

    Returns ``(positive bool[A], negative bool[A])``: ``num_pos = min(#positives,
    int(num_samples * positive_fraction))`` positives and ``num_neg = min(#negatives, num_samples -
    num_pos)`` negatives.
    """
    if labels.ndim != 1 or priorities.shape != labels.shape:
        raise ValueError(f"subsample_labels: labels and priorities must be [A], got shapes {labels.shape} "
                         f"and {priorities.shape}")
    positive = (labels != -1) & (labels != bg_label)
    negative = labels == bg_label
    priorities = jnp.asarray(priorities, jnp.float32)
    num_pos = jnp.minimum(jnp.sum(positive), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(negative), num_samples - num_pos)
    keep_pos = positive & (_rank(positive, priorities) < num_pos)
    keep_neg = negative & (_rank(negative, priorities) < num_neg)
    return keep_pos, keep_neg


def sampled_indices(keep_pos: Array, keep_neg: Array, priorities: Array, num_samples: int) -> tuple[Array, Array]:
    """The kept candidates gathered into ``num_samples`` static slots, positives first (each group
    by decreasing priority, as detectron2 concatenates ``pos_idx`` and ``neg_idx``).

    Returns ``(indices int32[S], valid bool[S])`` with ``S = min(num_samples, A)``; invalid slots
    point at candidate 0.
    """
    count = min(num_samples, keep_pos.shape[0])
    group = jnp.where(keep_pos, 0, jnp.where(keep_neg, 1, 2))
    index = jnp.arange(keep_pos.shape[0])
    order = jnp.lexsort((index, -jnp.asarray(priorities, jnp.float32), group))[:count]
    valid = group[order] < 2
    return jnp.where(valid, order, 0).astype(jnp.int32), valid
