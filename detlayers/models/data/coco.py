"""A COCO-format instances file as detectron2's dataset dicts (``data/datasets/coco.py``,
``load_coco_json``), read with pycocotools."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_coco_json"]


def load_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per image, in the file's image order:

    ``{"file_name": image_root/file, "height", "width", "image_id", "annotations": [{"bbox": [x1,
    y1, x2, y2] (XYXY_ABS, from COCO's XYWH), "category_id": contiguous id, "iscrowd",
    "segmentation": polygons (a list of flat ``[x, y, ...]`` lists) or RLE (a dict)}, ...]}``.

    Category ids are mapped to ``0 .. K-1`` in increasing COCO id order (detectron2's
    ``thing_dataset_id_to_contiguous_id``). Annotations without ``bbox`` or ``category_id`` are
    refused with ``ValueError`` naming the file and the annotation id.
    """
    from pycocotools.coco import COCO

    json_file = os.fspath(json_file)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(json_file)
    category_ids = sorted(coco.getCatIds())
    contiguous = {cid: i for i, cid in enumerate(category_ids)}
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        annotations = []
        for ann in coco.imgToAnns.get(image_id, []):
            if "bbox" not in ann or "category_id" not in ann:
                raise ValueError(f"load_coco_json: {json_file}: annotation {ann.get('id')} has no bbox or category_id")
            if ann["category_id"] not in contiguous:
                raise ValueError(f"load_coco_json: {json_file}: annotation {ann.get('id')} has category_id "
                                 f"{ann['category_id']}, not among the categories {category_ids}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            annotations.append({
                "bbox": [x, y, x + w, y + h], "category_id": contiguous[ann["category_id"]],
                "iscrowd": int(ann.get("iscrowd", 0)), "segmentation": ann.get("segmentation"),
            })
        records.append({
            "file_name": os.path.join(os.fspath(image_root), info["file_name"]),
            "height": int(info["height"]), "width": int(info["width"]), "image_id": image_id,
            "annotations": annotations,
        })
    return records
