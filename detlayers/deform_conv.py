"""Deformable convolution v1 (Dai et al., 2017) and v2 / modulated (Zhu et al., 2019), NHWC.

Semantics are torchvision's ``torchvision.ops.deform_conv2d`` (which detectron2's CPU path calls
and whose CUDA kernels share the layout and bilinear rule), moved to Flax's layout:

* ``input``  ``[N, H, W, C]``; ``kernel`` HWIO ``[kh, kw, C / groups, O]``; output
  ``[N, Ho, Wo, O]`` with PyTorch's output size ``(H + 2*pad - (dil*(k-1) + 1)) // stride + 1``.
* ``offset`` ``[N, Ho, Wo, 2 * dg * kh * kw]``: for deformable group ``g`` and kernel tap
  ``k = i * kw + j`` channel ``g*2*kh*kw + 2*k`` is the y offset and ``+1`` the x offset
  (detectron2's / torchvision's channel order, moved to the last axis).  Deformable group ``g``
  covers the input channels ``[g * C/dg, (g+1) * C/dg)``.
* ``mask`` ``[N, Ho, Wo, dg * kh * kw]``, channel ``g*kh*kw + k``; it multiplies the sample as
  given (apply any sigmoid before).
* Tap ``(i, j)`` of output ``(ho, wo)`` samples the point
  ``y = ho*stride_h - pad_h + i*dil_h + dy``, ``x = wo*stride_w - pad_w + j*dil_w + dx``.  The
  sample is taken only when ``-1 < y < H`` and ``-1 < x < W`` (else it is 0); inside that window
  it is the bilinear blend of the four neighbours ``floor(y) + {0, 1}`` x ``floor(x) + {0, 1}``,
  neighbours outside the image counting as 0.

Gradients equal torchvision's backward for input, offset, mask, kernel and bias, including where
torchvision's offset gradient is not the derivative of its forward: at a sample lying exactly on
``y == -1`` (or ``x == -1``) the forward is 0 but the offset gradient is the one-sided derivative
of the bilinear blend. Zero offsets with ``padding = dilation`` put the border taps exactly there,
which is how detectron2 initialises its offset convolutions. (detectron2's own CUDA kernel
returns 0 there instead.)

Memory: the bilinear columns (``N*Ho*Wo*kh*kw*C`` elements) are built at most
``max_column_elements`` at a time (default ``2**26``, 256 MiB in float32), in chunks of output rows.

dtypes: bfloat16 / float16 inputs are blended in float32 and multiplied in the promoted dtype of
``input`` and ``kernel`` (as PyTorch's im2col does), accumulating in float32; the result has
``input``'s dtype (like ``Conv2d``).

How it is computed (a bilinear im2col by gathers and one matmul per group):
``docs/design/deform_conv.md`` in the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detlayers._checks import IntOrPair, check_groups
from detlayers._checks import as_pair as _pair
from detlayers._conv_norm import ConvGeometry as _ConvGeometry
from detlayers._conv_norm import norm_then_activation
from detlayers._numerics import opaque
from detlayers._roi_sampling import gather_rows as _gather

__all__ = ["deform_conv", "modulated_deform_conv", "DeformConv", "ModulatedDeformConv"]

# Bound on the number of elements of the bilinear column tensor built at once (256 MiB in f32).
DEFAULT_MAX_COLUMN_ELEMENTS = 2**26


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def output_size(
    size: int, kernel_size: int, stride: int, padding: int, dilation: int
) -> int:
    """PyTorch's convolution output length along one axis (ints, static):
    ``(size + 2*padding - (dilation*(kernel_size-1) + 1)) // stride + 1``; may be < 1 when the
    input is too small (callers check)."""
    return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def _check_rank(array: jax.Array, name: str, layout: str) -> None:
    if jnp.ndim(array) != 4:
        raise ValueError(f"{name} must be rank 4 {layout}, got shape {jnp.shape(array)}")


class _Neighbour(NamedTuple):
    """One of the four bilinear neighbours of every sample, arrays ``[R, Wo, K * dg]``."""

    index: jax.Array  # int32 row of ``image_rows`` (clipped into the image)
    weight: jax.Array  # bilinear weight, 0 when the neighbour is outside the image (no gate)


class _SamplingPlan(NamedTuple):
    neighbours: tuple[_Neighbour, ...]
    inside: jax.Array  # bool [R, Wo, K * dg]: -1 < y < H and -1 < x < W


def _sampling_plan(
    batch_index: jax.Array,
    out_rows: jax.Array,
    offset: jax.Array,
    *,
    height: int,
    width: int,
    kernel_hw: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    deformable_groups: int,
) -> _SamplingPlan:
    """Neighbour rows and bilinear weights of every (output position, tap, deformable group).

    Args:
      batch_index: int32 ``[R]`` image index of each output row of the block.
      out_rows: int32 ``[R]`` output row (``ho``) of each row of the block.
      offset: ``[R, Wo, dg, K, 2]`` (y, x) offsets.

    Arrays of the plan are ``[R, Wo, K * dg]`` (tap-major): taps before deformable groups, so that
    gathered channel vectors come out in the (tap, channel) order of the kernel.  The (K, dg) pair
    is flattened because a size-1 ``dg`` axis makes XLA:CPU copy the column tensor between layouts.
    """
    kh, kw = kernel_hw
    dg = deformable_groups
    taps = np.arange(kh * kw)
    tap_y = jnp.asarray((taps // kw) * dilation[0], jnp.float32)  # [K]
    tap_x = jnp.asarray((taps % kw) * dilation[1], jnp.float32)
    wo = offset.shape[1]
    base_y = (out_rows * stride[0] - padding[0]).astype(jnp.float32)  # [R]
    base_x = (jnp.arange(wo) * stride[1] - padding[1]).astype(jnp.float32)  # [Wo]

    offset = offset.astype(jnp.float32)
    off_y = jnp.swapaxes(offset[..., 0], -1, -2)  # [R, Wo, K, dg]
    off_x = jnp.swapaxes(offset[..., 1], -1, -2)
    # torchvision adds the offset to the integer position ho*stride - pad + i*dilation (exact in
    # float32) in one rounding; hiding that integer part pins the order under jit, where a
    # reassociated sum would round twice (see detlayers._numerics).
    y = opaque(base_y[:, None, None, None] + tap_y[None, None, :, None]) + off_y
    x = opaque(base_x[None, :, None, None] + tap_x[None, None, :, None]) + off_x

    flat = (*y.shape[:2], -1)
    inside = ((y > -1) & (y < height) & (x > -1) & (x < width)).reshape(flat)
    # Beyond one pixel outside the image every neighbour is outside too (weight and gradient 0),
    # so clamping there changes nothing but keeps huge offsets from overflowing the int32 cast.
    y = jnp.clip(y, -2.0, height + 1.0)
    x = jnp.clip(x, -2.0, width + 1.0)
    y_floor = jnp.floor(y)
    x_floor = jnp.floor(x)
    frac_y = y - y_floor
    frac_x = x - x_floor
    y0 = y_floor.astype(jnp.int32)
    x0 = x_floor.astype(jnp.int32)
    pixel_base = batch_index[:, None, None, None] * (height * width)  # [R, 1, 1, 1]
    group = jnp.arange(dg, dtype=jnp.int32)

    neighbours = []
    for dy, weight_y in ((0, 1.0 - frac_y), (1, frac_y)):
        row = y0 + dy
        row_ok = (row >= 0) & (row < height)
        row_clipped = jnp.clip(row, 0, height - 1)
        for dx, weight_x in ((0, 1.0 - frac_x), (1, frac_x)):
            col = x0 + dx
            ok = row_ok & (col >= 0) & (col < width)
            col_clipped = jnp.clip(col, 0, width - 1)
            neighbours.append(
                _Neighbour(
                    index=((pixel_base + row_clipped * width + col_clipped) * dg + group).reshape(
                        flat
                    ),
                    weight=jnp.where(ok, weight_y * weight_x, 0.0).reshape(flat),
                )
            )
    return _SamplingPlan(tuple(neighbours), inside)


def _columns(image_rows: jax.Array, plan: _SamplingPlan, mask: jax.Array | None) -> jax.Array:
    """Bilinear im2col: ``[R, Wo, K * dg, C/dg]`` float32 (``mask`` ``[R, Wo, dg, K]`` or None)."""
    scale = None
    if mask is not None:
        scale = jnp.swapaxes(mask.astype(jnp.float32), -1, -2).reshape(plan.inside.shape)
    columns = None
    for nb in plan.neighbours:
        # The forward samples only inside (-1, H) x (-1, W).  The gate enters as a constant
        # (stop_gradient) so that the offset gradient stays torchvision's one-sided derivative
        # on the -1 border; the input and mask gradients see the gated weight.
        weight = nb.weight + lax.stop_gradient(jnp.where(plan.inside, 0.0, -nb.weight))
        if scale is not None:
            weight = weight * scale
        term = weight[..., None] * _gather(image_rows, nb.index).astype(jnp.float32)
        columns = term if columns is None else columns + term
    return columns


class _DeformArgs(NamedTuple):
    """A deformable convolution's checked arguments and its output size."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    deformable_groups: int
    out_hw: tuple[int, int]


def _check_deform_args(
    fn_name: str, input: jax.Array, offset: jax.Array, mask: jax.Array | None, kernel: jax.Array,
    bias: jax.Array | None, stride: IntOrPair, padding: IntOrPair, dilation: IntOrPair,
    groups: int, deformable_groups: int,
) -> _DeformArgs:
    """Normalizes the int-or-pair arguments and raises ``TypeError``/``ValueError`` (naming
    ``fn_name``, the argument and the shapes) for anything ``_deform_conv_impl`` cannot run."""
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    groups = _positive_int(groups, "groups")
    dg = _positive_int(deformable_groups, "deformable_groups")
    _check_rank(input, "input", "[N, H, W, C]")
    _check_rank(offset, "offset", "[N, Ho, Wo, 2*dg*kh*kw]")
    _check_rank(kernel, "kernel", "HWIO [kh, kw, C/groups, O]")
    n, h, w, c = input.shape
    kh, kw, c_per_group, o = kernel.shape
    if c < 1:
        raise ValueError(
            f"{fn_name}: input must have at least one channel, got input shape {input.shape} (NHWC)"
        )
    if kh < 1 or kw < 1:
        raise ValueError(
            f"{fn_name}: kernel spatial size must be positive, got kernel shape {kernel.shape} (HWIO)"
        )
    if c % groups or c_per_group * groups != c:
        raise ValueError(
            f"{fn_name}: kernel shape {kernel.shape} (HWIO) needs input channels = "
            f"kernel.shape[2] * groups = {c_per_group} * {groups}, but input has shape "
            f"{input.shape}"
        )
    if o % groups:
        raise ValueError(
            f"{fn_name}: output channels kernel.shape[3] = {o} must be divisible by "
            f"groups = {groups} (kernel shape {kernel.shape})"
        )
    if c % dg:
        raise ValueError(
            f"{fn_name}: input channels {c} (input shape {input.shape}) must be divisible by "
            f"deformable_groups = {dg}"
        )
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{fn_name}: input {input.shape} is too small for kernel {kernel.shape[:2]} with "
            f"stride {stride}, padding {padding}, dilation {dilation} (output {ho}x{wo})"
        )
    taps = kh * kw
    expected_offset = (n, ho, wo, 2 * dg * taps)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(
            f"{fn_name}: offset must have shape [N, Ho, Wo, 2*deformable_groups*kh*kw] = "
            f"{expected_offset} for input {input.shape}, kernel {kernel.shape}, "
            f"deformable_groups={dg}; got {offset.shape}"
        )
    if mask is not None:
        _check_rank(mask, "mask", "[N, Ho, Wo, dg*kh*kw]")
        expected_mask = (n, ho, wo, dg * taps)
        if tuple(mask.shape) != expected_mask:
            raise ValueError(
                f"{fn_name}: mask must have shape [N, Ho, Wo, deformable_groups*kh*kw] = "
                f"{expected_mask} for input {input.shape}, kernel {kernel.shape}, "
                f"deformable_groups={dg}; got {mask.shape}"
            )
    if bias is not None and tuple(jnp.shape(bias)) != (o,):
        raise ValueError(f"{fn_name}: bias must have shape ({o},), got {jnp.shape(bias)}")

    for array, name in ((input, "input"), (offset, "offset"), (kernel, "kernel"), (mask, "mask")):
        if array is not None and not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{fn_name}: {name} must be floating point, got {array.dtype}")
    return _DeformArgs(stride, padding, dilation, groups, dg, (ho, wo))


def _deform_conv_impl(
    input: jax.Array,
    offset: jax.Array,
    mask: jax.Array | None,
    kernel: jax.Array,
    bias: jax.Array | None,
    stride: IntOrPair,
    padding: IntOrPair,
    dilation: IntOrPair,
    groups: int,
    deformable_groups: int,
    max_column_elements: int | None,
    fn_name: str,
) -> jax.Array:
    stride, padding, dilation, groups, dg, (ho, wo) = _check_deform_args(
        fn_name, input, offset, mask, kernel, bias, stride, padding, dilation, groups,
        deformable_groups,
    )
    n, h, w, c = input.shape
    kh, kw, c_per_group, o = kernel.shape
    taps = kh * kw
    out_dtype = input.dtype
    if n == 0:
        return jnp.zeros((0, ho, wo, o), out_dtype)

    # The matmul runs in the promoted dtype of input and kernel (bfloat16 when both are), capped
    # at float32, and always accumulates in float32.
    matmul_dtype = jnp.promote_types(input.dtype, kernel.dtype)
    if jnp.finfo(matmul_dtype).bits > 32:
        matmul_dtype = jnp.float32
    image_rows = input.reshape(n * h * w * dg, c // dg)
    # [K, C/groups, groups, O/groups]: output channel o belongs to group o // (O/groups).
    grouped_kernel = kernel.reshape(taps, c_per_group, groups, o // groups).astype(matmul_dtype)
    offset_rows = offset.reshape(n * ho, wo, dg, taps, 2)
    mask_rows = None if mask is None else mask.reshape(n * ho, wo, dg, taps)

    plan_config = dict(
        height=h, width=w, kernel_hw=(kh, kw), stride=stride, padding=padding,
        dilation=dilation, deformable_groups=dg,
    )

    def block(image_rows_, kernel_, offset_block, mask_block, batch_index, out_rows):
        plan = _sampling_plan(batch_index, out_rows, offset_block, **plan_config)
        columns = _columns(image_rows_, plan, mask_block)
        rows = columns.shape[0]
        columns = columns.reshape(rows * wo, taps, groups, c_per_group).astype(matmul_dtype)
        out = jnp.einsum(
            "mkgc,kcgo->mgo", columns, kernel_, preferred_element_type=jnp.float32
        )
        return out.reshape(rows, wo, o)

    # Rematerialise the gathers in the backward pass instead of keeping the four gathered
    # neighbour tensors (4x the column tensor) alive between forward and backward: measured as
    # fast or faster on CPU, and it keeps training memory near one column tensor per chunk.
    block = jax.checkpoint(block)
    total_rows = n * ho
    limit = DEFAULT_MAX_COLUMN_ELEMENTS if max_column_elements is None else max_column_elements
    per_row = wo * taps * c
    rows_per_chunk = max(1, min(total_rows, int(limit) // per_row))
    flat_row = jnp.arange(total_rows, dtype=jnp.int32)
    # Padded rows read image 0 row 0 with zero offsets; their outputs are dropped.
    out = _map_row_chunks(
        lambda *rows: block(image_rows, grouped_kernel, *rows),
        (offset_rows, mask_rows, flat_row // ho, flat_row % ho), total_rows, rows_per_chunk,
    )
    out = out.reshape(n, ho, wo, o)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(out_dtype)


def _map_row_chunks(
    fn: Callable[..., jax.Array], row_args: tuple, total_rows: int, rows_per_chunk: int
) -> jax.Array:
    """``fn(*row_args)``, whose arguments and result have ``total_rows`` rows on axis 0, evaluated
    ``rows_per_chunk`` rows at a time under ``lax.map`` when that is fewer than all; the last chunk
    is zero-padded and the padded rows' outputs dropped. ``None`` arguments pass through."""
    if rows_per_chunk >= total_rows:
        return fn(*row_args)
    chunks = -(-total_rows // rows_per_chunk)
    padded = chunks * rows_per_chunk
    pad = padded - total_rows

    def chunked(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(chunks, rows_per_chunk, *a.shape[1:])

    # A None argument is an empty pytree: lax.map hands it to every call unchanged.
    out = lax.map(lambda args: fn(*args), tuple(None if a is None else chunked(a) for a in row_args))
    return out.reshape(padded, *out.shape[2:])[:total_rows]


def deform_conv(
    input: jax.Array, offset: jax.Array, kernel: jax.Array,
    stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
    groups: int = 1, deformable_groups: int = 1,
    *, max_column_elements: int | None = None,
) -> jax.Array:
    """Deformable convolution v1 (no mask, no bias), NHWC.

    Args:
      input: ``[N, H, W, C]``.
      offset: ``[N, Ho, Wo, 2 * deformable_groups * kh * kw]``, per group and tap (y, x) pairs in
        detectron2's channel order (see the module docstring).
      kernel: HWIO ``[kh, kw, C // groups, O]``.
      stride, padding, dilation: int or (h, w) pair, PyTorch meaning (symmetric zero padding).
      groups: convolution groups (``C`` and ``O`` divisible by it).
      deformable_groups: offset groups (``C`` divisible by it).
      max_column_elements: bound on the bilinear column tensor built at once (default ``2**26``);
        larger problems run in chunks of output rows.

    Returns:
      ``[N, Ho, Wo, O]`` in ``input``'s dtype.

    Raises:
      ValueError / TypeError at trace time for wrong ranks, channel counts or arguments.
    """
    return _deform_conv_impl(
        input, offset, None, kernel, None, stride, padding, dilation, groups,
        deformable_groups, max_column_elements, "deform_conv",
    )


def modulated_deform_conv(
    input: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
    stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
    groups: int = 1, deformable_groups: int = 1,
    *, max_column_elements: int | None = None,
) -> jax.Array:
    """Modulated deformable convolution (DCNv2), NHWC.

    As :func:`deform_conv`, plus ``mask`` ``[N, Ho, Wo, deformable_groups * kh * kw]`` (channel
    ``g*kh*kw + k``) multiplying every sample as given, and an optional ``bias`` ``[O]``.
    """
    return _deform_conv_impl(
        input, offset, mask, kernel, bias, stride, padding, dilation, groups,
        deformable_groups, max_column_elements, "modulated_deform_conv",
    )


def _kernel_init() -> Callable[..., jax.Array]:
    # detectron2: nn.init.kaiming_uniform_(weight, nonlinearity="relu") -> U(+-sqrt(6 / fan_in)),
    # fan_in = in_channels/groups * kh * kw (Flax's fan_in for an HWIO kernel).
    return nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


class _DeformConvBase(_ConvGeometry):
    dilation: IntOrPair = 1
    groups: int = 1
    deformable_groups: int = 1
    bias: bool = False
    norm: Any = None
    activation: Callable[[jax.Array], jax.Array] | None = None
    param_dtype: Any = jnp.float32

    def _params(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        kh, kw = _pair(self.kernel_size, "kernel_size", 1)
        groups = _positive_int(self.groups, "groups")
        _positive_int(self.in_channels, f"{type(self).__name__}: in_channels")
        check_groups(self.in_channels, self.out_channels, groups, type(self).__name__)
        if jnp.ndim(x) != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input [N, H, W, {self.in_channels}], "
                f"got shape {jnp.shape(x)}"
            )
        kernel = self.param(
            "kernel", _kernel_init(), (kh, kw, self.in_channels // groups, self.out_channels),
            self.param_dtype,
        )
        bias = (
            self.param("bias", nn.initializers.zeros_init(), (self.out_channels,), self.param_dtype)
            if self.bias
            else None
        )
        return kernel, bias

    def _finish(self, y: jax.Array, train: bool) -> jax.Array:
        return norm_then_activation(y, self.norm, self.out_channels, self.activation, train,
                                    type(self).__name__)


class DeformConv(_DeformConvBase):
    """Deformable convolution v1 layer, detectron2's ``DeformConv`` in NHWC.

    Parameters ``kernel`` (HWIO ``[kh, kw, in/groups, out]``, kaiming-uniform with ReLU gain as in
    detectron2) and, when ``bias=True`` (detectron2 forbids it; allowed here), ``bias`` (zeros).
    ``norm`` (a name or callable for :func:`detlayers.batch_norm.get_norm`, built as the submodule
    ``norm``) and ``activation`` are applied after the convolution, like ``Conv2d``.

    ``__call__(x [N, H, W, in], offset [N, Ho, Wo, 2*dg*kh*kw], train=False) -> [N, Ho, Wo, out]``.
    """

    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array, train: bool = False) -> jax.Array:
        kernel, bias = self._params(x)
        y = deform_conv(
            x, offset, kernel, self.stride, self.padding, self.dilation, self.groups,
            self.deformable_groups,
        )
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return self._finish(y, train)


class ModulatedDeformConv(_DeformConvBase):
    """Modulated deformable convolution (DCNv2) layer, detectron2's ``ModulatedDeformConv``, NHWC.

    As :class:`DeformConv` with ``bias=True`` by default (bias initialised to 0) and a ``mask``
    argument (apply the sigmoid before, as detectron2's callers do).

    ``__call__(x, offset, mask [N, Ho, Wo, dg*kh*kw], train=False) -> [N, Ho, Wo, out]``.
    """

    bias: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, offset: jax.Array, mask: jax.Array, train: bool = False
    ) -> jax.Array:
        kernel, bias = self._params(x)
        y = modulated_deform_conv(
            x, offset, mask, kernel, bias, self.stride, self.padding, self.dilation, self.groups,
            self.deformable_groups,
        )
        return self._finish(y, train)
