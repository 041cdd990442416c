"""``detlayers.models.matcher.Matcher`` and ``detlayers.models.sampling`` against NumPy transcriptions
of detectron2's ``Matcher.__call__`` / ``set_low_quality_matches_`` and of ``subsample_labels`` with
the priority rule (the highest priorities win, ties by index)."""

from __future__ import annotations

import numpy as np
import pytest


def _np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


def _np_matcher(iou: np.ndarray, thresholds, labels, low_quality: bool):
    """detectron2's Matcher, transcribed (the rows given are the real ground truth)."""
    if iou.shape[0] == 0:
        return np.zeros(iou.shape[1], np.int64), np.full(iou.shape[1], labels[0])
    matches = iou.argmax(0)
    best = iou.max(0)
    out = np.ones(iou.shape[1], np.int64)
    bounds = [-np.inf, *thresholds, np.inf]
    for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
        out[(best >= lo) & (best < hi)] = lab
    if low_quality:
        _, cols = np.nonzero(iou == iou.max(1)[:, None])
        out[cols] = 1
    return matches, out


def _np_subsample(labels, num_samples, fraction, bg, prio):
    pos = np.nonzero((labels != -1) & (labels != bg))[0]
    neg = np.nonzero(labels == bg)[0]
    num_pos = min(len(pos), int(num_samples * fraction))
    num_neg = min(len(neg), num_samples - num_pos)
    by_prio = lambda idx: idx[np.lexsort((idx, -prio[idx]))]  # noqa: E731
    return by_prio(pos)[:num_pos], by_prio(neg)[:num_neg]


def _boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(4, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_matches_detectron2_with_padded_ground_truth(low_quality):
    import jax.numpy as jnp

    from detlayers.boxes import pairwise_iou
    from detlayers.models.matcher import Matcher

    rng = np.random.default_rng(0)
    gt, anchors = _boxes(rng, 5), _boxes(rng, 300)
    anchors[7] = gt[2]  # an exact match
    anchors[11] = gt[2]  # and its tie: both become positive through the low-quality rule
    valid = np.array([True, False, True, True, False])
    iou = np.asarray(pairwise_iou(jnp.asarray(gt), jnp.asarray(anchors)))
    np.testing.assert_allclose(iou, _np_iou(gt, anchors), rtol=1e-5, atol=1e-7)
    matcher = Matcher((0.3, 0.7), (0, -1, 1), low_quality)
    matches, labels = matcher(jnp.asarray(iou), jnp.asarray(valid))
    real = np.nonzero(valid)[0]
    want_matches, want_labels = _np_matcher(iou[real], (0.3, 0.7), (0, -1, 1), low_quality)
    np.testing.assert_array_equal(np.asarray(matches), real[want_matches])
    np.testing.assert_array_equal(np.asarray(labels), want_labels)
    assert set(np.unique(want_labels)) == {-1, 0, 1}
    # the low-quality rule adds positives here (best anchors of ground truth with IoU < 0.7)
    plain = _np_matcher(iou[real], (0.3, 0.7), (0, -1, 1), False)[1]
    assert (np.sum(want_labels == 1) > np.sum(plain == 1)) == low_quality


def test_matcher_without_ground_truth_labels_everything_background():
    import jax.numpy as jnp

    from detlayers.models.matcher import Matcher

    iou = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (3, 20)).astype(np.float32))
    matches, labels = Matcher((0.5,), (0, 1), False)(iou, jnp.zeros(3, bool))
    np.testing.assert_array_equal(np.asarray(matches), 0)
    np.testing.assert_array_equal(np.asarray(labels), 0)
    with pytest.raises(ValueError, match="labels"):
        Matcher((0.3, 0.7), (0, 1))
    with pytest.raises(ValueError, match="valid"):
        Matcher((0.5,), (0, 1))(iou, jnp.zeros(4, bool))


@pytest.mark.parametrize("num_pos_cands, num_neg_cands", [(40, 500), (3, 500), (40, 10), (0, 0)])
def test_subsample_labels_keeps_the_highest_priorities(num_pos_cands, num_neg_cands):
    import jax.numpy as jnp

    from detlayers.models.sampling import sampled_indices, subsample_labels

    rng = np.random.default_rng(num_pos_cands + num_neg_cands)
    a = 700
    labels = np.full(a, -1)
    perm = rng.permutation(a)
    labels[perm[:num_pos_cands]] = rng.integers(0, 3, num_pos_cands)  # classes 0..2, background 3
    labels[perm[num_pos_cands:num_pos_cands + num_neg_cands]] = 3
    prio = (rng.integers(0, 8, a) / 8).astype(np.float32)  # many ties, split by the cut: lower index first
    keep_pos, keep_neg = subsample_labels(jnp.asarray(labels), 64, 0.25, 3, jnp.asarray(prio))
    want_pos, want_neg = _np_subsample(labels, 64, 0.25, 3, prio)
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep_pos))[0], np.sort(want_pos))
    np.testing.assert_array_equal(np.nonzero(np.asarray(keep_neg))[0], np.sort(want_neg))
    index, valid = sampled_indices(keep_pos, keep_neg, jnp.asarray(prio), 64)
    count = len(want_pos) + len(want_neg)
    np.testing.assert_array_equal(np.asarray(valid), np.arange(64) < count)
    np.testing.assert_array_equal(np.asarray(index)[:count], np.concatenate([want_pos, want_neg]))
