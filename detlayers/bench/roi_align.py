"""ROIAlign benchmarks: detlayers (NHWC) vs ``torchvision.ops.roi_align`` (NCHW, its native layout).

CPU: features ``2 x 256 x 100 x 168`` (a stride-4 level of an 400 x 672 image), 512 ROIs with
log-uniform sides from 16 px to 60 % of the image (spatial_scale 1/4), outputs 7x7 and 14x14,
sampling_ratio 0 (adaptive, detectron2's default) and 2; forward, and forward + feature gradient
(both return the output and the gradient for a fixed random upstream gradient).
Also on CPU: ``roi_align_rotated`` on the same boxes with random angles vs detectron2's
``ROIAlignRotated`` (skipped for torch when detectron2 is not installed).
GPU: an FPN pyramid (strides 4..32 of an 800 x 1216 image, batch 2, 256 channels) with 1000 ROIs,
250 per level sized for that level, vs torchvision's CUDA kernel.

Design notes and the alternatives measured while choosing: docs/design/roi_align.md; results:
BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np

from detlayers.bench import Case


def _boxes(rng: np.random.Generator, num: int, batch: int, img_h: float, img_w: float,
           lo: float, hi_w: float, hi_h: float) -> np.ndarray:
    """``(b, x1, y1, x2, y2)``, log-uniform sides in ``[lo, hi]`` pixels, clipped to the image."""
    cx, cy = rng.uniform(0, img_w, num), rng.uniform(0, img_h, num)
    bw = np.exp(rng.uniform(np.log(lo), np.log(hi_w), num))
    bh = np.exp(rng.uniform(np.log(lo), np.log(hi_h), num))
    return np.stack([
        rng.integers(0, batch, num), np.clip(cx - bw / 2, 0, img_w), np.clip(cy - bh / 2, 0, img_h),
        np.clip(cx + bw / 2, 0, img_w), np.clip(cy + bh / 2, 0, img_h),
    ], 1).astype(np.float32)


def _torch_pair(feature_sets, rois_sets, scales, size, ratio, device):
    """Zero-arg torchvision callables (forward; forward + backward) over one or more levels."""
    try:
        import torch
        from torchvision.ops import roi_align as tv_roi_align
    except ImportError:
        return None, None
    if device == "cuda" and not torch.cuda.is_available():
        return None, None
    feats = [torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).to(device) for f in feature_sets]
    leaves = [f.clone().requires_grad_(True) for f in feats]
    boxes = [torch.from_numpy(r).to(device) for r in rois_sets]
    upstream = [torch.from_numpy(np.random.default_rng(1).standard_normal(
        (len(r), feats[0].shape[1], size, size)).astype(np.float32)).to(device) for r in rois_sets]

    def forward():
        return [tv_roi_align(f, b, size, s, ratio, True) for f, b, s in zip(feats, boxes, scales)]

    def forward_backward():
        outs = []
        for leaf, b, s, g in zip(leaves, boxes, scales, upstream):
            leaf.grad = None
            out = tv_roi_align(leaf, b, size, s, ratio, True)
            out.backward(g)
            outs.append((out, leaf.grad))
        return outs

    return forward, forward_backward


def _ours_pair(feature_sets, rois_sets, scales, size, ratio):
    import jax
    import jax.numpy as jnp

    from detlayers.roi_align import roi_align

    feats = [jnp.asarray(f) for f in feature_sets]
    boxes = [jnp.asarray(r) for r in rois_sets]
    upstream = [
        jnp.asarray(np.random.default_rng(1).standard_normal(
            (len(r), size, size, f.shape[-1])).astype(np.float32))
        for f, r in zip(feature_sets, rois_sets)
    ]

    @jax.jit
    def forward(feats, boxes):
        return [roi_align(f, b, size, s, ratio, True) for f, b, s in zip(feats, boxes, scales)]

    @jax.jit
    def forward_backward(feats, boxes, upstream):
        outs = []
        for f, b, s, g in zip(feats, boxes, scales, upstream):
            out, vjp = jax.vjp(lambda x, b=b, s=s: roi_align(x, b, size, s, ratio, True), f)
            outs.append((out, vjp(g)[0]))
        return outs

    return (lambda: forward(feats, boxes)), (lambda: forward_backward(feats, boxes, upstream))


def _rotated_cases(feature_sets, rois_sets, scales, size, ratio, label) -> list[Case]:
    """detlayers vs detectron2's ROIAlignRotated (CPU kernel; torch=None when not installed)."""
    import jax
    import jax.numpy as jnp

    from detlayers.roi_align_rotated import roi_align_rotated

    features, boxes, scale = feature_sets[0], rois_sets[0], scales[0]
    # The axis-aligned boxes turned into rotated ones with random angles.
    rng = np.random.default_rng(2)
    rotated = np.stack([
        boxes[:, 0], (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 2] + boxes[:, 4]) / 2,
        boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2], rng.uniform(-180, 180, len(boxes)),
    ], 1).astype(np.float32)
    upstream = np.random.default_rng(1).standard_normal(
        (len(boxes), size, size, features.shape[-1])).astype(np.float32)
    f_j, r_j, g_j = jnp.asarray(features), jnp.asarray(rotated), jnp.asarray(upstream)

    @jax.jit
    def forward(f, r):
        return roi_align_rotated(f, r, size, scale, ratio)

    @jax.jit
    def forward_backward(f, r, g):
        out, vjp = jax.vjp(lambda x: roi_align_rotated(x, r, size, scale, ratio), f)
        return out, vjp(g)[0]

    torch_f = torch_fb = None
    try:
        import torch
        from detectron2.layers import ROIAlignRotated
    except ImportError:
        pass
    else:
        op = ROIAlignRotated((size, size), scale, ratio)
        x = torch.from_numpy(features.transpose(0, 3, 1, 2).copy())
        leaf = x.clone().requires_grad_(True)
        r_t = torch.from_numpy(rotated)
        g_t = torch.from_numpy(upstream.transpose(0, 3, 1, 2).copy())

        def torch_f():
            return op(x, r_t)

        def torch_fb():
            leaf.grad = None
            out = op(leaf, r_t)
            out.backward(g_t)
            return out, leaf.grad

    name = f"roi_align_rotated {label} {size}x{size} s={ratio}"
    return [
        Case("roi_align", f"{name} fwd", lambda: forward(f_j, r_j), torch_f),
        Case("roi_align", f"{name} fwd+bwd", lambda: forward_backward(f_j, r_j, g_j), torch_fb),
    ]


def cases(platform: str) -> list[Case]:
    rng = np.random.default_rng(0)
    result: list[Case] = []
    if platform == "gpu":
        batch, channels, img_h, img_w = 2, 256, 800, 1216
        strides = (4, 8, 16, 32)
        feature_sets, rois_sets, scales = [], [], []
        for level, stride in enumerate(strides):
            feature_sets.append(rng.standard_normal(
                (batch, img_h // stride, img_w // stride, channels)).astype(np.float32))
            # detectron2's level assignment: canonical box 224 px at level 4 (stride 16).
            lo, hi = 224 * 2.0 ** (level - 3), 224 * 2.0 ** (level - 2)
            rois_sets.append(_boxes(rng, 250, batch, img_h, img_w, lo, hi, hi))
            scales.append(1.0 / stride)
        device = "cuda"
        label = "FPN 4 levels 2x256x(200x304..25x38) 1000 rois"
    else:
        batch, channels, height, width = 2, 256, 100, 168
        feature_sets = [rng.standard_normal((batch, height, width, channels)).astype(np.float32)]
        rois_sets = [_boxes(rng, 512, batch, height * 4, width * 4, 16, 0.6 * width * 4,
                            0.6 * height * 4)]
        scales = [0.25]
        device = "cpu"
        label = "2x256x100x168 512 rois"
    for size in (7, 14):
        for ratio in (0, 2):
            ours_f, ours_fb = _ours_pair(feature_sets, rois_sets, scales, size, ratio)
            torch_f, torch_fb = _torch_pair(feature_sets, rois_sets, scales, size, ratio, device)
            name = f"roi_align {label} {size}x{size} s={ratio}"
            result.append(Case("roi_align", f"{name} fwd", ours_f, torch_f))
            result.append(Case("roi_align", f"{name} fwd+bwd", ours_fb, torch_fb))
    if platform == "cpu":
        result += _rotated_cases(feature_sets, rois_sets, scales, 7, 0, label)
    return result
