"""detlayers: detectron2's detection layers (``detectron2.layers``) for JAX and Flax linen.

Every public layer is importable from here (``import detlayers as L``); the conventions they all
follow are in the repository's ``docs/conventions.md``.

Submodules are imported lazily on first attribute access, so ``import detlayers`` stays cheap and
one op family never pays for another's import.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from detlayers._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it (one op family a file).
_EXPORTS: dict[str, str] = {
    # box and suppression ops
    "NMSResult": "nms",
    "nms": "nms",
    "batched_nms": "nms",
    "nms_rotated": "nms",
    "batched_nms_rotated": "nms",
    "pairwise_iou_rotated": "rotated_boxes",
    # ROI pooling
    "roi_align": "roi_align",
    "ROIAlign": "roi_align",
    "roi_align_rotated": "roi_align_rotated",
    "ROIAlignRotated": "roi_align_rotated",
    # deformable convolution
    "deform_conv": "deform_conv",
    "modulated_deform_conv": "deform_conv",
    "DeformConv": "deform_conv",
    "ModulatedDeformConv": "deform_conv",
    # masks
    "paste_masks_in_image": "mask_ops",
    # normalization
    "BatchNorm2d": "batch_norm",
    "FrozenBatchNorm2d": "batch_norm",
    "NaiveSyncBatchNorm": "batch_norm",
    "SyncBatchNorm": "batch_norm",
    "get_norm": "batch_norm",
    "GroupNorm": "batch_norm",
    "LayerNorm": "batch_norm",
    "CycleBatchNormList": "batch_norm",
    "convert_frozen_batchnorm": "freeze",
    "frozen_class": "freeze",
    "trainable_mask": "freeze",
    "prefix_trainable_mask": "freeze",
    "masked_optimizer": "freeze",
    # wrappers and blocks
    "ShapeSpec": "shape_spec",
    "Conv2d": "wrappers",
    "ConvTranspose2d": "wrappers",
    "Linear": "wrappers",
    "cat": "wrappers",
    "interpolate": "wrappers",
    "nonzero_tuple": "wrappers",
    "shapes_to_tensor": "wrappers",
    "cross_entropy": "wrappers",
    "CNNBlockBase": "blocks",
    "DepthwiseSeparableConv2d": "blocks",
    "ASPP": "aspp",
    "diou_loss": "losses",
    "ciou_loss": "losses",
    # checkpoints
    "load_torch_state_dict": "torch_weights",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


class _Package(types.ModuleType):
    """Keeps exported functions from being replaced by their same-named submodules.

    Importing ``detlayers.nms`` (the module) makes Python set the package attribute ``nms`` to
    that module, which would shadow the function ``nms`` exported here (torchvision.ops has the
    same clash).  The function wins; the module stays importable (``from detlayers.nms import
    ...`` reads ``sys.modules``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static tools see the real definitions
    from detlayers.aspp import ASPP
    from detlayers.batch_norm import (
        BatchNorm2d,
        CycleBatchNormList,
        FrozenBatchNorm2d,
        GroupNorm,
        LayerNorm,
        NaiveSyncBatchNorm,
        SyncBatchNorm,
        get_norm,
    )
    from detlayers.blocks import CNNBlockBase, DepthwiseSeparableConv2d
    from detlayers.torch_weights import load_torch_state_dict
    from detlayers.freeze import (
        convert_frozen_batchnorm,
        frozen_class,
        masked_optimizer,
        prefix_trainable_mask,
        trainable_mask,
    )
    from detlayers.deform_conv import DeformConv, ModulatedDeformConv, deform_conv, modulated_deform_conv
    from detlayers.losses import ciou_loss, diou_loss
    from detlayers.mask_ops import paste_masks_in_image
    from detlayers.nms import NMSResult, batched_nms, batched_nms_rotated, nms, nms_rotated
    from detlayers.roi_align import ROIAlign, roi_align
    from detlayers.roi_align_rotated import ROIAlignRotated, roi_align_rotated
    from detlayers.rotated_boxes import pairwise_iou_rotated
    from detlayers.shape_spec import ShapeSpec
    from detlayers.wrappers import (
        Conv2d,
        ConvTranspose2d,
        Linear,
        cat,
        cross_entropy,
        interpolate,
        nonzero_tuple,
        shapes_to_tensor,
    )
