"""Training batches (detectron2's ``DatasetMapper`` + ``TrainingSampler`` + batching), with the
static shapes a compiled step needs.

* Order: an endless stream of examples, reshuffled every epoch from ``seed``; the example at
  global position ``p`` (step ``s`` reads positions ``s * B ... s * B + B - 1``) and its
  augmentation depend only on ``(seed, p)``, so a resumed run sees exactly the batches an
  uninterrupted one would, on any number of processes.
* Mapping: ``INPUT.FORMAT`` image, ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN,
  MIN_SIZE_TRAIN_SAMPLING)``, ``RandomFlip(INPUT.RANDOM_FLIP)``, boxes and masks transformed
  alike (polygons are transformed and then rasterised, RLE masks resized with nearest, as
  detectron2 does), crowd annotations dropped, boxes clipped and empty ones removed.
* Static shapes: images are normalised (``MODEL.PIXEL_MEAN``/``PIXEL_STD``) and zero-padded to
  a bucket: the batch's largest height and width rounded up to a multiple of ``bucket`` (itself a
  multiple of ``SIZE_DIVISIBILITY``), so the step compiles once per bucket; ground truth is padded
  to ``max_gt`` rows with ``gt_valid``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from detlayers._prefetch import prefetched
from detlayers.models.data.transforms import (
    Geometry,
    RandomFlip,
    ResizeShortestEdge,
    flip_array,
    resize_image,
    resize_mask,
    transform_boxes,
)

__all__ = ["DatasetMapper", "TrainingBatches", "build_training_batches"]


def read_image(path: str, image_format: str) -> np.ndarray:
    """``uint8[H, W, 3]`` in ``image_format`` (``"BGR"``/``"RGB"``) channel order, EXIF
    orientation applied (detectron2's ``read_image``)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1]) if image_format == "BGR" else rgb


def _polygon_mask(polygons: Sequence[Sequence[float]], source_hw: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """Polygons (flat ``[x, y, ...]`` lists in source pixels) transformed, then rasterised at the
    output size with pycocotools (detectron2's ``PolygonMasks`` -> bitmask)."""
    from pycocotools import mask as mask_util

    sy, sx = geometry.height / source_hw[0], geometry.width / source_hw[1]
    moved = []
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2) * np.array([sx, sy])
        if geometry.flip == "horizontal":
            xy[:, 0] = geometry.width - xy[:, 0]
        elif geometry.flip == "vertical":
            xy[:, 1] = geometry.height - xy[:, 1]
        moved.append(xy.reshape(-1).tolist())
    rles = mask_util.frPyObjects(moved, geometry.height, geometry.width)
    return mask_util.decode(mask_util.merge(rles)).astype(np.uint8)


def _rle_mask(segmentation: dict, source_hw: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """An RLE mask (compressed or not) at the source size, resized with nearest, then mirrored."""
    from pycocotools import mask as mask_util

    rle = segmentation
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(rle, *rle["size"])
    mask = mask_util.decode(rle).astype(np.uint8)
    if mask.shape != tuple(source_hw):
        raise ValueError(f"DatasetMapper: an RLE mask of size {mask.shape} on an image of size {tuple(source_hw)}")
    return flip_array(resize_mask(mask, geometry.height, geometry.width), geometry.flip)


@dataclasses.dataclass(frozen=True)
class DatasetMapper:
    """detectron2's training ``DatasetMapper``: a record -> a normalised image and its instances.

    :meth:`geometry` draws the augmentation (no image read); :meth:`__call__` applies it and
    returns ``image float32[h, w, 3]`` (normalised), ``boxes float32[K, 4]`` XYXY,
    ``classes int32[K]`` and, with ``mask_on``, ``masks uint8[K, h, w]``.
    """

    resize: ResizeShortestEdge
    flip: RandomFlip
    image_format: str = "BGR"
    pixel_mean: tuple[float, ...] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    mask_on: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> DatasetMapper:
        """``INPUT.*`` augmentation and format, ``MODEL.PIXEL_MEAN``/``PIXEL_STD``, ``MODEL.MASK_ON``."""
        inp = cfg.INPUT
        if inp.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"DatasetMapper: INPUT.FORMAT must be 'BGR' or 'RGB', got {inp.FORMAT!r}")
        if len(cfg.MODEL.PIXEL_MEAN) != 3 or len(cfg.MODEL.PIXEL_STD) != 3:
            raise ValueError(f"DatasetMapper: MODEL.PIXEL_MEAN/PIXEL_STD need 3 values, got "
                             f"{cfg.MODEL.PIXEL_MEAN} / {cfg.MODEL.PIXEL_STD}")
        return cls(resize=ResizeShortestEdge(tuple(inp.MIN_SIZE_TRAIN), int(inp.MAX_SIZE_TRAIN),
                                             inp.MIN_SIZE_TRAIN_SAMPLING),
                   flip=RandomFlip(inp.RANDOM_FLIP), image_format=inp.FORMAT,
                   pixel_mean=tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN),
                   pixel_std=tuple(float(v) for v in cfg.MODEL.PIXEL_STD), mask_on=bool(cfg.MODEL.MASK_ON))

    def geometry(self, record: dict, rng: np.random.Generator) -> Geometry:
        """The resize (drawn first, as detectron2's augmentation list runs) and the flip."""
        height, width = self.resize.output_shape(rng, int(record["height"]), int(record["width"]))
        return Geometry(height, width, self.flip.draw(rng))

    def __call__(self, record: dict, geometry: Geometry) -> dict[str, np.ndarray]:
        image = read_image(record["file_name"], self.image_format)
        source_hw = (int(record["height"]), int(record["width"]))
        if image.shape[:2] != source_hw:
            raise ValueError(f"DatasetMapper: {record['file_name']} is {image.shape[1]}x{image.shape[0]} (WxH), "
                             f"its record says {source_hw[1]}x{source_hw[0]}")
        image = flip_array(resize_image(image, geometry.height, geometry.width), geometry.flip)
        image = (image.astype(np.float32) - np.float32(self.pixel_mean)) / np.float32(self.pixel_std)
        annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        boxes = transform_boxes(np.array([a["bbox"] for a in annotations], np.float64).reshape(-1, 4), source_hw,
                                geometry)
        classes = np.array([a["category_id"] for a in annotations], np.int32)
        # detectron2's filter_empty_instances: boxes with no area after clipping are dropped
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        out = {"image": image, "boxes": boxes[keep], "classes": classes[keep]}
        if self.mask_on:
            masks = []
            for ann, kept in zip(annotations, keep):
                if not kept:
                    continue
                seg = ann.get("segmentation")
                if isinstance(seg, list):
                    masks.append(_polygon_mask(seg, source_hw, geometry))
                elif isinstance(seg, dict):
                    masks.append(_rle_mask(seg, source_hw, geometry))
                else:
                    raise ValueError(f"DatasetMapper: MODEL.MASK_ON needs a segmentation (polygons or RLE) on "
                                     f"every annotation; {record['file_name']} has one without")
            out["masks"] = np.stack(masks) if masks else np.zeros((0, geometry.height, geometry.width), np.uint8)
        return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class TrainingBatches:
    """Global batches of ``global_batch`` examples from ``records`` (see the module docstring).

    Args:
      records: dataset dicts (:func:`detlayers.models.data.load_coco_json`), at least one.
      mapper: the :class:`DatasetMapper`.
      global_batch: ``SOLVER.IMS_PER_BATCH``.
      seed: the order's and augmentation's seed.
      bucket: padded heights and widths are multiples of it (a positive multiple of
        ``size_divisibility``).
      max_gt: ground-truth rows per image; an image with more instances raises ``ValueError``.
      size_divisibility: the backbone's (``32`` for FPN, ``MODEL`` side).
      shuffle: reshuffle every epoch (False: the records' order, repeated).
    """

    def __init__(self, records: Sequence[dict], mapper: DatasetMapper, *, global_batch: int, seed: int,
                 bucket: int, max_gt: int, size_divisibility: int = 32, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("TrainingBatches: no training records (is every image's annotation list empty?)")
        if global_batch < 1:
            raise ValueError(f"TrainingBatches: SOLVER.IMS_PER_BATCH must be positive, got {global_batch}")
        divisibility = max(int(size_divisibility), 1)
        if bucket < 1 or bucket % divisibility:
            raise ValueError(f"TrainingBatches: bucket must be a positive multiple of the size divisibility "
                             f"{divisibility}, got {bucket}")
        if max_gt < 1:
            raise ValueError(f"TrainingBatches: max_gt must be positive, got {max_gt}")
        self.records = list(records)
        self.mapper = mapper
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.bucket = int(bucket)
        self.max_gt = int(max_gt)
        self.shuffle = shuffle
        self._epoch_orders: dict[int, np.ndarray] = {}

    def _record_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.records))
        if not self.shuffle:
            return offset
        if epoch not in self._epoch_orders:
            self._epoch_orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.records))}
        return int(self._epoch_orders[epoch][offset])

    def _plan(self, position: int) -> tuple[dict, Geometry]:
        record = self.records[self._record_index(position)]
        # the augmentation of position p: its own stream, independent of which process reads it
        return record, self.mapper.geometry(record, np.random.default_rng([self.seed, position, 1]))

    def bucket_shape(self, step: int) -> tuple[int, int]:
        """The padded ``(H, W)`` of step ``step``'s batch (from the planned sizes of every image of
        the global batch, so every process pads to the same shape without reading images)."""
        plans = [self._plan(step * self.global_batch + i)[1] for i in range(self.global_batch)]
        return (_round_up(max(g.height for g in plans), self.bucket),
                _round_up(max(g.width for g in plans), self.bucket))

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """``rows`` (default all) of step ``step``'s global batch, as the training call takes it:
        ``images float32[n, H, W, 3]``, ``image_hw int32[n, 2]``, ``gt_boxes float32[n, G, 4]``,
        ``gt_classes int32[n, G]``, ``gt_masks uint8[n, G, H, W]`` (``[n, G, 1, 1]`` zeros
        without masks), ``gt_valid bool[n, G]``."""
        height, width = self.bucket_shape(step)
        indices = range(self.global_batch)[rows if rows is not None else slice(None)]
        n, g = len(indices), self.max_gt
        mask_hw = (height, width) if self.mapper.mask_on else (1, 1)
        out = {
            "images": np.zeros((n, height, width, 3), np.float32), "image_hw": np.zeros((n, 2), np.int32),
            "gt_boxes": np.zeros((n, g, 4), np.float32), "gt_classes": np.zeros((n, g), np.int32),
            "gt_masks": np.zeros((n, g) + mask_hw, np.uint8), "gt_valid": np.zeros((n, g), bool),
        }
        for row, i in enumerate(indices):
            record, geometry = self._plan(step * self.global_batch + i)
            example = self.mapper(record, geometry)
            h, w = example["image"].shape[:2]
            k = len(example["classes"])
            if k > g:
                raise ValueError(f"TrainingBatches: {record['file_name']} has {k} instances, more than the "
                                 f"max_gt={g} ground-truth rows per image (raise --max-gt-per-image)")
            out["images"][row, :h, :w] = example["image"]
            out["image_hw"][row] = (h, w)
            out["gt_boxes"][row, :k] = example["boxes"]
            out["gt_classes"][row, :k] = example["classes"]
            out["gt_valid"][row, :k] = True
            if self.mapper.mask_on:
                out["gt_masks"][row, :k, :h, :w] = example["masks"]
        return out

    def stream(self, first_step: int, rows: slice | None = None, prefetch: int = 2
               ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Endless ``(step, batch)`` from ``first_step`` on, made in a background thread."""
        return prefetched(lambda step: self.batch(step, rows), first_step, depth=prefetch)


def build_training_batches(cfg: Any, *, seed: int, bucket: int, max_gt: int,
                           size_divisibility: int = 32) -> TrainingBatches:
    """The batches of ``cfg.DATASETS.TRAIN`` (registered names, concatenated in order), with images
    that have no non-crowd annotation dropped when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``;
    ``size_divisibility`` is the backbone's (detectron2's ``backbone.size_divisibility``)."""
    from detlayers.models.data.catalog import get_dataset_dicts

    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("build_training_batches: DATASETS.TRAIN names no dataset")
    records = [r for name in names for r in get_dataset_dicts(name)]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        records = [r for r in records if any(not a.get("iscrowd", 0) for a in r["annotations"])]
    return TrainingBatches(records, DatasetMapper.from_config(cfg), global_batch=int(cfg.SOLVER.IMS_PER_BATCH),
                           seed=seed, bucket=bucket, max_gt=max_gt, size_divisibility=size_divisibility)
