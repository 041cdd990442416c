"""One Mask R-CNN R50-FPN training step against detectron2's: the five losses and every gradient.

The fixture ``tests/fixtures/train_step_mask_rcnn.npz`` is written by
``tools/fixtures/make_mask_rcnn_train.py`` (detectron2 built from source, CPU): two photographs
with hand-made ground truth, the inference parity's synthetic weights (regenerated here), and
detectron2's sampler replaced by the priority rule on priorities it saves, which are passed here
as ``sampling_priorities``. Gradients are stored as per-tensor random projections (see the
script); no torch is needed here.
"""

from __future__ import annotations

import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "train_step_mask_rcnn.npz"
CALIBRATION = FIXTURES / "mask_rcnn_bn_calibration.npz"
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
PADDED_GT = 4  # one more ground-truth row than the fullest image: padding is exercised


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE.name} missing (tools/fixtures/make_mask_rcnn_train.py writes it)")
    with np.load(FIXTURE) as f:
        return dict(f)


def _config(fx):
    from detlayers.models import mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = int(fx["roi_batch_size"])
    cfg.INPUT.MIN_SIZE_TEST = int(fx["min_size"])
    cfg.INPUT.MAX_SIZE_TEST = int(fx["max_size"])
    return cfg


# Our training proposals take the priority of detectron2's proposal with the same box (within
# this many pixels in every coordinate): float32 rounding swaps near-tied neighbours (objectness
# logits ~1e-5 apart) between the two frameworks, so proposal ranks are not comparable.
PROPOSAL_MATCH_PX = 0.05


def _training_proposals(model, variables, images, image_hw, gt_boxes, gt_valid, rpn_priorities):
    import flax.linen as nn

    def run(module):
        features = module.backbone(images)
        (boxes, _, valid), _ = module.proposal_generator(features, image_hw, gt_boxes, gt_valid, rpn_priorities,
                                                         train=True)
        return boxes, valid

    boxes, valid = jax.jit(lambda v: nn.apply(run, model)(v))(variables)
    return np.asarray(boxes), np.asarray(valid)


def _inputs(fx, model, variables):
    """The batch as the training call takes it, with detectron2's priorities on our candidates."""
    import skimage.data

    from detlayers.models import batch_images, preprocess_image

    cfg = _config(fx)
    photos = [np.ascontiguousarray(getattr(skimage.data, str(name))()[..., ::-1]) for name in fx["image_names"]]
    images, image_hw = batch_images([preprocess_image(p, cfg) for p in photos])
    np.testing.assert_array_equal(image_hw, fx["image_hw"])
    n, hp, wp = images.shape[:3]
    g = PADDED_GT
    gt_boxes = np.zeros((n, g, 4), np.float32)
    gt_classes = np.zeros((n, g), np.int32)
    gt_valid = np.zeros((n, g), bool)
    gt_masks = np.zeros((n, g, hp, wp), bool)
    for i in range(n):
        count = int(fx["gt_counts"][i])
        h, w = fx["image_hw"][i]
        gt_boxes[i, :count] = fx["gt_boxes"][i, :count]
        gt_classes[i, :count] = fx["gt_classes"][i, :count]
        gt_valid[i, :count] = True
        gt_masks[i, :count, :h, :w] = np.unpackbits(fx[f"gt_masks_{i}"], axis=-1, count=int(w)).astype(bool)
    arrays = tuple(jnp.asarray(x) for x in (images, image_hw, gt_boxes, gt_classes, gt_masks, gt_valid))
    rpn = jnp.asarray(np.stack([fx[f"rpn_priorities_{i}"] for i in range(n)]))
    proposals, proposal_valid = _training_proposals(model, variables, arrays[0], arrays[1], arrays[2], arrays[5], rpn)
    num_slots = proposals.shape[1]
    roi = np.full((n, num_slots + g), -1.0, np.float32)
    for i in range(n):
        count = int(fx["gt_counts"][i])
        theirs = fx[f"proposals_{i}"]
        prio = fx[f"roi_priorities_{i}"]  # detectron2's proposals, then its ground truth
        assert len(prio) == len(theirs) + count
        ours = proposals[i][proposal_valid[i]]
        assert len(ours) == len(theirs), (i, len(ours), len(theirs))
        distance = np.max(np.abs(ours[:, None, :] - theirs[None, :, :]), axis=-1)
        nearest = np.argmin(distance, axis=1)
        assert np.all(distance[np.arange(len(ours)), nearest] < PROPOSAL_MATCH_PX)
        assert len(np.unique(nearest)) == len(ours)  # one to one
        roi[i, np.nonzero(proposal_valid[i])[0]] = prio[nearest]
        roi[i, num_slots:num_slots + count] = prio[len(theirs):]
    return arrays, {"rpn": rpn, "roi_heads": jnp.asarray(roi)}


@pytest.fixture(scope="module")
def step(fixture):
    """Our losses and gradients (one jit of the whole step) and the model variables."""
    from detlayers.models import build_model, load_detectron2_weights
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_state_dict

    model = build_model(_config(fixture))
    state = mask_rcnn_r50_fpn_state_dict(seed=int(fixture["seed"]), calibration=str(CALIBRATION))
    variables = load_detectron2_weights(model, state)
    arrays, priorities = _inputs(fixture, model, variables)

    def total(params):
        losses = model.apply({**variables, "params": params}, *arrays, train=True, sampling_priorities=priorities)
        return sum(losses.values()), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(variables["params"])
    return model, state, {k: float(v) for k, v in losses.items()}, grads


# OPEN (issue #21): with the same sampled ROIs (checked: same boxes within 2e-3 px, same classes,
# no FPN-level or ROIAlign-grid flips) loss_cls is 3.7e-4 relative off detectron2's, and the
# gradients of the box head (fc1/fc2/cls_score ~1.2e-2), the FPN laterals (~1e-2), res3-res5
# (3e-2 to 2e-1) and the mask convs (~1.5e-3) miss the 1e-3 bound, while the RPN head (<6e-4),
# bbox_pred (1.5e-5), the mask predictor (4e-6) and fpn_output4/5 (<4e-5) match. Not yet explained.
OPEN = "box-branch loss_cls / backbone gradients differ from detectron2 beyond the bounds (see comment)"


def test_training_losses_match_detectron2(fixture, step):
    _, _, losses, _ = step
    assert sorted(losses) == sorted(LOSS_NAMES)
    for name in LOSS_NAMES:
        if name == "loss_cls":
            continue  # test_loss_cls_matches_detectron2
        want = float(fixture[name])
        assert abs(losses[name] - want) <= LOSS_RTOL * abs(want), (name, losses[name], want)


@pytest.mark.xfail(strict=True, reason=OPEN)
def test_loss_cls_matches_detectron2(fixture, step):
    want = float(fixture["loss_cls"])
    assert abs(step[2]["loss_cls"] - want) <= LOSS_RTOL * abs(want), (step[2]["loss_cls"], want)


def _torch_layout(model, state: dict[str, np.ndarray], grads) -> dict[str, np.ndarray]:
    """Our gradients with detectron2's names, in PyTorch's layout, flattened.

    The weight loader is run on two made-up state dicts: one holding each element's flat index
    (exact in float32: no tensor has 2**24 elements) and one holding each tensor's number; the
    Flax leaves it fills say where each gradient element goes.
    """
    from detlayers.models import load_detectron2_weights

    names = list(state)
    index = load_detectron2_weights(model, {k: np.arange(v.size, dtype=np.float32).reshape(v.shape)
                                            for k, v in state.items()})
    which = load_detectron2_weights(model, {k: np.full(v.shape, j, np.float32)
                                            for j, (k, v) in enumerate(state.items())})
    out = {}
    flat_grads = jax.tree_util.tree_leaves_with_path(grads)
    flat_index = dict(jax.tree_util.tree_leaves_with_path(index["params"]))
    flat_which = dict(jax.tree_util.tree_leaves_with_path(which["params"]))
    for path, grad in flat_grads:
        ids = np.unique(np.asarray(flat_which[path]))
        assert len(ids) == 1, path
        name = names[int(ids[0])]
        torch_flat = np.zeros(state[name].size, np.float32)
        torch_flat[np.asarray(flat_index[path]).astype(np.int64).reshape(-1)] = np.asarray(grad).reshape(-1)
        out[name] = torch_flat
    return out


@pytest.mark.xfail(strict=True, reason=OPEN)
def test_every_gradient_matches_detectron2(fixture, step):
    model, state, _, grads = step
    ours = _torch_layout(model, state, grads)
    trained = sorted(k[len("grad_norm/"):] for k in fixture if k.startswith("grad_norm/"))
    assert len(trained) == 84  # ResNet res3-res5, FPN, RPN, box and mask heads (FREEZE_AT 2)
    # Parameters detectron2 does not train (stem and res2, frozen at 2) get zero gradients here.
    frozen = sorted(set(ours) - set(trained))
    assert frozen and all(name.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")) for name in frozen)
    assert all(not np.any(ours[name]) for name in frozen)
    worst = {}
    for name in trained:
        grad = ours[name].astype(np.float64)
        rng = np.random.default_rng([int(fixture["seed"]), zlib.crc32(name.encode())])
        vectors = rng.standard_normal((int(fixture["projections"]), grad.size), dtype=np.float32)
        proj = vectors.astype(np.float64) @ grad
        want = fixture[f"grad_proj/{name}"].astype(np.float64)
        norm = float(fixture[f"grad_norm/{name}"])
        assert norm > 0, name
        worst[name] = np.linalg.norm(proj - want) / np.linalg.norm(want)
        assert abs(np.linalg.norm(grad) - norm) <= GRAD_RTOL * norm, (name, np.linalg.norm(grad), norm)
    bad = {k: v for k, v in worst.items() if v > GRAD_RTOL}
    assert not bad, f"gradients off by more than {GRAD_RTOL} relative: {bad}"
