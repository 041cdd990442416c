"""detectron2's FPN (``modeling/backbone/fpn.py``) over the ResNet, with ``LastLevelMaxPool``.

Submodules ``bottom_up`` (the ResNet), ``fpn_lateral{2..5}`` and ``fpn_output{2..5}``: the state-dict
names of detectron2's ``build_resnet_fpn_backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from detlayers.interpolate import interpolate
from detlayers.models.resnet import ResNet
from detlayers.wrappers import Conv2d

Array = jax.Array


def last_level_max_pool(x: Array) -> Array:
    """detectron2's ``LastLevelMaxPool``: ``F.max_pool2d(x, kernel_size=1, stride=2)`` (P6 from P5)."""
    return x[:, ::2, ::2, :]


class ResNetFPN(nn.Module):
    """``build_resnet_fpn_backbone``: ``bottom_up`` is ``ResNet(**dict(resnet_kwargs))``;
    ``{"p2": [N, H/4, W/4, C], ..., "p6": [N, H/64, W/64, C]}``.

    The input height and width must be multiples of 32 (detectron2's ``size_divisibility``) so
    that every 2x nearest upsample meets its lateral map.
    """

    resnet_kwargs: tuple[tuple[str, Any], ...] = ()
    in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    out_channels: int = 256
    norm: str = ""
    fuse_type: str = "sum"

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        if self.fuse_type not in ("sum", "avg"):
            raise ValueError(f"ResNetFPN: fuse_type must be 'sum' or 'avg', got {self.fuse_type!r}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"ResNetFPN: input height and width must be multiples of 32, got shape {x.shape}")
        bottom_up = ResNet(**dict(self.resnet_kwargs), name="bottom_up")
        features = bottom_up(x)
        use_bias = self.norm == ""
        stages = [int(name[3:]) for name in self.in_features]
        in_channels = {name: features[name].shape[-1] for name in self.in_features}
        laterals = {
            s: Conv2d(in_channels[f"res{s}"], self.out_channels, 1, bias=use_bias, norm=self.norm or None,
                      name=f"fpn_lateral{s}") for s in stages
        }
        outputs_convs = {
            s: Conv2d(self.out_channels, self.out_channels, 3, padding=1, bias=use_bias, norm=self.norm or None,
                      name=f"fpn_output{s}") for s in stages
        }
        results = {}
        top = stages[-1]
        prev = laterals[top](features[f"res{top}"])
        results[f"p{top}"] = outputs_convs[top](prev)
        for s in reversed(stages[:-1]):
            top_down = interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = laterals[s](features[f"res{s}"]) + top_down
            if self.fuse_type == "avg":
                prev = prev / 2
            results[f"p{s}"] = outputs_convs[s](prev)
        results[f"p{top + 1}"] = last_level_max_pool(results[f"p{top}"])
        return {k: results[k] for k in sorted(results, key=lambda n: int(n[1:]))}
