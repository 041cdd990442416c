"""The public names and their signatures import from ``detlayers`` (see docs/conventions.md)."""

import inspect

import pytest

import detlayers as L

SPEC_NAMES = """
nms batched_nms nms_rotated batched_nms_rotated pairwise_iou_rotated NMSResult
roi_align ROIAlign roi_align_rotated ROIAlignRotated
deform_conv modulated_deform_conv DeformConv ModulatedDeformConv
paste_masks_in_image
BatchNorm2d FrozenBatchNorm2d NaiveSyncBatchNorm get_norm LayerNorm CycleBatchNormList
convert_frozen_batchnorm
ShapeSpec Conv2d ConvTranspose2d Linear cat interpolate nonzero_tuple CNNBlockBase
DepthwiseSeparableConv2d ASPP diou_loss ciou_loss cross_entropy shapes_to_tensor
load_torch_state_dict
""".split()

# leading parameters as the spec writes them (callables) or dataclass fields (modules)
SPEC_PARAMETERS = {
    "nms": ["boxes", "scores", "iou_threshold", "max_output_size"],
    "batched_nms": ["boxes", "scores", "idxs", "iou_threshold", "max_output_size"],
    "nms_rotated": ["boxes", "scores", "iou_threshold", "max_output_size"],
    "batched_nms_rotated": ["boxes", "scores", "idxs", "iou_threshold", "max_output_size"],
    "pairwise_iou_rotated": ["boxes1", "boxes2"],
    "roi_align": ["input", "rois", "output_size", "spatial_scale", "sampling_ratio", "aligned"],
    "roi_align_rotated": ["input", "rois", "output_size", "spatial_scale", "sampling_ratio"],
    "deform_conv": ["input", "offset", "kernel", "stride", "padding", "dilation", "groups",
                    "deformable_groups"],
    "modulated_deform_conv": ["input", "offset", "mask", "kernel", "bias", "stride", "padding",
                              "dilation", "groups", "deformable_groups"],
    "paste_masks_in_image": ["masks", "boxes", "image_shape", "threshold"],
    "get_norm": ["norm", "out_channels"],
    "cat": ["tensors", "dim"],
    "interpolate": ["input", "size", "scale_factor", "mode", "align_corners"],
    "load_torch_state_dict": ["module", "state_dict"],
    "ROIAlign": ["output_size", "spatial_scale", "sampling_ratio", "aligned"],
    "ROIAlignRotated": ["output_size", "spatial_scale", "sampling_ratio"],
    "DeformConv": ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                   "groups", "deformable_groups", "bias", "norm", "activation"],
    "ModulatedDeformConv": ["in_channels", "out_channels", "kernel_size", "stride", "padding",
                            "dilation", "groups", "deformable_groups", "bias", "norm",
                            "activation"],
    "Conv2d": ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "bias", "norm", "activation"],
    "ConvTranspose2d": ["in_channels", "out_channels", "kernel_size", "stride", "padding",
                        "output_padding", "groups", "bias", "dilation"],
    "Linear": ["in_features", "out_features", "bias"],
    "BatchNorm2d": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    # detectron2's NaiveSyncBatchNorm subclasses torch's BatchNorm2d (and so does SyncBatchNorm):
    # the same positional arguments, extras keyword-only
    "NaiveSyncBatchNorm": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "SyncBatchNorm": ["num_features", "eps", "momentum", "affine", "track_running_stats"],
    "FrozenBatchNorm2d": ["num_features", "eps"],
    "ASPP": ["in_channels", "out_channels", "dilations", "norm", "activation", "pool_kernel_size",
             "dropout", "use_depthwise_separable_conv"],
    "ShapeSpec": ["channels", "height", "width", "stride"],
}


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_spec_name_is_exported(name):
    assert name in L.__all__
    assert getattr(L, name) is not None


@pytest.mark.parametrize("name", sorted(SPEC_PARAMETERS))
def test_spec_parameters_come_in_spec_order(name):
    params = [p for p in inspect.signature(getattr(L, name)).parameters
              if p not in ("self", "parent", "name")]
    want = SPEC_PARAMETERS[name]
    assert params[:len(want)] == want, f"{name}{tuple(params)}"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_layer"):
        L.no_such_layer  # noqa: B018


def test_importing_a_submodule_does_not_shadow_its_function():
    import detlayers.deform_conv  # noqa: F401
    import detlayers.interpolate  # noqa: F401
    import detlayers.nms  # noqa: F401
    import detlayers.roi_align  # noqa: F401
    from detlayers.nms import nms as nms_function

    assert L.nms is nms_function
    assert callable(L.roi_align) and L.roi_align.__name__ == "roi_align"
    assert L.deform_conv.__name__ == "deform_conv"
    assert callable(L.interpolate) and L.interpolate.__name__ == "interpolate"
