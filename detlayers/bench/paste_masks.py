"""Benchmark: ``paste_masks_in_image`` vs detectron2's (``python -m detlayers.bench paste_masks``).

A COCO-sized inference step: 100 instances with 28 x 28 mask probabilities pasted onto an
800 x 1333 image, thresholded to bool and soft (uint8). The PyTorch side is detectron2's own
``paste_masks_in_image`` when detectron2 is importable (per-box ``grid_sample`` on CPU,
whole-image chunks on GPU); otherwise a short re-statement of the same algorithm in PyTorch
(below), so the table still has a baseline.  Measured tables: BENCHMARKS.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from detlayers.bench import Case

NUM_MASKS = 100
MASK_SIZE = 28
IMAGE_HW = (800, 1333)


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mask probabilities and boxes whose sizes spread like COCO detections (8 px to ~half the image)."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_HW
    logits = rng.standard_normal((NUM_MASKS, MASK_SIZE, MASK_SIZE)).astype(np.float32) * 3.0
    masks = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    sizes = np.exp(rng.uniform(np.log(8.0), np.log(0.6 * min(height, width)), (NUM_MASKS, 2)))
    corners = rng.uniform(0.0, 1.0, (NUM_MASKS, 2)) * (np.asarray([width, height]) - sizes)
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    return masks, boxes


def _torch_paste_fallback(torch: Any) -> Callable[..., Any]:
    """detectron2's algorithm restated: grid_sample each mask over its box's pixel window (CPU)
    or over the whole image (GPU), then threshold (or scale to uint8)."""
    functional = torch.nn.functional

    def paste(masks: Any, boxes: Any, image_hw: tuple[int, int], threshold: float) -> Any:
        height, width = image_hw
        on_cpu = masks.device.type == "cpu"
        out = torch.zeros(
            (len(masks), height, width), device=masks.device,
            dtype=torch.bool if threshold >= 0 else torch.uint8,
        )
        groups = torch.arange(len(masks)).split(1 if on_cpu else len(masks))
        for group in groups:
            box = boxes[group]
            if on_cpu:  # only the pixels around this box
                x_lo = int(max(box[:, 0].min().floor().item() - 1, 0))
                y_lo = int(max(box[:, 1].min().floor().item() - 1, 0))
                x_hi = int(min(box[:, 2].max().ceil().item() + 1, width))
                y_hi = int(min(box[:, 3].max().ceil().item() + 1, height))
            else:
                x_lo, y_lo, x_hi, y_hi = 0, 0, width, height
            ys = torch.arange(y_lo, y_hi, device=masks.device, dtype=torch.float32) + 0.5
            xs = torch.arange(x_lo, x_hi, device=masks.device, dtype=torch.float32) + 0.5
            ys = (ys - box[:, 1:2]) / (box[:, 3:4] - box[:, 1:2]) * 2 - 1
            xs = (xs - box[:, 0:1]) / (box[:, 2:3] - box[:, 0:1]) * 2 - 1
            grid = torch.stack(
                [xs[:, None, :].expand(-1, len(ys[0]), -1), ys[:, :, None].expand(-1, -1, len(xs[0]))], dim=3
            )
            values = functional.grid_sample(masks[group, None], grid, align_corners=False)[:, 0]
            values = values >= threshold if threshold >= 0 else (values * 255).to(torch.uint8)
            out[group, y_lo:y_hi, x_lo:x_hi] = values
        return out

    return paste


def _torch_reference() -> tuple[Any, Callable[..., Any]] | None:
    try:
        import torch
    except ImportError:
        return None
    try:
        from detectron2.layers.mask_ops import paste_masks_in_image as detectron2_paste
    except Exception:  # detectron2 absent or its import fails: use the restated algorithm
        detectron2_paste = _torch_paste_fallback(torch)
    return torch, detectron2_paste


def cases(platform: str) -> list[Case]:
    """The paste_masks rows (hard ``threshold=0.5`` -> bool and soft -> uint8 output) on the
    COCO-sized problem above; ``platform`` only picks the torch device."""
    from detlayers.mask_ops import paste_masks_in_image

    masks_np, boxes_np = _inputs()
    masks, boxes = jax.device_put(masks_np), jax.device_put(boxes_np)
    reference = _torch_reference()
    if reference is not None:
        torch, torch_paste = reference
        device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
        masks_t = torch.from_numpy(masks_np).to(device)
        boxes_t = torch.from_numpy(boxes_np).to(device)

    rows = []
    for threshold, label in ((0.5, "thr=0.5 -> bool"), (-1.0, "soft -> uint8")):
        ours_fn = jax.jit(functools.partial(paste_masks_in_image, image_shape=IMAGE_HW, threshold=threshold))
        name = f"paste_masks N={NUM_MASKS} M={MASK_SIZE} {IMAGE_HW[0]}x{IMAGE_HW[1]} {label}"
        torch_fn = None
        if reference is not None:
            torch_fn = functools.partial(torch_paste, masks_t, boxes_t, IMAGE_HW, threshold)
        rows.append(Case("paste_masks", name, functools.partial(ours_fn, masks, boxes), torch_fn))
    return rows
