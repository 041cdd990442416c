"""``detlayers.models`` laid out as detectron2's ``modeling/``: registries keyed by detectron2's
registered names, one ``from_config`` per module mapping the config to plain fields, the variable
tree of the built model (names and shapes recorded from the model before the re-layout, whose
names the parity tests check against detectron2's state dict), ``Box2BoxTransform.get_deltas``
and the ``LastLevelP6P7`` top block against float64 NumPy derivations.

Everything here builds modules without compiling them, except the small FPN forward tests.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detlayers.models import mask_rcnn_R_50_FPN_3x_config
from detlayers.models import registry as reg
from detlayers.shape_spec import ShapeSpec

VARIABLES = pathlib.Path(__file__).parent / "fixtures" / "mask_rcnn_R_50_FPN_variables.txt"

# (registry, config key, the names detectron2 registers that are built here)
REGISTRIES = [
    (reg.META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE",
     ["GeneralizedRCNN", "PanopticFPN", "RetinaNet", "SemanticSegmentor"]),
    (reg.BACKBONE_REGISTRY, "MODEL.BACKBONE.NAME",
     ["build_resnet_backbone", "build_resnet_deeplab_backbone", "build_resnet_fpn_backbone",
      "build_retinanet_resnet_fpn_backbone"]),
    (reg.PROPOSAL_GENERATOR_REGISTRY, "MODEL.PROPOSAL_GENERATOR.NAME", ["RPN", "RRPN"]),
    (reg.ANCHOR_GENERATOR_REGISTRY, "MODEL.ANCHOR_GENERATOR.NAME",
     ["DefaultAnchorGenerator", "RotatedAnchorGenerator"]),
    (reg.RPN_HEAD_REGISTRY, "MODEL.RPN.HEAD_NAME", ["StandardRPNHead"]),
    (reg.ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME",
     ["CascadeROIHeads", "RROIHeads", "Res5ROIHeads", "StandardROIHeads"]),
    (reg.ROI_BOX_HEAD_REGISTRY, "MODEL.ROI_BOX_HEAD.NAME", ["FastRCNNConvFCHead"]),
    (reg.ROI_MASK_HEAD_REGISTRY, "MODEL.ROI_MASK_HEAD.NAME", ["MaskRCNNConvUpsampleHead"]),
    (reg.SEM_SEG_HEADS_REGISTRY, "MODEL.SEM_SEG_HEAD.NAME", ["DeepLabV3Head", "DeepLabV3PlusHead", "SemSegFPNHead"]),
]


def _merged(cfg, pairs):
    """A copy of ``cfg`` with ``pairs`` merged in (``merge_from_list`` changes a config in place)."""
    copy = cfg.clone()
    copy.merge_from_list(pairs)
    return copy


def _cfg(*pairs):
    return _merged(mask_rcnn_R_50_FPN_3x_config(), list(pairs))


# --------------------------------------------------------------------------------------------
# registries


def test_every_registry_is_exported_and_lists_detectron2s_names():
    import detlayers.models as models

    exported = {name for name in models.__all__ if name.endswith("_REGISTRY")}
    assert exported == {f"{r.name}_REGISTRY" for r, _, _ in REGISTRIES}
    for registry, key, names in REGISTRIES:
        assert getattr(models, f"{registry.name}_REGISTRY") is registry
        assert registry.config_key == key
        assert registry.names() == sorted(names)


@pytest.mark.parametrize("registry, key, names", REGISTRIES, ids=[r.name for r, _, _ in REGISTRIES])
def test_unknown_name_lists_the_known_ones(registry, key, names):
    with pytest.raises(KeyError) as info:
        registry.get("NoSuchPart")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"{key} 'NoSuchPart'" in message
    assert f"known: {sorted(names)}" in message


@pytest.mark.parametrize("registry, key, names", REGISTRIES[:-1], ids=[r.name for r, _, _ in REGISTRIES[:-1]])
def test_build_model_names_the_key_of_an_unknown_part(registry, key, names):
    from detlayers.models import build_model

    with pytest.raises(ValueError, match=f"{key} 'NoSuchPart' is not in the {registry.name} registry") as info:
        build_model(_cfg(key, "NoSuchPart"))
    assert str(sorted(names)) in str(info.value)


def test_register_adds_a_part_and_refuses_a_second_one_of_that_name():
    registry = reg.Registry("TEST", "MODEL.TEST.NAME")

    @registry.register()
    def my_part(cfg, input_shape):
        return ("built", cfg, input_shape)

    assert registry.get("my_part") is my_part
    assert reg.build_from_registry(registry, "my_part", "cfg", 3) == ("built", "cfg", 3)
    with pytest.raises(ValueError, match="'my_part' is already registered"):
        registry.register(lambda cfg: None, name="my_part")


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, False], "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
    ("MODEL.RESNETS.RES5_DILATION", 2, "MODEL.RESNETS.RES5_DILATION must be 1"),
    ("MODEL.RESNETS.DEPTH", 42, "MODEL.RESNETS.DEPTH must be one of"),
    ("MODEL.RPN.CONV_DIMS", [256], "MODEL.RPN.CONV_DIMS"),
    ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool", "MODEL.ROI_BOX_HEAD.POOLER_TYPE 'ROIPool'"),
    ("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlignRotated", "MODEL.ROI_MASK_HEAD.POOLER_TYPE 'ROIAlignRotated'"),
    ("MODEL.RPN.IN_FEATURES", ["p2", "p9"], r"MODEL.RPN.IN_FEATURES \['p9'\]"),
    ("MODEL.ROI_HEADS.IN_FEATURES", ["p1"], r"MODEL.ROI_HEADS.IN_FEATURES \['p1'\]"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]], "sizes needs 1 or 5 entries"),
])
def test_config_values_the_models_cannot_honour_raise_at_build_time(key, value, message):
    from detlayers.models import build_model

    with pytest.raises(ValueError, match=message):
        build_model(_cfg(key, value))


def test_build_model_refuses_a_non_config():
    from detlayers.models import build_model

    with pytest.raises(TypeError, match="cfg must be a detlayers.models config, got dict"):
        build_model({"MODEL": {}})


# --------------------------------------------------------------------------------------------
# from_config: every module's fields from the config (distinct non-default values)


def test_resnet_from_config():
    from detlayers.models.backbone import ResNet, build_backbone

    cfg = _cfg("MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", 101,
               "MODEL.RESNETS.NORM", "GN", "MODEL.RESNETS.NUM_GROUPS", 32, "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
               "MODEL.RESNETS.STRIDE_IN_1X1", False, "MODEL.RESNETS.RES5_DILATION", 2,
               "MODEL.RESNETS.STEM_OUT_CHANNELS", 32, "MODEL.RESNETS.RES2_OUT_CHANNELS", 128,
               "MODEL.RESNETS.OUT_FEATURES", ["stem", "res3", "res5"], "MODEL.BACKBONE.FREEZE_AT", 3,
               "MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0, 4.0], "MODEL.PIXEL_STD", [1.0, 1.0, 1.0, 1.0])
    net = build_backbone(cfg)
    assert isinstance(net, ResNet)
    assert (net.depth, net.norm, net.num_groups, net.width_per_group, net.stride_in_1x1, net.res5_dilation) == (
        101, "GN", 32, 8, False, 2)
    assert (net.stem_out_channels, net.res2_out_channels, net.freeze_at, tuple(net.out_features), net.in_channels) == (
        32, 128, 3, ("stem", "res3", "res5"), 4)
    # detectron2's output_shape(): res5 keeps stride 16 when dilated; channels double per stage
    assert net.output_shape() == {"stem": ShapeSpec(channels=32, stride=4), "res3": ShapeSpec(channels=256, stride=8),
                                  "res5": ShapeSpec(channels=1024, stride=16)}
    undilated = ResNet.from_config(_cfg("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64))
    assert undilated.output_shape() == {f"res{k}": ShapeSpec(channels=64 * 2 ** (k - 2), stride=2**k)
                                        for k in (2, 3, 4, 5)}


def test_fpn_backbones_from_config():
    from detlayers.models.backbone import FPN, LastLevelMaxPool, LastLevelP6P7, ResNet, build_backbone

    cfg = _cfg("MODEL.FPN.OUT_CHANNELS", 128, "MODEL.FPN.NORM", "GN", "MODEL.FPN.FUSE_TYPE", "avg",
               "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"], "MODEL.RESNETS.DEPTH", 34,
               "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
    fpn = build_backbone(cfg)
    assert isinstance(fpn, FPN) and isinstance(fpn.bottom_up, ResNet) and isinstance(fpn.top_block, LastLevelMaxPool)
    assert fpn.bottom_up.depth == 34
    assert (tuple(fpn.in_features), fpn.out_channels, fpn.norm, fpn.fuse_type) == (("res3", "res4", "res5"), 128, "GN",
                                                                                  "avg")
    assert fpn.size_divisibility == 32
    assert fpn.output_shape() == {f"p{k}": ShapeSpec(channels=128, stride=2**k) for k in (3, 4, 5, 6)}

    retina = build_backbone(_merged(cfg, ["MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"]))
    assert isinstance(retina.top_block, LastLevelP6P7)
    assert (retina.top_block.in_channels, retina.top_block.out_channels, retina.top_block.in_feature) == (
        512, 128, "res5")
    assert retina.output_shape() == {f"p{k}": ShapeSpec(channels=128, stride=2**k) for k in (3, 4, 5, 6, 7)}


def test_rpn_and_anchor_generator_from_config():
    from detlayers.models.anchor_generator import DefaultAnchorGenerator
    from detlayers.models.proposal_generator import RPN, StandardRPNHead, build_proposal_generator

    cfg = _cfg("MODEL.RPN.IN_FEATURES", ["p3", "p4"], "MODEL.RPN.PRE_NMS_TOPK_TEST", 300,
               "MODEL.RPN.POST_NMS_TOPK_TEST", 200, "MODEL.RPN.NMS_THRESH", 0.6,
               "MODEL.RPN.BBOX_REG_WEIGHTS", [2.0, 3.0, 4.0, 5.0], "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", 3,
               "MODEL.ANCHOR_GENERATOR.SIZES", [[16, 24], [48, 64]],
               "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0, 2.0]],
               "MODEL.ANCHOR_GENERATOR.OFFSET", 0.5)
    shapes = {f"p{k}": ShapeSpec(channels=96, stride=2**k) for k in (2, 3, 4, 5)}
    rpn = build_proposal_generator(cfg, shapes)
    assert isinstance(rpn, RPN)
    assert tuple(rpn.in_features) == ("p3", "p4")
    assert (rpn.pre_nms_topk, rpn.post_nms_topk, rpn.nms_thresh, rpn.min_box_size) == (300, 200, 0.6, 3.0)
    assert rpn.box2box_transform.weights == (2.0, 3.0, 4.0, 5.0)
    assert isinstance(rpn.rpn_head, StandardRPNHead)
    assert (rpn.rpn_head.in_channels, rpn.rpn_head.num_anchors) == (96, 4)
    anchors = rpn.anchor_generator
    assert isinstance(anchors, DefaultAnchorGenerator)
    assert anchors.sizes == ((16.0, 24.0), (48.0, 64.0))
    assert anchors.aspect_ratios == ((1.0, 2.0), (1.0, 2.0))  # one entry broadcast to every level
    assert (anchors.strides, anchors.offset, anchors.num_anchors) == ((8, 16), 0.5, [4, 4])
    with pytest.raises(ValueError, match="same number of anchors"):
        build_proposal_generator(_merged(cfg, ["MODEL.ANCHOR_GENERATOR.SIZES", [[16], [48, 64]]]), shapes)


def test_roi_heads_from_config():
    from detlayers.models.poolers import ROIPooler
    from detlayers.models.roi_heads import (
        FastRCNNConvFCHead,
        FastRCNNOutputLayers,
        MaskRCNNConvUpsampleHead,
        StandardROIHeads,
        build_roi_heads,
    )

    cfg = _cfg("MODEL.ROI_HEADS.IN_FEATURES", ["p3", "p4", "p5"], "MODEL.ROI_HEADS.NUM_CLASSES", 7,
               "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.3, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.4,
               "TEST.DETECTIONS_PER_IMAGE", 33,
               "MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, "MODEL.ROI_BOX_HEAD.NORM", "GN",
               "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "MODEL.ROI_BOX_HEAD.FC_DIM", 512,
               "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2,
               "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign",
               "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", [1.0, 2.0, 3.0, 4.0],
               "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
               "MODEL.ROI_MASK_HEAD.NUM_CONV", 3, "MODEL.ROI_MASK_HEAD.CONV_DIM", 48, "MODEL.ROI_MASK_HEAD.NORM", "BN",
               "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 9, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 1,
               "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True)
    shapes = {f"p{k}": ShapeSpec(channels=96, stride=2**k) for k in (2, 3, 4, 5, 6)}
    heads = build_roi_heads(cfg, shapes)
    assert isinstance(heads, StandardROIHeads)
    assert tuple(heads.box_in_features) == tuple(heads.mask_in_features) == ("p3", "p4", "p5")
    assert heads.box_pooler == ROIPooler(5, (1 / 8, 1 / 16, 1 / 32), 2, "ROIAlign")
    assert heads.box_pooler.strides == (8, 16, 32)
    assert heads.mask_pooler == ROIPooler(9, (1 / 8, 1 / 16, 1 / 32), 1, "ROIAlignV2")
    box_head = heads.box_head
    assert isinstance(box_head, FastRCNNConvFCHead)
    assert (box_head.input_shape, tuple(box_head.conv_dims), tuple(box_head.fc_dims), box_head.conv_norm) == (
        ShapeSpec(channels=96, height=5, width=5), (64, 64), (512,), "GN")
    predictor = heads.box_predictor
    assert isinstance(predictor, FastRCNNOutputLayers)
    assert (predictor.input_shape, predictor.input_dim, predictor.num_classes, predictor.cls_agnostic_bbox_reg) == (
        ShapeSpec(channels=512), 512, 7, True)
    assert (predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image) == (0.3, 0.4, 33)
    assert predictor.box2box_transform.weights == (1.0, 2.0, 3.0, 4.0)
    mask_head = heads.mask_head
    assert isinstance(mask_head, MaskRCNNConvUpsampleHead)
    assert (mask_head.input_shape, mask_head.num_classes, tuple(mask_head.conv_dims), mask_head.conv_norm) == (
        ShapeSpec(channels=96, height=9, width=9), 1, (48, 48, 48, 48), "BN")

    no_fc = FastRCNNConvFCHead.from_config(_merged(cfg, ["MODEL.ROI_BOX_HEAD.NUM_FC", 0]),
                                           ShapeSpec(channels=96, height=5, width=5))
    assert no_fc.output_shape() == ShapeSpec(channels=64, height=5, width=5)
    class_specific = MaskRCNNConvUpsampleHead.from_config(
        _merged(cfg, ["MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", False]), ShapeSpec(channels=96))
    assert class_specific.num_classes == 7
    faster = build_roi_heads(_merged(cfg, ["MODEL.MASK_ON", False]), shapes)
    assert faster.mask_head is None and faster.mask_pooler is None and tuple(faster.mask_in_features) == ()


def test_generalized_rcnn_from_config():
    from detlayers.models import GeneralizedRCNN, build_model
    from detlayers.models.backbone import FPN
    from detlayers.models.proposal_generator import RPN
    from detlayers.models.roi_heads import StandardROIHeads

    cfg = _cfg("MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0], "MODEL.PIXEL_STD", [4.0, 5.0, 6.0])
    model = build_model(cfg)
    assert isinstance(model, GeneralizedRCNN)
    assert isinstance(model.backbone, FPN) and isinstance(model.proposal_generator, RPN)
    assert isinstance(model.roi_heads, StandardROIHeads)
    assert (tuple(model.pixel_mean), tuple(model.pixel_std)) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert tuple(model.proposal_generator.in_features) == ("p2", "p3", "p4", "p5", "p6")
    assert model.proposal_generator.anchor_generator.strides == (4, 8, 16, 32, 64)
    assert model.roi_heads.box_pooler.strides == (4, 8, 16, 32)


# --------------------------------------------------------------------------------------------
# the variable tree


def test_variable_names_and_shapes_are_unchanged():
    """Every variable of build_model(R50 Mask R-CNN) by collection/path and shape, as recorded from
    the model before the re-layout (the names detectron2's checkpoints load into)."""
    from detlayers.models import build_model
    from detlayers.models.checkpoint import example_inputs

    shapes = jax.eval_shape(build_model(mask_rcnn_R_50_FPN_3x_config()).init, jax.random.key(0), *example_inputs())
    names = sorted(
        "/".join(p.key for p in path) + " " + "x".join(map(str, leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    )
    expected = VARIABLES.read_text().split("\n")[:-1]
    assert names == expected


# --------------------------------------------------------------------------------------------
# Box2BoxTransform.get_deltas, LastLevelP6P7 (float64 NumPy derivations)


def test_get_deltas_is_detectron2s_and_inverts_apply_deltas():
    from detlayers.models.box_regression import Box2BoxTransform

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (6, 2))
    src = np.concatenate([xy, xy + rng.uniform(5, 60, (6, 2))], axis=1).astype(np.float32)
    xy = rng.uniform(0, 100, (6, 2))
    tgt = np.concatenate([xy, xy + rng.uniform(5, 60, (6, 2))], axis=1).astype(np.float32)
    weights = (10.0, 5.0, 2.0, 1.0)
    transform = Box2BoxTransform(weights)
    deltas = np.asarray(transform.get_deltas(jnp.asarray(src), jnp.asarray(tgt)))
    s, t = src.astype(np.float64), tgt.astype(np.float64)
    sw, sh, tw, th = s[:, 2] - s[:, 0], s[:, 3] - s[:, 1], t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    expected = np.stack([
        10.0 * ((t[:, 0] + tw / 2) - (s[:, 0] + sw / 2)) / sw,
        5.0 * ((t[:, 1] + th / 2) - (s[:, 1] + sh / 2)) / sh,
        2.0 * np.log(tw / sw),
        1.0 * np.log(th / sh),
    ], axis=1)
    np.testing.assert_allclose(deltas, expected, rtol=1e-5, atol=1e-5)
    back = np.asarray(transform.apply_deltas(jnp.asarray(deltas), jnp.asarray(src)))
    np.testing.assert_allclose(back, tgt, rtol=0, atol=1e-3)


def _conv3x3_s2_reference(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 3x3 stride-2 padding-1 convolution of NHWC ``x`` with an HWIO kernel."""
    n, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.zeros((n, ho, wo, kernel.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            patch = padded[:, 2 * i: 2 * i + 3, 2 * j: 2 * j + 3, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, kernel.astype(np.float64))
    return out + bias.astype(np.float64)


class _StubBottomUp(nn.Module):
    """A bottom-up network without weights (fast to trace): ``res{k}`` is the input subsampled
    by ``2**k`` and projected by a fixed random matrix to ``CHANNELS[k]`` channels."""

    CHANNELS = {3: 8, 4: 12, 5: 20}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f"res{k}": ShapeSpec(channels=c, stride=2**k) for k, c in self.CHANNELS.items()}

    def __call__(self, x):
        rng = np.random.default_rng(2)
        return {f"res{k}": x[:, :: 2**k, :: 2**k, :] @ jnp.asarray(rng.normal(size=(3, c)), jnp.float32)
                for k, c in self.CHANNELS.items()}


@pytest.mark.parametrize("in_feature", ["res5", "p5"])
def test_retinanet_fpn_top_block_p6_p7(in_feature):
    from detlayers.models.backbone import FPN, LastLevelP6P7

    source_channels = 20 if in_feature == "res5" else 16
    fpn = FPN(bottom_up=_StubBottomUp(), in_features=("res3", "res4", "res5"), out_channels=16,
              top_block=LastLevelP6P7(source_channels, 16, in_feature=in_feature))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 128, 96, 3)), jnp.float32)
    variables = fpn.init(jax.random.key(0), x)
    params = variables["params"]["top_block"]
    assert set(params) == {"p6", "p7"}
    assert params["p6"]["kernel"].shape == (3, 3, source_channels, 16)
    out = fpn.apply(variables, x)
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    source = _StubBottomUp()(x)["res5"] if in_feature == "res5" else out["p5"]
    p6 = _conv3x3_s2_reference(np.asarray(source), np.asarray(params["p6"]["kernel"]), np.asarray(params["p6"]["bias"]))
    p7 = _conv3x3_s2_reference(np.maximum(p6, 0), np.asarray(params["p7"]["kernel"]), np.asarray(params["p7"]["bias"]))
    assert out["p6"].shape == (1, 2, 2, 16) and out["p7"].shape == (1, 1, 1, 16)
    np.testing.assert_allclose(np.asarray(out["p6"]), p6, rtol=1e-4, atol=1e-4 * np.abs(p6).max())
    np.testing.assert_allclose(np.asarray(out["p7"]), p7, rtol=1e-4, atol=1e-4 * np.abs(p7).max())
