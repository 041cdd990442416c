"""Thin layers and functions that detectron2 wraps around ``torch.nn`` (``detectron2.layers.wrappers``).

Everything here is NHWC (Flax's layout) and uses Flax parameter names: convolution ``kernel``
``[kh, kw, in/groups, out]`` (HWIO) and ``bias``; linear ``kernel`` ``[in, out]`` and ``bias``.
Arguments, defaults and output sizes are PyTorch's, so a detectron2 model can be rewritten line by
line and its weights loaded with :func:`detlayers.load_torch_state_dict`.

Dtypes: float32 gives PyTorch's float32 numbers. bfloat16/float16 inputs run with the parameters
cast to the input dtype and products accumulated in float32 (``preferred_element_type``); the
result comes back in the input dtype.

Precision: ``precision=None`` follows JAX's default matmul precision (exact float32 on CPU; on
recent NVIDIA GPUs XLA may use TF32, as PyTorch's cuDNN convolutions do by default). Pass
``precision=jax.lax.Precision.HIGHEST`` for bit-for-bit float32 on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detlayers._checks import IntOrPair
from detlayers._checks import as_pair as _pair
from detlayers._checks import check_floating as _check_floating
from detlayers._checks import check_groups as _check_groups
from detlayers._checks import check_nhwc as _check_nhwc
from detlayers._conv_norm import ConvGeometry as _ConvGeometry
from detlayers._conv_norm import norm_then_activation
from detlayers._numerics import operand_dtype

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = [
    "Conv2d",
    "ConvTranspose2d",
    "Linear",
    "cat",
    "nonzero_tuple",
    "shapes_to_tensor",
    "torch_default_kernel_init",
    "torch_default_bias_init",
]


# --------------------------------------------------------------------------------------------
# PyTorch's default initialisation (nn.Conv2d / nn.Linear reset_parameters)
# --------------------------------------------------------------------------------------------
# torch uses kaiming_uniform_(a=sqrt(5)) for weights, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# which is variance scaling with scale 1/3; biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
def torch_default_kernel_init(fan_in: int) -> Initializer:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default for conv and linear weights.

    Returns a Flax initialiser ``(key, shape, dtype=float32) -> Array``; ``fan_in`` is given
    explicitly (PyTorch's, e.g. ``in/groups * kh * kw``) rather than read from ``shape``, because
    PyTorch's transposed convolutions compute it from the output channels.
    """
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_bias_init(fan_in: int) -> Initializer:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default for conv and linear biases."""
    return torch_default_kernel_init(fan_in)


def _check_conv_operands(x: Array, kernel: Array, groups: int, fn_name: str) -> None:
    """Checks of the functional (transposed) convolutions: floating NHWC ``x``, a rank-4 kernel
    ``[kh, kw, in/groups, out]``, a positive ``groups``, and ``x``'s channels equal to the kernel's
    in-channels times ``groups``."""
    _check_floating(x, "x")
    if x.ndim != 4:
        raise ValueError(f"{fn_name}: input must be NHWC [N, H, W, C] (rank 4), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"{fn_name}: kernel must be HWIO [kh, kw, in/groups, out], got shape {kernel.shape}")
    _check_positive_groups(groups, fn_name)
    if x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(
            f"{fn_name}: input channels {x.shape[-1]} (shape {x.shape}) != kernel in-channels "
            f"{kernel.shape[2]} x groups {groups} (kernel shape {kernel.shape})"
        )


# --------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------
def _conv_padding(
    padding: IntOrPair | str, kernel_size: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch padding (int, pair, ``"valid"`` or ``"same"``) as explicit (low, high) per axis."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in PyTorch)")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                # PyTorch puts the odd pixel of an uneven 'same' padding on the high side.
                pads.append((total // 2, total - total // 2))
            return pads[0], pads[1]
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph), (pw, pw)


def _nhwc_conv(
    x: Array,
    kernel: Array,
    bias: Array | None,
    *,
    window_strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    rhs_dilation: tuple[int, int],
    groups: int,
    precision: Any,
    lhs_dilation: tuple[int, int] | None = None,
) -> Array:
    """``lax.conv_general_dilated`` NHWC x HWIO with this module's dtype rule: operands in the input
    dtype, products and bias accumulated in float32, result in the input dtype."""
    dtype = operand_dtype(x)
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(dtype),
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def conv2d(
    x: Array, kernel: Array, bias: Array | None = None,
    stride: IntOrPair = 1, padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1,
    *, precision: Any = None,
) -> Array:
    """``torch.nn.functional.conv2d`` in NHWC/HWIO.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in / groups, C_out]``.
      bias: ``[C_out]`` or None.
    Returns:
      ``[N, Ho, Wo, C_out]`` with ``Ho = floor((H + 2*ph - dh*(kh-1) - 1) / sh) + 1`` (PyTorch's rule),
      in ``x.dtype``; products accumulate in float32.
    """
    _check_conv_operands(x, kernel, groups, "conv2d")
    if kernel.shape[3] % groups:
        raise ValueError(f"conv2d: out channels {kernel.shape[3]} not divisible by groups={groups}")
    kh, kw = kernel.shape[:2]
    if kh < 1 or kw < 1:
        raise ValueError(f"conv2d: kernel spatial size must be positive, got kernel shape {kernel.shape} (HWIO)")
    stride_hw = _pair(stride, "conv2d: stride", 1)
    dilation_hw = _pair(dilation, "conv2d: dilation", 1)
    pad_h, pad_w = _conv_padding(padding, (kh, kw), dilation_hw, stride_hw)
    for axis, (size, (lo, hi), k, d) in enumerate(
        zip(x.shape[1:3], (pad_h, pad_w), (kh, kw), dilation_hw)
    ):
        if size + lo + hi < d * (k - 1) + 1:
            raise ValueError(
                f"conv2d: padded input size {size + lo + hi} along {'HW'[axis]} is smaller than the "
                f"dilated kernel size {d * (k - 1) + 1} (input shape {x.shape})"
            )
    return _nhwc_conv(
        x, kernel, bias, window_strides=stride_hw, padding=(pad_h, pad_w), rhs_dilation=dilation_hw,
        groups=groups, precision=precision,
    )


class Conv2d(_ConvGeometry):
    """``detectron2.layers.Conv2d``: convolution, then ``norm``, then ``activation``; NHWC.

    Attributes (PyTorch's ``nn.Conv2d`` arguments plus detectron2's two extras):
      in_channels, out_channels: channel counts; both divisible by ``groups``.
      kernel_size, stride, dilation: int or ``(h, w)``.
      padding: int, ``(h, w)``, ``"valid"`` or ``"same"``; zero padding on both sides, so the output
        size is PyTorch's ``floor((H + 2p - d(k-1) - 1) / s) + 1``.
      groups: grouped convolution (``groups == in_channels`` is depthwise).
      bias: whether to add a learned bias (param ``bias`` ``[out]``).
      norm: ``None``/``""``, a :func:`detlayers.get_norm` name (``"BN"``, ``"GN"``, ``"FrozenBN"``,
        ...), a callable ``channels -> flax Module``, or an (unbound) Flax module. It becomes the
        submodule ``norm`` and is called as ``norm(x, train=train)``.
      activation: callable applied last (e.g. ``jax.nn.relu``), or None.
      kernel_init, bias_init: Flax initialisers. ``None`` means PyTorch's ``nn.Conv2d`` default
        (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for both, ``fan_in = in/groups * kh * kw``), which is
        what detectron2's ``Conv2d`` gets unless a caller re-initialises it (detectron2's heads call
        ``c2_msra_fill``/``c2_xavier_fill``; pass the matching Flax initialiser to get those).
      precision: ``jax.lax`` precision of the convolution (see module docstring).
      param_dtype: dtype of the parameters (float32).

    Parameters: ``kernel`` ``[kh, kw, in/groups, out]`` and, if ``bias``, ``bias`` ``[out]``.

    ``__call__(x, train=False, *, mask=None)``: ``x`` is ``[N, H, W, in_channels]`` (any floating
    dtype, ``N`` may be 0); returns ``[N, Ho, Wo, out_channels]`` in ``x.dtype``. ``train`` is
    forwarded to the norm, and so is ``mask`` (``bool[N]``, the real examples of a padded
    per-device batch) when given, for :class:`detlayers.NaiveSyncBatchNorm`.
    """

    padding: IntOrPair | str = 0  # also "valid" / "same"
    dilation: IntOrPair = 1
    groups: int = 1
    bias: bool = True
    norm: Any = None
    activation: Callable[[Array], Array] | None = None
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False, *, mask: Array | None = None) -> Array:
        kernel, bias = _conv_params(self, x, fan_in_channels=self.in_channels)
        y = conv2d(
            x, kernel, bias, self.stride, self.padding, self.dilation, self.groups, precision=self.precision
        )
        return norm_then_activation(y, self.norm, self.out_channels, self.activation, train, "Conv2d",
                                    mask)


def _check_positive_groups(groups: Any, layer: str) -> None:
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{layer}: groups must be a positive int, got {groups!r}")


def _conv_params(layer: nn.Module, x: Array, *, fan_in_channels: int) -> tuple[Array, Array | None]:
    """Checks ``x`` and the config of a (transposed) conv layer, then creates its parameters.

    ``layer`` is a Conv2d/ConvTranspose2d inside its compact method. Both store ``kernel`` as
    ``[kh, kw, in/groups, out]`` and draw PyTorch's default initialisation from
    ``fan_in = fan_in_channels/groups * kh * kw`` (``in_channels`` for a convolution, but
    ``out_channels`` for a transposed one, as PyTorch computes it from ``weight.shape[1]``).
    """
    name = type(layer).__name__
    _check_positive_groups(layer.groups, name)
    _check_groups(layer.in_channels, layer.out_channels, layer.groups, name)
    kh, kw = _pair(layer.kernel_size, f"{name}: kernel_size", 1)
    _pair(layer.stride, f"{name}: stride", 1)
    _pair(layer.dilation, f"{name}: dilation", 1)
    _check_nhwc(x, layer.in_channels, name)
    _check_floating(x, "x")
    fan_in = fan_in_channels // layer.groups * kh * kw
    kernel = layer.param(
        "kernel",
        layer.kernel_init or torch_default_kernel_init(fan_in),
        (kh, kw, layer.in_channels // layer.groups, layer.out_channels),
        layer.param_dtype,
    )
    bias = None
    if layer.bias:
        bias = layer.param(
            "bias", layer.bias_init or torch_default_bias_init(fan_in), (layer.out_channels,), layer.param_dtype
        )
    return kernel, bias


# --------------------------------------------------------------------------------------------
# ConvTranspose2d
# --------------------------------------------------------------------------------------------
def conv_transpose2d(
    x: Array, kernel: Array, bias: Array | None = None,
    stride: IntOrPair = 1, padding: IntOrPair = 0, output_padding: IntOrPair = 0, groups: int = 1,
    dilation: IntOrPair = 1,
    *, precision: Any = None,
) -> Array:
    """``torch.nn.functional.conv_transpose2d`` in NHWC.

    Args:
      x: ``[N, H, W, C_in]``.
      kernel: ``[kh, kw, C_in / groups, C_out]`` where ``kernel[y, x, i, g * (C_out/groups) + o]`` is
        PyTorch's ``weight[g * (C_in/groups) + i, o, y, x]`` (PyTorch stores ``[C_in, C_out/groups,
        kh, kw]``). The spatial taps are *not* flipped: they are PyTorch's, so loading is a pure
        transpose/reshape.
      bias: ``[C_out]`` or None.
    Returns:
      ``[N, Ho, Wo, C_out]`` with ``Ho = (H-1)*sh - 2*ph + dh*(kh-1) + oph + 1``.
    """
    _check_conv_operands(x, kernel, groups, "conv_transpose2d")
    kh, kw = kernel.shape[:2]
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    oph, opw = _pair(output_padding, "output_padding")
    dh, dw = _pair(dilation, "dilation")
    if min(ph, pw, oph, opw) < 0 or min(sh, sw, dh, dw) < 1:
        raise ValueError("conv_transpose2d: padding/output_padding must be >= 0 and stride/dilation >= 1")
    if oph >= max(sh, dh) or opw >= max(sw, dw):
        raise ValueError(
            f"conv_transpose2d: output_padding {(oph, opw)} must be smaller than stride {(sh, sw)} "
            f"or dilation {(dh, dw)} (PyTorch's rule)"
        )
    out_hw = []
    for size, s, p, d, k, op in ((x.shape[1], sh, ph, dh, kh, oph), (x.shape[2], sw, pw, dw, kw, opw)):
        out_hw.append((size - 1) * s - 2 * p + d * (k - 1) + op + 1)
    if min(out_hw) <= 0 and x.shape[1] > 0 and x.shape[2] > 0:
        raise ValueError(f"conv_transpose2d: output size {tuple(out_hw)} is not positive (input {x.shape})")
    if (kh, kw) == (sh, sw) and (ph, pw, oph, opw, dh, dw, groups) == (0, 0, 0, 0, 1, 1, 1):
        # Kernel == stride (Mask R-CNN's 2x2/2 deconv): the taps do not overlap, and each input pixel
        # writes one kh x kw block, out[n, i*sh + a, j*sw + b] = x[n, i, j] @ kernel[a, b]: one matmul.
        # XLA:CPU computes the kernel gradient of the lhs-dilated convolution below ~250x slower than
        # the forward; this form's gradients are matmuls too.
        n, h, w = x.shape[:3]
        dtype = operand_dtype(x)  # _nhwc_conv's dtype rule
        out = jnp.einsum("nijc,abco->niajbo", x, kernel.astype(dtype), precision=precision,
                         preferred_element_type=jnp.float32)
        out = out.reshape(n, h * sh, w * sw, kernel.shape[-1])
        if bias is not None:
            out = out + bias.astype(jnp.float32)
        return out.astype(dtype)
    # A transposed convolution is the forward convolution of the stride-dilated input with the
    # spatially flipped kernel, padded by d*(k-1) - p on each side (+ output_padding on the high
    # side). Negative padding crops, which XLA supports directly.
    pads = (
        (dh * (kh - 1) - ph, dh * (kh - 1) - ph + oph),
        (dw * (kw - 1) - pw, dw * (kw - 1) - pw + opw),
    )
    return _nhwc_conv(
        x, kernel[::-1, ::-1], bias, window_strides=(1, 1), padding=pads, lhs_dilation=(sh, sw),
        rhs_dilation=(dh, dw), groups=groups, precision=precision,
    )


class ConvTranspose2d(_ConvGeometry):
    """``torch.nn.ConvTranspose2d`` (detectron2 re-exports it) in NHWC.

    Attributes: PyTorch's arguments (``kernel_size``, ``stride``, ``padding``, ``output_padding``,
    ``dilation``: int or pair). Output size ``(H-1)*stride - 2*padding + dilation*(k-1) +
    output_padding + 1``. ``kernel_init``/``bias_init`` default to PyTorch's
    (``U(-1/sqrt(fan_in), ...)`` with PyTorch's ``fan_in = out/groups * kh * kw`` for this layer).

    Parameters: ``kernel`` ``[kh, kw, in/groups, out]`` (see ``conv_transpose2d`` for how it
    relates to PyTorch's ``[in, out/groups, kh, kw]`` weight; the taps are not flipped) and ``bias``
    ``[out]``.

    ``__call__(x, output_size=None)``: ``[N, H, W, in_channels]`` -> ``[N, Ho, Wo, out_channels]``.
    ``output_size`` (``(Ho, Wo)``, or a longer sequence whose last two entries are used, as PyTorch
    accepts) picks ``output_padding`` as PyTorch does: it must lie between the minimum size
    (``output_padding=0``) and that plus ``stride - 1``; it overrides ``output_padding``.
    """

    output_padding: IntOrPair = 0
    groups: int = 1
    bias: bool = True
    dilation: IntOrPair = 1
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, output_size: Sequence[int] | None = None) -> Array:
        # PyTorch computes fan_in from weight.shape[1] = out/groups for transposed convolutions.
        kernel, bias = _conv_params(self, x, fan_in_channels=self.out_channels)
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = self._output_padding_for(x.shape[1:3], kernel.shape[:2], output_size)
        return conv_transpose2d(
            x,
            kernel,
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
            precision=self.precision,
        )

    def _output_padding_for(
        self, in_hw: Sequence[int], kernel_hw: tuple[int, int], output_size: Sequence[int]
    ) -> tuple[int, int]:
        """PyTorch's ``ConvTranspose2d._output_padding``: the padding that reaches ``output_size``."""
        wanted = tuple(int(s) for s in output_size)[-2:]
        if len(wanted) != 2:
            raise ValueError(f"ConvTranspose2d: output_size needs at least 2 entries, got {output_size!r}")
        stride = _pair(self.stride, "stride")
        padding = _pair(self.padding, "padding")
        dilation = _pair(self.dilation, "dilation")
        result = []
        for axis in range(2):
            smallest = (in_hw[axis] - 1) * stride[axis] - 2 * padding[axis] + dilation[axis] * (kernel_hw[axis] - 1) + 1
            largest = smallest + stride[axis] - 1
            if not smallest <= wanted[axis] <= largest:
                raise ValueError(
                    f"ConvTranspose2d: requested output size {wanted} is not reachable from input size "
                    f"{tuple(in_hw)}: axis {axis} must be in [{smallest}, {largest}]"
                )
            result.append(wanted[axis] - smallest)
        return result[0], result[1]


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """``torch.nn.Linear``: ``y = x @ kernel + bias`` over the last axis.

    Parameters: ``kernel`` ``[in_features, out_features]`` (PyTorch's ``weight`` transposed) and
    ``bias`` ``[out_features]``; PyTorch's default initialisation unless ``kernel_init``/``bias_init``
    are given. ``x`` is ``[..., in_features]`` (leading dims may be empty/zero-size), any floating
    dtype; returns ``[..., out_features]`` in ``x.dtype`` with products accumulated in float32 (see
    the module docstring for dtypes and ``precision``).
    """

    in_features: int
    out_features: int
    bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: input last dim must be in_features={self.in_features}, got shape {x.shape}")
        _check_floating(x, "x")
        kernel = self.param(
            "kernel",
            self.kernel_init or torch_default_kernel_init(self.in_features),
            (self.in_features, self.out_features),
            self.param_dtype,
        )
        dtype = operand_dtype(x)
        y = jnp.matmul(x, kernel.astype(dtype), precision=self.precision, preferred_element_type=jnp.float32)
        if self.bias:
            bias = self.param(
                "bias",
                self.bias_init or torch_default_bias_init(self.in_features),
                (self.out_features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype)


# --------------------------------------------------------------------------------------------
# small functions
# --------------------------------------------------------------------------------------------
def cat(tensors: Sequence[Array], dim: int = 0) -> Array:
    """``jnp.concatenate`` that returns a single input unchanged (detectron2's ``cat``).

    ``dim`` indexes the arrays as they are, so channels of NHWC maps are ``dim=-1`` (detectron2
    code that concatenates NCHW maps on ``dim=1`` becomes ``dim=-1`` here).
    """
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"cat expects a list or tuple of arrays, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("cat expects at least one array")
    if len(tensors) == 1:
        return tensors[0]
    return jnp.concatenate(tensors, axis=dim)


def shapes_to_tensor(x: Sequence[int | Array], device: Any = None) -> Array:
    """A list of int (or scalar int array) sizes as a 1-D int32 array, traceable under ``jit``.

    ``device`` is accepted for detectron2 compatibility; when given, the result is put there.
    """
    values = [jnp.asarray(v) for v in x]
    for v in values:
        if v.ndim != 0:
            raise ValueError(f"shapes_to_tensor expects scalars, got an array of shape {v.shape}")
    out = jnp.stack(values).astype(jnp.int32) if values else jnp.zeros((0,), jnp.int32)
    if device is not None:
        out = jax.device_put(out, device)
    return out


def nonzero_tuple(x: Array, *, size: int | None = None, fill_value: Any = None) -> tuple[Array, ...]:
    """Indices of the non-zero entries, one array per dimension (``torch.nonzero(as_tuple=True)``).

    Without ``size`` the length depends on the data, so it works eagerly only. Under ``jit`` pass a
    static ``size``: the result is padded with ``fill_value`` (default 0, as ``jnp.nonzero``) or
    truncated to ``size`` entries, in row-major order. A 0-d input is treated as a 1-element vector
    (as detectron2's scripted version does).
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        x = x.reshape(1)
    if size is None and isinstance(x, jax.core.Tracer):
        raise ValueError(
            "nonzero_tuple: under jit/vmap the result needs a static `size` (and optional "
            "`fill_value`), because the number of non-zero entries depends on the data"
        )
    return jnp.nonzero(x, size=size, fill_value=fill_value)
