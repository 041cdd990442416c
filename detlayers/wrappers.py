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
    "cross_entropy",
    "interpolate",
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


def cross_entropy(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    weight: Array | None = None,
    ignore_index: int = -100,
) -> Array:
    """``torch.nn.functional.cross_entropy`` with integer targets, class axis **last**.

    Args:
      input: logits ``[..., C]`` (``[N, C]`` or NHWC ``[N, H, W, C]``).
      target: int class indices of shape ``input.shape[:-1]``; ``ignore_index`` entries are skipped.
      reduction: ``"none"`` (per-element loss, 0 at ignored entries), ``"sum"`` or ``"mean"``
        (sum divided by the summed ``weight`` of the non-ignored targets, like PyTorch).
      weight: optional per-class weights ``[C]``.
    Returns:
      the loss in float32 (or ``input.dtype`` if wider). As in detectron2's wrapper, an empty
      ``target`` with ``reduction="mean"`` gives 0 (connected to ``input`` for gradients) instead of
      NaN.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if input.ndim < 1 or tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"cross_entropy: target shape {target.shape} must equal input shape {input.shape} without "
            "its last (class) axis"
        )
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype {target.dtype}")
    if target.size == 0 and reduction == "mean":
        return input.sum() * 0.0
    logits = input.astype(jnp.promote_types(input.dtype, jnp.float32))
    valid = target != ignore_index
    safe_target = jnp.where(valid, target, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
    w = jnp.ones_like(picked) if weight is None else jnp.asarray(weight, logits.dtype)[safe_target]
    w = jnp.where(valid, w, 0.0)
    losses = -picked * w
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / w.sum()


# --------------------------------------------------------------------------------------------
# interpolate
# --------------------------------------------------------------------------------------------
INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_ALIGN_CORNERS_MODES = ("bilinear", "bicubic")


def _output_size(
    in_hw: tuple[int, int],
    size: IntOrPair | None,
    scale_factor: float | Sequence[float] | None,
) -> tuple[tuple[int, int], tuple[float | None, float | None]]:
    """Output ``(Ho, Wo)`` and the scale factors the coordinate transform uses (None: in/out)."""
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of `size` and `scale_factor`")
    if size is not None:
        out = _pair(size, "interpolate: size")
        if min(out) < 0:
            raise ValueError(f"interpolate: size must be non-negative, got {size!r}")
        return out, (None, None)
    if isinstance(scale_factor, Sequence) and not isinstance(scale_factor, str):
        if len(scale_factor) != 2:
            raise ValueError(f"interpolate: scale_factor must be a number or a pair, got {scale_factor!r}")
        raw = tuple(scale_factor)
    else:
        raw = (scale_factor, scale_factor)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in raw):
        raise TypeError(f"interpolate: scale_factor must be a number or a pair of numbers, got {scale_factor!r}")
    scales = (float(raw[0]), float(raw[1]))
    if not all(np.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"interpolate: scale_factor must be finite and positive, got {scale_factor!r}")
    # PyTorch: the output size is floor(input * scale), computed in double.
    out = (int(np.floor(in_hw[0] * scales[0])), int(np.floor(in_hw[1] * scales[1])))
    return out, scales


def _source_scale(in_size: int, out_size: int, scale: float | None, align_corners: bool) -> np.float32:
    """PyTorch's ``area_pixel_compute_scale`` in float32 (its opmath type for float inputs)."""
    if align_corners:
        return np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)  # PyTorch uses the user's scale_factor, not in/out
    return np.float32(in_size) / np.float32(out_size)


def _nearest_taps(in_size: int, out_size: int, scale: float | None, exact: bool) -> tuple[np.ndarray, None]:
    """PyTorch's ``nearest_idx`` (legacy ``min(floor(dst*scale), in-1)``, with its identity and
    halving shortcuts) or ``nearest_exact_idx`` (``min(floor((dst+0.5)*scale), in-1)``)."""
    dst = np.arange(out_size, dtype=np.int64)
    s = _source_scale(in_size, out_size, scale, align_corners=False)
    if exact:
        # (dst + 0.5) is a double in PyTorch; the product is rounded to float by floorf
        src = np.floor(((dst + 0.5) * np.float64(s)).astype(np.float32)).astype(np.int64)
    elif out_size == in_size:
        src = dst
    elif out_size == 2 * in_size:
        src = dst >> 1
    else:
        src = np.floor(dst.astype(np.float32) * s).astype(np.int64)
    return np.minimum(src, in_size - 1)[:, None], None


def _index_and_lambda(real: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's ``guard_index_and_lambda``: ``floor`` capped at ``in-1``, fraction in [0, 1]."""
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.clip(real - index.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return index, lam


def _linear_taps(
    in_size: int, out_size: int, scale: float | None, align_corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``[out, 2]`` and weights of linear interpolation, as PyTorch computes them
    (float32; ``compute_source_index_and_lambda``, with its copy shortcut when out == in)."""
    dst = np.arange(out_size, dtype=np.int64)
    if out_size == in_size:
        return np.stack([dst, dst], 1), np.tile(np.array([1, 0], np.float32), (out_size, 1))
    s = _source_scale(in_size, out_size, scale, align_corners)
    dst_f = dst.astype(np.float32)
    if align_corners:
        real = s * dst_f
    else:
        real = np.maximum(s * (dst_f + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0, w1 = _index_and_lambda(real.astype(np.float32), in_size)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return np.stack([i0, i1], 1), np.stack([w0, w1], 1)


def _cubic_taps(
    in_size: int, out_size: int, scale: float | None, align_corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``[out, 4]`` (clamped to the border, as PyTorch reads them) and weights of
    bicubic interpolation: Keys' kernel with ``A = -0.75`` at the unclamped source position
    ``scale*(dst+0.5)-0.5`` (or ``dst*(in-1)/(out-1)`` with ``align_corners``), in float32."""
    s = _source_scale(in_size, out_size, scale, align_corners)
    dst_f = np.arange(out_size, dtype=np.float32)
    real = s * dst_f if align_corners else s * (dst_f + np.float32(0.5)) - np.float32(0.5)
    index, t = _index_and_lambda(real.astype(np.float32), in_size)
    a = np.float32(-0.75)
    one = np.float32(1)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], 1)
    indices = np.clip(index[:, None] - 1 + np.arange(4), 0, in_size - 1)
    return indices, weights.astype(np.float32)


def _area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``adaptive_avg_pool`` bins: output ``i`` averages inputs ``[floor(i*in/out),
    ceil((i+1)*in/out))``; indices ``[out, K]`` padded with weight 0 to the longest bin."""
    dst = np.arange(out_size, dtype=np.int64)
    start = (dst * in_size) // out_size
    end = ((dst + 1) * in_size + out_size - 1) // out_size
    lengths = end - start
    k = int(lengths.max()) if out_size else 1
    offsets = np.arange(k)
    indices = np.minimum(start[:, None] + offsets, in_size - 1)
    weights = np.where(offsets < lengths[:, None], np.float32(1) / lengths[:, None].astype(np.float32), 0)
    return indices, weights.astype(np.float32)


def _resample_axis(x: Array, axis: int, indices: np.ndarray, weights: np.ndarray | None) -> Array:
    """``y[..., o, ...] = sum_k weights[o, k] * x[..., indices[o, k], ...]`` along ``axis``
    (static taps: one gather and a weighted sum; a plain gather without weights)."""
    out_size, taps = indices.shape
    if weights is None:
        return jnp.take(x, jnp.asarray(indices[:, 0], jnp.int32), axis=axis)
    gathered = jnp.take(x, jnp.asarray(indices.reshape(-1), jnp.int32), axis=axis)
    gathered = gathered.reshape(x.shape[:axis] + (out_size, taps) + x.shape[axis + 1:])
    w = jnp.asarray(weights, x.dtype).reshape((out_size, taps) + (1,) * (x.ndim - axis - 1))
    return jnp.sum(gathered * w, axis=axis + 1)


def interpolate(
    input: Array,
    size: IntOrPair | None = None,
    scale_factor: float | Sequence[float] | None = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> Array:
    """``torch.nn.functional.interpolate`` for NHWC maps ``[N, H, W, C]``.

    Args:
      input: ``[N, H, W, C]``, floating point; ``N`` and ``C`` may be 0, ``H`` and ``W`` not.
      size: output ``(Ho, Wo)`` (or one int for both).
      scale_factor: a number or a pair: the output size is ``floor(H * scale)`` (in double, as
        PyTorch), and, with ``recompute_scale_factor`` None or False, the source coordinates use
        ``1 / scale_factor`` (PyTorch's rule), not ``H / Ho``. Must be finite and positive.
      mode:

        - ``"nearest"``: PyTorch's legacy nearest, ``src = min(floor(dst * scale), H-1)`` (with its
          shortcuts for ``Ho == H`` and ``Ho == 2H``);
        - ``"nearest-exact"``: ``src = min(floor((dst + 0.5) * scale), H-1)`` (Pillow / scikit-image);
        - ``"bilinear"``: ``align_corners=False``: ``src = max(scale*(dst+0.5)-0.5, 0)``;
          ``True``: ``src = dst*(H-1)/(Ho-1)``; ``Ho == H`` copies (PyTorch's shortcut);
        - ``"bicubic"``: Keys' cubic convolution with ``A = -0.75`` on 4x4 taps at the same source
          positions as bilinear but without clamping them at 0, the taps read with the index
          clamped to the border (PyTorch's rule), so results may overshoot the input range;
        - ``"area"``: adaptive average pooling to ``(Ho, Wo)`` (bins ``[floor(i*H/Ho),
          ceil((i+1)*H/Ho))``); ``scale_factor`` only sets the output size.
      align_corners: only for ``"bilinear"`` and ``"bicubic"`` (None means False, as PyTorch).
      recompute_scale_factor: True: compute the output size from ``scale_factor``, then
        interpolate as if that size had been passed (``scale = H / Ho``). Only with
        ``scale_factor``, as PyTorch.
      antialias: must be False (PyTorch's antialiased resampling is not implemented).

    Returns:
      ``[N, Ho, Wo, C]`` in ``input.dtype``; the arithmetic is float32 for lower-precision inputs.
      The sampling positions and weights are computed at trace time in float32 exactly as
      PyTorch's CPU kernels do, so results match PyTorch's to float32 rounding. A zero output
      size is an error except for ``"area"`` (PyTorch's behaviour); ``C == 0`` gives an empty
      result in every mode (PyTorch's interpolating modes reject it).
    """
    if input.ndim != 4:
        raise ValueError(f"interpolate: input must be NHWC [N, H, W, C] (rank 4), got shape {input.shape}")
    _check_floating(input, "input")
    if mode not in INTERPOLATE_MODES:
        raise ValueError(f"interpolate: mode must be one of {INTERPOLATE_MODES}, got {mode!r}")
    if align_corners is not None and mode not in _ALIGN_CORNERS_MODES:
        raise ValueError(
            f"interpolate: align_corners can only be set with the interpolating modes "
            f"{_ALIGN_CORNERS_MODES} (as in PyTorch), got mode={mode!r}"
        )
    if antialias:
        raise ValueError("interpolate: antialias=True is not supported")
    if recompute_scale_factor and scale_factor is None:
        raise ValueError("interpolate: recompute_scale_factor is only allowed with scale_factor (as PyTorch)")
    in_hw = (int(input.shape[1]), int(input.shape[2]))
    out_hw, scales = _output_size(in_hw, size, scale_factor)
    if recompute_scale_factor:
        scales = (None, None)
    if min(in_hw) <= 0:
        raise ValueError(f"interpolate: input spatial size must be positive, got input shape {input.shape} (NHWC)")
    if min(out_hw) <= 0 and mode != "area":
        raise ValueError(
            f"interpolate: output size {out_hw} must be positive for mode={mode!r} (input shape "
            f"{input.shape}, NHWC)"
        )
    if mode in ("nearest", "nearest-exact"):
        exact = mode == "nearest-exact"
        rows = _nearest_taps(in_hw[0], out_hw[0], scales[0], exact)[0]
        cols = _nearest_taps(in_hw[1], out_hw[1], scales[1], exact)[0]
        return _resample_axis(_resample_axis(input, 1, rows, None), 2, cols, None)
    corners = bool(align_corners)
    if mode == "bilinear":
        taps_h = _linear_taps(in_hw[0], out_hw[0], scales[0], corners)
        taps_w = _linear_taps(in_hw[1], out_hw[1], scales[1], corners)
    elif mode == "bicubic":
        taps_h = _cubic_taps(in_hw[0], out_hw[0], scales[0], corners)
        taps_w = _cubic_taps(in_hw[1], out_hw[1], scales[1], corners)
    else:  # area
        taps_h = _area_taps(in_hw[0], out_hw[0])
        taps_w = _area_taps(in_hw[1], out_hw[1])
    x = input.astype(jnp.promote_types(input.dtype, jnp.float32))
    out = _resample_axis(_resample_axis(x, 2, *taps_w), 1, *taps_h)
    return out.astype(input.dtype)
