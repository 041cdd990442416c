"""CNN building blocks of ``detectron2.layers.blocks``: :class:`CNNBlockBase` and
:class:`DepthwiseSeparableConv2d` (NHWC, Flax linen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from detlayers.wrappers import Conv2d

Array = jax.Array

__all__ = ["CNNBlockBase", "DepthwiseSeparableConv2d", "c2_msra_kernel_init", "c2_xavier_kernel_init"]

# detectron2 (fvcore) initialisers, as Flax variance-scaling initialisers on HWIO kernels.
# c2_msra_fill: kaiming_normal_(mode="fan_out", nonlinearity="relu") -> N(0, 2 / fan_out), bias 0.
c2_msra_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# c2_xavier_fill: kaiming_uniform_(a=1) -> U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), bias 0.
c2_xavier_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class CNNBlockBase(nn.Module):
    """Base of CNN blocks: a block maps ``[N, H, W, in_channels]`` to
    ``[N, H / stride, W / stride, out_channels]`` (NHWC; detectron2's contract with NCHW).

    Subclasses add their own fields (after ``in_channels, out_channels, stride``) and an
    ``@nn.compact __call__(self, x, train=False)``. Choose batch norms through fields (a norm name
    such as ``norm="BN"`` passed to :class:`detlayers.Conv2d`, or a norm module given as a field)
    so that :meth:`freeze` can turn them into frozen ones.

    Attributes:
      in_channels, out_channels, stride: the block's specification.
      frozen: (keyword-only) set by :meth:`freeze`; read by :func:`detlayers.freeze.trainable_mask`.

    **Freezing.** detectron2's ``block.freeze()`` flips ``requires_grad`` off and swaps BN for
    FrozenBN in place. Flax variables live outside the module, so here::

        frozen_block, frozen_vars = block.freeze(variables)

    returns a new module and a new variable dict, and changes neither input:

    * every batch norm chosen through a field becomes ``FrozenBatchNorm2d`` and its
      ``params/{scale,bias}`` + ``batch_stats/{mean,var}`` move to the frozen layer's
      ``batch_stats/{scale,bias,mean,var}``, so ``frozen_block.apply(frozen_vars, x)`` equals
      ``block.apply(variables, x)`` (eval mode) and no batch statistic changes in training;
    * the returned module stops gradients into its remaining ``params`` (a
      ``flax.linen.map_variables`` lift of the block's class, same variable tree), so
      ``jax.grad`` gives exactly zero for them, like ``requires_grad=False``;
    * optimisers with weight decay would still move zero-gradient parameters, so build the
      optimiser with :func:`detlayers.freeze.masked_optimizer` and
      :func:`detlayers.freeze.trainable_mask` (which finds frozen blocks anywhere in a model); the
      frozen parameters then stay bit-for-bit unchanged.

    Inside a parent module, create an already-frozen block with
    ``detlayers.freeze.frozen_class(MyBlock)(..., frozen=True, norm="FrozenBN")`` and convert its
    loaded variables with :func:`detlayers.convert_frozen_batchnorm`.
    """

    in_channels: int
    out_channels: int
    stride: int
    frozen: bool = dataclasses.field(default=False, kw_only=True)

    @nn.nowrap
    def freeze(self, variables: Any) -> tuple[CNNBlockBase, dict]:
        """``(frozen_block, frozen_variables)``: BN -> FrozenBN with converted variables, gradients
        into the block's parameters stopped, ``frozen=True``. See the class docstring."""
        from detlayers.freeze import freeze_module

        return freeze_module(self, variables)


class DepthwiseSeparableConv2d(nn.Module):
    """A ``k x k`` depthwise convolution followed by a ``1 x 1`` convolution (detectron2's).

    Submodules ``depthwise`` (``Conv2d(in, in, kernel_size, padding=padding, dilation=dilation,
    groups=in, bias=not norm1, norm=norm1, activation=activation1)``) and ``pointwise``
    (``Conv2d(in, out, 1, bias=not norm2, norm=norm2, activation=activation2)``): the names and
    biases follow detectron2, so ``depthwise.weight``/``pointwise.norm.running_mean`` load
    directly. Kernels are initialised with detectron2's ``c2_msra_fill`` (``N(0, 2/fan_out)``) and
    biases with zeros.

    ``__call__(x, train=False)``: ``[N, H, W, in_channels]`` -> ``[N, Ho, Wo, out_channels]``;
    ``train`` goes to both norms.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int] = 3
    padding: int | tuple[int, int] = 1
    dilation: int | tuple[int, int] = 1
    norm1: Any = dataclasses.field(default=None, kw_only=True)
    activation1: Callable[[Array], Array] | None = dataclasses.field(default=None, kw_only=True)
    norm2: Any = dataclasses.field(default=None, kw_only=True)
    activation2: Callable[[Array], Array] | None = dataclasses.field(default=None, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _msra_conv(
            self.in_channels, self.in_channels, self.norm1, self.activation1, "depthwise",
            kernel_size=self.kernel_size, padding=self.padding, dilation=self.dilation,
            groups=self.in_channels,
        )(x, train=train)
        return _msra_conv(
            self.in_channels, self.out_channels, self.norm2, self.activation2, "pointwise",
            kernel_size=1,
        )(x, train=train)


def _msra_conv(in_channels: int, out_channels: int, norm: Any,
               activation: Callable[[Array], Array] | None, name: str, **conv_args: Any) -> Conv2d:
    """A ``Conv2d`` with caffe2 MSRA kernels and zero biases, with a bias only without ``norm``."""
    return Conv2d(
        in_channels, out_channels, bias=not norm, norm=norm, activation=activation,
        kernel_init=c2_msra_kernel_init, bias_init=nn.initializers.zeros, name=name, **conv_args,
    )
