"""detectron2's semantic segmentation head ``SemSegFPNHead`` and ``build_sem_seg_head``
(``modeling/meta_arch/semantic_seg.py``), NHWC, inference only.

The submodules carry detectron2's names: the head of feature ``p4`` is the ``nn.Sequential``
``p4`` of (conv, upsample, conv, upsample), so its convolutions are ``p4.0`` and ``p4.2`` (Flax
``p4_0``, ``p4_2``); a feature already at ``COMMON_STRIDE`` has one conv ``p2.0``; then
``predictor``. A detectron2 checkpoint loads one to one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from detlayers.interpolate import interpolate
from detlayers.models.registry import SEM_SEG_HEADS_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["SemSegFPNHead", "build_sem_seg_head", "SEM_SEG_NORMS"]

# MODEL.SEM_SEG_HEAD.NORM values the head honours (the parity tests cover both).
SEM_SEG_NORMS = ("", "GN")


def scale_head_lengths(strides: list[int], common_stride: int) -> list[int]:
    """detectron2's ``head_length`` per feature: ``max(1, log2(stride) - log2(common_stride))``
    conv layers, each followed by a 2x upsampling unless the feature is at ``common_stride``."""
    return [max(1, int(math.log2(s) - math.log2(common_stride))) for s in strides]


@SEM_SEG_HEADS_REGISTRY.register()
class SemSegFPNHead(nn.Module):
    """The Panoptic FPN semantic head: per input feature, ``head_length`` x (3x3 conv ``conv_dims``
    wide, ``norm``, ReLU, then a 2x bilinear upsampling while above ``common_stride``), summed over
    the features, a 1x1 ``predictor`` to ``num_classes`` logits, then a bilinear upsampling by
    ``common_stride``.

    Fields: ``input_shape`` ``{feature name: ShapeSpec}`` (the features read; sorted by stride as
    detectron2 sorts them), ``num_classes``, ``conv_dims``, ``common_stride``, ``norm`` (``""``:
    biased convs; ``"GN"``: 32-group GroupNorm, convs without bias).

    ``__call__(features) -> float32[N, Hp, Wp, num_classes]``: logits at the padded input size
    ``Hp = H(first feature) * common_stride`` (detectron2's inference output before
    ``sem_seg_postprocess``). Bilinear resampling is ``detlayers.interpolate`` with
    ``align_corners=False``, PyTorch's ``F.interpolate`` arithmetic.
    """

    input_shape: Mapping[str, ShapeSpec]
    num_classes: int
    conv_dims: int
    common_stride: int
    norm: str = "GN"

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> SemSegFPNHead:
        """``MODEL.SEM_SEG_HEAD.{IN_FEATURES, NUM_CLASSES, CONVS_DIM, COMMON_STRIDE, NORM}`` over
        the backbone's ``input_shape``. ``IGNORE_VALUE`` and ``LOSS_WEIGHT`` only weigh the training
        loss (not implemented). Raises ValueError naming the key for a value the head cannot honour."""
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [name for name in head.IN_FEATURES if name not in input_shape]
        if missing or not head.IN_FEATURES:
            raise ValueError(f"SemSegFPNHead: MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head.IN_FEATURES)} must be "
                             f"non-empty backbone outputs {sorted(input_shape)}")
        if head.NORM not in SEM_SEG_NORMS:
            raise ValueError(f"SemSegFPNHead: MODEL.SEM_SEG_HEAD.NORM must be one of {SEM_SEG_NORMS}, "
                             f"got {head.NORM!r}")
        if head.NUM_CLASSES < 1 or head.CONVS_DIM < 1:
            raise ValueError(f"SemSegFPNHead: MODEL.SEM_SEG_HEAD.NUM_CLASSES ({head.NUM_CLASSES}) and CONVS_DIM "
                             f"({head.CONVS_DIM}) must be positive")
        shapes = {name: input_shape[name] for name in head.IN_FEATURES}
        strides = [int(s.stride) for s in shapes.values()]
        common = head.COMMON_STRIDE
        if common < 1 or any(s < common or s % common or s & (s - 1) for s in strides) or common & (common - 1):
            raise ValueError(f"SemSegFPNHead: MODEL.SEM_SEG_HEAD.COMMON_STRIDE {common} must be a power of 2 at "
                             f"most every input stride {strides} (powers of 2)")
        return cls(input_shape=shapes, num_classes=int(head.NUM_CLASSES), conv_dims=int(head.CONVS_DIM),
                   common_stride=int(common), norm=head.NORM)

    def _sorted_features(self) -> list[tuple[str, ShapeSpec]]:
        return sorted(self.input_shape.items(), key=lambda item: item[1].stride)

    @nn.compact
    def __call__(self, features: Mapping[str, Array]) -> Array:
        if self.norm not in SEM_SEG_NORMS:
            raise ValueError(f"SemSegFPNHead: norm must be one of {SEM_SEG_NORMS}, got {self.norm!r}")
        items = self._sorted_features()
        lengths = scale_head_lengths([int(s.stride) for _, s in items], self.common_stride)
        total = None
        for (name, shape), length in zip(items, lengths):
            if name not in features:
                raise ValueError(f"SemSegFPNHead: feature {name!r} missing from {sorted(features)}")
            x = features[name]
            upsamples = shape.stride != self.common_stride
            channels = shape.channels
            for k in range(length):
                # the nn.Sequential index: each conv is followed by an upsampling layer when there is one
                index = 2 * k if upsamples else k
                x = Conv2d(channels, self.conv_dims, 3, padding=1, bias=not self.norm, norm=self.norm or None,
                           activation=jax.nn.relu, name=f"{name}_{index}")(x)
                channels = self.conv_dims
                if upsamples:
                    x = interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        logits = Conv2d(self.conv_dims, self.num_classes, 1, name="predictor")(total)
        return interpolate(logits, scale_factor=float(self.common_stride), mode="bilinear", align_corners=False)


def build_sem_seg_head(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The head ``MODEL.SEM_SEG_HEAD.NAME`` names (detectron2's ``build_sem_seg_head``)."""
    return build_from_registry(SEM_SEG_HEADS_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.NAME, cfg, input_shape)
