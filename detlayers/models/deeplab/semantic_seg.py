"""detectron2's DeepLab heads (``projects/DeepLab/deeplab/semantic_seg.py``) in Flax, NHWC:
``DeepLabV3PlusHead`` (ASPP on the coarsest feature, then a decoder fusing projected low-level
features) and ``DeepLabV3Head`` (ASPP alone), both registered in ``SEM_SEG_HEADS_REGISTRY``.

Inference only: the heads return logits upsampled by ``COMMON_STRIDE``; their training losses
(``cross_entropy`` and DeepLab's ``hard_pixel_mining``) are not implemented, and training raises
``NotImplementedError`` in :class:`detlayers.models.meta_arch.semantic_seg.SemanticSegmentor`.

Parameter names are detectron2's: ``decoder.res5.project_conv.convs.0...`` (the ASPP),
``decoder.res2.project_conv`` (the 1x1 projection), ``decoder.res2.fuse_conv.0`` / ``.1`` (two 3x3
convs) or ``decoder.res2.fuse_conv.depthwise`` / ``.pointwise`` (one 5x5 depthwise-separable conv),
``predictor``; ``aspp.*`` and ``predictor`` for ``DeepLabV3Head``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers.aspp import ASPP
from detlayers.blocks import DepthwiseSeparableConv2d
from detlayers.interpolate import interpolate
from detlayers.models.registry import SEM_SEG_HEADS_REGISTRY
from detlayers.shape_spec import ShapeSpec
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["DeepLabV3PlusHead", "DeepLabV3Head", "LOSS_TYPES"]

LOSS_TYPES = ("cross_entropy", "hard_pixel_mining")


def _aspp_pool_kernel(cfg: Any, encoder_stride: int, head: str) -> tuple[int, int] | None:
    """ASPP's image-pooling window: ``INPUT.CROP.SIZE / encoder_stride`` when training crops are
    on (``INPUT.CROP.TYPE`` must be ``"absolute"``), else None (global pooling), as detectron2."""
    crop = cfg.INPUT.CROP
    if not crop.ENABLED:
        return None
    if crop.TYPE != "absolute":
        raise ValueError(f"{head}: INPUT.CROP.TYPE must be 'absolute' when INPUT.CROP.ENABLED, got {crop.TYPE!r}")
    train_h, train_w = (int(v) for v in crop.SIZE)
    if train_h % encoder_stride or train_w % encoder_stride:
        raise ValueError(f"{head}: INPUT.CROP.SIZE {tuple(crop.SIZE)} must be divisible by the encoder "
                         f"stride {encoder_stride}")
    return train_h // encoder_stride, train_w // encoder_stride


def _check_common_keys(cfg: Any, head: str) -> None:
    """Keys both heads read that detectron2 checks (or would fail on)."""
    sem = cfg.MODEL.SEM_SEG_HEAD
    if "ASPP_DILATIONS" not in sem:
        raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.ASPP_DILATIONS is missing "
                         "(call add_deeplab_config(cfg) before merging a DeepLab config)")
    if len(sem.ASPP_DILATIONS) != 3:
        raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.ASPP_DILATIONS needs 3 dilations, got {list(sem.ASPP_DILATIONS)}")
    if sem.LOSS_TYPE not in LOSS_TYPES:
        raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.LOSS_TYPE must be one of {LOSS_TYPES}, got {sem.LOSS_TYPE!r}")
    if sem.NUM_CLASSES < 1:
        raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.NUM_CLASSES must be positive, got {sem.NUM_CLASSES}")


class _DecoderStage(nn.Module):
    """One stage of DeepLabV3+'s decoder on feature ``x``: the ASPP (the coarsest stage, ``y`` is
    None), or a 1x1 ``project_conv`` of ``x`` concatenated with ``y`` bilinearly resized to ``x``'s
    size, then ``fuse_conv``."""

    in_channels: int
    out_channels: int  # the stage's output: ASPP channels or the decoder channels
    project_channels: int  # the 1x1 projection's width (unused by the ASPP stage)
    previous_channels: int  # channels of the coarser stage's output (0 for the ASPP stage)
    norm: str
    use_depthwise_separable_conv: bool
    aspp_dilations: Sequence[int] = ()
    aspp_dropout: float = 0.0
    aspp_pool_kernel: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x: Array, y: Array | None, train: bool = False) -> Array:
        if y is None:
            return ASPP(self.in_channels, self.out_channels, tuple(self.aspp_dilations), norm=self.norm,
                        activation=jax.nn.relu, pool_kernel_size=self.aspp_pool_kernel, dropout=self.aspp_dropout,
                        use_depthwise_separable_conv=self.use_depthwise_separable_conv, name="project_conv")(
                x, train=train)
        use_bias = self.norm == ""
        proj = Conv2d(self.in_channels, self.project_channels, 1, bias=use_bias, norm=self.norm,
                      activation=jax.nn.relu, name="project_conv")(x, train=train)
        y = interpolate(y, size=(proj.shape[1], proj.shape[2]), mode="bilinear", align_corners=False)
        y = jnp.concatenate([proj, y], axis=-1)
        fused_in = self.project_channels + self.previous_channels
        if self.use_depthwise_separable_conv:
            # one 5x5 depthwise-separable conv instead of two 3x3 convs (same receptive field)
            return DepthwiseSeparableConv2d(fused_in, self.out_channels, kernel_size=5, padding=2, norm1=self.norm,
                                            activation1=jax.nn.relu, norm2=self.norm, activation2=jax.nn.relu,
                                            name="fuse_conv")(y, train=train)
        for index, c_in in enumerate((fused_in, self.out_channels)):
            y = Conv2d(c_in, self.out_channels, 3, padding=1, bias=use_bias, norm=self.norm, activation=jax.nn.relu,
                       name=f"fuse_conv_{index}")(y, train=train)
        return y


class _Decoder(nn.Module):
    """The decoder's stages, named after their features (detectron2's ``decoder[name]``), run
    from the coarsest feature (the ASPP) to the finest; the fields are the head's."""

    in_features: Sequence[str]
    in_channels: Sequence[int]
    project_channels: Sequence[int]
    aspp_channels: int
    aspp_dilations: Sequence[int]
    aspp_dropout: float
    aspp_pool_kernel: Sequence[int] | None
    decoder_channels: int
    norm: str
    use_depthwise_separable_conv: bool

    @nn.compact
    def __call__(self, features: Mapping[str, Array], train: bool = False) -> Array:
        last = len(self.in_features) - 1
        y = None
        for index in reversed(range(last + 1)):
            name = self.in_features[index]
            if index == last:
                stage = _DecoderStage(self.in_channels[index], self.aspp_channels, 0, 0, self.norm,
                                      self.use_depthwise_separable_conv, tuple(self.aspp_dilations),
                                      self.aspp_dropout, self.aspp_pool_kernel, name=name)
            else:
                previous = self.aspp_channels if index == last - 1 else self.decoder_channels
                stage = _DecoderStage(self.in_channels[index], self.decoder_channels, self.project_channels[index],
                                      previous, self.norm, self.use_depthwise_separable_conv, name=name)
            y = stage(features[name], y, train=train)
        return y


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusHead(nn.Module):
    """detectron2's ``DeepLabV3PlusHead`` (Chen et al., "Encoder-Decoder with Atrous Separable
    Convolution", 2018), inference.

    Fields: ``in_features`` ordered by stride (finest first) with their ``in_channels``; the
    coarsest feeds the ASPP (``aspp_channels`` out, ``aspp_dilations``, ``aspp_dropout``, pooling
    window ``aspp_pool_kernel`` or None for global pooling); every other feature ``i`` is projected
    to ``project_channels[i]`` and fused with the coarser stage's output into ``decoder_channels``
    channels; then the 1x1 ``predictor`` to ``num_classes`` logits. ``norm`` is every conv's norm
    (a bias only without one); ``use_depthwise_separable_conv`` puts depthwise-separable convs in
    the ASPP and the fusion.

    ``__call__(features {name: [N, Hi, Wi, Ci]}, train=False) -> [N, H0 * s, W0 * s, num_classes]``:
    logits at the finest feature's size times ``common_stride`` (bilinear, ``align_corners=False``).
    """

    in_features: Sequence[str]
    in_channels: Sequence[int]
    project_channels: Sequence[int]
    aspp_channels: int
    aspp_dilations: Sequence[int]
    aspp_dropout: float
    aspp_pool_kernel: Sequence[int] | None
    decoder_channels: int
    common_stride: int
    norm: str
    num_classes: int
    use_depthwise_separable_conv: bool = False
    loss_type: str = "hard_pixel_mining"
    ignore_value: int = 255
    loss_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> DeepLabV3PlusHead:
        """``MODEL.SEM_SEG_HEAD.{IN_FEATURES, PROJECT_CHANNELS, ASPP_CHANNELS, ASPP_DILATIONS,
        ASPP_DROPOUT, CONVS_DIM, COMMON_STRIDE, NORM, NUM_CLASSES, USE_DEPTHWISE_SEPARABLE_CONV,
        LOSS_TYPE, LOSS_WEIGHT, IGNORE_VALUE}`` and ``INPUT.CROP`` (the ASPP pooling window), as
        detectron2 reads them (``PROJECT_FEATURES`` is not read, in detectron2 neither)."""
        head = "DeepLabV3PlusHead"
        _check_common_keys(cfg, head)
        sem = cfg.MODEL.SEM_SEG_HEAD
        unknown = [f for f in sem.IN_FEATURES if f not in input_shape]
        if unknown or not sem.IN_FEATURES:
            raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.IN_FEATURES {list(sem.IN_FEATURES)} must be backbone "
                             f"outputs {list(input_shape)}")
        # by stride, ties in the backbone's order (detectron2 sorts the backbone's filtered outputs)
        shapes = sorted(((f, s) for f, s in input_shape.items() if f in sem.IN_FEATURES), key=lambda i: i[1].stride)
        if len(sem.PROJECT_CHANNELS) != len(shapes) - 1:
            raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS needs {len(shapes) - 1} entries (one per "
                             f"IN_FEATURES but the coarsest), got {list(sem.PROJECT_CHANNELS)}")
        return cls(
            in_features=tuple(f for f, _ in shapes), in_channels=tuple(s.channels for _, s in shapes),
            project_channels=tuple(int(c) for c in sem.PROJECT_CHANNELS), aspp_channels=int(sem.ASPP_CHANNELS),
            aspp_dilations=tuple(int(d) for d in sem.ASPP_DILATIONS), aspp_dropout=float(sem.ASPP_DROPOUT),
            aspp_pool_kernel=_aspp_pool_kernel(cfg, shapes[-1][1].stride, head),
            decoder_channels=int(sem.CONVS_DIM), common_stride=int(sem.COMMON_STRIDE), norm=sem.NORM,
            num_classes=int(sem.NUM_CLASSES), use_depthwise_separable_conv=bool(sem.USE_DEPTHWISE_SEPARABLE_CONV),
            loss_type=sem.LOSS_TYPE, ignore_value=int(sem.IGNORE_VALUE), loss_weight=float(sem.LOSS_WEIGHT),
        )

    @nn.compact
    def __call__(self, features: Mapping[str, Array], train: bool = False) -> Array:
        if train:
            raise NotImplementedError(f"{type(self).__name__}: training (the {self.loss_type!r} loss) is not "
                                      "implemented; use detectron2's projects/DeepLab to train")
        y = _Decoder(tuple(self.in_features), tuple(self.in_channels), tuple(self.project_channels),
                     self.aspp_channels, tuple(self.aspp_dilations), self.aspp_dropout, self.aspp_pool_kernel,
                     self.decoder_channels, self.norm, self.use_depthwise_separable_conv, name="decoder")(
            features, train=train)
        y = Conv2d(y.shape[-1], self.num_classes, 1, name="predictor")(y)
        return interpolate(y, scale_factor=self.common_stride, mode="bilinear", align_corners=False)


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3Head(nn.Module):
    """detectron2's ``DeepLabV3Head`` (Chen et al., "Rethinking Atrous Convolution", 2017), inference:
    the ASPP ``aspp`` on the one feature ``in_feature``, the 1x1 ``predictor``, then logits
    upsampled by ``common_stride`` (bilinear). ``__call__(features, train=False) -> [N, H * s, W * s, num_classes]``."""

    in_feature: str
    in_channels: int
    aspp_channels: int
    aspp_dilations: Sequence[int]
    aspp_dropout: float
    aspp_pool_kernel: Sequence[int] | None
    conv_dims: int
    common_stride: int
    norm: str
    num_classes: int
    use_depthwise_separable_conv: bool = False
    loss_type: str = "hard_pixel_mining"
    ignore_value: int = 255
    loss_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any, input_shape: Mapping[str, ShapeSpec]) -> DeepLabV3Head:
        """``MODEL.SEM_SEG_HEAD.{IN_FEATURES (one), ASPP_CHANNELS, ASPP_DILATIONS, ASPP_DROPOUT,
        CONVS_DIM, COMMON_STRIDE, NORM, NUM_CLASSES, USE_DEPTHWISE_SEPARABLE_CONV, LOSS_TYPE}`` and
        ``INPUT.CROP``; the pooling window is the crop size over ``COMMON_STRIDE``, as detectron2."""
        head = "DeepLabV3Head"
        _check_common_keys(cfg, head)
        sem = cfg.MODEL.SEM_SEG_HEAD
        if len(sem.IN_FEATURES) != 1 or sem.IN_FEATURES[0] not in input_shape:
            raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.IN_FEATURES must be one backbone output of "
                             f"{list(input_shape)}, got {list(sem.IN_FEATURES)}")
        if sem.CONVS_DIM != sem.ASPP_CHANNELS:
            # detectron2 builds the predictor on CONVS_DIM channels but feeds it the ASPP's output
            raise ValueError(f"{head}: MODEL.SEM_SEG_HEAD.CONVS_DIM ({sem.CONVS_DIM}) must equal ASPP_CHANNELS "
                             f"({sem.ASPP_CHANNELS})")
        name = sem.IN_FEATURES[0]
        return cls(
            in_feature=name, in_channels=input_shape[name].channels, aspp_channels=int(sem.ASPP_CHANNELS),
            aspp_dilations=tuple(int(d) for d in sem.ASPP_DILATIONS), aspp_dropout=float(sem.ASPP_DROPOUT),
            aspp_pool_kernel=_aspp_pool_kernel(cfg, int(sem.COMMON_STRIDE), head), conv_dims=int(sem.CONVS_DIM),
            common_stride=int(sem.COMMON_STRIDE), norm=sem.NORM, num_classes=int(sem.NUM_CLASSES),
            use_depthwise_separable_conv=bool(sem.USE_DEPTHWISE_SEPARABLE_CONV), loss_type=sem.LOSS_TYPE,
            ignore_value=int(sem.IGNORE_VALUE), loss_weight=float(sem.LOSS_WEIGHT),
        )

    @nn.compact
    def __call__(self, features: Mapping[str, Array], train: bool = False) -> Array:
        if train:
            raise NotImplementedError(f"{type(self).__name__}: training (the {self.loss_type!r} loss) is not "
                                      "implemented; use detectron2's projects/DeepLab to train")
        x = ASPP(self.in_channels, self.aspp_channels, tuple(self.aspp_dilations), norm=self.norm,
                 activation=jax.nn.relu, pool_kernel_size=self.aspp_pool_kernel, dropout=self.aspp_dropout,
                 use_depthwise_separable_conv=self.use_depthwise_separable_conv, name="aspp")(
            features[self.in_feature], train=train)
        x = Conv2d(self.conv_dims, self.num_classes, 1, name="predictor")(x)
        return interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
