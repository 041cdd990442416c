"""Box and mask AP with pycocotools (the COCO reference implementation, not our own arithmetic).

Ground truth and predictions are converted to COCO's JSON structures in memory: boxes become
``[x, y, width, height]``, masks become COCO run-length encodings (``pycocotools.mask.encode``),
category ids are ``class + 1`` (COCO ids start at 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np

from detlayers.demo.data import CLASS_NAMES, Example


@dataclasses.dataclass
class Detections:
    """Predictions for one image (unpadded).

    ``boxes`` float [D, 4] (x1, y1, x2, y2); ``scores`` float [D]; ``classes`` int [D] in
    ``[0, NUM_CLASSES)``; ``masks`` bool [D, H, W] (image-sized, already pasted) or None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None


def _rle(masks: np.ndarray) -> list[dict]:
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    for e in encoded:  # json-friendly, as COCO files store it
        e["counts"] = e["counts"].decode("ascii")
    return encoded


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in boxes]


def coco_ground_truth(examples: list[Example]) -> dict:
    """The COCO dataset dict (``images``, ``annotations``, ``categories``) of ``examples``."""
    images, annotations = [], []
    for image_id, ex in enumerate(examples, start=1):
        h, w = ex.image.shape[:2]
        images.append(dict(id=image_id, height=h, width=w))
        for box, cls, rle, mask in zip(_xywh(ex.boxes), ex.classes, _rle(ex.masks), ex.masks):
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=int(cls) + 1,
                bbox=box, area=float(mask.sum()), segmentation=rle, iscrowd=0))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASS_NAMES)]
    return dict(images=images, annotations=annotations, categories=categories)


def coco_results(detections: list[Detections], with_masks: bool) -> list[dict]:
    """COCO result dicts, one per detection; image ids follow :func:`coco_ground_truth`."""
    results = []
    for image_id, det in enumerate(detections, start=1):
        rles = _rle(det.masks) if with_masks else [None] * len(det.scores)
        for box, score, cls, rle in zip(_xywh(det.boxes), det.scores, det.classes, rles):
            r = dict(image_id=image_id, category_id=int(cls) + 1, bbox=box, score=float(score))
            if with_masks:
                r["segmentation"] = rle
            results.append(r)
    return results


def coco_ap(examples: list[Example], detections: list[Detections],
            verbose: bool = False) -> dict[str, float]:
    """COCO AP of ``detections`` against ``examples``, as computed by ``pycocotools.COCOeval``.

    Returns ``box_AP`` (AP averaged over IoU 0.50:0.95), ``box_AP50``, ``box_AP75`` and, when the
    detections carry masks, ``mask_AP``, ``mask_AP50``, ``mask_AP75``; all in [0, 1].  With no
    detections at all every AP is 0.  ``verbose`` lets COCOeval print its usual summary.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(examples) != len(detections):
        raise ValueError(f"{len(examples)} images but {len(detections)} detection lists")
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO()
        gt.dataset = coco_ground_truth(examples)
        gt.createIndex()
    with_masks = all(d.masks is not None for d in detections)
    metrics: dict[str, float] = {}
    for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
        prefix = "box" if iou_type == "bbox" else "mask"
        results = coco_results(detections, with_masks=iou_type == "segm")
        if not results:  # COCO.loadRes refuses an empty list
            metrics.update({f"{prefix}_AP": 0.0, f"{prefix}_AP50": 0.0, f"{prefix}_AP75": 0.0})
            continue
        with quiet:
            if verbose:
                print(f"--- {prefix} ---")
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iouType=iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval writes -1 where a category has no ground truth at all; clamp for reporting
        ap, ap50, ap75 = (max(float(v), 0.0) for v in ev.stats[:3])
        metrics.update({f"{prefix}_AP": ap, f"{prefix}_AP50": ap50, f"{prefix}_AP75": ap75})
    return metrics
