"""detectron2's ``SemanticSegmentor`` (``modeling/meta_arch/semantic_seg.py``): a backbone and a
semantic-segmentation head from ``SEM_SEG_HEADS_REGISTRY`` (``MODEL.SEM_SEG_HEAD.NAME``), with
``sem_seg_postprocess``; inference only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.models.backbone.build import build_backbone
from detlayers.models.postprocessing import sem_seg_postprocess
from detlayers.models.registry import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_from_registry
from detlayers.shape_spec import ShapeSpec

Array = jax.Array

__all__ = ["SemanticSegmentor", "build_sem_seg_head"]


def build_sem_seg_head(cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> nn.Module:
    """The head ``cfg.MODEL.SEM_SEG_HEAD.NAME`` names, from its ``from_config(cfg, input_shape)``."""
    return build_from_registry(SEM_SEG_HEADS_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.NAME, cfg, input_shape)


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
