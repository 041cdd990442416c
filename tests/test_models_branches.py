"""``detlayers.models`` past the default config: the branches only non-default config values (or
edge-case inputs) take, each against a float64 NumPy derivation of detectron2's rule.

Covered: FPN ``FUSE_TYPE: avg``; the RPN's ``PRE_NMS_TOPK_TEST`` != ``POST_NMS_TOPK_TEST`` and
``PROPOSAL_GENERATOR.MIN_SIZE``; a non-zero anchor ``OFFSET``; the ``dw``/``dh`` scale clamp on
each coordinate; ``CLS_AGNOSTIC_BBOX_REG``; ``CLS_AGNOSTIC_MASK``; ``ROI_HEADS.NMS_THRESH_TEST``;
scores exactly at ``SCORE_THRESH_TEST``; ``DETECTIONS_PER_IMAGE`` < 0 (no limit); ROIAlign vs
ROIAlignV2 poolers; mask-head chunking for slot counts that are not a multiple of the chunk; boxes
that become empty in ``detector_postprocess``. Small synthetic inputs, no model compile.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detlayers.shape_spec import ShapeSpec

# --------------------------------------------------------------------------------------------
# float64 references


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, thresh: float) -> list[int]:
    """torchvision's ``batched_nms``: greedy by decreasing score (stable), suppression within a group
    at IoU > thresh. Returns kept indices by decreasing score."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(groups[j] != groups[i] or _iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(int(i))
    return keep


SCALE_CLAMP = math.log(1000.0 / 16)  # detectron2's _DEFAULT_SCALE_CLAMP


def _decode(deltas: np.ndarray, boxes: np.ndarray, weights, clamp: float = SCALE_CLAMP) -> np.ndarray:
    """detectron2's ``Box2BoxTransform.apply_deltas`` in float64: ``deltas [R, K*4]``, ``boxes [R, 4]``."""
    d = deltas.astype(np.float64).reshape(len(deltas), -1, 4) / np.asarray(weights, np.float64)
    b = boxes.astype(np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h
    px = d[..., 0] * w[:, None] + cx[:, None]
    py = d[..., 1] * h[:, None] + cy[:, None]
    pw = np.exp(np.minimum(d[..., 2], clamp)) * w[:, None]
    ph = np.exp(np.minimum(d[..., 3], clamp)) * h[:, None]
    return np.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], -1).reshape(deltas.shape)


def _clip(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
    return np.stack([boxes[..., 0].clip(0, w), boxes[..., 1].clip(0, h), boxes[..., 2].clip(0, w),
                     boxes[..., 3].clip(0, h)], -1)


def _random_boxes(rng, n: int, extent: float, min_side: float = 2.0, max_side: float = 40.0) -> np.ndarray:
    xy = rng.uniform(0, extent, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(min_side, max_side, (n, 2))], 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Box2BoxTransform: the scale clamp on each of dw and dh


@pytest.mark.parametrize("coord", [2, 3], ids=["dw", "dh"])
def test_scale_clamp_on_each_size_delta(coord):
    from detlayers.models.box_regression import Box2BoxTransform

    boxes = np.array([[10.0, 20.0, 50.0, 44.0], [0.0, 0.0, 8.0, 16.0]], np.float32)
    # two classes per box: one delta beyond the clamp on `coord`, one below it
    deltas = np.zeros((2, 8), np.float32)
    deltas[:, coord] = 30.0     # / weight 5 = 6 > log(1000/16) = 4.135
    deltas[:, 4 + coord] = 10.0  # / 5 = 2: not clamped
    deltas[:, [0, 1, 4, 5]] = [0.5, -1.0, 2.0, 0.25]
    weights = (10.0, 10.0, 5.0, 5.0)
    out = np.asarray(Box2BoxTransform(weights).apply_deltas(jnp.asarray(deltas), jnp.asarray(boxes)))
    np.testing.assert_allclose(out, _decode(deltas, boxes, weights), rtol=1e-5, atol=1e-3)
    side = out[:, coord] - out[:, coord - 2]
    np.testing.assert_allclose(side, (boxes[:, coord] - boxes[:, coord - 2]) * 1000 / 16, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# anchors: a non-zero OFFSET


def test_grid_anchors_with_offset():
    from detlayers.models.anchor_generator import DefaultAnchorGenerator

    gen = DefaultAnchorGenerator(sizes=((16.0, 32.0),), aspect_ratios=((0.5, 2.0),), strides=(8, 16), offset=0.5)
    anchors = gen([(3, 2), (2, 1)])
    for level, (stride, (gh, gw)) in enumerate(zip((8, 16), [(3, 2), (2, 1)])):
        cells = []
        for size in (16.0, 32.0):
            for ratio in (0.5, 2.0):
                w = math.sqrt(size * size / ratio)
                cells.append([-w / 2, -ratio * w / 2, w / 2, ratio * w / 2])
        expected = [[(x + 0.5) * stride + c[0], (y + 0.5) * stride + c[1], (x + 0.5) * stride + c[2],
                     (y + 0.5) * stride + c[3]] for y in range(gh) for x in range(gw) for c in cells]
        np.testing.assert_allclose(anchors[level], np.asarray(expected), rtol=1e-6, err_msg=f"level {level}")


# --------------------------------------------------------------------------------------------
# RPN proposal selection: pre != post top-k, MIN_SIZE


def _rpn_reference(anchors, deltas, logits, hw, weights, nms_thresh, pre, post, min_size):
    """detectron2's ``find_top_rpn_proposals`` for one image (float64 decode)."""
    boxes, scores, levels = [], [], []
    for level, (a, d, s) in enumerate(zip(anchors, deltas, logits)):
        k = min(len(s), pre)
        top = np.argsort(-s, kind="stable")[:k]
        boxes.append(_decode(d[top], a[top], weights))
        scores.append(s[top])
        levels.append(np.full(k, level))
    boxes, scores, levels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(levels)
    boxes = _clip(boxes, *hw)
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    kept = _batched_nms(boxes, scores, levels, nms_thresh)[:post]
    return boxes[kept], scores[kept]


@pytest.mark.parametrize("pre, post, min_size", [(7, 5, 0.0), (4, 12, 0.0), (9, 6, 6.0)])
def test_rpn_top_k_and_min_size(pre, post, min_size):
    from detlayers.models.box_regression import Box2BoxTransform
    from detlayers.models.proposal_generator.rpn import find_top_rpn_proposals

    rng = np.random.default_rng(3)
    hw = (60, 70)
    counts = (16, 6)
    anchors = [_random_boxes(rng, c, 60, 4, 30) for c in counts]
    deltas = [rng.normal(0, 0.4, (1, c, 4)).astype(np.float32) for c in counts]
    logits = [rng.permutation(c).astype(np.float32)[None] * 0.37 + level for level, c in enumerate(counts)]
    weights = (1.0, 1.0, 1.0, 1.0)
    boxes, scores, valid = find_top_rpn_proposals(
        anchors, [jnp.asarray(d) for d in deltas], [jnp.asarray(s) for s in logits], jnp.asarray([hw], jnp.int32),
        box2box_transform=Box2BoxTransform(weights), nms_thresh=0.3, pre_nms_topk=pre, post_nms_topk=post,
        min_box_size=min_size)
    ref_boxes, ref_scores = _rpn_reference(anchors, [d[0] for d in deltas], [s[0] for s in logits], hw, weights,
                                           0.3, pre, post, min_size)
    assert boxes.shape[1] == min(post, sum(min(c, pre) for c in counts))
    k = int(np.asarray(valid[0]).sum())
    assert k == len(ref_boxes) and np.asarray(valid[0, :k]).all()
    np.testing.assert_allclose(np.asarray(boxes[0, :k]), ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(scores[0, :k]), ref_scores.astype(np.float32))


# --------------------------------------------------------------------------------------------
# fast_rcnn_inference: score threshold (strict), NMS_THRESH_TEST, class-agnostic boxes, no limit


def _fast_rcnn_reference(boxes, scores, hw, score_thresh, nms_thresh, topk):
    """detectron2's ``fast_rcnn_inference_single_image``: ``boxes [R, K*4 or 4]``, ``scores [R, K+1]``."""
    r, k = scores.shape[0], scores.shape[1] - 1
    boxes = _clip(boxes.astype(np.float64).reshape(r, -1, 4), *hw)
    if boxes.shape[1] == 1:
        boxes = np.broadcast_to(boxes, (r, k, 4))
    mask = scores[:, :k] > score_thresh
    rows, cols = np.nonzero(mask)
    cand_boxes, cand_scores = boxes[rows, cols], scores[rows, cols]
    kept = _batched_nms(cand_boxes, cand_scores, cols, nms_thresh)
    if topk >= 0:
        kept = kept[:topk]
    return cand_boxes[kept], cand_scores[kept], cols[kept]


def _fast_rcnn_case(rng, r=8, k=3, agnostic=False):
    # two clusters of jittered proposals: overlaps spread over the NMS thresholds tested
    proposals = (np.repeat(_random_boxes(rng, 2, 30, 14, 24), r // 2, axis=0)
                 + rng.uniform(-4, 4, (r, 4))).astype(np.float32)
    boxes = _decode(rng.normal(0, 0.3, (r, 4 if agnostic else 4 * k)), proposals, (1, 1, 1, 1)).astype(np.float32)
    scores = rng.dirichlet(np.ones(k + 1), r).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("nms_thresh, agnostic, topk", [(0.3, False, 4), (0.7, True, -1), (0.5, False, -1)],
                         ids=["nms0.3-per-class-top4", "nms0.7-agnostic-no-limit", "nms0.5-per-class-no-limit"])
def test_fast_rcnn_inference_against_detectron2s_rule(nms_thresh, agnostic, topk):
    from detlayers.models.roi_heads.fast_rcnn import fast_rcnn_inference

    rng = np.random.default_rng(5)
    boxes, scores = _fast_rcnn_case(rng, agnostic=agnostic)
    # two scores exactly at the threshold: detectron2 keeps only scores strictly above it
    score_thresh = float(np.float32(0.05))  # exactly representable in float32: a real tie
    scores[1, 0] = scores[4, 2] = score_thresh
    hw = (55, 60)
    out_boxes, out_scores, out_classes, valid = fast_rcnn_inference(
        jnp.asarray(boxes[None]), jnp.asarray(scores[None]), jnp.asarray([hw], jnp.int32), jnp.ones((1, 8), bool),
        score_thresh=score_thresh, nms_thresh=nms_thresh, topk_per_image=topk)
    ref_boxes, ref_scores, ref_classes = _fast_rcnn_reference(boxes, scores, hw, score_thresh, nms_thresh, topk)
    assert out_boxes.shape[1] == (8 * 3 if topk < 0 else topk)
    n = int(np.asarray(valid).sum())
    assert n == len(ref_boxes) and np.asarray(valid[0, :n]).all()
    np.testing.assert_allclose(np.asarray(out_boxes[0, :n]), ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out_scores[0, :n]), ref_scores)
    np.testing.assert_array_equal(np.asarray(out_classes[0, :n]), ref_classes)


def test_fast_rcnn_output_layers_agnostic_bbox_reg_decodes_one_box_for_every_class():
    from detlayers.models.box_regression import Box2BoxTransform
    from detlayers.models.roi_heads.fast_rcnn import FastRCNNOutputLayers

    layers = FastRCNNOutputLayers(ShapeSpec(channels=6), num_classes=3, box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), cls_agnostic_bbox_reg=True, test_score_thresh=0.0, test_nms_thresh=1.0,
        test_topk_per_image=-1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)
    variables = layers.init(jax.random.key(0), x)
    assert variables["params"]["bbox_pred"]["kernel"].shape == (6, 4)
    logits, deltas = layers.apply(variables, x)
    proposals = _random_boxes(np.random.default_rng(4), 4, 40, 10, 20)
    boxes, scores, classes, valid = layers.apply(
        variables, logits, deltas, jnp.asarray(proposals[None]), jnp.ones((1, 4), bool),
        jnp.asarray([[100, 100]], jnp.int32), method=FastRCNNOutputLayers.inference)
    decoded = _decode(np.asarray(deltas, np.float64), proposals, (10.0, 10.0, 5.0, 5.0))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), -1))
    ref_boxes, ref_scores, ref_classes = _fast_rcnn_reference(decoded, probs, (100, 100), 0.0, 1.0, -1)
    assert int(np.asarray(valid).sum()) == 12 == len(ref_boxes)
    np.testing.assert_allclose(np.asarray(boxes[0]), ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scores[0]), ref_scores, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(classes[0]), ref_classes)


# --------------------------------------------------------------------------------------------
# FPN FUSE_TYPE: avg


class _StubBottomUp(nn.Module):
    """A weightless bottom-up network: ``res{k}`` is the input subsampled by ``2**k`` and projected
    by a fixed random matrix to ``CHANNELS[k]`` channels."""

    CHANNELS = {3: 4, 4: 6, 5: 5}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f"res{k}": ShapeSpec(channels=c, stride=2**k) for k, c in self.CHANNELS.items()}

    def __call__(self, x):
        rng = np.random.default_rng(7)
        return {f"res{k}": x[:, :: 2**k, :: 2**k, :] @ jnp.asarray(rng.normal(size=(3, c)), jnp.float32)
                for k, c in self.CHANNELS.items()}


def _conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 stride-1 'same' convolution (odd kernel, zero padding) of NHWC ``x``, HWIO kernel."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nhwc,co->nhwo", padded[:, i: i + x.shape[1], j: j + x.shape[2]], kernel[i, j])
    return out + bias


@pytest.mark.parametrize("fuse_type", ["sum", "avg"])
def test_fpn_fuse_type(fuse_type):
    from detlayers.models.backbone import FPN, LastLevelMaxPool

    fpn = FPN(bottom_up=_StubBottomUp(), in_features=("res3", "res4", "res5"), out_channels=4,
              top_block=LastLevelMaxPool(), fuse_type=fuse_type)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 64, 32, 3)), jnp.float32)
    variables = fpn.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    params = jax.tree.map(lambda a: a + np.random.default_rng(a.size).normal(0, 0.1, a.shape), params)  # non-zero bias
    out = fpn.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}, x)
    feats = {k: np.asarray(v, np.float64) for k, v in _StubBottomUp()(x).items()}

    def conv(name, a):
        return _conv_same(a, params[name]["kernel"], params[name]["bias"])

    prev = conv("fpn_lateral5", feats["res5"])
    expected = {"p5": conv("fpn_output5", prev)}
    for level in (4, 3):
        prev = conv(f"fpn_lateral{level}", feats[f"res{level}"]) + prev.repeat(2, axis=1).repeat(2, axis=2)
        if fuse_type == "avg":
            prev = prev / 2
        expected[f"p{level}"] = conv(f"fpn_output{level}", prev)
    expected["p6"] = expected["p5"][:, ::2, ::2]
    for name, want in expected.items():
        np.testing.assert_allclose(np.asarray(out[name]), want, rtol=1e-4, atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------------------------
# mask head: chunking over slot counts that are not a multiple of the chunk; class-specific and
# class-agnostic masks


class _LinearMaskHead(nn.Module):
    """Logits ``[M, 2S, 2S, K]``: a per-pixel linear map, upsampled 2x by repetition."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], self.num_classes))
        return (x @ w).repeat(2, axis=1).repeat(2, axis=2)


class _ChunkedMasks(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, features, classes, valid):
        from detlayers.models.roi_heads.roi_heads import _mask_probs_of_valid_slots

        head = _LinearMaskHead(self.num_classes, name="head")
        return _mask_probs_of_valid_slots(head, features, classes, valid, initializing=self.is_initializing())


@pytest.mark.parametrize("num_classes", [3, 1], ids=["class-specific", "class-agnostic"])
def test_mask_head_chunks_and_class_channel(num_classes):
    from detlayers.models.roi_heads.roi_heads import MASK_HEAD_CHUNK

    d = MASK_HEAD_CHUNK + 3  # not a multiple of the chunk
    counts = (MASK_HEAD_CHUNK + 1, 3)  # image 0 needs two chunks, image 1 one
    rng = np.random.default_rng(8)
    features = rng.normal(size=(2, d, 2, 2, 5)).astype(np.float32)
    classes = rng.integers(0, 3, (2, d)).astype(np.int32)
    valid = np.arange(d)[None, :] < np.asarray(counts)[:, None]
    module = _ChunkedMasks(num_classes)
    variables = module.init(jax.random.key(0), features, classes, valid)
    probs = np.asarray(module.apply(variables, features, classes, valid))
    w = np.asarray(variables["params"]["head"]["w"], np.float64)
    logits = (features.astype(np.float64) @ w).repeat(2, axis=2).repeat(2, axis=3)  # [2, d, 4, 4, K]
    channel = classes if num_classes > 1 else np.zeros_like(classes)
    expected = 1 / (1 + np.exp(-np.take_along_axis(logits, channel[:, :, None, None, None], axis=-1)[..., 0]))
    assert probs.shape == (2, d, 4, 4)
    for i, count in enumerate(counts):
        np.testing.assert_allclose(probs[i, :count], expected[i, :count], rtol=1e-5, atol=1e-6)
    # chunks are shared by the batch: image 0's eleven valid slots make both chunks run for both
    # images, every one of the d slots included
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# detector_postprocess: boxes that become empty at the output size


def test_postprocess_drops_boxes_that_become_empty():
    from detlayers.models.postprocessing import detector_postprocess

    boxes = np.array([[[10, 10, 30, 40], [70, 5, 90, 20], [5, 85, 25, 100], [20, 20, 20.5, 30], [1, 2, 3, 4]]],
                     np.float32)
    valid = np.array([[True, True, True, True, False]])
    det = {"boxes": jnp.asarray(boxes), "scores": jnp.asarray([[0.9, 0.8, 0.7, 0.6, 0.5]]),
           "classes": jnp.asarray([[1, 2, 0, 1, 2]], jnp.int32), "valid": jnp.asarray(valid)}
    image_hw, output_hw = np.array([[80, 64]]), np.array([[40, 96]])  # sy = 0.5, sx = 1.5
    out = detector_postprocess(det, jnp.asarray(image_hw, jnp.int32), jnp.asarray(output_hw, jnp.int32), None)
    scaled = boxes[0].astype(np.float64) * [1.5, 0.5, 1.5, 0.5]
    clipped = _clip(scaled, 40, 96)
    keep = valid[0] & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    # box 1 lies right of x = 96 and box 2 below y = 40 after scaling: both become empty
    assert keep.tolist() == [True, False, False, True, False]
    k = int(keep.sum())
    assert int(out["num_instances"][0]) == k
    np.testing.assert_array_equal(np.asarray(out["valid"][0]), np.arange(5) < k)
    np.testing.assert_allclose(np.asarray(out["pred_boxes"][0, :k]), clipped[keep], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["scores"][0, :k]), np.float32([0.9, 0.6]))
    np.testing.assert_array_equal(np.asarray(out["pred_classes"][0]), [1, 1, -1, -1, -1])
