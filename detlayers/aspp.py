"""Atrous Spatial Pyramid Pooling (DeepLab v3/v3+), detectron2's ``layers.ASPP`` in NHWC."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detlayers._checks import check_nhwc
from detlayers.blocks import DepthwiseSeparableConv2d, c2_xavier_kernel_init
from detlayers.interpolate import interpolate
from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["ASPP", "avg_pool2d"]


def avg_pool2d(x: Array, kernel_size: tuple[int, int]) -> Array:
    """``torch.nn.AvgPool2d(kernel_size, stride=1)`` (no padding) on NHWC ``x``, float32 sums.

    Returns ``[N, H - kh + 1, W - kw + 1, C]`` in ``x.dtype``.
    """
    kh, kw = kernel_size
    summed = jax.lax.reduce_window(
        x.astype(jnp.promote_types(x.dtype, jnp.float32)),
        0.0,
        jax.lax.add,
        window_dimensions=(1, kh, kw, 1),
        window_strides=(1, 1, 1, 1),
        padding="VALID",
    )
    return (summed / (kh * kw)).astype(x.dtype)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling, exactly as ``detectron2.layers.ASPP`` (NHWC).

    Five branches on ``x`` ``[N, H, W, in_channels]``, each giving ``out_channels``:

    * ``convs_0``: 1x1 ``Conv2d`` with ``norm`` and ``activation``;
    * ``convs_1..3``: 3x3 ``Conv2d`` with ``padding = dilation = dilations[i]`` (or, with
      ``use_depthwise_separable_conv``, :class:`detlayers.DepthwiseSeparableConv2d` with
      ``norm1 = norm2 = norm`` and both activations);
    * image pooling: global average (``pool_kernel_size=None``) or ``AvgPool2d(pool_kernel_size,
      stride=1)``, then ``convs_4_1``: 1x1 ``Conv2d`` **with bias, without norm**, with
      ``activation``; then bilinearly resized (``align_corners=False``) back to ``H x W``;

    concatenated on channels (branch order above), then ``project``: 1x1 ``Conv2d(5 * out,
    out)`` with ``norm`` and ``activation``, then dropout (rate ``dropout``, rng stream
    ``"dropout"``, only when ``train=True``).

    As in detectron2 the branch convolutions have a bias only when ``norm == ""`` (``norm=None``
    gives neither bias nor norm). Kernels use detectron2's ``c2_xavier_fill``
    (``U(-sqrt(3/fan_in), sqrt(3/fan_in))``), biases 0. Submodule names map onto detectron2's
    state-dict names for :func:`detlayers.load_torch_state_dict`: ``convs_0`` -> ``convs.0``,
    ``convs_4_1`` -> ``convs.4.1`` (detectron2's ``Sequential(pool, conv)``), ``project``.

    ``pool_kernel_size`` must divide the input's ``(H, W)`` (checked at trace time, ValueError);
    with it, training on crops of exactly that size is global pooling, and larger inference
    inputs keep the same window.

    ``__call__(x, train=False)`` -> ``[N, H, W, out_channels]``; ``train`` drives the norms
    (batch statistics) and dropout.
    """

    in_channels: int
    out_channels: int
    dilations: Sequence[int]
    norm: Any = dataclasses.field(kw_only=True)
    activation: Callable[[Array], Array] | None = dataclasses.field(kw_only=True)
    pool_kernel_size: Sequence[int] | None = dataclasses.field(default=None, kw_only=True)
    dropout: float = dataclasses.field(default=0.0, kw_only=True)
    use_depthwise_separable_conv: bool = dataclasses.field(default=False, kw_only=True)

    def _check_config(self) -> None:
        if len(self.dilations) != 3:
            raise ValueError(f"ASPP expects 3 dilations, got {len(self.dilations)}: {self.dilations!r}")
        if self.pool_kernel_size is not None and len(self.pool_kernel_size) != 2:
            raise ValueError(f"ASPP: pool_kernel_size must be a pair (kh, kw), got {self.pool_kernel_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ASPP: dropout must be in [0, 1), got {self.dropout}")

    def _check_input(self, x: Array) -> None:
        check_nhwc(x, self.in_channels, "ASPP")
        height, width = x.shape[1], x.shape[2]
        if self.pool_kernel_size is not None:
            kh, kw = (int(k) for k in self.pool_kernel_size)
            if height % kh or width % kw:
                raise ValueError(
                    "ASPP: `pool_kernel_size` must be divisible by the shape of inputs. "
                    f"Input size: {(height, width)} `pool_kernel_size`: {tuple(self.pool_kernel_size)}"
                )

    def _conv(self, in_channels: int, name: str, kernel_size: int = 1, dilation: int = 1,
              pooled: bool = False) -> Conv2d:
        """One of ASPP's convs: caffe2 Xavier kernels, zero biases, a bias only without a norm.
        The pooled branch's 1x1 conv has a bias and no norm: detectron2 drops it because the map
        is 1x1 (TF had BN)."""
        return Conv2d(
            in_channels,
            self.out_channels,
            kernel_size=kernel_size,
            padding=dilation if kernel_size > 1 else 0,
            dilation=dilation,
            bias=pooled or self.norm == "",
            norm=None if pooled else self.norm,
            activation=self.activation,
            name=name,
            kernel_init=c2_xavier_kernel_init,
            bias_init=nn.initializers.zeros,
        )

    def _dilated_branch(self, index: int, dilation: int) -> nn.Module:
        """Branch ``index`` (1..3): a 3x3 conv with ``dilation``, depthwise separable on request."""
        if not self.use_depthwise_separable_conv:
            return self._conv(self.in_channels, f"convs_{index}", kernel_size=3, dilation=dilation)
        return DepthwiseSeparableConv2d(
            self.in_channels,
            self.out_channels,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            norm1=self.norm,
            activation1=self.activation,
            norm2=self.norm,
            activation2=self.activation,
            name=f"convs_{index}",
        )

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        self._check_config()
        self._check_input(x)
        height, width = x.shape[1], x.shape[2]
        branches = [self._conv(self.in_channels, "convs_0")(x, train=train)]
        for index, dilation in enumerate(self.dilations, start=1):
            branches.append(self._dilated_branch(index, dilation)(x, train=train))

        if self.pool_kernel_size is None:
            pooled = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2), keepdims=True)
            pooled = pooled.astype(x.dtype)
        else:
            pooled = avg_pool2d(x, tuple(int(k) for k in self.pool_kernel_size))
        pooled = self._conv(self.in_channels, f"convs_{len(self.dilations) + 1}_1", pooled=True)(
            pooled, train=train
        )
        branches.append(interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False))

        y = jnp.concatenate(branches, axis=-1)
        y = self._conv(5 * self.out_channels, "project")(y, train=train)
        if self.dropout > 0:
            y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        return y
