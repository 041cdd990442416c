"""Box-detection parity with detectron2, shared by the RetinaNet and Faster R-CNN tests (imported as
``detection_parity``: pytest puts ``tests/`` on ``sys.path``).

A case (``tests/fixtures/<stem>.npz``, written by ``tools/fixtures/make_retinanet.py``) is
detectron2's output on a BATCH of photographs (``image_names``) at one ``MIN_SIZE_TEST``, over a zoo
config plus ``overrides``; instances of all images are concatenated (``num_instances`` per image).

Bounds are the Mask R-CNN test's: scores within 1e-4, boxes within 1e-2 px, instances matched by
class and box IoU; instances within ``SCORE_CUT_MARGIN`` of the score threshold or of a top-k
cut-off are left out (float32 differences may move them across the cut).
"""

from __future__ import annotations

import ast
import pathlib

import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SCORE_CUT_MARGIN = 1e-3
SCORE_ATOL = 1e-4
BOX_ATOL = 1e-2
FPN_RTOL = 1e-4
ROTATED_MATCH = 1.0  # rotated instances pair up when every coordinate is this close (px, degrees)
MASK_PROB_MARGIN = 1e-4  # mask pixels whose probability lies this close to 0.5 may flip with float32 rounding


def load_case(stem: str) -> dict:
    path = FIXTURES / f"{stem}.npz"
    if not path.is_file():
        pytest.skip(f"no {path.name}: generate it with tools/fixtures/make_retinanet.py (needs detectron2)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def overrides(case: dict) -> list:
    """The case's ``merge_from_list`` pairs with the values parsed (the fixture stores strings)."""
    items = [str(v) for v in case["overrides"]]
    return [v if i % 2 == 0 else ast.literal_eval(v) for i, v in enumerate(items)]


def weights_kwargs(case: dict) -> dict:
    """The synthetic-weights generator's extra arguments of the case."""
    pairs = (str(item).split("=", 1) for item in case["weights_kwargs"])
    return {name: ast.literal_eval(value) for name, value in pairs}


def photo_bgr(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(getattr(skimage_data, name)()[..., ::-1])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def rotated_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[A, B]`` largest coordinate difference between rotated boxes ``(xc, yc, w, h, angle)``:
    pixels for the first four, degrees (wrapped into ``[-180, 180)``) for the angle."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sides = np.abs(a[:, None, :4] - b[None, :, :4]).max(axis=-1)
    angle = np.abs((a[:, None, 4] - b[None, :, 4] + 180.0) % 360.0 - 180.0)
    return np.maximum(sides, angle)


def _near_cut(scores: np.ndarray, score_thresh: float, topk: int, next_score: float = -1.0) -> np.ndarray:
    near = scores < score_thresh + SCORE_CUT_MARGIN
    if len(scores) >= topk:
        near |= scores < scores[-1] + SCORE_CUT_MARGIN
    if next_score >= 0:
        near |= scores < next_score + SCORE_CUT_MARGIN
    return near


def _match(ref_boxes, ref_classes, boxes, classes) -> np.ndarray:
    """For each reference instance the same-class instance with the highest box IoU (> 0.5), or -1;
    rotated boxes ``[.., 5]``: the nearest same-class one within ``ROTATED_MATCH`` (pixels and
    degrees, :func:`rotated_distance`)."""
    if len(boxes) == 0:
        return np.full(len(ref_boxes), -1)
    if ref_boxes.shape[-1] == 5:
        distance = rotated_distance(ref_boxes, boxes)
        distance[ref_classes[:, None] != classes[None, :]] = np.inf
        best = distance.argmin(axis=1)
        return np.where(distance[np.arange(len(ref_boxes)), best] < ROTATED_MATCH, best, -1)
    iou = box_iou(ref_boxes, boxes)
    iou[ref_classes[:, None] != classes[None, :]] = 0
    best = iou.argmax(axis=1)
    return np.where(iou[np.arange(len(ref_boxes)), best] > 0.5, best, -1)


def _masks_agree(ref: dict, ours: dict, i: int, j: int) -> None:
    """detectron2's mask ``i`` and our mask ``j`` agree (IoU >= 0.99) on the pixels rounding cannot flip."""
    a, b = ref["pred_masks"][i], ours["pred_masks"][j]
    if "ambiguous" in ours:
        # Pixels that float32 rounding of the probability may flip (pasted into our box or into
        # detectron2's), and pixels that flip when our mask is pasted into detectron2's box instead
        # of ours (the boxes agree within BOX_ATOL, which moves the edge of a tiny mask by a pixel).
        at_ref_box = ours["paste_at"](j, ref["pred_boxes"][i])
        flips = (at_ref_box >= 0.5) != b
        certain = ~(ours["ambiguous"][j] | (np.abs(at_ref_box - 0.5) < MASK_PROB_MARGIN) | flips)
        assert (np.logical_or(a, b) & certain).sum() >= 0.5 * np.logical_or(a, b).sum()
        a, b = a & certain, b & certain
    union = np.logical_or(a, b).sum()
    iou = np.logical_and(a, b).sum() / union if union else 1.0
    assert iou >= 0.99, f"mask IoU {iou:.4f} of instance {i}"


def compare_instances(ref: dict, ours: dict, score_thresh: float, topk: int, next_score: float = -1.0) -> int:
    """Asserts detectron2's instances (``ref``: ``pred_boxes``, ``scores``, ``pred_classes`` and, when
    both have them, ``pred_masks``) and ours agree both ways; returns how many were compared.
    ``ours`` may carry ``ambiguous`` (pixels within ``MASK_PROB_MARGIN`` of 0.5) and ``paste_at(j, box)``
    (our mask ``j`` pasted into another box) to leave rounding-sensitive pixels out."""
    checked = 0
    for first, second, first_name in ((ref, ours, "detectron2"), (ours, ref, "detlayers")):
        near = _near_cut(first["scores"], score_thresh, topk, next_score)
        match = _match(first["pred_boxes"], first["pred_classes"], second["pred_boxes"], second["pred_classes"])
        for i in np.nonzero(~near)[0]:
            j = match[i]
            assert j >= 0, (f"{first_name} instance {i} (class {first['pred_classes'][i]}, score "
                            f"{first['scores'][i]:.6f}, box {first['pred_boxes'][i]}) has no counterpart")
            if first is ref:
                np.testing.assert_allclose(second["pred_boxes"][j], first["pred_boxes"][i], atol=BOX_ATOL, rtol=0,
                                           err_msg=f"box of instance {i}")
                np.testing.assert_allclose(second["scores"][j], first["scores"][i], atol=SCORE_ATOL, rtol=0,
                                           err_msg=f"score of instance {i}")
                if "pred_masks" in first and "pred_masks" in second:
                    _masks_agree(first, second, i, j)
                checked += 1
    return checked


def check_fpn_levels(out: dict, case: dict, levels) -> None:
    """The case's stored FPN channels of ``levels``: relative error (max over the level) <= ``FPN_RTOL``."""
    for level in levels:
        ours, ref = out[level][..., case["fpn_channels"]], case[level]
        assert ours.shape == ref.shape, level
        error = np.abs(ours - ref).max() / np.abs(ref).max()
        assert error <= FPN_RTOL, f"{level}: relative error {error:.2e}"


def check_fpn_and_proposals(out: dict, case: dict) -> None:
    """One image's stored FPN channels (relative error <= ``FPN_RTOL``) and RPN proposals
    (:func:`check_proposals`)."""
    check_fpn_levels(out, case, ("p2", "p3", "p4", "p5", "p6"))
    check_proposals(out, case["proposal_boxes"], case["proposal_logits"])


def check_proposals(out: dict, ref_boxes: np.ndarray, ref_logits: np.ndarray, image: int = 0) -> None:
    """Image ``image``'s RPN proposals against detectron2's ``ref_boxes``/``ref_logits``: the same
    count within 2, and each of detectron2's proposals among ours (IoU > 0.999, or for rotated
    boxes every coordinate within ``BOX_ATOL`` plus 1e-4 of the box's largest, the angle within
    ``BOX_ATOL`` degrees; logit within 1e-3 relative; a proposal whose logit nearly ties with
    another may swap places with it, so 99%)."""
    valid = out["proposal_valid"][image]
    boxes, logits = out["proposal_boxes"][image][valid], out["proposal_logits"][image][valid]
    assert abs(len(boxes) - len(ref_boxes)) <= 2, (len(boxes), len(ref_boxes))
    if ref_boxes.shape[-1] == 5:  # rotated: every coordinate within BOX_ATOL (+1e-4 relative), angle in degrees
        tolerance = BOX_ATOL + 1e-4 * np.abs(ref_boxes[:, :4]).max(axis=1)
        close = np.abs(ref_boxes[:, None, :4] - boxes[None, :, :4]).max(axis=-1) <= tolerance[:, None]
        angle = np.abs((ref_boxes[:, None, 4] - boxes[None, :, 4] + 180.0) % 360.0 - 180.0)
        iou = (close & (angle <= BOX_ATOL)).astype(np.float64)
    else:
        iou = box_iou(ref_boxes, boxes)
    best = iou.argmax(axis=1)
    found = (iou[np.arange(len(ref_boxes)), best] > 0.999) & (
        np.abs(logits[best] - ref_logits) <= 1e-3 * np.maximum(1.0, np.abs(ref_logits))
    )
    assert found.mean() >= 0.99, f"only {found.mean():.4f} of detectron2's proposals found"


def check_case(predictor, case: dict, fpn_levels: tuple[str, ...] = ()) -> list[int]:
    """Runs ``predictor`` on the case's photographs as ONE batch and compares with detectron2: the
    stored FPN channels of ``fpn_levels`` (relative error <= ``FPN_RTOL``) and every image's
    instances. Returns the number of instances compared per image."""
    images = [photo_bgr(str(name)) for name in case["image_names"]]
    assert [im.shape[:2] for im in images] == [tuple(hw) for hw in case["image_hw"]]
    batch, image_hw, original_hw, _ = predictor.inputs(images)
    np.testing.assert_array_equal(image_hw, case["input_hw"])
    assert tuple(batch.shape[1:3]) == tuple(case["padded_hw"])
    out = jax.device_get(predictor.run(batch, image_hw, original_hw, None, return_intermediates=bool(fpn_levels)))
    check_fpn_levels(out, case, fpn_levels)
    return check_instances(out, case)


def check_instances(out: dict, case: dict) -> list[int]:
    """Every image's instances of ``out`` (a batch) against the case's (concatenated, with
    ``num_instances``, ``score_thresh``, ``topk`` and ``next_score``): valid slots first, sorted,
    above the threshold, and :func:`compare_instances` both ways. Returns the number compared per
    image."""
    topk = int(case["topk"])
    assert out["pred_boxes"].shape[1] <= topk
    starts = np.concatenate([[0], np.cumsum(case["num_instances"])])
    checked = []
    for i in range(len(case["num_instances"])):
        k = int(out["num_instances"][i])
        valid = out["valid"][i]
        assert valid[:k].all() and not valid[k:].any(), "valid slots must come first"
        ours = {"pred_boxes": out["pred_boxes"][i, :k], "scores": out["scores"][i, :k],
                "pred_classes": out["pred_classes"][i, :k].astype(np.int64)}
        assert np.all(np.diff(ours["scores"]) <= 0), "instances are not sorted by score"
        # the comparison leaves out instances near the threshold: none may lie at or below it
        assert np.all(ours["scores"] > float(case["score_thresh"])), "an instance at or below the score threshold"
        ref = {key: case[key][starts[i]:starts[i + 1]] for key in ("pred_boxes", "scores", "pred_classes")}
        checked.append(compare_instances(ref, ours, float(case["score_thresh"]), topk, float(case["next_score"][i])))
        assert checked[-1] >= min(10, len(ref["scores"]) // 2), f"image {i}: only {checked[-1]} instances compared"
    return checked
