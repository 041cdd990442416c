"""TEMPORARY stand-ins for detlayers ops that have not landed yet (removed once they land)."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class NMSResult(NamedTuple):
    indices: jax.Array
    count: jax.Array


def _iou(a, b):
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / jnp.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def batched_nms(boxes, scores, idxs, iou_threshold, *, max_output_size=None):
    n = boxes.shape[0]
    order = jnp.argsort(-scores)
    b = boxes[order]
    same = idxs[order][:, None] == idxs[order][None, :]
    iou = jnp.where(same, _iou(b, b), 0.0)

    def body(i, keep):
        suppressed = jnp.any((iou[i] > iou_threshold) & keep & (jnp.arange(n) < i))
        return keep.at[i].set(~suppressed)

    keep = jax.lax.fori_loop(0, n, body, jnp.zeros(n, bool))
    rank = jnp.where(keep, jnp.arange(n), n)
    sel = jnp.sort(rank)
    k = n if max_output_size is None else min(n, max_output_size)
    sel = sel[:k]
    indices = jnp.where(sel < n, order[jnp.minimum(sel, n - 1)], -1).astype(jnp.int32)
    return NMSResult(indices, jnp.minimum(keep.sum(), k).astype(jnp.int32))


def _bilinear(feat, y, x):
    h, w = feat.shape[:2]
    valid = (y >= -1) & (y <= h) & (x >= -1) & (x <= w)
    y = jnp.clip(y, 0, h - 1)
    x = jnp.clip(x, 0, w - 1)
    y0 = jnp.floor(y).astype(jnp.int32)
    x0 = jnp.floor(x).astype(jnp.int32)
    y1 = jnp.minimum(y0 + 1, h - 1)
    x1 = jnp.minimum(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    v = (feat[y0, x0] * ((1 - ly) * (1 - lx))[..., None] + feat[y0, x1] * ((1 - ly) * lx)[..., None]
         + feat[y1, x0] * (ly * (1 - lx))[..., None] + feat[y1, x1] * (ly * lx)[..., None])
    return v * valid[..., None]


class ROIAlign(nn.Module):
    output_size: tuple
    spatial_scale: float
    sampling_ratio: int
    aligned: bool = True

    def __call__(self, input, rois):
        ph, pw = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        s = 2

        def one(roi):
            off = 0.5 if self.aligned else 0.0
            x1, y1, x2, y2 = (roi[1:] * self.spatial_scale - off)
            bh, bw = (y2 - y1) / ph, (x2 - x1) / pw
            gy = y1 + (jnp.arange(ph)[:, None] + (jnp.arange(s)[None, :] + 0.5) / s) * bh
            gx = x1 + (jnp.arange(pw)[:, None] + (jnp.arange(s)[None, :] + 0.5) / s) * bw
            yy = gy.reshape(-1)[:, None] * jnp.ones((1, pw * s))
            xx = jnp.ones((ph * s, 1)) * gx.reshape(-1)[None, :]
            v = _bilinear(input[roi[0].astype(jnp.int32)], yy, xx)
            return v.reshape(ph, s, pw, s, -1).mean((1, 3))

        return jax.vmap(one)(rois)


def paste_masks_in_image(masks, boxes, image_shape, threshold=0.5):
    h, w = image_shape

    def one(m, box):
        x1, y1, x2, y2 = box
        ys = (jnp.arange(h) + 0.5 - y1) / (y2 - y1) * 2 - 1
        xs = (jnp.arange(w) + 0.5 - x1) / (x2 - x1) * 2 - 1
        msz = m.shape[0]
        py = (ys + 1) * msz / 2 - 0.5
        px = (xs + 1) * msz / 2 - 0.5
        yy = py[:, None] * jnp.ones((1, w))
        xx = jnp.ones((h, 1)) * px[None, :]
        return _bilinear(m[..., None], yy, xx)[..., 0]

    out = jax.vmap(one)(masks, boxes)
    return out >= threshold
