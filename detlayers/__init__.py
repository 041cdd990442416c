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

from detlayers._lazy import exports_by_name, lazy_exports

__version__ = "0.1.0"

# submodule -> the public names it defines (one op family a file).
_NAMES_BY_MODULE: dict[str, tuple[str, ...]] = {
    # box and suppression ops
    "nms": ("NMSResult", "nms", "batched_nms", "nms_rotated", "batched_nms_rotated"),
    "rotated_boxes": ("pairwise_iou_rotated",),
    "boxes": (
        "box_area", "box_iou", "pairwise_intersection", "pairwise_iou", "pairwise_ioa", "clip_boxes", "nonempty",
        "Box2BoxTransform", "Box2BoxTransformRotated", "rotated_box_area", "clip_rotated_boxes", "nonempty_rotated",
    ),
    # ROI pooling
    "roi_align": ("roi_align", "ROIAlign"),
    "roi_align_rotated": ("roi_align_rotated", "ROIAlignRotated"),
    # deformable convolution
    "deform_conv": ("deform_conv", "modulated_deform_conv", "DeformConv", "ModulatedDeformConv"),
    # masks
    "mask_ops": ("paste_masks_in_image",),
    # normalization
    "batch_norm": (
        "BatchNorm2d", "FrozenBatchNorm2d", "NaiveSyncBatchNorm", "SyncBatchNorm", "get_norm", "GroupNorm",
        "LayerNorm", "CycleBatchNormList",
    ),
    "freeze": (
        "convert_frozen_batchnorm", "frozen_class", "trainable_mask", "prefix_trainable_mask", "masked_optimizer",
    ),
    # wrappers and blocks
    "shape_spec": ("ShapeSpec",),
    "wrappers": ("Conv2d", "ConvTranspose2d", "Linear", "cat", "nonzero_tuple", "shapes_to_tensor"),
    "interpolate": ("interpolate",),
    "blocks": ("CNNBlockBase", "DepthwiseSeparableConv2d"),
    "aspp": ("ASPP",),
    "losses": ("diou_loss", "ciou_loss", "cross_entropy"),
    # checkpoints
    "torch_weights": ("load_torch_state_dict",),
}
# public name -> submodule that defines it
_EXPORTS: dict[str, str] = exports_by_name(_NAMES_BY_MODULE)

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
    from detlayers.boxes import (
        Box2BoxTransform,
        Box2BoxTransformRotated,
        box_area,
        box_iou,
        clip_boxes,
        clip_rotated_boxes,
        nonempty,
        nonempty_rotated,
        pairwise_intersection,
        pairwise_ioa,
        pairwise_iou,
        rotated_box_area,
    )
    from detlayers.deform_conv import DeformConv, ModulatedDeformConv, deform_conv, modulated_deform_conv
    from detlayers.freeze import (
        convert_frozen_batchnorm,
        frozen_class,
        masked_optimizer,
        prefix_trainable_mask,
        trainable_mask,
    )
    from detlayers.interpolate import interpolate
    from detlayers.losses import ciou_loss, cross_entropy, diou_loss
    from detlayers.mask_ops import paste_masks_in_image
    from detlayers.nms import NMSResult, batched_nms, batched_nms_rotated, nms, nms_rotated
    from detlayers.roi_align import ROIAlign, roi_align
    from detlayers.roi_align_rotated import ROIAlignRotated, roi_align_rotated
    from detlayers.rotated_boxes import pairwise_iou_rotated
    from detlayers.shape_spec import ShapeSpec
    from detlayers.torch_weights import load_torch_state_dict
    from detlayers.wrappers import (
        Conv2d,
        ConvTranspose2d,
        Linear,
        cat,
        nonzero_tuple,
        shapes_to_tensor,
    )
