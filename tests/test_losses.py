"""diou_loss / ciou_loss against detectron2.layers.losses, cross_entropy against detectron2's wrapper.

References: ``tests/fixtures/losses.npz`` from ``tools/fixtures/make_losses.py`` (detectron2's own
box losses run in float64 on the stored float32 boxes), values and gradients; the ``xent/*``
entries of ``tests/fixtures/wrappers.npz`` from ``tools/fixtures/make_wrappers.py``
(``detectron2.layers.cross_entropy``).
"""

from __future__ import annotations

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_fixture

from detlayers.losses import ciou_loss, cross_entropy, diou_loss

LOSSES = {"diou": diou_loss, "ciou": ciou_loss}


@pytest.fixture(scope="module")
def ref():
    return load_fixture("losses.npz")


def assert_close(actual, expected, rtol=1e-5):
    helpers.assert_close(actual, expected, rtol=rtol, nan_ok=True)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_matches_detectron2_on_random_boxes(ref, name, reduction):
    fn = jax.jit(LOSSES[name], static_argnames="reduction")
    out = fn(jnp.asarray(ref["random/boxes1"]), jnp.asarray(ref["random/boxes2"]), reduction=reduction)
    chex.assert_type(out, jnp.float32)
    assert_close(out, ref[f"random/{name}_{reduction}"])


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_gradients_match_detectron2(ref, name):
    fn = LOSSES[name]
    grad1, grad2 = jax.jit(jax.grad(lambda a, b: fn(a, b, reduction="sum"), argnums=(0, 1)))(
        jnp.asarray(ref["random/boxes1"]), jnp.asarray(ref["random/boxes2"]))
    assert_close(grad1, ref[f"random/{name}_grad1"])
    assert_close(grad2, ref[f"random/{name}_grad2"])


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_detectron2_on_degenerate_boxes(ref, name):
    out = LOSSES[name](jnp.asarray(ref["degenerate/boxes1"]), jnp.asarray(ref["degenerate/boxes2"]))
    expected = ref[f"degenerate/{name}_none"]
    assert_close(out, expected)
    # NaN exactly where detectron2 gives NaN (CIoU of point boxes), nowhere else
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_single_box_and_empty_input(ref, name):
    fn = LOSSES[name]
    single = fn(jnp.asarray(ref["single/boxes1"]), jnp.asarray(ref["single/boxes2"]))
    chex.assert_shape(single, ())
    assert_close(single, ref[f"single/{name}_none"])
    empty = jnp.zeros((0, 4), jnp.float32)
    chex.assert_shape(fn(empty, empty), (0,))
    for reduction in ("mean", "sum"):
        out = fn(empty, empty, reduction=reduction)
        chex.assert_shape(out, ())
        assert_close(out, ref[f"empty/{name}_{reduction}"])


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_runs_in_bf16_with_float32_math(ref, name):
    b1 = jnp.asarray(ref["random/boxes1"], jnp.bfloat16)
    b2 = jnp.asarray(ref["random/boxes2"], jnp.bfloat16)
    out = LOSSES[name](b1, b2)
    chex.assert_type(out, jnp.bfloat16)
    exact = LOSSES[name](b1.astype(jnp.float32), b2.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_vmaps_over_a_batch_of_box_sets(ref, name):
    b1 = jnp.asarray(ref["random/boxes1"]).reshape(4, 16, 4)
    b2 = jnp.asarray(ref["random/boxes2"]).reshape(4, 16, 4)
    out = jax.vmap(lambda a, b: LOSSES[name](a, b, reduction="sum"))(b1, b2)
    expected = ref[f"random/{name}_none"].reshape(4, 16).sum(axis=1)
    assert_close(out, expected)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_rejects_bad_arguments(name):
    fn = LOSSES[name]
    box = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="reduction"):
        fn(box, box, reduction="avg")
    with pytest.raises(ValueError, match=r"boxes1 must have shape \(N, 4\)"):
        fn(jnp.zeros((3, 5)), jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not broadcast"):
        fn(jnp.zeros((3, 4)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="x1 larger than x2"):
        fn(jnp.array([[3.0, 0.0, 2.0, 2.0]]), box)
    with pytest.raises(ValueError, match="y1 larger than y2"):
        fn(jnp.array([[0.0, 3.0, 2.0, 2.0]]), box)


# ------------------------------------------------------------------------------ cross_entropy
@pytest.fixture(scope="module")
def xent():
    return load_fixture("wrappers.npz", prefix="xent/")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_detectron2(xent, reduction):
    logits, target = xent["xent/logits"], xent["xent/target"]
    np.testing.assert_allclose(
        cross_entropy(logits, target, reduction=reduction), xent[f"xent/{reduction}"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        cross_entropy(logits, target, reduction=reduction, weight=xent["xent/weight"]),
        xent[f"xent/weighted_{reduction}"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_cross_entropy_nhwc_segmentation_with_ignore_index(xent):
    loss = cross_entropy(xent["xent/seg_logits"], xent["xent/seg_target"], ignore_index=255)
    np.testing.assert_allclose(loss, xent["xent/seg_mean"], rtol=1e-5, atol=1e-5)


def test_cross_entropy_empty_target_is_zero_with_zero_gradient(xent):
    assert float(xent["xent/empty_mean"]) == 0.0
    logits = jnp.zeros((0, 5))
    loss, grad = jax.value_and_grad(lambda z: cross_entropy(z, jnp.zeros((0,), jnp.int32)))(logits)
    assert float(loss) == 0.0
    chex.assert_shape(grad, (0, 5))
    with pytest.raises(ValueError, match="target shape"):
        cross_entropy(jnp.zeros((3, 5)), jnp.zeros((4,), jnp.int32))
