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
_NON_WEIGHT_PREFIXES = ("proposal_generator.anchor_generator.",)


def example_inputs(batch: int = 1, hw: tuple[int, int] = (64, 64)) -> tuple:
    """Small ``(images, image_hw, output_hw)`` that give a ``GeneralizedRCNN`` its variable shapes."""
    images = jnp.zeros((batch, hw[0], hw[1], 3), jnp.float32)
    sizes = jnp.full((batch, 2), hw[0], jnp.int32)
    return images, sizes, sizes


def load_detectron2_weights(model: nn.Module, weights: Any) -> dict:
    """Variables of ``model`` (a ``GeneralizedRCNN``) from detectron2 weights: a model-zoo
    ``.pkl``, a ``.pth`` or a ``{name: array}`` dict with ``GeneralizedRCNN.state_dict()`` names.

    ``pixel_mean``/``pixel_std`` and anchor buffers are ignored (they come from the config), as are
    ``num_batches_tracked``. Any missing, unexpected or mis-shaped key raises ONE ``ValueError``
    listing all of them (:func:`detlayers.load_torch_state_dict`).
    """
    from detlayers.torch_weights import load_torch_state_dict, read_state_dict

    state = read_state_dict(weights)
    state = {
        k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS and not k.startswith(_NON_WEIGHT_PREFIXES)
    }
    return load_torch_state_dict(model, state, *example_inputs())


def save_detectron2_weights(variables: Mapping, path: str | os.PathLike[str], *, model: nn.Module) -> dict:
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
      model: the module the variables belong to (its submodules decide the layouts).

    Returns:
      The ``{name: array}`` written.
    """
    from detlayers.torch_weights import torch_state_dict

    path = os.fspath(path)
    if not path.endswith(".pkl"):
        raise ValueError(f"save_detectron2_weights: path must end with .pkl (detectron2's format), got {path!r}")
    state = torch_state_dict(model, variables, *example_inputs())
    payload = {"model": state, "__author__": "detlayers", "matching_heuristics": False}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    return state
