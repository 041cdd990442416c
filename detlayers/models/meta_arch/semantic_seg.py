"""detectron2's ``modeling/meta_arch/semantic_seg.py``, NHWC, inference only: the meta
architecture ``SemanticSegmentor`` (a backbone and a semantic-segmentation head from
``SEM_SEG_HEADS_REGISTRY``, ``MODEL.SEM_SEG_HEAD.NAME``, with ``sem_seg_postprocess``), the Panoptic
FPN semantic head ``SemSegFPNHead`` and ``build_sem_seg_head``.

``SemSegFPNHead``'s submodules carry detectron2's names: the head of feature ``p4`` is the
``nn.Sequential`` ``p4`` of (conv, upsample, conv, upsample), so its convolutions are ``p4.0`` and
``p4.2`` (Flax ``p4_0``, ``p4_2``); a feature already at ``COMMON_STRIDE`` has one conv ``p2.0``;
then ``predictor``. A detectron2 checkpoint loads one to one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.interpolate import interpolate
from detlayers.models.backbone.build import build_backbone
from detlayers.models.postprocessing import sem_seg_postprocess
from detlayers.models.registry import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["SemanticSegmentor", "SemSegFPNHead", "build_sem_seg_head", "SEM_SEG_NORMS"]

# MODEL.SEM_SEG_HEAD.NORM values SemSegFPNHead honours (the parity tests cover both).
SEM_SEG_NORMS = ("", "GN")


def build_sem_seg_head(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The head ``cfg.MODEL.SEM_SEG_HEAD.NAME`` names (detectron2's ``build_sem_seg_head``), from its
    ``from_config(cfg, input_shape)``."""
    return build_from_registry(SEM_SEG_HEADS_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.NAME, cfg, input_shape)


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


@META_ARCH_REGISTRY.register()
class SemanticSegmentor(nn.Module):
    """detectron2's ``SemanticSegmentor``, NHWC, static shapes, inference.

    Fields: ``backbone`` (``{name: [N, Hi, Wi, C]}``), ``sem_seg_head`` (features -> logits
    ``[N, Hp, Wp, num_classes]`` at the padded input size), ``pixel_mean``/``pixel_std`` (the host
    normalises: :func:`detlayers.models.preprocess_image`, then pads with 0 as detectron2's
    ``ImageList`` pads normalised images to the backbone's ``size_divisibility``).

    ``__call__(images, image_hw, output_hw, *, canvas_hw=None, return_intermediates=False)``:
    ``images float32[N, Hp, Wp, 3]`` normalised and padded, ``image_hw``/``output_hw``
    ``int32[N, 2]`` the sizes before padding and the original sizes; ``canvas_hw`` a static
    ``(H, W)`` at least every ``output_hw`` (None: ``(Hp, Wp)``). Returns ``{"sem_seg": [N, H, W,
    num_classes]}``: per image the logits resized to its original size (detectron2's
    ``sem_seg_postprocess``) in ``[:oh, :ow]``, zero elsewhere; with ``return_intermediates`` also
    the backbone maps and ``sem_seg_logits`` (the head's output at the padded input size).
    """

    backbone: nn.Module
    sem_seg_head: nn.Module
    pixel_mean: Sequence[float] = (103.530, 116.280, 123.675)
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_config(cls, cfg: Any) -> SemanticSegmentor:
        """The backbone ``MODEL.BACKBONE.NAME``, the head ``MODEL.SEM_SEG_HEAD.NAME`` over the
        backbone's ``output_shape()``, ``MODEL.PIXEL_MEAN``/``MODEL.PIXEL_STD``."""
        model = cfg.MODEL
        if len(model.PIXEL_MEAN) != len(model.PIXEL_STD):
            raise ValueError(f"SemanticSegmentor: MODEL.PIXEL_MEAN {model.PIXEL_MEAN} and MODEL.PIXEL_STD "
                             f"{model.PIXEL_STD} differ in length")
        backbone = build_backbone(cfg)
        return cls(backbone=backbone, sem_seg_head=build_sem_seg_head(cfg, backbone.output_shape()),
                   pixel_mean=tuple(float(v) for v in model.PIXEL_MEAN),
                   pixel_std=tuple(float(v) for v in model.PIXEL_STD))

    def example_input_hw(self) -> tuple[int, int]:
        """A padded input size the model accepts (what ``load_detectron2_weights`` traces with):
        64x64, or the smallest multiple of the ASPP pooling window in input pixels when the head
        pools over a fixed window (detectron2's ``INPUT.CROP.SIZE`` / stride)."""
        window = getattr(self.sem_seg_head, "aspp_pool_kernel", None)
        if window is None:
            return 64, 64
        shapes = self.backbone.output_shape()
        head = self.sem_seg_head
        name = head.in_features[-1] if hasattr(head, "in_features") else head.in_feature
        stride = shapes[name].stride
        return int(window[0]) * stride, int(window[1]) * stride

    def __call__(
        self,
        images: Array,
        image_hw: Array,
        *targets: Array,
        train: bool = False,
        canvas_hw: tuple[int, int] | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Array]:
        if train:
            raise NotImplementedError("SemanticSegmentor: training (the DeepLab heads' cross_entropy / "
                                      "hard_pixel_mining losses) is not implemented; train with detectron2 and "
                                      "load its checkpoint with load_detectron2_weights")
        if images.ndim != 4 or images.shape[-1] != len(self.pixel_mean):
            raise ValueError(f"SemanticSegmentor: images must be [N, H, W, {len(self.pixel_mean)}], "
                             f"got shape {images.shape}")
        if len(targets) != 1:
            raise TypeError("SemanticSegmentor: inference takes (images, image_hw, output_hw), "
                            f"got {2 + len(targets)} arguments")
        (output_hw,) = targets
        n = images.shape[0]
        for name, value in (("image_hw", image_hw), ("output_hw", output_hw)):
            if tuple(value.shape) != (n, 2):
                raise ValueError(f"SemanticSegmentor: {name} must be [N, 2] = [{n}, 2], got shape {value.shape}")
        features = self.backbone(images)
        logits = self.sem_seg_head(features)
        canvas = tuple(images.shape[1:3]) if canvas_hw is None else canvas_hw
        out = {"sem_seg": sem_seg_postprocess(logits, image_hw.astype(jnp.int32), output_hw.astype(jnp.int32),
                                              canvas)}
        if return_intermediates:
            out.update(features)
            out["sem_seg_logits"] = logits
        return out
