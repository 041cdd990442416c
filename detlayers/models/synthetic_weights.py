"""Synthetic R50-FPN weights (Mask R-CNN, Faster R-CNN, RetinaNet): detectron2's state dicts,
initialized from a NumPy seed.

The detectron2 model zoo cannot be downloaded everywhere this project is tested, and committing a
170 MB checkpoint is not an option, so the parity tests, the benchmark and the notebook regenerate a
full checkpoint from a seed instead. :func:`mask_rcnn_r50_fpn_state_dict` returns every entry of
detectron2's ``GeneralizedRCNN.state_dict()`` for
``configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` (same names, shapes and order,
float32), initialized with the distributions detectron2's constructors use:

- ResNet convolutions (stem and bottleneck blocks, no bias): ``c2_msra_fill``, i.e. normal with
  std ``sqrt(2 / fan_out)``;
- FPN lateral and output convolutions: ``c2_xavier_fill``, i.e. uniform in
  ``+-sqrt(3 / fan_in)``, bias 0;
- RPN head (3x3 conv and both 1x1 convs): normal std 0.01, bias 0;
- box head ``fc1``/``fc2``: ``c2_xavier_fill``; ``cls_score``: normal std 0.01;
  ``bbox_pred``: normal std 0.001; biases 0;
- mask head ``mask_fcn1..4`` and ``deconv``: ``c2_msra_fill`` (PyTorch's fan convention for
  transposed convolutions: ``fan_out = weight.shape[0] * kh * kw``), bias 0; ``predictor``: normal
  std 0.001, bias 0;
- every ``FrozenBatchNorm2d`` buffer as detectron2 constructs it: weight 1, bias 0,
  running_mean 0, running_var ``1 - 1e-5``.

The values are not PyTorch's (detectron2 draws from torch's RNG): they are drawn from
``numpy.random.default_rng`` with one stream per parameter, keyed by ``(seed, name)``, so a
parameter's values do not depend on which other parameters exist (``num_classes`` only changes
the class-dependent tensors).

With identity FrozenBN statistics such a network is useless (activations grow through 50 layers
and every detection scores 1.0), and with detectron2's output-layer init (std 0.01 / 0.001) every
class score sits near 1/81 and every mask probability near 0.5. ``calibration=`` fixes both from
measurements detectron2 itself made on a photograph: every ``running_mean``/``running_var``
becomes the per-channel mean and variance of that FrozenBN's input, and the five output layers
(RPN objectness and deltas, ``cls_score``, ``bbox_pred``, mask ``predictor``) are multiplied by
the factor that gives their outputs a chosen standard deviation (2, 0.3, 1.4, 0.5 and 3). Then
the features are well scaled, the detection scores spread out and the masks are crisp.
``tests/fixtures/mask_rcnn_bn_calibration.npz`` holds these for ``seed=0``, written by
``tools/fixtures/make_mask_rcnn.py``.

:func:`faster_rcnn_r50_fpn_state_dict` is the same without the mask head, and
:func:`rotated_faster_rcnn_r50_fpn_state_dict` that with 5 deltas an anchor and a class (RRPN,
RROIHeads);
:func:`retinanet_r50_fpn_state_dict` gives ``retinanet_R_50_FPN_3x.yaml``'s (FPN on res3-res5,
``LastLevelP6P7`` with ``c2_xavier_fill``, the RetinaNet head with normal std 0.01 and the
prior-probability ``cls_score`` bias), with the same ResNet-50 values for the same seed, so the
Mask R-CNN FrozenBN calibration serves it (:func:`retinanet_calibration`).

:func:`faster_rcnn_r50_c4_state_dict` and :func:`faster_rcnn_r50_dc5_state_dict` give the models
without FPN (``faster_rcnn_R_50_{C4,DC5}_3x.yaml``: the ResNet directly under ``backbone``, an RPN
of 15 anchors a cell on res4 / res5, ``roi_heads.res5`` or the 2-fc box head on 7x7 res5 ROIs), with
their own calibration files (``tools/fixtures/make_faster_rcnn_c4.py``).

:func:`cascade_mask_rcnn_r50_fpn_state_dict` gives ``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``'s:
the Mask R-CNN backbone, RPN and mask head (same values for the same seed), and per cascade stage
``k`` a 2-fc box head ``roi_heads.box_head.{k}`` and a class-agnostic predictor
``roi_heads.box_predictor.{k}`` (``bbox_pred`` 4 outputs), with its own calibration file
(``tools/fixtures/make_cascade_mask_rcnn.py``).

:func:`panoptic_fpn_r50_state_dict` gives ``panoptic_fpn_R_50_3x.yaml``'s: the Mask R-CNN one (the
same values for the same seed, so the Mask R-CNN calibration serves it) followed by
``sem_seg_head`` (``SemSegFPNHead``: every conv and the predictor ``c2_msra_fill``, bias 0; GN
weight 1, bias 0).

Variants (``variant=``, detectron2's ``configs/Misc``): ``mask_rcnn_R_50_FPN_3x_gn`` has GroupNorm
(weight 1, bias 0, as constructed) wherever the default has FrozenBN or no norm, bias-free convs
under each GN, and a box head of four 3x3 convs (``c2_msra_fill``) and one fc;
``mask_rcnn_R_50_FPN_3x_dconv_c3-c5`` (and its modulated twin) adds ``conv2_offset`` before every
res3-res5 ``conv2``. detectron2 initializes ``conv2_offset`` to zero, which makes a deformable
convolution an ordinary one and would test nothing, so here its weight is normal with std
``0.1 * sqrt(2 / fan_in)`` (offsets of about 0.1 pixel, mask logits around 0), bias 0. Offsets
of about a pixel (std ``sqrt(2 / fan_in)``) make the network chaotic: a 1e-6 relative change of
the input moves res5 by 4e-2, so float32 rounding alone would exceed any parity bound.

This module needs only NumPy (the fixture script loads it in an environment without JAX).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = [
    "mask_rcnn_r50_fpn_state_dict", "mask_rcnn_r50_fpn_shapes", "faster_rcnn_r50_fpn_state_dict",
    "retinanet_r50_fpn_state_dict", "retinanet_calibration", "RETINANET_CLS_BIAS", "VARIANTS",
    "faster_rcnn_r50_c4_state_dict", "faster_rcnn_r50_dc5_state_dict", "cascade_mask_rcnn_r50_fpn_state_dict",
    "deeplab_v3_plus_state_dict", "panoptic_fpn_r50_state_dict", "rotated_faster_rcnn_r50_fpn_state_dict",
    "rotated_faster_rcnn_calibration",
]

FROZEN_BN_EPS = 1e-5
# Calibration-file keys "scale.<parameter name>": a float32 factor for that parameter.
_SCALE_PREFIX = "scale."
# ... and "value.<parameter name>": a float32 value that fills that parameter.
_VALUE_PREFIX = "value."
# ResNet-50: blocks per stage res2..res5 and the stage widths (detectron2's RESNETS defaults).
_R50_BLOCKS = (3, 4, 6, 3)
_STEM_OUT = 64
_RES2_OUT = 256
_BOTTLENECK_RES2 = 64
_FPN_OUT = 256
_NUM_ANCHORS = 3  # one size x three aspect ratios per level
_RETINANET_ANCHORS = 9  # three sizes x three aspect ratios per level
_BOX_POOLER = 7
_FC_DIM = 1024
_MASK_CONV_DIM = 256
_MASK_NUM_CONV = 4

# How a parameter is initialized: ("msra",) / ("xavier",) / ("normal", std) / ("const", value).
_Init = tuple


class _Variant(NamedTuple):
    """What a detectron2 Mask R-CNN R50-FPN config changes in the state dict (a NamedTuple, since
    the fixture scripts load this file without registering it as a module)."""

    norm: str = "FrozenBN"  # MODEL.RESNETS.NORM
    fpn_norm: str = ""  # MODEL.FPN.NORM
    box_head_convs: int = 0  # MODEL.ROI_BOX_HEAD.NUM_CONV (CONV_DIM 256)
    box_head_fcs: int = 2  # MODEL.ROI_BOX_HEAD.NUM_FC
    head_norm: str = ""  # MODEL.ROI_BOX_HEAD.NORM and MODEL.ROI_MASK_HEAD.NORM
    deform_stages: tuple[bool, bool, bool, bool] = (False, False, False, False)  # res2..res5
    deform_modulated: bool = False


# The detectron2 configs (paths under configs/, without .yaml) the generator covers.
VARIANTS = {
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x": _Variant(),
    "Misc/mask_rcnn_R_50_FPN_3x_gn": _Variant(norm="GN", fpn_norm="GN", box_head_convs=4, box_head_fcs=1,
                                              head_norm="GN"),
    "Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5": _Variant(deform_stages=(False, True, True, True)),
    # The same with DEFORM_MODULATED True (not a zoo config): modulated deformable convolution.
    "Misc/mask_rcnn_R_50_FPN_3x_mdconv_c3-c5": _Variant(deform_stages=(False, True, True, True),
                                                        deform_modulated=True),
}
DEFAULT_VARIANT = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x"
_DEFAULT = VARIANTS[DEFAULT_VARIANT]
_BOX_CONV_DIM = 256


def _norm_entries(prefix: str, out_ch: int, norm: str) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """The parameters (and buffers) of ``{prefix}.norm`` as detectron2 constructs them."""
    if not norm:
        return
    yield f"{prefix}.norm.weight", (out_ch,), ("const", 1.0)
    yield f"{prefix}.norm.bias", (out_ch,), ("const", 0.0)
    if norm == "FrozenBN":
        yield f"{prefix}.norm.running_mean", (out_ch,), ("const", 0.0)
        yield f"{prefix}.norm.running_var", (out_ch,), ("const", 1.0 - FROZEN_BN_EPS)
    elif norm in ("BN", "SyncBN"):  # torch's BatchNorm2d / SyncBatchNorm buffers
        yield f"{prefix}.norm.running_mean", (out_ch,), ("const", 0.0)
        yield f"{prefix}.norm.running_var", (out_ch,), ("const", 1.0)
        yield f"{prefix}.norm.num_batches_tracked", (), ("const", 0.0)
    elif norm != "GN":  # pragma: no cover - VARIANTS only uses these
        raise AssertionError(norm)


def _conv_with_norm(
    prefix: str, out_ch: int, in_ch: int, k: int, norm: str = "FrozenBN", init: _Init = ("msra",)
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """A detectron2 ``Conv2d(norm=...)``: biased only without a norm (weight, bias, then the norm)."""
    yield f"{prefix}.weight", (out_ch, in_ch, k, k), init
    if not norm:
        yield f"{prefix}.bias", (out_ch,), ("const", 0.0)
    yield from _norm_entries(prefix, out_ch, norm)


def _fpn_entries(stages: tuple[int, ...], norm: str = "") -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """FPN ``fpn_lateral{s}``/``fpn_output{s}`` in detectron2's registration order (c2_xavier_fill)."""
    for stage in stages:
        in_ch = _RES2_OUT * 2 ** (stage - 2)
        yield from _conv_with_norm(f"backbone.fpn_lateral{stage}", _FPN_OUT, in_ch, 1, norm, ("xavier",))
        yield from _conv_with_norm(f"backbone.fpn_output{stage}", _FPN_OUT, _FPN_OUT, 3, norm, ("xavier",))


def _bottleneck_stage_entries(
    prefix: str, stage_index: int, in_ch: int, variant: _Variant = _DEFAULT
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """ResNet-50 stage ``res{stage_index + 2}`` (the bottleneck blocks ``{prefix}.0``, ...,
    taking ``in_ch`` channels) in registration order."""
    norm = variant.norm
    out_ch = _RES2_OUT * 2**stage_index
    bottleneck = _BOTTLENECK_RES2 * 2**stage_index
    for b in range(_R50_BLOCKS[stage_index]):
        block = f"{prefix}.{b}"
        if in_ch != out_ch:  # BottleneckBlock registers its projection shortcut first
            yield from _conv_with_norm(f"{block}.shortcut", out_ch, in_ch, 1, norm)
        yield from _conv_with_norm(f"{block}.conv1", bottleneck, in_ch, 1, norm)
        if variant.deform_stages[stage_index]:  # DeformBottleneckBlock: conv2_offset before conv2
            offset_ch = (27 if variant.deform_modulated else 18)
            yield f"{block}.conv2_offset.weight", (offset_ch, bottleneck, 3, 3), ("offset",)
            yield f"{block}.conv2_offset.bias", (offset_ch,), ("const", 0.0)
        yield from _conv_with_norm(f"{block}.conv2", bottleneck, bottleneck, 3, norm)
        yield from _conv_with_norm(f"{block}.conv3", out_ch, bottleneck, 1, norm)
        in_ch = out_ch


def _resnet50_entries(
    variant: _Variant = _DEFAULT, prefix: str = "backbone.bottom_up", num_stages: int = 4
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """The ResNet-50 ``prefix`` (stem and res2 up to res{num_stages + 1}, ``variant``'s norm and
    deformable stages) in registration order."""
    yield from _conv_with_norm(f"{prefix}.stem.conv1", _STEM_OUT, 3, 7, variant.norm)
    in_ch = _STEM_OUT
    for i in range(num_stages):
        yield from _bottleneck_stage_entries(f"{prefix}.res{i + 2}", i, in_ch, variant)
        in_ch = _RES2_OUT * 2**i


def _rpn_head_entries(
    channels: int, num_anchors: int, box_dim: int = 4
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``StandardRPNHead`` over ``channels``-wide maps with ``num_anchors`` a cell of ``box_dim``
    deltas each (normal std 0.01)."""
    rpn = "proposal_generator.rpn_head"
    yield f"{rpn}.conv.weight", (channels, channels, 3, 3), ("normal", 0.01)
    yield f"{rpn}.conv.bias", (channels,), ("const", 0.0)
    yield f"{rpn}.objectness_logits.weight", (num_anchors, channels, 1, 1), ("normal", 0.01)
    yield f"{rpn}.objectness_logits.bias", (num_anchors,), ("const", 0.0)
    yield f"{rpn}.anchor_deltas.weight", (box_dim * num_anchors, channels, 1, 1), ("normal", 0.01)
    yield f"{rpn}.anchor_deltas.bias", (box_dim * num_anchors,), ("const", 0.0)


def _box_predictor_entries(
    num_classes: int, features: int, predictor: str = "roi_heads.box_predictor", num_reg: int | None = None,
    box_dim: int = 4,
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``FastRCNNOutputLayers`` ``predictor`` over ``features`` inputs (``num_reg`` boxes a
    proposal of ``box_dim`` deltas each: ``num_classes`` by default, 1 when class agnostic)."""
    num_reg = num_classes if num_reg is None else num_reg
    yield f"{predictor}.cls_score.weight", (num_classes + 1, features), ("normal", 0.01)
    yield f"{predictor}.cls_score.bias", (num_classes + 1,), ("const", 0.0)
    yield f"{predictor}.bbox_pred.weight", (box_dim * num_reg, features), ("normal", 0.001)
    yield f"{predictor}.bbox_pred.bias", (box_dim * num_reg,), ("const", 0.0)


def _entries(
    num_classes: int, variant: _Variant = _DEFAULT, mask_on: bool = True, cascade_stages: int = 0,
    num_anchors: int = _NUM_ANCHORS, box_dim: int = 4,
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """Every state-dict entry of (Mask/Faster) R-CNN R50-FPN (``variant``'s config) in detectron2's
    order (module registration order); ``box_dim`` 5 and ``num_anchors`` from the angles for the
    rotated model."""
    # FPN: detectron2 registers fpn_lateral{s}/fpn_output{s} for s = 2..5, then bottom_up.
    yield from _fpn_entries((2, 3, 4, 5), variant.fpn_norm)
    yield from _resnet50_entries(variant)

    yield from _rpn_head_entries(_FPN_OUT, num_anchors, box_dim)

    if cascade_stages:
        yield from _cascade_box_entries(num_classes, cascade_stages)
    else:
        yield from _box_entries(num_classes, variant, box_dim)
    if not mask_on:
        return
    yield from _mask_head_entries(num_classes, variant)


def _cascade_box_entries(num_classes: int, stages: int) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``CascadeROIHeads``' ``box_head.{k}`` (2 fc, c2_xavier_fill) for every stage, then its
    class-agnostic ``box_predictor.{k}`` (the ``nn.ModuleList`` registration order)."""
    for k in range(stages):
        features = _FPN_OUT * _BOX_POOLER**2
        for fc in (1, 2):
            yield f"roi_heads.box_head.{k}.fc{fc}.weight", (_FC_DIM, features), ("xavier",)
            yield f"roi_heads.box_head.{k}.fc{fc}.bias", (_FC_DIM,), ("const", 0.0)
            features = _FC_DIM
    for k in range(stages):
        yield from _box_predictor_entries(num_classes, _FC_DIM, f"roi_heads.box_predictor.{k}", num_reg=1)


def _box_entries(num_classes: int, variant: _Variant, box_dim: int = 4) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``StandardROIHeads``' box head (``variant``'s convs and fcs) and predictor."""
    box_head = "roi_heads.box_head"
    channels = _FPN_OUT
    for k in range(1, variant.box_head_convs + 1):  # FastRCNNConvFCHead convs: c2_msra_fill
        yield from _conv_with_norm(f"{box_head}.conv{k}", _BOX_CONV_DIM, channels, 3, variant.head_norm)
        channels = _BOX_CONV_DIM
    features = channels * _BOX_POOLER**2
    for k in range(1, variant.box_head_fcs + 1):
        yield f"{box_head}.fc{k}.weight", (_FC_DIM, features), ("xavier",)
        yield f"{box_head}.fc{k}.bias", (_FC_DIM,), ("const", 0.0)
        features = _FC_DIM
    yield from _box_predictor_entries(num_classes, _FC_DIM, box_dim=box_dim)


def _mask_head_entries(num_classes: int, variant: _Variant) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``MaskRCNNConvUpsampleHead``: 4 convs (``variant``'s norm), deconv and predictor."""
    mask_head = "roi_heads.mask_head"
    for k in range(1, _MASK_NUM_CONV + 1):
        in_channels = _FPN_OUT if k == 1 else _MASK_CONV_DIM
        yield from _conv_with_norm(f"{mask_head}.mask_fcn{k}", _MASK_CONV_DIM, in_channels, 3, variant.head_norm)
    # ConvTranspose2d weight layout: [in_channels, out_channels, kh, kw].
    yield f"{mask_head}.deconv.weight", (_MASK_CONV_DIM, _MASK_CONV_DIM, 2, 2), ("msra",)
    yield f"{mask_head}.deconv.bias", (_MASK_CONV_DIM,), ("const", 0.0)
    yield f"{mask_head}.predictor.weight", (num_classes, _MASK_CONV_DIM, 1, 1), ("normal", 0.001)
    yield f"{mask_head}.predictor.bias", (num_classes,), ("const", 0.0)


def _retinanet_entries(
    num_classes: int, num_convs: int, norm: str, prior_prob: float
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """Every state-dict entry of RetinaNet R50-FPN in detectron2's order: FPN on res3-res5, the
    ``LastLevelP6P7`` top block (c2_xavier_fill), the bottom-up ResNet, then the head (every conv
    normal std 0.01, bias 0; ``cls_score`` bias ``-log((1 - prior_prob) / prior_prob)``; a
    ``"GN"`` norm weight 1, bias 0)."""
    yield from _fpn_entries((3, 4, 5))
    yield "backbone.top_block.p6.weight", (_FPN_OUT, _RES2_OUT * 8, 3, 3), ("xavier",)
    yield "backbone.top_block.p6.bias", (_FPN_OUT,), ("const", 0.0)
    yield "backbone.top_block.p7.weight", (_FPN_OUT, _FPN_OUT, 3, 3), ("xavier",)
    yield "backbone.top_block.p7.bias", (_FPN_OUT,), ("const", 0.0)
    yield from _resnet50_entries()
    for tower in ("cls_subnet", "bbox_subnet"):
        step = 3 if norm else 2  # conv, [norm,] ReLU: the indices of detectron2's nn.Sequential
        for i in range(num_convs):
            yield f"head.{tower}.{i * step}.weight", (_FPN_OUT, _FPN_OUT, 3, 3), ("normal", 0.01)
            yield f"head.{tower}.{i * step}.bias", (_FPN_OUT,), ("const", 0.0)
            if norm:
                yield f"head.{tower}.{i * step + 1}.weight", (_FPN_OUT,), ("const", 1.0)
                yield f"head.{tower}.{i * step + 1}.bias", (_FPN_OUT,), ("const", 0.0)
    anchors = _RETINANET_ANCHORS
    yield "head.cls_score.weight", (anchors * num_classes, _FPN_OUT, 3, 3), ("normal", 0.01)
    yield "head.cls_score.bias", (anchors * num_classes,), ("const", -math.log((1 - prior_prob) / prior_prob))
    yield "head.bbox_pred.weight", (anchors * 4, _FPN_OUT, 3, 3), ("normal", 0.01)
    yield "head.bbox_pred.bias", (anchors * 4,), ("const", 0.0)



def _variant(name: str) -> _Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def mask_rcnn_r50_fpn_shapes(num_classes: int = 80, variant: str = DEFAULT_VARIANT) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of detectron2's Mask R-CNN R50-FPN state dict (config ``variant``, a key
    of :data:`VARIANTS`), in its order."""
    _check_num_classes(num_classes)
    return {name: shape for name, shape, _ in _entries(num_classes, _variant(variant))}


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as ``torch.nn.init._calculate_fan_in_and_fan_out`` computes them."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _draw(seed: int, name: str, shape: tuple[int, ...], init: _Init) -> np.ndarray:
    kind = init[0]
    if kind == "const":
        return np.full(shape, init[1], dtype=np.float32)
    # One independent stream per parameter, keyed by its name.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    fan_in, fan_out = _torch_fans(shape)
    if kind == "msra":  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(np.sqrt(2.0 / fan_out))
    elif kind == "xavier":  # kaiming_uniform_(a=1): gain 1, bound sqrt(3 / fan_in)
        bound = np.float32(np.sqrt(3.0 / fan_in))
        out = rng.random(shape, dtype=np.float32)
        out *= 2 * bound
        out -= bound
    elif kind == "offset":  # deformable offsets of about 0.1 pixel from normalized ReLU inputs
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(0.1 * np.sqrt(2.0 / fan_in))
    elif kind == "normal":
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(init[1])
    else:  # pragma: no cover - the table above only uses the kinds handled here
        raise AssertionError(kind)
    return out


def mask_rcnn_r50_fpn_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, np.ndarray]:
    """detectron2's Mask R-CNN R50-FPN state dict with detectron2-style init from a NumPy seed.

    Args:
      seed: non-negative int; the same seed gives bit-identical arrays on every platform.
      calibration: ``None`` (FrozenBN buffers as detectron2 constructs them: an identity), or a
        ``.npz`` path (or a mapping) whose ``...norm.running_mean`` / ``...norm.running_var``
        entries replace the FrozenBN statistics and whose ``scale.<name>`` entries (float32
        scalars) multiply parameter ``<name>``, e.g.
        ``tests/fixtures/mask_rcnn_bn_calibration.npz`` (calibrated for ``seed=0``); a
        ``value.<name>`` entry (a float32 scalar) fills parameter ``<name>`` instead. Other keys
        of the file are ignored; every FrozenBN statistic must be present with its shape.
      num_classes: foreground classes (``MODEL.ROI_HEADS.NUM_CLASSES``, 80 for COCO).
      variant: the detectron2 config whose state dict is made, a key of :data:`VARIANTS`:
        the default Mask R-CNN, its GroupNorm variant ``Misc/mask_rcnn_R_50_FPN_3x_gn`` (GN in
        ResNet, FPN and both heads, a 4-conv + 1-fc box head; GN weight 1, bias 0), or its
        deformable variants (``conv2_offset`` in res3-res5; see the module docstring).

    Returns:
      ``{detectron2 name: float32 np.ndarray}`` in PyTorch layout (convolutions OIHW, linear
      ``[out, in]``, transposed convolution ``[in, out, kh, kw]``), in the order of
      ``GeneralizedRCNN.state_dict()``; detectron2's non-persistent buffers (``pixel_mean``,
      ``pixel_std``, anchors) are not part of it, as in a model-zoo checkpoint.
    """
    _check_seed(seed)
    _check_num_classes(num_classes)
    return _state_dict(_entries(int(num_classes), _variant(variant)), int(seed), calibration, "Mask R-CNN R50-FPN")


def faster_rcnn_r50_fpn_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
) -> dict[str, np.ndarray]:
    """detectron2's Faster R-CNN R50-FPN state dict (``faster_rcnn_R_50_FPN_3x.yaml``): the Mask
    R-CNN one of :func:`mask_rcnn_r50_fpn_state_dict` without ``roi_heads.mask_head``, the same
    values for the same seed. A Mask R-CNN calibration applies as it is (its mask-head scales are
    ignored), so both models give the same boxes."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    if calibration is not None:
        calibration = {k: v for k, v in _read_calibration(calibration).items()
                       if not k.startswith(("scale.roi_heads.mask_head.", "value.roi_heads.mask_head."))}
    return _state_dict(_entries(int(num_classes), mask_on=False), int(seed), calibration, "Faster R-CNN R50-FPN")


def rotated_faster_rcnn_r50_fpn_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
    num_anchors: int = 21,
) -> dict[str, np.ndarray]:
    """detectron2's rotated Faster R-CNN R50-FPN state dict
    (``detlayers/models/config/rotated_faster_rcnn_R_50_FPN_3x.yaml``): the Faster R-CNN one of
    :func:`faster_rcnn_r50_fpn_state_dict` (same backbone and box-head values for the same seed)
    with 5 deltas an anchor in ``rpn_head.anchor_deltas`` (``num_anchors`` a cell: sizes x ratios x
    angles, 21 for the YAML's 1 x 3 x 7) and 5 a class in ``box_predictor.bbox_pred``.
    ``calibration``: as :func:`mask_rcnn_r50_fpn_state_dict`'s, e.g.
    :func:`rotated_faster_rcnn_calibration` (mask-head entries are ignored)."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    if calibration is not None:
        calibration = {k: v for k, v in _read_calibration(calibration).items()
                       if not k.startswith(("scale.roi_heads.mask_head.", "value.roi_heads.mask_head."))}
    entries = _entries(int(num_classes), mask_on=False, num_anchors=int(num_anchors), box_dim=5)
    return _state_dict(entries, int(seed), calibration, "rotated Faster R-CNN R50-FPN")


def rotated_faster_rcnn_calibration(
    frozen_bn_source: str | os.PathLike[str] | dict[str, np.ndarray],
    head_scales: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The calibration of :func:`rotated_faster_rcnn_r50_fpn_state_dict`: the FrozenBN statistics of
    ``frozen_bn_source`` (a Mask R-CNN calibration such as
    ``tests/fixtures/mask_rcnn_bn_calibration.npz``: the same seed gives the same ResNet-50) and the
    output-layer factors ``head_scales`` (``{"scale.roi_heads.box_predictor.cls_score.weight": ...}``,
    measured by ``tools/fixtures/make_rotated_faster_rcnn.py`` and stored in its fixture)."""
    stats = {k: v for k, v in _read_calibration(frozen_bn_source).items()
             if k.endswith((".norm.running_mean", ".norm.running_var"))}
    return {**stats, **dict(head_scales or {})}


# detectron2's prior-probability init (bias -4.6) leaves every RetinaNet score near 0.01, under
# the 0.05 test threshold; with this bias and the head's output layers rescaled (class logits of
# std 1 on a photograph) the scores of a photograph spread over the whole range.
RETINANET_CLS_BIAS = -3.0


def retinanet_calibration(
    frozen_bn_source: str | os.PathLike[str] | dict[str, np.ndarray],
    head_scales: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The calibration of :func:`retinanet_r50_fpn_state_dict`: the FrozenBN statistics of
    ``frozen_bn_source`` (a Mask R-CNN calibration such as
    ``tests/fixtures/mask_rcnn_bn_calibration.npz``: RetinaNet's ResNet-50 has the same names, so
    the same seed gives the same backbone and the same statistics), the ``cls_score`` bias
    :data:`RETINANET_CLS_BIAS`, and ``head_scales`` (``{"scale.head.cls_score.weight": ...}``,
    measured by ``tools/fixtures/make_retinanet.py`` and stored in its fixtures)."""
    stats = {k: v for k, v in _read_calibration(frozen_bn_source).items()
             if k.endswith((".norm.running_mean", ".norm.running_var"))}
    return {**stats, "value.head.cls_score.bias": np.float32(RETINANET_CLS_BIAS), **dict(head_scales or {})}


def retinanet_r50_fpn_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
    num_convs: int = 4,
    norm: str = "",
    prior_prob: float = 0.01,
) -> dict[str, np.ndarray]:
    """detectron2's RetinaNet R50-FPN state dict (``retinanet_R_50_FPN_3x.yaml``) with detectron2's
    init from a NumPy seed, as :func:`mask_rcnn_r50_fpn_state_dict` (the ResNet-50 values are the
    same for the same seed).

    ``num_classes``, ``num_convs``, ``norm`` (``""`` or ``"GN"``) and ``prior_prob`` are
    ``MODEL.RETINANET.{NUM_CLASSES, NUM_CONVS, NORM, PRIOR_PROB}``. ``calibration``: as in
    :func:`mask_rcnn_r50_fpn_state_dict`, e.g. :func:`retinanet_calibration` of the Mask R-CNN file.
    """
    _check_seed(seed)
    _check_num_classes(num_classes)
    if isinstance(num_convs, bool) or not isinstance(num_convs, (int, np.integer)) or num_convs < 0:
        raise ValueError(f"num_convs must be a non-negative int, got {num_convs!r}")
    if norm not in ("", "GN"):
        raise ValueError(f"norm must be '' or 'GN', got {norm!r}")
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob!r}")
    entries = _retinanet_entries(int(num_classes), int(num_convs), norm, float(prior_prob))
    return _state_dict(entries, int(seed), calibration, "RetinaNet R50-FPN")


def cascade_mask_rcnn_r50_fpn_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
    num_stages: int = 3,
    mask_on: bool = True,
) -> dict[str, np.ndarray]:
    """detectron2's Cascade Mask R-CNN R50-FPN state dict (``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``
    with ``num_stages`` entries in ``MODEL.ROI_BOX_CASCADE_HEAD``): the backbone, RPN and mask head of
    :func:`mask_rcnn_r50_fpn_state_dict` (the same values for the same seed), and per stage ``k`` the
    2-fc ``roi_heads.box_head.{k}`` and the class-agnostic ``roi_heads.box_predictor.{k}``, each
    drawn from its own name's stream (so the first two stages of a 3-stage model equal a 2-stage
    one's); ``mask_on`` False leaves ``roi_heads.mask_head`` out (``MODEL.MASK_ON`` False).
    ``calibration``: as in :func:`mask_rcnn_r50_fpn_state_dict`, e.g.
    ``tests/fixtures/cascade_mask_rcnn_calibration.npz`` (written by
    ``tools/fixtures/make_cascade_mask_rcnn.py``); scales of stages this model lacks are ignored."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    entries = _entries(int(num_classes), mask_on=bool(mask_on), cascade_stages=int(num_stages))
    if calibration is not None:
        names = {name for name, _, _ in _entries(int(num_classes), mask_on=bool(mask_on),
                                                  cascade_stages=int(num_stages))}
        calibration = {k: v for k, v in _read_calibration(calibration).items()
                       if not k.startswith((_SCALE_PREFIX, _VALUE_PREFIX)) or k.split(".", 1)[1] in names}
    return _state_dict(entries, int(seed), calibration, "Cascade Mask R-CNN R50-FPN")


# C4 / DC5 (no FPN): one backbone map, five anchor sizes x three aspect ratios a cell.
_SINGLE_LEVEL_ANCHORS = 15
_RES4_OUT = _RES2_OUT * 4
_RES5_OUT = _RES2_OUT * 8


def _c4_entries(num_classes: int) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """Faster R-CNN R50-C4 in detectron2's order: the ResNet ``backbone`` up to res4, the RPN on
    res4, ``Res5ROIHeads``' ``res5`` stage (c2_msra_fill, FrozenBN) and its predictor on 2048."""
    yield from _resnet50_entries(prefix="backbone", num_stages=3)
    yield from _rpn_head_entries(_RES4_OUT, _SINGLE_LEVEL_ANCHORS)
    yield from _bottleneck_stage_entries("roi_heads.res5", 3, _RES4_OUT)
    yield from _box_predictor_entries(num_classes, _RES5_OUT)


def _dc5_entries(num_classes: int) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """Faster R-CNN R50-DC5 in detectron2's order: the ResNet ``backbone`` up to the dilated res5
    (the same shapes as an undilated one), the RPN on res5, the 2-fc box head on 7x7 res5 ROIs
    (c2_xavier_fill) and its predictor."""
    yield from _resnet50_entries(prefix="backbone", num_stages=4)
    yield from _rpn_head_entries(_RES5_OUT, _SINGLE_LEVEL_ANCHORS)
    features = _RES5_OUT * _BOX_POOLER**2
    for k in (1, 2):
        yield f"roi_heads.box_head.fc{k}.weight", (_FC_DIM, features), ("xavier",)
        yield f"roi_heads.box_head.fc{k}.bias", (_FC_DIM,), ("const", 0.0)
        features = _FC_DIM
    yield from _box_predictor_entries(num_classes, _FC_DIM)


def faster_rcnn_r50_c4_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
) -> dict[str, np.ndarray]:
    """detectron2's Faster R-CNN R50-C4 state dict (``faster_rcnn_R_50_C4_3x.yaml``): ``backbone``
    (stem, res2-res4), the RPN on res4 (15 anchors a cell), ``roi_heads.res5`` and
    ``roi_heads.box_predictor``, with detectron2's init from a NumPy seed; ``calibration`` as in
    :func:`mask_rcnn_r50_fpn_state_dict` (its FrozenBN statistics include the res5 head's), e.g.
    ``tests/fixtures/faster_rcnn_c4_calibration.npz`` written by
    ``tools/fixtures/make_faster_rcnn_c4.py``."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    return _state_dict(_c4_entries(int(num_classes)), int(seed), calibration, "Faster R-CNN R50-C4")


def faster_rcnn_r50_dc5_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
) -> dict[str, np.ndarray]:
    """detectron2's Faster R-CNN R50-DC5 state dict (``faster_rcnn_R_50_DC5_3x.yaml``): ``backbone``
    (stem, res2-res5), the RPN on res5 (15 anchors a cell), the box head ``fc1`` (2048 x 7 x 7 in)
    and ``fc2`` and ``roi_heads.box_predictor``; as :func:`faster_rcnn_r50_c4_state_dict`."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    return _state_dict(_dc5_entries(int(num_classes)), int(seed), calibration, "Faster R-CNN R50-DC5")


# SemSegFPNHead of Base-Panoptic-FPN.yaml: P2-P5 (stride 4..32) to COMMON_STRIDE 4, CONVS_DIM 128.
_SEM_SEG_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
_SEM_SEG_COMMON_STRIDE = 4
_SEM_SEG_CONVS_DIM = 128


def _sem_seg_entries(num_classes: int, norm: str) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``sem_seg_head`` in detectron2's order: per feature the ``nn.Sequential`` of 3x3 convs (each
    followed by an upsampling layer, which takes an index, unless the feature is at the common
    stride), then the 1x1 ``predictor``; every conv ``c2_msra_fill``."""
    for feature, stride in _SEM_SEG_STRIDES.items():
        length = max(1, int(math.log2(stride) - math.log2(_SEM_SEG_COMMON_STRIDE)))
        step = 1 if stride == _SEM_SEG_COMMON_STRIDE else 2
        channels = _FPN_OUT
        for k in range(length):
            yield from _conv_with_norm(f"sem_seg_head.{feature}.{k * step}", _SEM_SEG_CONVS_DIM, channels, 3, norm)
            channels = _SEM_SEG_CONVS_DIM
    yield "sem_seg_head.predictor.weight", (num_classes, _SEM_SEG_CONVS_DIM, 1, 1), ("msra",)
    yield "sem_seg_head.predictor.bias", (num_classes,), ("const", 0.0)


def panoptic_fpn_r50_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    num_classes: int = 80,
    sem_seg_classes: int = 54,
    sem_seg_norm: str = "GN",
) -> dict[str, np.ndarray]:
    """detectron2's Panoptic FPN R50 state dict (``panoptic_fpn_R_50_3x.yaml``): the Mask R-CNN one
    of :func:`mask_rcnn_r50_fpn_state_dict` (same values for the same seed), then ``sem_seg_head``
    with ``sem_seg_classes`` (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``) and ``sem_seg_norm``
    (``MODEL.SEM_SEG_HEAD.NORM``: ``"GN"`` or ``""``, biased convs). ``calibration`` as in
    :func:`mask_rcnn_r50_fpn_state_dict`, e.g. ``tests/fixtures/mask_rcnn_bn_calibration.npz``."""
    _check_seed(seed)
    _check_num_classes(num_classes)
    _check_num_classes(sem_seg_classes)
    if sem_seg_norm not in ("", "GN"):
        raise ValueError(f"sem_seg_norm must be '' or 'GN', got {sem_seg_norm!r}")

    def entries():
        yield from _entries(int(num_classes))
        yield from _sem_seg_entries(int(sem_seg_classes), sem_seg_norm)

    return _state_dict(entries(), int(seed), calibration, "Panoptic FPN R50")


# DeepLab (projects/DeepLab): ResNet with the three-conv stem, DeepLabV3+ head.


def _aspp_entries(prefix: str, in_ch: int, width: int, separable: bool, norm: str
                  ) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """detectron2's ``ASPP``: ``convs.0`` (1x1), ``convs.1..3`` (3x3, or depthwise-separable:
    ``c2_msra_fill``), ``convs.4.1`` (the pooled 1x1: bias, no norm), ``project``; c2_xavier_fill."""
    yield from _conv_with_norm(f"{prefix}.convs.0", width, in_ch, 1, norm, ("xavier",))
    for k in (1, 2, 3):
        if separable:
            yield from _conv_with_norm(f"{prefix}.convs.{k}.depthwise", in_ch, 1, 3, norm)
            yield from _conv_with_norm(f"{prefix}.convs.{k}.pointwise", width, in_ch, 1, norm)
        else:
            yield from _conv_with_norm(f"{prefix}.convs.{k}", width, in_ch, 3, norm, ("xavier",))
    yield from _conv_with_norm(f"{prefix}.convs.4.1", width, in_ch, 1, "", ("xavier",))
    yield from _conv_with_norm(f"{prefix}.project", width, 5 * width, 1, norm, ("xavier",))
_DEEPLAB_STEM_OUT = 128
_R_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _deeplab_entries(
    depth: int, stem_type: str, num_classes: int, use_depthwise_separable_conv: bool, plus: bool,
    decoder: tuple[tuple[str, int], ...] = (("res2", 48),), norm: str = "SyncBN",
) -> Iterator[tuple[str, tuple[int, ...], _Init]]:
    """``SemanticSegmentor`` with ``build_resnet_deeplab_backbone`` and ``DeepLabV3PlusHead`` (the
    Cityscapes config: ``decoder`` stages ``(feature, projected channels)`` finest first, res2
    projected to 48; ASPP on res5, ASPP and decoder 256 wide; ``plus`` False: ``DeepLabV3Head``,
    the ASPP on res5) in detectron2's order."""
    stem_out = _DEEPLAB_STEM_OUT if stem_type == "deeplab" else _STEM_OUT
    if stem_type == "deeplab":  # DeepLabStem: three 3x3 convs, c2_msra_fill
        yield from _conv_with_norm("backbone.stem.conv1", stem_out // 2, 3, 3, norm)
        yield from _conv_with_norm("backbone.stem.conv2", stem_out // 2, stem_out // 2, 3, norm)
        yield from _conv_with_norm("backbone.stem.conv3", stem_out, stem_out // 2, 3, norm)
    else:
        yield from _conv_with_norm("backbone.stem.conv1", stem_out, 3, 7, norm)
    in_ch = stem_out
    for stage_index, blocks in enumerate(_R_BLOCKS[depth]):
        out_ch = _RES2_OUT * 2**stage_index
        bottleneck = _BOTTLENECK_RES2 * 2**stage_index
        for b in range(blocks):
            block = f"backbone.res{stage_index + 2}.{b}"
            if in_ch != out_ch:
                yield from _conv_with_norm(f"{block}.shortcut", out_ch, in_ch, 1, norm)
            yield from _conv_with_norm(f"{block}.conv1", bottleneck, in_ch, 1, norm)
            yield from _conv_with_norm(f"{block}.conv2", bottleneck, bottleneck, 3, norm)
            yield from _conv_with_norm(f"{block}.conv3", out_ch, bottleneck, 1, norm)
            in_ch = out_ch
    width, res5 = 256, _RES2_OUT * 8
    if not plus:  # DeepLabV3Head: the ASPP on res5, then the predictor
        yield from _aspp_entries("sem_seg_head.aspp", res5, width, use_depthwise_separable_conv, norm)
        yield "sem_seg_head.predictor.weight", (num_classes, width, 1, 1), ("normal", 0.001)
        yield "sem_seg_head.predictor.bias", (num_classes,), ("const", 0.0)
        return
    head = "sem_seg_head.decoder"
    for feature, project in decoder:  # finest first, as detectron2 registers the stages
        stage = f"{head}.{feature}"
        in_ch = _RES2_OUT * 2 ** (int(feature[3:]) - 2)
        yield from _conv_with_norm(f"{stage}.project_conv", project, in_ch, 1, norm, ("xavier",))
        if use_depthwise_separable_conv:  # one 5x5 DepthwiseSeparableConv2d, c2_msra_fill
            yield from _conv_with_norm(f"{stage}.fuse_conv.depthwise", project + width, 1, 5, norm)
            yield from _conv_with_norm(f"{stage}.fuse_conv.pointwise", width, project + width, 1, norm)
        else:
            yield from _conv_with_norm(f"{stage}.fuse_conv.0", width, project + width, 3, norm, ("xavier",))
            yield from _conv_with_norm(f"{stage}.fuse_conv.1", width, width, 3, norm, ("xavier",))
    yield from _aspp_entries(f"{head}.res5.project_conv", res5, width, use_depthwise_separable_conv, norm)
    yield "sem_seg_head.predictor.weight", (num_classes, width, 1, 1), ("normal", 0.001)
    yield "sem_seg_head.predictor.bias", (num_classes,), ("const", 0.0)


def deeplab_v3_plus_state_dict(
    seed: int = 0,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None = None,
    depth: int = 101,
    stem_type: str = "deeplab",
    num_classes: int = 19,
    use_depthwise_separable_conv: bool = False,
    head: str = "DeepLabV3PlusHead",
    decoder_features: tuple[str, ...] = ("res2",),
    project_channels: tuple[int, ...] = (48,),
) -> dict[str, np.ndarray]:
    """detectron2's DeepLabV3+ state dict (``projects/DeepLab``'s
    ``deeplab_v3_plus_R_103_os16_mg124_poly_90k_bs16.yaml``: ``SemanticSegmentor``, SyncBN
    everywhere) with detectron2's init from a NumPy seed: ResNet-``depth`` (50 or 101; 101 is the
    zoo's R-103) with the ``"deeplab"`` stem (three 3x3 convs, 128 channels) or the ``"basic"`` one
    (one 7x7 conv, 64), every conv ``c2_msra_fill``; the head's convs ``c2_xavier_fill`` (the
    depthwise-separable ones, ``use_depthwise_separable_conv``, ``c2_msra_fill``), the predictor
    normal std 0.001; BN weight 1, bias 0, mean 0, var 1, ``num_batches_tracked`` 0.
    ``calibration``: as in :func:`mask_rcnn_r50_fpn_state_dict` (every ``running_mean`` /
    ``running_var``, and ``scale.`` factors), e.g. ``tests/fixtures/deeplab_calibration.npz``
    written by ``tools/fixtures/make_deeplab.py``. ``head="DeepLabV3Head"`` gives
    ``deeplab_v3_R_103_os16_mg124_poly_90k_bs16.yaml``'s (``sem_seg_head.aspp`` and the predictor).
    ``decoder_features`` / ``project_channels``: the DeepLabV3+ decoder's features besides res5
    (``SEM_SEG_HEAD.IN_FEATURES`` but the last, finest first) and their ``PROJECT_CHANNELS``."""
    _check_seed(seed)
    if head not in ("DeepLabV3PlusHead", "DeepLabV3Head"):
        raise ValueError(f"head must be 'DeepLabV3PlusHead' or 'DeepLabV3Head', got {head!r}")
    _check_num_classes(num_classes)
    if depth not in _R_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(_R_BLOCKS)}, got {depth!r}")
    if stem_type not in ("basic", "deeplab"):
        raise ValueError(f"stem_type must be 'basic' or 'deeplab', got {stem_type!r}")
    if len(decoder_features) != len(project_channels) or not set(decoder_features) <= {"res2", "res3", "res4"}:
        raise ValueError(f"decoder_features {decoder_features} (of res2-res4) need one project_channels entry "
                         f"each, got {project_channels}")
    decoder = tuple((f, int(c)) for f, c in zip(decoder_features, project_channels))
    entries = _deeplab_entries(int(depth), stem_type, int(num_classes), bool(use_depthwise_separable_conv),
                               head == "DeepLabV3PlusHead", decoder)
    state = _state_dict(entries, int(seed), calibration, "DeepLabV3+")
    for name in state:
        if name.endswith(".num_batches_tracked"):
            state[name] = np.zeros((), np.int64)
    return state


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _state_dict(
    entries: Iterator[tuple[str, tuple[int, ...], _Init]],
    seed: int,
    calibration: str | os.PathLike[str] | dict[str, np.ndarray] | None,
    model: str,
) -> dict[str, np.ndarray]:
    state = {name: _draw(seed, name, shape, init) for name, shape, init in entries}
    if calibration is not None:
        _apply_calibration(state, calibration, model)
    return state


def _read_calibration(calibration: str | os.PathLike[str] | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(calibration, (str, os.PathLike)):
        with np.load(calibration) as f:
            return {k: f[k] for k in f.files}
    return dict(calibration)


def _apply_calibration(
    state: dict[str, np.ndarray], calibration: str | os.PathLike[str] | dict[str, np.ndarray], model: str
) -> None:
    stats = _read_calibration(calibration)
    wanted = [k for k in state if k.endswith((".norm.running_mean", ".norm.running_var"))]
    missing = [k for k in wanted if k not in stats]
    bad_shape = [
        f"{k}: {np.shape(stats[k])} (expected {state[k].shape})"
        for k in wanted
        if k in stats and np.shape(stats[k]) != state[k].shape
    ]
    scales = {k[len(_SCALE_PREFIX):]: v for k, v in stats.items() if k.startswith(_SCALE_PREFIX)}
    values = {k[len(_VALUE_PREFIX):]: v for k, v in stats.items() if k.startswith(_VALUE_PREFIX)}
    unknown = [k for k in (*scales, *values) if k not in state]
    if missing or bad_shape or unknown:
        raise ValueError(
            f"calibration does not hold every FrozenBN statistic of {model}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); "
            f"wrong shape {bad_shape}; scales or values of unknown parameters {unknown}"
        )
    for k in wanted:
        state[k] = np.asarray(stats[k], dtype=np.float32).copy()
    for k, scale in scales.items():
        state[k] = state[k] * np.float32(scale)
    for k, value in values.items():
        state[k] = np.full(state[k].shape, value, dtype=np.float32)
