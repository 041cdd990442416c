"""Deformable convolution v1/v2 (detlayers.deform_conv) against independent references.

References:
* ``tests/fixtures/deform_conv.npz``: ``torchvision.ops.deform_conv2d`` forward and backward
  (input, offset, mask, weight, bias) in float64, made by ``tools/fixtures/make_deform_conv.py``.
* detectron2's hard-coded table from ``tests/layers/test_deformable.py``
  (``DeformableTest.test_forward_output``), published values.
* ``jax.lax.conv_general_dilated``: with zero offsets and unit mask a deformable convolution is an
  ordinary convolution.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_fixture
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from detlayers.deform_conv import (
    DeformConv,
    ModulatedDeformConv,
    deform_conv,
    modulated_deform_conv,
    output_size,
)

FIXTURE = "deform_conv.npz"
CONFIG_NAMES = [
    "basic_v2",
    "basic_v1",
    "groups2_dg2_v2",
    "dg4_stride2_v2",
    "dg4_stride2_v1",
    "dilation2_v2",
    "kernel1_dg2_v2",
    "kernel5_groups2_stride2_v2",
    "kernel5_v1",
    "asymmetric_v2",
    "zero_offset_v2",
    "groups4_dg1_v1",
]
STATIC = ("stride", "padding", "dilation", "groups", "deformable_groups", "max_column_elements")

_conv_v2 = jax.jit(modulated_deform_conv, static_argnames=STATIC)
_conv_v1 = jax.jit(deform_conv, static_argnames=STATIC)


@functools.partial(jax.jit, static_argnames=STATIC)
def _v2_value_and_grads(x, offset, mask, kernel, bias, grad_out, **static):
    out, vjp = jax.vjp(
        lambda *a: modulated_deform_conv(*a, **static), x, offset, mask, kernel, bias
    )
    return out, vjp(grad_out)


@functools.partial(jax.jit, static_argnames=STATIC)
def _v1_value_and_grads(x, offset, kernel, grad_out, **static):
    out, vjp = jax.vjp(lambda *a: deform_conv(*a, **static), x, offset, kernel)
    return out, vjp(grad_out)


@pytest.fixture(scope="module")
def fixture_data():
    return load_fixture(FIXTURE)


def _case(data, name):
    arrays = {key.split("/", 1)[1]: v for key, v in data.items() if key.startswith(name + "/")}
    sh, sw, ph, pw, dh, dw, groups, dg, modulated = (int(v) for v in arrays["config"])
    static = dict(
        stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
        deformable_groups=dg,
    )
    return arrays, static, bool(modulated)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_forward_and_all_gradients_match_torchvision(fixture_data, name):
    a, static, modulated = _case(fixture_data, name)
    if modulated:
        out, grads = _v2_value_and_grads(
            a["input"], a["offset"], a["mask"], a["kernel"], a["bias"], a["grad_out"], **static
        )
        references = ("d_input", "d_offset", "d_mask", "d_kernel", "d_bias")
    else:
        out, grads = _v1_value_and_grads(
            a["input"], a["offset"], a["kernel"], a["grad_out"], **static
        )
        references = ("d_input", "d_offset", "d_kernel")
    chex.assert_shape(out, a["out"].shape)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, a["out"], rtol=1e-4, atol=1e-4)
    for grad, ref in zip(grads, references):
        np.testing.assert_allclose(grad, a[ref], rtol=1e-4, atol=1e-4, err_msg=ref)


def test_offset_gradient_on_the_minus_one_border_is_torchvisions(fixture_data):
    # Zero offsets with padding 1 put the border taps exactly on y == -1 / x == -1: the sample is 0
    # there, but torchvision's offset gradient pulls it into the image.  The fixture must contain
    # such non-zero gradients, or the comparison above would not test this convention.
    a, static, _ = _case(fixture_data, "zero_offset_v2")
    d_offset = a["d_offset"].reshape(*a["d_offset"].shape[:3], 9, 2)
    # output row 0, tap row 0 samples y = -1: its y-offset gradient is non-zero in torchvision.
    assert np.abs(d_offset[:, 0, 1:-1, 0:3, 0]).min() > 0
    _, grads = _v2_value_and_grads(
        a["input"], a["offset"], a["mask"], a["kernel"], a["bias"], a["grad_out"], **static
    )
    np.testing.assert_allclose(grads[1], a["d_offset"], rtol=1e-4, atol=1e-4)


# detectron2 tests/layers/test_deformable.py::DeformableTest::test_forward_output: 5x5 arange
# input, 3x3 all-ones kernel, padding 1, every offset 0.5.
DETECTRON2_DEFORM_TABLE = np.array(
    [
        [30, 41.25, 48.75, 45, 28.75],
        [62.25, 81, 90, 80.25, 50.25],
        [99.75, 126, 135, 117.75, 72.75],
        [105, 131.25, 138.75, 120, 73.75],
        [71.75, 89.25, 93.75, 80.75, 49.5],
    ],
    dtype=np.float32,
)


def test_detectron2_published_table_v1_and_v2():
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    offset = np.full((1, 5, 5, 18), 0.5, np.float32)
    ones = {"params": {"kernel": np.ones((3, 3, 1, 1), np.float32)}}

    v1 = jax.jit(DeformConv(1, 1, kernel_size=3, padding=1).apply)(ones, x, offset)
    np.testing.assert_allclose(v1[0, :, :, 0], DETECTRON2_DEFORM_TABLE, rtol=1e-6)

    mask = np.full((1, 5, 5, 9), 0.5, np.float32)
    v2 = jax.jit(ModulatedDeformConv(1, 1, kernel_size=3, padding=1, bias=False).apply)(
        ones, x, offset, mask
    )
    np.testing.assert_allclose(v2[0, :, :, 0], DETECTRON2_DEFORM_TABLE * 0.5, rtol=1e-6)


@settings(max_examples=6, deadline=None)
@given(
    kernel_size=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    dg=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_zero_offsets_and_unit_mask_equal_ordinary_convolution(
    kernel_size, stride, dilation, padding, groups, dg, seed
):
    rng = np.random.default_rng(seed)
    n, h, w, c, o = 2, 9, 8, 4, 6
    ho = output_size(h, kernel_size, stride, padding, dilation)
    wo = output_size(w, kernel_size, stride, padding, dilation)
    assume(ho >= 1 and wo >= 1)  # e.g. a 5x5 kernel with dilation 2 does not fit 8 columns
    taps = kernel_size * kernel_size
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, c // groups, o)).astype(np.float32)
    offset = np.zeros((n, ho, wo, 2 * dg * taps), np.float32)
    mask = np.ones((n, ho, wo, dg * taps), np.float32)
    expected = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding)] * 2, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    static = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                  deformable_groups=dg)
    got = _conv_v2(x, offset, mask, kernel, **static)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_conv_v1(x, offset, kernel, **static), expected, rtol=1e-4,
                               atol=1e-4)



def test_samples_far_outside_the_image_contribute_zero():
    # huge offsets (also ones that would overflow an int32 pixel index) sample nothing
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    offset = np.zeros((1, 5, 6, 18), np.float32)
    offset[0, 2, 3] = 3e9
    offset[0, 1, 1] = -3e9
    offset[0, 4, 0, 0::2] = 5.0  # y pushed to 3..5 + 5 >= H = 5
    expected = np.array(
        jax.lax.conv_general_dilated(
            x, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
    )
    expected[0, 2, 3] = expected[0, 1, 1] = expected[0, 4, 0] = 0.0
    np.testing.assert_allclose(_conv_v1(x, offset, kernel, padding=1), expected, atol=1e-5)


def test_chunked_rows_equal_single_pass_including_gradients(fixture_data):
    a, static, _ = _case(fixture_data, "kernel5_groups2_stride2_v2")
    args = (a["input"], a["offset"], a["mask"], a["kernel"], a["bias"], a["grad_out"])
    # per output row: Wo * 25 taps * 8 channels = 800 elements -> 3 rows a chunk, padded tail.
    chunked = _v2_value_and_grads(*args, **static, max_column_elements=2500)
    np.testing.assert_allclose(chunked[0], a["out"], rtol=1e-4, atol=1e-4)
    for grad, ref in zip(chunked[1], ("d_input", "d_offset", "d_mask", "d_kernel", "d_bias")):
        np.testing.assert_allclose(grad, a[ref], rtol=1e-4, atol=1e-4, err_msg=ref)
    # v1 (no mask) through the chunked path: 8 columns * 25 taps * 4 channels a row, 2 rows a chunk
    a, static, _ = _case(fixture_data, "kernel5_v1")
    out, grads = _v1_value_and_grads(
        a["input"], a["offset"], a["kernel"], a["grad_out"], **static, max_column_elements=1600
    )
    np.testing.assert_allclose(out, a["out"], rtol=1e-4, atol=1e-4)
    for grad, ref in zip(grads, ("d_input", "d_offset", "d_kernel")):
        np.testing.assert_allclose(grad, a[ref], rtol=1e-4, atol=1e-4, err_msg=ref)


def test_vmap_over_a_leading_axis_equals_a_loop(fixture_data):
    a, static, _ = _case(fixture_data, "groups2_dg2_v2")
    # treat the batch as the vmapped axis, each element a batch of one image
    fn = functools.partial(modulated_deform_conv, **static)
    batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None, None)))(
        a["input"][:, None], a["offset"][:, None], a["mask"][:, None], a["kernel"], a["bias"]
    )
    chex.assert_shape(batched, (2, 1, *a["out"].shape[1:]))
    np.testing.assert_allclose(batched[:, 0], a["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_run_and_stay_close(fixture_data, dtype):
    a, static, _ = _case(fixture_data, "basic_v2")
    low = [jnp.asarray(a[k], dtype) for k in ("input", "offset", "mask", "kernel", "bias")]
    out = _conv_v2(*low, **static)
    chex.assert_type(out, dtype)
    chex.assert_shape(out, a["out"].shape)
    scale = np.abs(a["out"]).max()
    np.testing.assert_allclose(np.asarray(out, np.float32), a["out"], atol=0.05 * scale)


def test_empty_batch_gives_empty_output_and_gradients():
    x = jnp.zeros((0, 7, 6, 4))
    offset = jnp.zeros((0, 4, 3, 2 * 2 * 9))
    mask = jnp.zeros((0, 4, 3, 2 * 9))
    kernel = jnp.ones((3, 3, 4, 5))
    out = modulated_deform_conv(x, offset, mask, kernel, jnp.zeros(5), stride=2, padding=1,
                                deformable_groups=2)
    chex.assert_shape(out, (0, 4, 3, 5))
    grads = jax.grad(
        lambda x, o, m, k: modulated_deform_conv(x, o, m, k, stride=2, padding=1,
                                                 deformable_groups=2).sum(),
        argnums=(0, 1, 2, 3),
    )(x, offset, mask, kernel)
    for grad, arg in zip(grads, (x, offset, mask, kernel)):
        chex.assert_shape(grad, arg.shape)
    np.testing.assert_array_equal(grads[3], 0.0)
    module_out, _ = DeformConv(4, 5, 3, stride=2, padding=1, deformable_groups=2).init_with_output(
        jax.random.key(0), x, offset
    )
    chex.assert_shape(module_out, (0, 4, 3, 5))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(offset=jnp.zeros((1, 5, 5, 9))), "offset must have shape"),  # dg*kh*kw, not 2x
        (dict(mask=jnp.zeros((1, 5, 5, 18))), "mask must have shape"),
        (dict(offset=jnp.zeros((1, 4, 5, 18))), "offset must have shape"),  # wrong spatial size
        (dict(kernel=jnp.zeros((3, 3, 3, 4))), "input channels"),  # C != C/groups * groups
        (dict(kernel=jnp.zeros((3, 3, 2, 3)), groups=2), "divisible by groups"),  # O % groups
        (dict(deformable_groups=3), "deformable_groups"),  # 4 % 3 != 0
        (dict(bias=jnp.zeros(5)), "bias must have shape"),
        (dict(input=jnp.zeros((5, 5, 4))), "input must be rank 4"),
        (dict(input=jnp.zeros((1, 1, 1, 4)), padding=0), "too small"),
        (dict(stride=0), "stride"),
        (dict(padding=-1), "padding"),
        (dict(groups=0), "groups"),
        (dict(input=jnp.zeros((1, 5, 5, 0)), kernel=jnp.zeros((3, 3, 0, 4))),
         r"input must have at least one channel, got input shape \(1, 5, 5, 0\)"),
        (dict(kernel=jnp.zeros((0, 3, 4, 4)), offset=jnp.zeros((1, 7, 5, 0)),
          mask=jnp.zeros((1, 7, 5, 0))), r"kernel spatial size must be positive"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, match):
    args = dict(
        input=jnp.zeros((1, 5, 5, 4)), offset=jnp.zeros((1, 5, 5, 18)),
        mask=jnp.zeros((1, 5, 5, 9)), kernel=jnp.zeros((3, 3, 4, 4)), bias=None, padding=1,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        modulated_deform_conv(**args)


def test_bad_argument_types_raise_type_errors():
    x = jnp.zeros((1, 5, 5, 4))
    with pytest.raises(TypeError, match="stride"):
        deform_conv(x, jnp.zeros((1, 5, 5, 18)), jnp.zeros((3, 3, 4, 4)), stride=1.5)
    with pytest.raises(TypeError, match="input must be floating"):
        deform_conv(x.astype(jnp.int32), jnp.zeros((1, 3, 3, 18)), jnp.zeros((3, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"expected input \[N, H, W, 3\]"):
        DeformConv(3, 4, 3, padding=1).init(jax.random.key(0), x, jnp.zeros((1, 5, 5, 18)))
    with pytest.raises(ValueError, match="DeformConv: in_channels must be a positive int, got 0"):
        DeformConv(0, 4, 3, padding=1).init(jax.random.key(0), x[..., :0], jnp.zeros((1, 5, 5, 18)))


def test_modules_have_flax_params_and_detectron2_init():
    x = np.ones((2, 6, 6, 8), np.float32)
    offset = np.zeros((2, 6, 6, 2 * 2 * 9), np.float32)
    mask = np.ones((2, 6, 6, 2 * 9), np.float32)
    v1 = DeformConv(8, 16, 3, padding=1, groups=2, deformable_groups=2)
    v1_vars = jax.jit(v1.init)(jax.random.key(0), x, offset)
    chex.assert_trees_all_equal_shapes(v1_vars["params"], {"kernel": jnp.zeros((3, 3, 4, 16))})
    v2 = ModulatedDeformConv(8, 16, 3, padding=1, groups=2, deformable_groups=2)
    v2_vars = jax.jit(v2.init)(jax.random.key(1), x, offset, mask)
    chex.assert_trees_all_equal_shapes(
        v2_vars["params"], {"kernel": jnp.zeros((3, 3, 4, 16)), "bias": jnp.zeros(16)}
    )
    np.testing.assert_array_equal(v2_vars["params"]["bias"], 0.0)
    # kaiming_uniform_(nonlinearity="relu"): U(-b, b), b = sqrt(6 / fan_in), fan_in = 4*9.
    kernel = np.asarray(v2_vars["params"]["kernel"])
    bound = np.sqrt(6.0 / 36)
    assert np.abs(kernel).max() <= bound
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound
    # the module output equals the functional op on its parameters
    out = jax.jit(v2.apply)(v2_vars, x, offset, mask)
    ref = _conv_v2(x, offset, mask, v2_vars["params"]["kernel"], v2_vars["params"]["bias"],
                   padding=1, groups=2, deformable_groups=2)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_norm_and_activation_follow_the_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    offset = (0.5 * rng.standard_normal((2, 5, 5, 18))).astype(np.float32)
    mask = rng.uniform(0, 1, (2, 5, 5, 9)).astype(np.float32)
    layer = ModulatedDeformConv(4, 6, 3, padding=1, norm="BN", activation=jax.nn.relu)
    variables = jax.jit(layer.init)(jax.random.key(3), x, offset, mask)
    assert set(variables["params"]) == {"kernel", "bias", "norm"}
    assert "norm" in variables["batch_stats"]
    apply = jax.jit(functools.partial(layer.apply, train=True, mutable=["batch_stats"]))
    out, updates = apply(variables, x, offset, mask)
    plain = np.asarray(
        _conv_v2(x, offset, mask, variables["params"]["kernel"], variables["params"]["bias"],
                 padding=1), np.float64,
    )
    mean = plain.mean(axis=(0, 1, 2))
    var = plain.var(axis=(0, 1, 2))
    expected = np.maximum((plain - mean) / np.sqrt(var + 1e-5), 0.0)  # fresh BN: scale 1, bias 0
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(updates["batch_stats"]["norm"]["mean"], 0.0)


class _DeformBottleneck(nn.Module):
    """detectron2's DeformBottleneckBlock (DCNv2 branch), small: 1x1 -> DCNv2 3x3 -> 1x1 + skip."""

    channels: int = 8
    bottleneck: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        from detlayers.wrappers import Conv2d

        y = Conv2d(self.channels, self.bottleneck, 1, bias=False, activation=jax.nn.relu)(x)
        # offsets and mask from a zero-initialised 3x3 conv, split as detectron2 does:
        # chunk(3) -> (offset_x, offset_y, mask); offset = cat(offset_x, offset_y); sigmoid(mask)
        offset_mask = Conv2d(
            self.bottleneck, 27, 3, padding=1, kernel_init=nn.initializers.zeros_init(),
            bias_init=nn.initializers.zeros_init(), name="conv2_offset",
        )(y)
        offset = offset_mask[..., :18]
        mask = jax.nn.sigmoid(offset_mask[..., 18:])
        y = ModulatedDeformConv(
            self.bottleneck, self.bottleneck, 3, padding=1, bias=False, norm="BN",
            activation=jax.nn.relu, name="conv2",
        )(y, offset, mask, train=train)
        y = Conv2d(self.bottleneck, self.channels, 1, bias=False)(y)
        return jax.nn.relu(y + x)


def test_dcnv2_bottleneck_trains_under_jit():
    model = _DeformBottleneck()
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 8)).astype(np.float32)
    target = np.roll(x, shift=1, axis=1) * 0.5 + 0.2  # a spatial shift the offsets can help with
    variables = jax.jit(model.init)(jax.random.key(1), x)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch_stats):
        y, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((y - target) ** 2), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

    losses = []
    first_grads = None
    for _ in range(15):
        params, batch_stats, opt_state, loss, grads = step(params, batch_stats, opt_state)
        first_grads = grads if first_grads is None else first_grads
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    # the zero-initialised offset conv receives gradient through the deformable conv's offsets
    assert np.abs(first_grads["conv2_offset"]["kernel"]).max() > 0
    assert np.abs(params["conv2_offset"]["kernel"]).max() > 0
