"""One data-parallel training step of a ``GeneralizedRCNN`` (detectron2's ``SimpleTrainer.run_step``
under DDP), as one jitted function over a 1-D device mesh.

``SOLVER.IMS_PER_BATCH`` images are split evenly over the mesh's devices with ``shard_map``
(mesh axis ``"batch"``, the axis detlayers' ``SyncBatchNorm``/``NaiveSyncBatchNorm`` reduce over by
default, so ``MODEL.RESNETS.NORM: SyncBN`` and ``FPN.NORM: SyncBN`` normalise with the statistics
of the whole global batch); every device computes detectron2's loss dict on its images, the
gradients and losses are averaged over devices with ``pmean`` (DDP's all-reduce mean), and every
device applies the same optax update to its replica of the parameters.

Sampling priorities (``sampling_priorities=`` of the training call) are drawn for the global
batch from the step's key and split with the images, so the anchors and proposals sampled do not
depend on the number of devices: a step on ``k`` devices equals a step on one device with the
whole batch up to float32 reassociation, whenever every device's loss normalisers are
proportional to its images (detectron2's RPN losses always; the ROI losses when every image fills
its ``BATCH_SIZE_PER_IMAGE`` slots and positive quota, as with enough proposals and ground truth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from detlayers._data_parallel import AXIS, make_mesh, shard_batch
from detlayers.models.sampling import draw_priorities

__all__ = ["AXIS", "make_mesh", "priority_counts", "make_train_step", "shard_batch", "replicate"]

BATCH_KEYS = ("images", "image_hw", "gt_boxes", "gt_classes", "gt_masks", "gt_valid")


def priority_counts(model: nn.Module, variables: Any, image_hw: tuple[int, int], num_gt: int) -> tuple[int, int]:
    """``(A, R)``: how many sampling candidates an image of padded size ``image_hw`` has, the
    anchors (every level, as the RPN concatenates them) and the ROI heads' candidates (the
    ``min(POST_NMS_TOPK_TRAIN, sum_i min(anchors_i, PRE_NMS_TOPK_TRAIN))`` proposal slots, plus
    ``num_gt`` when ground truth is appended). The feature sizes are traced, not computed."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)
    image = jax.ShapeDtypeStruct((1, *image_hw, 3), np.float32)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, y: m.backbone(y)), abstract, image)
    rpn = model.proposal_generator
    per_level = [int(features[name].shape[1]) * int(features[name].shape[2]) * int(a)
                 for name, a in zip(rpn.in_features, rpn.anchor_generator.num_anchors)]
    proposals = min(rpn.post_nms_topk_train, sum(min(n, rpn.pre_nms_topk_train) for n in per_level))
    return sum(per_level), proposals + (num_gt if model.roi_heads.proposal_append_gt else 0)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    donate: bool = True) -> Callable[..., tuple[Any, Any, Any, dict[str, jax.Array]]]:
    """The jitted step ``(params, batch_stats, opt_state, batch, key) -> (params, batch_stats,
    opt_state, losses)``.

    ``batch`` holds the training call's arrays (``images``, ``image_hw``, ``gt_boxes``,
    ``gt_classes``, ``gt_masks``, ``gt_valid``) for the global batch, sharded (or shardable) along
    the first axis over ``"batch"``; its size must divide by the mesh size. ``key`` draws the
    sampling priorities. ``losses`` is detectron2's loss dict averaged over devices.
    ``donate`` lets the step reuse the input state's memory (the caller must not use it again).
    """

    def per_device(params, batch_stats, opt_state, batch, priorities):
        def loss_fn(p):
            losses, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, *(batch[k] for k in BATCH_KEYS), train=True,
                sampling_priorities=priorities, mutable=["batch_stats"])
            return sum(losses.values()), (losses, updates.get("batch_stats", batch_stats))

        grads, (losses, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
        # DDP: the mean of the devices' gradients (each device holds an equal share of the batch)
        grads = jax.lax.pmean(grads, AXIS)
        losses = jax.lax.pmean(losses, AXIS)
        # synchronized norms already agree; pmean marks the result replicated (per-device BN:
        # the running statistics are averaged, where DDP would keep device 0's)
        new_batch_stats = jax.lax.pmean(new_batch_stats, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, opt_state, losses

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
                            out_specs=(P(), P(), P(), P()), check_vma=False)

    def step(params, batch_stats, opt_state, batch, key):
        images = batch["images"]
        n = images.shape[0]
        if n % mesh.size:
            raise ValueError(f"train step: the batch of {n} images does not split over {mesh.size} devices "
                             "(SOLVER.IMS_PER_BATCH must be a multiple of the device count)")
        anchors, candidates = priority_counts(model, {"params": params, "batch_stats": batch_stats},
                                              tuple(images.shape[1:3]), int(batch["gt_valid"].shape[1]))
        rpn_key, roi_key = jax.random.split(key)
        priorities = {"rpn": draw_priorities(rpn_key, (n, anchors)),
                      "roi_heads": draw_priorities(roi_key, (n, candidates))}
        return sharded(params, batch_stats, opt_state, batch, priorities)

    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` replicated over ``mesh`` (through host memory, which multi-process ``device_put``
    onto a global sharding needs)."""
    return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))
