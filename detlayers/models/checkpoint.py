"""Loading detectron2 checkpoints into a model (detectron2's ``DetectionCheckpointer`` for inference)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["load_detectron2_weights", "save_detectron2_weights", "example_inputs"]

# Entries of detectron2 checkpoints that are not weights of the model: the pixel statistics
# (they come from the config) and the anchor buffers (computed from the config).
_NON_WEIGHT_KEYS = ("pixel_mean", "pixel_std")
_NON_WEIGHT_PREFIXES = ("proposal_generator.anchor_generator.", "anchor_generator.")


def example_inputs(batch: int = 1, hw: tuple[int, int] = (64, 64)) -> tuple:
    """Small ``(images, image_hw, output_hw)`` that give a ``GeneralizedRCNN`` its variable shapes."""
    images = jnp.zeros((batch, hw[0], hw[1], 3), jnp.float32)
    sizes = jnp.full((batch, 2), hw[0], jnp.int32)
    return images, sizes, sizes


def load_detectron2_weights(model: nn.Module, weights: Any) -> dict:
    """Variables of ``model`` (a ``GeneralizedRCNN``, ``RetinaNet`` or ``SemanticSegmentor``) from
    detectron2 weights: a model-zoo ``.pkl``, a ``.pth`` or a ``{name: array}`` dict with the
    model's ``state_dict()`` names.

    ``pixel_mean``/``pixel_std`` and anchor buffers are ignored (they come from the config), as are
    ``num_batches_tracked``. Any missing, unexpected or mis-shaped key raises ONE ``ValueError``
    listing all of them (:func:`detlayers.load_torch_state_dict`).
    """
    from detlayers.torch_weights import load_torch_state_dict, read_state_dict

    state = read_state_dict(weights)
    state = {
        k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS and not k.startswith(_NON_WEIGHT_PREFIXES)
    }
    # a model whose input size is constrained (a DeepLab head pooling over a fixed window) says which
    hw = model.example_input_hw() if hasattr(model, "example_input_hw") else (64, 64)
    return load_torch_state_dict(model, state, *example_inputs(hw=hw))


def _model_of(variables: Mapping) -> nn.Module:
    """The ``GeneralizedRCNN`` (ResNet-FPN, FrozenBN, detectron2's zoo heads) whose variable tree is
    exactly ``variables``': depth from the blocks of each stage, classes and class-agnostic
    regression from the predictor, masks from the mask head. Anything else raises ``ValueError``
    asking for ``model=``; a guess is never used unchecked."""
    import jax

    from detlayers.models.backbone.resnet import _BLOCKS_PER_STAGE
    from detlayers.models.config import mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.meta_arch.build import build_model

    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    try:
        bottom_up = params["backbone"]["bottom_up"]
        blocks = tuple(sum(name.startswith(f"res{k}_") for name in bottom_up) for k in (2, 3, 4, 5))
        bottleneck = "conv3" in bottom_up["res2_0"]
        depth = next(d for d, b in _BLOCKS_PER_STAGE.items() if b == blocks and (d >= 50) == bottleneck)
        roi = params["roi_heads"]
        num_classes = int(roi["box_predictor"]["cls_score"]["bias"].shape[0]) - 1
        agnostic = int(roi["box_predictor"]["bbox_pred"]["bias"].shape[0]) == 4
        res2_out = int(bottom_up["res2_0"]["conv3" if bottleneck else "conv2"]["kernel"].shape[-1])
    except (KeyError, StopIteration, TypeError, AttributeError) as err:
        raise ValueError("save_detectron2_weights: cannot tell which model these variables belong to; "
                         "pass model=build_model(cfg)") from err
    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.RES2_OUT_CHANNELS", res2_out,
        "MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", agnostic,
        "MODEL.MASK_ON", "mask_head" in roi,
    ])
    model = build_model(cfg)
    expected = jax.eval_shape(model.init, jax.random.key(0), *example_inputs())
    shapes = jax.tree.map(lambda a: tuple(a.shape), dict(variables))
    if jax.tree.map(lambda a: tuple(a.shape), dict(expected)) != shapes:
        raise ValueError("save_detectron2_weights: these variables are not those of a detectron2 zoo "
                         f"R{depth}-FPN model with {num_classes} classes; pass model=build_model(cfg)")
    return model


def save_detectron2_weights(variables: Mapping, path: str | os.PathLike[str], *, model: nn.Module | None = None
                            ) -> dict:
    """Writes ``variables`` of ``model`` (a ``GeneralizedRCNN``) as a detectron2 ``.pkl`` that
    detectron2's ``DetectionCheckpointer`` loads into the model built from the same config.

    The file is a pickle of ``{"model": {detectron2 name: np.ndarray}, "__author__": "detlayers",
    "matching_heuristics": False}`` (the model-zoo layout; ``matching_heuristics=False`` makes
    detectron2 match names exactly). Names and layouts are those :func:`load_detectron2_weights`
    reads (:func:`detlayers.torch_weights.torch_state_dict`): kernels transposed back to
    PyTorch's layouts, FrozenBN / BN statistics as ``running_mean``/``running_var``/``weight``/
    ``bias``. ``num_batches_tracked`` and detectron2's non-persistent buffers (``pixel_mean``,
    ``pixel_std``, anchors) are not written, as in a model-zoo file. Arrays keep their dtype
    (float32 for a model from ``load_detectron2_weights`` or ``init``).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of ``model``.
      path: the ``.pkl`` to write (overwritten).
      model: the module the variables belong to (its submodules decide the layouts). When omitted
        (detectron2's ``save_detectron2_weights(variables, path)`` spelling), the zoo
        ``GeneralizedRCNN`` (ResNet-FPN, FrozenBN) whose variable tree is exactly ``variables`` is
        built from their shapes; any other model must be passed (``ValueError`` says so).

    Returns:
      The ``{name: array}`` written.
    """
    from detlayers.torch_weights import torch_state_dict

    path = os.fspath(path)
    if not path.endswith(".pkl"):
        raise ValueError(f"save_detectron2_weights: path must end with .pkl (detectron2's format), got {path!r}")
    if model is None:
        model = _model_of(variables)
    state = torch_state_dict(model, variables, *example_inputs())
    payload = {"model": state, "__author__": "detlayers", "matching_heuristics": False}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    return state
