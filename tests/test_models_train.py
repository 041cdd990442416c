"""The trainer (``python -m detlayers.models.train``): COCO data and augmentation, the
data-parallel step on 1, 2, 4 and 8 devices with SyncBN, and the CLI with exact ``--resume``.

One tiny Mask R-CNN (R18-FPN, SyncBN, 8-16 channels) on eight small photographs (skimage) with
hand-made ground truth written as a COCO json. The step is compiled once per device count, with
LLVM's optimisations off (``STEP_COMPILER_OPTIONS``): every device count is compiled alike, so the
comparison is unchanged, and the four compiles take about a third less time. The CLI compiles its
own step as a user's run does.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("models_train")

SEED = 5
GLOBAL_BATCH = 8
DEVICE_COUNTS = (1, 2, 4, 8)
# XLA options of the equivalence steps (see the module docstring)
STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# One step on k devices against one device with the whole batch: the same sampled anchors and
# ROIs (the priorities are drawn for the global batch), so only float32 reassociation differs
# (SyncBN's and pmean's sums, the gradient all-reduce). Measured: losses ~1e-7 relative; parameter
# updates within 2e-4 of their norm per tensor (norm scales, whose gradients are sums of large
# cancelling terms), most within 1e-6. A dropped gradient pmean moves them by O(1).
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3
IMAGE_HW = (64, 80)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "retina")
CATEGORY_IDS = (1, 3, 7)  # COCO ids; contiguous 0, 1, 2

TINY_CONFIG = """
MODEL:
  META_ARCHITECTURE: GeneralizedRCNN
  MASK_ON: true
  BACKBONE: {NAME: build_resnet_fpn_backbone, FREEZE_AT: 1}
  RESNETS: {DEPTH: 18, NORM: SyncBN, OUT_FEATURES: [res2, res3, res4, res5], STEM_OUT_CHANNELS: 8,
            RES2_OUT_CHANNELS: 8}
  FPN: {IN_FEATURES: [res2, res3, res4, res5], OUT_CHANNELS: 8}
  ANCHOR_GENERATOR: {SIZES: [[16], [32], [64], [128], [256]], ASPECT_RATIOS: [[1.0]]}
  RPN: {IN_FEATURES: [p2, p3, p4, p5, p6], BATCH_SIZE_PER_IMAGE: 32, PRE_NMS_TOPK_TRAIN: 128,
        POST_NMS_TOPK_TRAIN: 32}
  ROI_HEADS: {NAME: StandardROIHeads, IN_FEATURES: [p2, p3, p4, p5], NUM_CLASSES: 3, BATCH_SIZE_PER_IMAGE: 16}
  ROI_BOX_HEAD: {NAME: FastRCNNConvFCHead, NUM_FC: 2, FC_DIM: 16, POOLER_RESOLUTION: 7}
  ROI_MASK_HEAD: {NAME: MaskRCNNConvUpsampleHead, NUM_CONV: 1, CONV_DIM: 8, POOLER_RESOLUTION: 14}
DATASETS: {TRAIN: [tiny_train]}
INPUT: {MIN_SIZE_TRAIN: [64], MAX_SIZE_TRAIN: 96}
SOLVER: {IMS_PER_BATCH: 8, BASE_LR: 0.02, MAX_ITER: 2, STEPS: [], WARMUP_FACTOR: 1.0, WARMUP_ITERS: 0,
         CHECKPOINT_PERIOD: 1}
SEED: 5
"""
# every image has 5 objects: with 4 positive ROI slots per image (16 * 0.25) every image fills
# its quota, so per-device loss normalisers are proportional to the images (see engine/step.py)
OBJECTS = [(4, 4, 18, 16), (24, 6, 14, 18), (46, 8, 16, 12), (8, 34, 20, 20), (40, 36, 30, 22)]
MAX_GT = 6
BUCKET = 32


def _write_dataset(root: pathlib.Path) -> pathlib.Path:
    """Eight photographs resized to 80x64 and a COCO json: rectangles as polygons, the last object
    of each image as an (uncompressed) RLE ellipse."""
    import skimage.data
    from PIL import Image
    from pycocotools import mask as mask_util

    images, annotations = [], []
    h, w = IMAGE_HW
    yy, xx = np.mgrid[:h, :w]
    for index, name in enumerate(PHOTOS):
        photo = np.asarray(Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((w, h), Image.BILINEAR))
        Image.fromarray(photo).save(root / f"{name}.png")
        images.append({"id": index + 1, "file_name": f"{name}.png", "height": h, "width": w})
        for k, (x, y, bw, bh) in enumerate(OBJECTS):
            ann = {"id": 10 * index + k + 1, "image_id": index + 1, "category_id": CATEGORY_IDS[(k + index) % 3],
                   "iscrowd": 0, "area": bw * bh}
            if k < len(OBJECTS) - 1:
                ann["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
                ann["bbox"] = [x, y, bw, bh]
            else:
                ellipse = (((xx + 0.5 - x - bw / 2) / (bw / 2)) ** 2 + ((yy + 0.5 - y - bh / 2) / (bh / 2)) ** 2) <= 1
                rle = mask_util.encode(np.asfortranarray(ellipse.astype(np.uint8)))
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
                ann["bbox"] = [float(v) for v in mask_util.toBbox(rle)]
            annotations.append(ann)
    annotations.append({"id": 999, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 4.0, "bbox": [0, 0, 2, 2],
                        "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})  # crowd: dropped by the mapper
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def dataset(tmp_path_factory) -> dict[str, pathlib.Path]:
    from detlayers.models.data import catalog

    root = tmp_path_factory.mktemp("coco")
    json_file = _write_dataset(root)
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    catalog.unregister("tiny_train")
    catalog.register_coco_instances("tiny_train", {}, json_file, root)
    return {"root": root, "json": json_file, "config": config}


def _cfg(dataset):
    from detlayers.models.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(dataset["config"]))
    return cfg


# --------------------------------------------------------------------------------------------
# data: COCO records, ResizeShortestEdge, flip, batches


def test_coco_records_map_categories_and_keep_crowd_flags(dataset):
    from detlayers.models.data import load_coco_json

    records = load_coco_json(dataset["json"], dataset["root"])
    assert [pathlib.Path(r["file_name"]).name for r in records] == [f"{n}.png" for n in PHOTOS]
    first = records[0]["annotations"]
    assert [a["category_id"] for a in first[:5]] == [CATEGORY_IDS.index(CATEGORY_IDS[k % 3]) for k in range(5)]
    x, y, bw, bh = OBJECTS[1]
    np.testing.assert_allclose(first[1]["bbox"], [x, y, x + bw, y + bh])  # XYWH -> XYXY
    assert [a["iscrowd"] for a in first] == [0] * 5 + [1]


@pytest.mark.parametrize("flip", ["none", "horizontal"])
def test_mapper_resizes_and_flips_image_boxes_and_masks_together(dataset, flip):
    from detlayers.models.data import DatasetMapper, load_coco_json
    from detlayers.models.data.transforms import Geometry

    cfg = _cfg(dataset)
    record = load_coco_json(dataset["json"], dataset["root"])[0]
    out_h, out_w = 96, 120  # 1.5x
    out = DatasetMapper.from_config(cfg)(record, Geometry(out_h, out_w, flip))
    assert out["image"].shape == (out_h, out_w, 3)
    assert len(out["boxes"]) == len(OBJECTS)  # the crowd annotation is dropped
    # an independent float64 derivation of the transformed rectangles
    for k, (x, y, bw, bh) in enumerate(OBJECTS[:-1]):
        x1, x2 = 1.5 * x, 1.5 * (x + bw)
        if flip == "horizontal":
            x1, x2 = out_w - x2, out_w - x1
        np.testing.assert_allclose(out["boxes"][k], [x1, 1.5 * y, x2, 1.5 * (y + bh)], rtol=1e-6)
        # the rasterised polygon covers the transformed box (pycocotools' pixel rule: rows/cols inside)
        ys, xs = np.nonzero(out["masks"][k])
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
        assert abs(ys.min() - 1.5 * y) <= 1 and abs(ys.max() + 1 - 1.5 * (y + bh)) <= 1
    # the RLE ellipse: resized with nearest and mirrored like the image
    ys, xs = np.nonzero(out["masks"][-1])
    x, y, bw, bh = OBJECTS[-1]
    centre = 1.5 * (x + bw / 2)
    expected_centre = out_w - centre if flip == "horizontal" else centre
    assert abs((xs.min() + xs.max() + 1) / 2 - expected_centre) <= 1.0
    # the image is mirrored too: column j of the flipped image is column W-1-j of the unflipped one
    if flip == "horizontal":
        plain = DatasetMapper.from_config(cfg)(record, Geometry(out_h, out_w, "none"))
        np.testing.assert_array_equal(out["image"], plain["image"][:, ::-1])


def test_batches_pad_to_buckets_and_a_static_gt_count(dataset):
    from detlayers.models.data import build_training_batches

    cfg = _cfg(dataset)
    batches = build_training_batches(cfg, seed=SEED, bucket=BUCKET, max_gt=MAX_GT)
    batch = batches.batch(0)
    assert batch["images"].shape == (GLOBAL_BATCH, 64, 96, 3)  # 64x80 padded to multiples of 32
    np.testing.assert_array_equal(batch["image_hw"], [IMAGE_HW] * GLOBAL_BATCH)
    assert batch["gt_masks"].shape == (GLOBAL_BATCH, MAX_GT, 64, 96)
    np.testing.assert_array_equal(batch["gt_valid"].sum(1), [len(OBJECTS)] * GLOBAL_BATCH)
    assert not batch["images"][:, :, 80:].any() and not batch["gt_masks"][:, :, :, 80:].any()
    # one epoch of 8 images is a permutation of the 8; the same step is the same batch again
    means = sorted(float(m) for m in batch["images"][:, :, :80].mean(axis=(1, 2, 3)))
    assert len(set(np.round(means, 4))) == GLOBAL_BATCH
    np.testing.assert_array_equal(batches.batch(0, slice(2, 4))["images"], batch["images"][2:4])
    with pytest.raises(ValueError, match="max_gt=3"):
        build_training_batches(cfg, seed=SEED, bucket=BUCKET, max_gt=3).batch(0)


# --------------------------------------------------------------------------------------------
# the data-parallel step: 1 device with the global batch == 2, 4 and 8 devices (SyncBN)


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def steps(dataset) -> dict[int, dict]:
    """One step from the same state, batch and key on each device count: losses and new state."""
    import jax

    from detlayers.models.data import build_training_batches
    from detlayers.models.engine.step import make_mesh, make_train_step, replicate, shard_batch
    from detlayers.models.engine.train_loop import init_state
    from detlayers.models.meta_arch.build import build_model

    cfg = _cfg(dataset)
    model = build_model(cfg)
    state, optimizer = init_state(cfg, model, SEED)
    batch = build_training_batches(cfg, seed=SEED, bucket=BUCKET, max_gt=MAX_GT).batch(0)
    key = jax.random.fold_in(state.rng, 0)  # the CLI's iteration 0
    results = {"initial": jax.device_get({"params": state.params, "batch_stats": state.batch_stats})}
    for count in DEVICE_COUNTS:
        mesh = make_mesh(count)
        step = make_train_step(model, optimizer, mesh)  # as the CLI builds it (donating the state)
        params, batch_stats, opt_state = replicate((state.params, state.batch_stats, state.opt_state), mesh)
        args = (params, batch_stats, opt_state, shard_batch(batch, mesh), key)
        out = step.lower(*args).compile(STEP_COMPILER_OPTIONS)(*args)
        params, batch_stats, _, losses = jax.device_get(out)
        results[count] = {"params": params, "batch_stats": batch_stats,
                          "losses": {k: float(v) for k, v in losses.items()}}
    return results


def _leaves(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("count", DEVICE_COUNTS[1:])
def test_step_on_k_devices_equals_one_device_with_the_global_batch(steps, count):
    reference, got = steps[1], steps[count]
    assert set(got["losses"]) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    for name, value in reference["losses"].items():
        assert np.isfinite(value) and value > 0, name
        np.testing.assert_allclose(got["losses"][name], value, rtol=LOSS_RTOL, err_msg=name)
    for collection in ("params", "batch_stats"):
        before = _leaves(steps["initial"][collection])
        ref = _leaves(reference[collection])
        new = _leaves(got[collection])
        assert ref.keys() == new.keys()
        for name in ref:
            update = ref[name] - before[name]
            scale = max(float(np.linalg.norm(update)), 1e-12)
            err = float(np.linalg.norm((new[name] - before[name]) - update)) / scale
            assert err <= UPDATE_RTOL, f"{collection}{name}: update differs by {err:.2e} of its norm"


def test_step_trains_syncbn_and_leaves_the_frozen_stem_alone(steps):
    before = _leaves(steps["initial"]["params"])
    after = _leaves(steps[1]["params"])
    stem = [n for n in before if "'stem'" in n]
    assert stem and all(np.array_equal(before[n], after[n]) for n in stem)  # FREEZE_AT 1
    moved = [n for n in before if "'stem'" not in n and not np.array_equal(before[n], after[n])]
    assert len(moved) == len(before) - len(stem)  # every trainable parameter got an update
    stats_before = _leaves(steps["initial"]["batch_stats"])
    stats_after = _leaves(steps[1]["batch_stats"])
    # SyncBN running statistics move in training (momentum 0.1); the frozen stem's do not
    res2 = [n for n in stats_before if "'res2_0'" in n and "'conv1'" in n and n.endswith("['mean']")]
    assert res2 and not np.allclose(stats_before[res2[0]], stats_after[res2[0]])
    stem_stats = [n for n in stats_before if "'stem'" in n]
    assert stem_stats and all(np.array_equal(stats_before[n], stats_after[n]) for n in stem_stats)


# --------------------------------------------------------------------------------------------
# the CLI: metrics, checkpoints, model_final.pkl, exact --resume, NaN guard


def _run_cli(dataset, output_dir, *extra) -> int:
    from detlayers.models.train import main

    return main(["--config-file", str(dataset["config"]), "--num-devices", "2", "--max-gt-per-image", str(MAX_GT),
                 "--bucket", str(BUCKET), "--no-progress", *extra, "OUTPUT_DIR", str(output_dir)])


def _final_weights(output_dir) -> dict[str, np.ndarray]:
    from detlayers.torch_weights import read_state_dict

    return read_state_dict(str(output_dir / "model_final.pkl"))


def test_cli_trains_writes_metrics_and_resumes_exactly(dataset, steps, tmp_path):
    import shutil

    out = tmp_path / "run"
    assert _run_cli(dataset, out) == 0
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for r in records:
        assert set(r) >= {"iteration", "total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg",
                          "loss_mask", "lr"}
        np.testing.assert_allclose(r["total_loss"], sum(v for k, v in r.items() if k.startswith("loss_")), rtol=1e-6)
        assert r["lr"] == pytest.approx(0.02)
    # iteration 0 of the CLI is the step of the equivalence test (same seed, batch and key)
    for name, value in steps[1]["losses"].items():
        np.testing.assert_allclose(records[0][name], value, rtol=LOSS_RTOL, err_msg=name)
    assert "SEED: 5" in (out / "config.yaml").read_text()
    uninterrupted = _final_weights(out)
    assert "backbone.bottom_up.res2.0.conv1.norm.running_mean" in uninterrupted

    # interrupted after iteration 0: only its checkpoint survives; --resume redoes iteration 1
    shutil.rmtree(out / "checkpoints" / "2")
    (out / "model_final.pkl").unlink()
    assert _run_cli(dataset, out, "--resume") == 0
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 1]
    assert records[2] == {**records[1], "time": records[2]["time"], "data_time": records[2]["data_time"]}
    resumed = _final_weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)

    # a fresh run into a directory with checkpoints is refused (exit 4), naming --resume
    assert _run_cli(dataset, out) == 4


def test_cli_stops_on_a_non_finite_loss_with_one_line(dataset, tmp_path, capsys):
    out = tmp_path / "nan"
    # zero pixel std: every image becomes inf/NaN on the host, the model's program is unchanged
    assert _run_cli(dataset, out, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iteration=0" in err[0] and "loss_cls=" in err[0], err
    assert not (out / "checkpoints" / "1").exists() and not (out / "metrics.json").exists()


def test_cli_out_of_memory_is_one_line_and_exit_status_5(dataset, tmp_path, capsys, monkeypatch):
    """XLA's allocation failure inside a step (raised here by a stand-in step: a real one needs a
    machine-sized batch) becomes one line naming the batch and the keys to lower, exit status 5."""
    import detlayers.models.engine.train_loop as loop

    def step_out_of_memory(*args, **kwargs):
        def step(*step_args):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.\n  at ...")

        return step

    monkeypatch.setattr(loop, "make_train_step", step_out_of_memory)
    out = tmp_path / "oom"
    assert _run_cli(dataset, out) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for part in ("out of memory at iteration 0", "lower SOLVER.IMS_PER_BATCH", "RESOURCE_EXHAUSTED"):
        assert part in err[0], (part, err[0])
    assert "at ..." not in err[0]
