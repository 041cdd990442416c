"""Benchmark: one Mask R-CNN R50-FPN training step vs detectron2 (``python -m detlayers.bench mask_rcnn_train``).

Batch: two photographs from scikit-image, ``chelsea()`` (300 x 451) and ``coffee()`` (400 x 600),
RGB fed as BGR and resized once with PIL bilinear by detectron2's ``ResizeShortestEdge`` rule to
a short side of ``SHORT_SIDES`` = 512 each (512 x 770 and 512 x 768, ``MAX_SIZE`` 1333), then
padded together to 512 x 800 (multiples of 32, as detectron2's ``ImageList`` pads a batch: both
frameworks run the backbone on the padded batch). Both at 512 rather than 512 and 800 (800 x 1216
padded, 2.4 times the pixels): on 2 shared CPU cores one step at that size took minutes, and a run
of the family most of an hour; ``train_batch(cfg, short_sides=(512, 800))`` builds that batch.
Ground truth: a few hand-made objects per photo
(``OBJECTS``: boxes as fractions of the photo, a COCO class, and the ellipse inscribed in each box
as its bitmask), no flip.

Model: ``mask_rcnn_R_50_FPN_3x_config()`` (the zoo's ``mask_rcnn_R_50_FPN_3x.yaml``: FrozenBN,
``FREEZE_AT`` 2, 512 ROIs per image, RPN train top-k 2000/1000) with ``SOLVER.IMS_PER_BATCH`` 2
and ``BASE_LR`` 1e-4 without warmup (detectron2's ``SimpleTrainer`` alone, without the scheduler
hook, steps at ``BASE_LR``; at the zoo's 0.02 the synthetic weights diverge within a few steps);
weights: ``synthetic_weights.mask_rcnn_r50_fpn_state_dict(seed=0)``, with the FrozenBN calibration
of the inference benchmark when its file is found (:func:`detlayers.bench.mask_rcnn.benchmark_weights`).

- ours: the trainer's jitted step (:func:`detlayers.models.engine.step.make_train_step` on a
  one-device mesh, the optimizer of :func:`detlayers.models.engine.train_loop.build_solver`:
  detectron2's SGD with momentum and weight decay, frozen stages untouched), compiled ahead of
  time on its first call (the runner's warm-up; the trace/lower and XLA compile seconds are on
  the row's summary line), then
  called as ``python -m detlayers.models.train`` calls it: the state it returns (donated) is the
  next call's, the key of call ``t`` is ``fold_in(key, t)``; blocked on every output.
- theirs (when detectron2 is importable): detectron2's ``SimpleTrainer.run_step`` (forward, the
  losses' sum backward, ``optimizer.step()``; metrics written to an ``EventStorage``) of the model
  ``build_model`` makes from the same config (our config's YAML dump, merged into detectron2's
  ``get_cfg()``; ``MODEL.DEVICE`` cpu) holding the same weights, with detectron2's
  ``build_optimizer``, on the same batch (uint8 CHW images: detectron2 normalises and pads inside
  its forward; ours gets them normalised and padded by the host).

Both samplers draw at random (ours from the step's key, detectron2 with ``torch.randperm``; the
seeds are fixed): the anchors and ROIs sampled differ, the work does not (the sample sizes are
fixed by the config; detectron2's mask head runs on its positive ROIs only, ours on the static
``BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION`` slots per image, of which the padding is masked).

Where the time goes: two more rows time parts of the step in both frameworks, each compiled
alone for ours: ``forward`` (the training forward to the loss dict, no gradient) and ``backbone
forward`` (ResNet-50 + FPN on the padded batch). The last row's summary splits each step into
backbone forward, heads forward (RPN, ROI heads and losses: forward - backbone) and backward +
SGD update (step - forward), as shares of that framework's step. Parts compiled alone cannot fuse
with their neighbours, so the shares are estimates.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detlayers.bench import Case

FAMILY = "mask_rcnn_train"
PHOTOS = ("chelsea", "coffee")
SHORT_SIDES = (512, 512)
MAX_SIZE = 1333
SIZE_DIVISIBILITY = 32
STEP_SEED = 0  # the key of our step's samplers
TORCH_SEED = 0  # detectron2's samplers (torch.randperm)
BASE_LR = 1e-4
# Hand-made objects per photo: (x1, y1, x2, y2) as fractions of the photo's width and height, and
# a contiguous COCO class (0 person, 15 cat, 41 cup, 45 bowl).
OBJECTS: dict[str, tuple[tuple[float, float, float, float, int], ...]] = {
    "chelsea": ((0.31, 0.08, 0.68, 0.59, 15),   # the cat's head
                (0.10, 0.35, 0.86, 0.98, 15),   # its body
                (0.53, 0.09, 0.65, 0.27, 0)),   # an ear, overlapping the head
    "coffee": ((0.16, 0.12, 0.78, 0.78, 41),    # the cup
               (0.05, 0.47, 0.91, 0.96, 45)),   # the saucer
}


@dataclasses.dataclass
class TrainBatch:
    """One training batch in both frameworks' forms.

    Attributes:
      arrays: the training call's arrays (the names in ``BATCH_KEYS`` of ``detlayers.models.engine.step``): ``images
        float32[N, Hp, Wp, 3]`` normalised and zero-padded, ``image_hw int32[N, 2]``, ``gt_boxes
        float32[N, G, 4]`` (resized pixels, x1 y1 x2 y2), ``gt_classes int32[N, G]``, ``gt_masks
        uint8[N, G, Hp, Wp]``, ``gt_valid bool[N, G]`` (G: the largest object count).
      photos_bgr: the resized photos, ``uint8[h_i, w_i, 3]`` BGR (detectron2's input).
      counts: objects per photo.
    """

    arrays: dict[str, np.ndarray]
    photos_bgr: list[np.ndarray]
    counts: list[int]


def ellipse_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``bool[G, height, width]``: the ellipse inscribed in each ``(x1, y1, x2, y2)`` box, tested
    on pixel centres."""
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5
    x = np.arange(width, dtype=np.float64)[None, :] + 0.5
    out = np.zeros((len(boxes), height, width), bool)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        out[k] = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    return out


def resized_photo(name: str, short_side: int, max_size: int = MAX_SIZE) -> np.ndarray:
    """``uint8[h, w, 3]`` BGR: scikit-image's photo ``name`` resized by ``ResizeShortestEdge``
    (``short_side``, ``max_size``) with PIL bilinear, as detectron2's ``ResizeTransform``."""
    import skimage.data
    from PIL import Image

    from detlayers.models.predictor import resize_shortest_edge_shape

    rgb = getattr(skimage.data, name)()[..., :3]
    h, w = resize_shortest_edge_shape(rgb.shape[0], rgb.shape[1], short_side, max_size)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(resized[..., ::-1])


def train_batch(cfg: Any, short_sides: Sequence[int] = SHORT_SIDES, photos: Sequence[str] = PHOTOS,
                max_size: int = MAX_SIZE) -> TrainBatch:
    """The benchmark's batch: ``photos[i]`` resized to the short side ``short_sides[i]``, with
    ``OBJECTS[photos[i]]`` as ground truth, normalised with ``cfg.MODEL.PIXEL_MEAN``/``PIXEL_STD``
    (``cfg.INPUT.FORMAT`` BGR) and padded to a common multiple of ``SIZE_DIVISIBILITY``."""
    from detlayers.models import batch_images

    if len(short_sides) != len(photos):
        raise ValueError(f"train_batch: one short side per photo, got {list(short_sides)} for {list(photos)}")
    if cfg.INPUT.FORMAT != "BGR":
        raise ValueError(f"train_batch: INPUT.FORMAT must be 'BGR' (the zoo's), got {cfg.INPUT.FORMAT!r}")
    mean = np.asarray(cfg.MODEL.PIXEL_MEAN, np.float32)
    std = np.asarray(cfg.MODEL.PIXEL_STD, np.float32)
    bgr = [resized_photo(name, side, max_size) for name, side in zip(photos, short_sides)]
    images, image_hw = batch_images([(p.astype(np.float32) - mean) / std for p in bgr], SIZE_DIVISIBILITY)
    n, hp, wp = images.shape[:3]
    counts = [len(OBJECTS[name]) for name in photos]
    g = max(counts)
    gt_boxes = np.zeros((n, g, 4), np.float32)
    gt_classes = np.zeros((n, g), np.int32)
    gt_masks = np.zeros((n, g, hp, wp), np.uint8)
    gt_valid = np.zeros((n, g), bool)
    for i, name in enumerate(photos):
        h, w = (int(v) for v in image_hw[i])
        objects = np.asarray(OBJECTS[name], np.float64)
        k = counts[i]
        gt_boxes[i, :k] = objects[:, :4] * np.array([w, h, w, h])
        gt_classes[i, :k] = objects[:, 4]
        gt_masks[i, :k, :h, :w] = ellipse_masks(gt_boxes[i, :k], h, w)
        gt_valid[i, :k] = True
    arrays = dict(images=images, image_hw=image_hw, gt_boxes=gt_boxes, gt_classes=gt_classes,
                  gt_masks=gt_masks, gt_valid=gt_valid)
    return TrainBatch(arrays, bgr, counts)


def detectron2_batch(batch: TrainBatch) -> list[dict[str, Any]]:
    """The batch as detectron2's model takes it: ``{"image": uint8[3, h, w] BGR, "instances":
    Instances(gt_boxes, gt_classes, gt_masks as BitMasks)}`` per photo (the valid rows only)."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    out = []
    for i, (photo, count) in enumerate(zip(batch.photos_bgr, batch.counts)):
        h, w = photo.shape[:2]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.from_numpy(batch.arrays["gt_boxes"][i, :count].copy()))
        inst.gt_classes = torch.from_numpy(batch.arrays["gt_classes"][i, :count].astype(np.int64))
        inst.gt_masks = BitMasks(torch.from_numpy(batch.arrays["gt_masks"][i, :count, :h, :w].astype(bool)))
        out.append({"image": torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1))), "instances": inst})
    return out


def detectron2_model(cfg: Any, state_dict: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """``(model, d2cfg)``: detectron2's ``build_model`` of ``cfg`` (its YAML dump merged into
    detectron2's ``get_cfg()``, on CPU) in training mode, holding ``state_dict``. Raises
    ImportError without torch or detectron2."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    d2cfg = get_cfg()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        d2cfg.merge_from_file(path)
    d2cfg.MODEL.DEVICE = "cpu"
    d2cfg.MODEL.WEIGHTS = ""
    model = build_model(d2cfg)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=False)
    if missing or unexpected:  # pixel_mean/std and anchors are non-persistent: nothing may differ
        raise ValueError(f"detectron2's model and the state dict differ: missing {missing}, unexpected {unexpected}")
    model.train()
    return model, d2cfg


@dataclasses.dataclass
class _Timings:
    """Seconds per call of each row, filled in as the runner times them (for the shares)."""

    ours: dict[str, float] = dataclasses.field(default_factory=dict)
    theirs: dict[str, float] = dataclasses.field(default_factory=dict)

    def record(self, part: str) -> Callable[[float, float | None], None]:
        def store(ours_s: float, theirs_s: float | None) -> None:
            self.ours[part] = ours_s
            if theirs_s is not None:
                self.theirs[part] = theirs_s

        return store


def step_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Shares of the step from the parts' seconds (``step``, ``forward``, ``backbone``): backbone
    forward, heads forward (forward - backbone) and backward + update (step - forward)."""
    step = seconds["step"]
    return {"backbone fwd": seconds["backbone"] / step,
            "heads+losses fwd": (seconds["forward"] - seconds["backbone"]) / step,
            "backward+SGD": (step - seconds["forward"]) / step}


def _format_shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * value:.0f}%" for name, value in shares.items())


class _Compiled:
    """A jitted function compiled ahead of time on its first call (the runner's warm-up), with
    the seconds spent tracing and lowering it and compiling it with XLA."""

    def __init__(self, jitted: Any):
        self.jitted = jitted
        self.executable: Any = None
        self.lower_s = self.compile_s = float("nan")

    def __call__(self, *args: Any) -> Any:
        if self.executable is None:
            t0 = time.perf_counter()
            lowered = self.jitted.lower(*args)
            t1 = time.perf_counter()
            self.executable = lowered.compile()
            self.lower_s, self.compile_s = t1 - t0, time.perf_counter() - t1
        return self.executable(*args)

    def seconds(self) -> str:
        return f"{self.lower_s:.1f}, {self.compile_s:.1f}"


class _OurSteps:
    """Calls the train step as the trainer's loop does: each call's (donated) state is the
    previous call's output and call ``t`` draws its samplers from ``fold_in(key, t)``."""

    def __init__(self, step: _Compiled, state: tuple[Any, Any, Any], batch: Any, key: Any):
        self.step, self.state, self.batch, self.key = step, state, batch, key
        self.iteration = 0
        self.first_losses: dict[str, float] | None = None

    def __call__(self) -> Any:
        import jax

        params, batch_stats, opt_state, losses = self.step(
            *self.state, self.batch, jax.random.fold_in(self.key, self.iteration))
        self.state = (params, batch_stats, opt_state)
        if self.first_losses is None:
            self.first_losses = {k: float(v) for k, v in jax.device_get(losses).items()}
        self.iteration += 1
        return params, batch_stats, opt_state, losses


def _detectron2_runs(cfg: Any, state_dict: dict[str, np.ndarray], batch: TrainBatch
                     ) -> dict[str, Callable[[], Any]] | None:
    """detectron2's step (``SimpleTrainer.run_step``), training forward and backbone forward on
    the batch, or None without detectron2."""
    try:
        import torch
        from detectron2.engine import SimpleTrainer
        from detectron2.solver import build_optimizer
        from detectron2.utils.events import EventStorage
    except ImportError:
        return None
    torch.manual_seed(TORCH_SEED)
    model, d2cfg = detectron2_model(cfg, state_dict)
    data = detectron2_batch(batch)
    trainer = SimpleTrainer(model, itertools.repeat(data), build_optimizer(d2cfg, model))
    storage = EventStorage(0)
    with torch.no_grad():
        padded = model.preprocess_image(data).tensor  # normalised and padded as its forward does

    def step() -> None:
        with storage:  # run_step writes its metrics to the current storage
            trainer.run_step()
        trainer.iter += 1
        storage.iter = trainer.iter

    def forward() -> Any:
        with storage:
            return model(data)

    runs = {"step": step, "forward": forward, "backbone": lambda: model.backbone(padded)}
    runs["first_total_loss"] = lambda: storage.history("total_loss").values()[0][0]
    return runs


def build_cases(cfg: Any, variables: dict[str, Any], state_dict: dict[str, np.ndarray] | None,
                batch: TrainBatch, *, label: str, warmup: int = 1, min_repeats: int = 3) -> list[Case]:
    """The family's rows for ``cfg`` holding ``variables`` (Flax) on ``batch``: the step, the
    training forward and the backbone forward; against detectron2 when ``state_dict`` (the same
    weights in detectron2's names) is given and detectron2 is importable."""
    import jax

    from detlayers.models.engine.step import BATCH_KEYS, make_mesh, make_train_step, replicate, shard_batch
    from detlayers.models.engine.train_loop import build_solver
    from detlayers.models.meta_arch.build import build_model

    model = build_model(cfg)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    optimizer = build_solver(cfg, params)
    mesh = make_mesh(1)
    opt_state = jax.jit(optimizer.init)(params)
    state = replicate((params, batch_stats, opt_state), mesh)
    arrays = shard_batch(batch.arrays, mesh)
    key = jax.random.key(STEP_SEED)
    # the trainer's step (donating its state, as the CLI builds it)
    step = _Compiled(make_train_step(model, optimizer, mesh))
    ours_step = _OurSteps(step, state, arrays, key)
    # fresh copies: the step donates (and so deletes) the state it is given
    frozen = replicate((params, batch_stats), mesh)

    def training_forward(p, s, b, k):
        losses, _ = model.apply({"params": p, "batch_stats": s}, *(b[name] for name in BATCH_KEYS),
                                train=True, rngs={"sampling": k}, mutable=["batch_stats"])
        return losses

    def backbone_forward(p, s, images):
        return model.apply({"params": p, "batch_stats": s}, images,
                           method=lambda m, x: m.backbone(x, train=True), mutable=["batch_stats"])[0]

    forward = _Compiled(jax.jit(training_forward))
    backbone = _Compiled(jax.jit(backbone_forward))
    theirs = None if state_dict is None else _detectron2_runs(cfg, state_dict, batch)
    timings = _Timings()
    hw = batch.arrays["image_hw"]
    sizes = "+".join(f"{h}x{w}" for h, w in hw)
    padded = "x".join(str(v) for v in batch.arrays["images"].shape[1:3])
    n = len(hw)

    def step_summary(ours_s: float, theirs_s: float | None) -> dict[str, Any]:
        timings.record("step")(ours_s, theirs_s)
        out = {"compile s (trace+lower, XLA)": step.seconds(),
               "first step's total_loss": f"{sum(ours_step.first_losses.values()):.4f}"}
        if theirs is not None:
            out["detectron2's"] = f"{theirs['first_total_loss']():.4f}"
        return out

    def forward_summary(ours_s: float, theirs_s: float | None) -> dict[str, Any]:
        timings.record("forward")(ours_s, theirs_s)
        return {"compile s": forward.seconds()}

    def backbone_summary(ours_s: float, theirs_s: float | None) -> dict[str, Any]:
        timings.record("backbone")(ours_s, theirs_s)
        out = {"compile s": backbone.seconds()}
        if {"step", "forward"} <= timings.ours.keys():
            out["ours, share of the step"] = _format_shares(step_shares(timings.ours))
        if {"step", "forward", "backbone"} <= timings.theirs.keys():
            out["detectron2's"] = _format_shares(step_shares(timings.theirs))
        return out

    repeats = dict(warmup=warmup, min_repeats=min_repeats)
    return [
        Case(FAMILY, f"{FAMILY} {label} step: fwd+bwd+SGD, {n} images {sizes} (padded {padded}) "
             "(vs detectron2 SimpleTrainer.run_step)", ours_step, None if theirs is None else theirs["step"],
             summary=step_summary, **repeats),
        Case(FAMILY, "  in it: training forward to the losses (compiled alone)",
             lambda: forward(*frozen, arrays, key), None if theirs is None else theirs["forward"],
             summary=forward_summary, **repeats),
        Case(FAMILY, "  in it: backbone forward (compiled alone; shares: step's)",
             lambda: backbone(*frozen, arrays["images"]), None if theirs is None else theirs["backbone"],
             summary=backbone_summary, **repeats),
    ]


def cases(platform: str) -> list[Case]:
    from detlayers.bench.mask_rcnn import benchmark_weights
    from detlayers.models import load_detectron2_weights, mask_rcnn_R_50_FPN_3x_config
    from detlayers.models.meta_arch.build import build_model

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.SOLVER.IMS_PER_BATCH = len(PHOTOS)
    # detectron2's SimpleTrainer alone (no LRScheduler hook) steps at BASE_LR: no warmup in ours
    # either; a small rate, since the synthetic weights diverge at the zoo's 0.02 within a few
    # steps (the step's cost does not depend on it)
    cfg.SOLVER.BASE_LR = BASE_LR
    cfg.SOLVER.WARMUP_ITERS = 0
    state_dict, calibrated = benchmark_weights()
    variables = load_detectron2_weights(build_model(cfg), state_dict)
    label = "R50-FPN" + ("" if calibrated else " uncalibrated")
    # detectron2's step runs on CPU only here: no counterpart on an accelerator
    return build_cases(cfg, variables, state_dict if platform == "cpu" else None, train_batch(cfg), label=label,
                       min_repeats=2)
