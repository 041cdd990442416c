"""Loading detectron2 checkpoints into a model (detectron2's ``DetectionCheckpointer`` for inference)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["load_detectron2_weights", "example_inputs"]

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
    """Variables of ``model`` (a ``GeneralizedRCNN`` or ``RetinaNet``) from detectron2 weights: a model-zoo
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
