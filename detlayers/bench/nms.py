"""NMS benchmarks: our custom call (C++ on CPU, CUDA on GPU) vs torchvision's nms / batched_nms.

Boxes are clustered (about 25 boxes per object, like detector proposals before NMS) with distinct
random scores; IoU threshold 0.5 (0.7 for the RPN-sized case). Both sides get the same arrays on
the same device; our time includes the score sort (XLA) and mapping back to input positions, as
torchvision's includes its sort.
"""

from __future__ import annotations

import functools
import importlib

import jax
import numpy as np

from detlayers.bench import Case


def clustered_boxes(n: int, seed: int = 0, extent: float = 1333.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 ``(x1, y1, x2, y2)`` boxes in ``~[0, extent]^2`` clustered about ``n // 25`` centres
    (sides 8-96 px) and float32 ``[n]`` scores, a permutation of ``k / n`` (distinct, no ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, extent, (max(1, n // 25), 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 12.0, (n, 2))
    wh = rng.uniform(8.0, 96.0, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n
    return boxes, scores


def _torch(device: str):
    try:
        import torch
        import torchvision
    except ImportError:
        return None, None
    if device == "cuda" and not torch.cuda.is_available():
        return None, None
    return torch, torchvision


def cases(platform: str) -> list[Case]:
    """The NMS rows for ``platform`` (``"cpu"`` or ``"gpu"``): nms at several N, batched_nms,
    vmapped nms over a batch of images, and nms_rotated (ours only); ``torch`` is None when
    torch/torchvision (or CUDA, on ``"gpu"``) is unavailable."""
    nms_mod = importlib.import_module("detlayers.nms")
    device = "cuda" if platform == "gpu" else "cpu"
    torch, torchvision = _torch(device)
    out: list[Case] = []
    sizes = (1_000, 5_000, 20_000) if platform == "cpu" else (1_000, 5_000, 20_000, 100_000)

    for n in sizes:
        thr = 0.5
        boxes, scores = clustered_boxes(n, seed=n)
        fn = jax.jit(functools.partial(nms_mod.nms, iou_threshold=thr))
        b, s = jax.device_put(boxes), jax.device_put(scores)
        torch_fn = None
        if torch is not None:
            tb, ts = torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device)
            torch_fn = functools.partial(torchvision.ops.nms, tb, ts, thr)
        out.append(Case("nms", f"nms N={n} iou={thr}", functools.partial(fn, b, s), torch_fn))

    for n, classes in ((5_000, 20), (20_000, 80)):
        thr = 0.5
        boxes, scores = clustered_boxes(n, seed=n + 1)
        idxs = np.random.default_rng(n).integers(0, classes, n).astype(np.int32)
        fn = jax.jit(functools.partial(nms_mod.batched_nms, iou_threshold=thr))
        b, s, i = jax.device_put(boxes), jax.device_put(scores), jax.device_put(idxs)
        torch_fn = None
        if torch is not None:
            tb, ts = torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device)
            ti = torch.from_numpy(idxs).to(device)
            torch_fn = functools.partial(torchvision.ops.batched_nms, tb, ts, ti, thr)
        out.append(Case("nms", f"batched_nms N={n} classes={classes}", functools.partial(fn, b, s, i), torch_fn))

    # a batch of images: one vmapped call vs torchvision's batched_nms keyed by image index
    images, n, thr = 8, 5_000, 0.7
    per_image = [clustered_boxes(n, seed=100 + k) for k in range(images)]
    boxes = np.stack([p[0] for p in per_image])
    scores = np.stack([p[1] for p in per_image])
    fn = jax.jit(jax.vmap(functools.partial(nms_mod.nms, iou_threshold=thr, max_output_size=1000)))
    b, s = jax.device_put(boxes), jax.device_put(scores)
    torch_fn = None
    if torch is not None:
        tb = torch.from_numpy(boxes.reshape(-1, 4)).to(device)
        ts = torch.from_numpy(scores.reshape(-1)).to(device)
        ti = torch.arange(images, device=device).repeat_interleave(n)
        torch_fn = functools.partial(torchvision.ops.batched_nms, tb, ts, ti, thr)
    out.append(Case("nms", f"vmap nms {images} images x {n} (torch: batched_nms)", functools.partial(fn, b, s),
                    torch_fn))

    # rotated: detectron2 is not a dependency, so ours only; the pure-XLA path (TPU) as well, up
    # to 200k boxes in one image (timed once: minutes on a CPU)
    for n in (2_000, 20_000, 200_000):
        rboxes, rscores = clustered_rotated_boxes(n)
        for backend in ("auto", "xla"):
            fn = jax.jit(functools.partial(nms_mod.nms_rotated, iou_threshold=0.5, backend=backend))
            label = "" if backend == "auto" else " pure-XLA"
            repeats = dict(warmup=1, min_repeats=1) if n > 20_000 else {}
            out.append(
                Case("nms", f"nms_rotated{label} N={n} (no torch counterpart)",
                     functools.partial(fn, jax.device_put(rboxes), jax.device_put(rscores)), None, **repeats)
            )
    return out


def clustered_rotated_boxes(n: int, seed: int = 7, extent: float = 1333.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 rotated boxes ``(xc, yc, w, h, angle)`` clustered like :func:`clustered_boxes`
    (centres ``~12`` px about ``n // 25`` points, sides 8-96 px, any angle) and distinct scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, extent, (n // 25, 2))
    xy = centres[rng.integers(0, n // 25, n)] + rng.normal(0, 12, (n, 2))
    boxes = np.concatenate([xy, rng.uniform(8, 96, (n, 2)), rng.uniform(-180, 180, (n, 1))], 1)
    return boxes.astype(np.float32), rng.permutation(n).astype(np.float32)
