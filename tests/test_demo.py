"""The demo: synthetic data, COCO evaluation (pycocotools is the reference), detector pieces, and
a short end-to-end run of ``python -m detlayers.demo``."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("pycocotools")

from detlayers.demo import data as shapes  # noqa: E402
from detlayers.demo.evaluate import Detections, coco_ap  # noqa: E402

CONFIG = shapes.ShapesConfig()


def test_examples_are_a_pure_function_of_seed_split_and_index():
    a = shapes.make_example(CONFIG, 7, shapes.TRAIN_SPLIT, 3)
    b = shapes.make_example(CONFIG, 7, shapes.TRAIN_SPLIT, 3)
    c = shapes.make_example(CONFIG, 7, shapes.EVAL_SPLIT, 3)
    for field in ("image", "boxes", "classes", "masks"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)


def test_boxes_are_the_tight_pixel_extents_of_non_overlapping_masks():
    for ex in shapes.eval_examples(CONFIG, 0, 30):
        assert 1 <= len(ex.classes) <= CONFIG.max_objects
        assert ex.image.shape == (64, 64, 3) and ex.image.dtype == np.float32
        assert set(ex.classes.tolist()) <= set(range(shapes.NUM_CLASSES))
        assert ex.masks.sum(0).max() == 1  # never two instances on one pixel
        for box, mask in zip(ex.boxes, ex.masks):
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(
                box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def test_process_shards_concatenate_to_the_global_batch():
    whole = shapes.train_batch(CONFIG, 1, 40, 6)
    parts = [shapes.train_batch(CONFIG, 1, 40, 6, p, 3) for p in range(3)]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    assert whole["image"].shape == (6, 64, 64, 3)
    assert whole["masks"].shape == (6, 3, 64, 64)
    np.testing.assert_array_equal(whole["valid"], whole["classes"] >= 0)


def test_model_batch_normalises_and_pads_images_and_ground_truth_to_the_fpn_stride():
    from detlayers.demo.model import model_batch

    small = shapes.ShapesConfig(image_size=48)  # not a multiple of the FPN's 32: padded to 64
    batch = shapes.train_batch(small, 2, 0, 4)
    out = model_batch(batch)
    assert out["images"].shape == (4, 64, 64, 3) and out["gt_masks"].shape == (4, 3, 64, 64)
    np.testing.assert_array_equal(out["image_hw"], [[48, 48]] * 4)
    # float64: colours in [0, 1] centred at 0.5 and scaled by 1 / 0.25; zeros in the padding
    expected = (batch["image"].astype(np.float64) - 0.5) / 0.25
    np.testing.assert_allclose(out["images"][:, :48, :48], expected, rtol=1e-6, atol=1e-6)
    assert not out["images"][:, 48:].any() and not out["images"][:, :, 48:].any()
    np.testing.assert_array_equal(out["gt_masks"][:, :, :48, :48], batch["masks"])
    assert not out["gt_masks"][:, :, 48:].any() and not out["gt_masks"][:, :, :, 48:].any()
    np.testing.assert_array_equal(out["gt_boxes"], batch["boxes"])
    np.testing.assert_array_equal(out["gt_valid"], batch["valid"])
    valid = batch["valid"]
    assert not valid.all()  # some images hold fewer than 3 shapes: padded rows exist
    np.testing.assert_array_equal(out["gt_classes"][valid], batch["classes"][valid])
    assert out["gt_classes"].min() >= 0


def _perfect(examples):
    return [Detections(e.boxes, np.full(len(e.classes), 0.9), e.classes, e.masks)
            for e in examples]


def test_coco_ap_is_one_when_predictions_equal_ground_truth():
    examples = shapes.eval_examples(CONFIG, 3, 20)
    metrics = coco_ap(examples, _perfect(examples))
    assert metrics == pytest.approx(dict(box_AP=1.0, box_AP50=1.0, box_AP75=1.0, mask_AP=1.0,
                                         mask_AP50=1.0, mask_AP75=1.0))


def test_coco_ap_is_near_zero_for_boxes_shifted_off_their_objects():
    examples = shapes.eval_examples(CONFIG, 3, 20)
    shifted = []
    for e in examples:  # move every box and mask by its own width: IoU with its object is 0
        widths = (e.boxes[:, 2] - e.boxes[:, 0]).astype(int)
        masks = np.stack([np.roll(m, w, axis=1) for m, w in zip(e.masks, widths)])
        shifted.append(Detections(e.boxes + widths[:, None] * np.array([1, 0, 1, 0]),
                                  np.full(len(widths), 0.9), e.classes, masks))
    metrics = coco_ap(examples, shifted)
    assert metrics["box_AP50"] < 0.05 and metrics["mask_AP50"] < 0.05


def test_coco_ap_counts_wrong_classes_and_missed_objects():
    examples = shapes.eval_examples(CONFIG, 4, 20)
    # every prediction of the first image dropped: recall loses those objects
    partial = _perfect(examples)
    partial[0] = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 64, 64)))
    ap50 = coco_ap(examples, partial)["box_AP50"]
    assert 0.5 < ap50 < 1.0
    wrong = [Detections(d.boxes, d.scores, (d.classes + 1) % shapes.NUM_CLASSES, d.masks)
             for d in _perfect(examples)]
    assert coco_ap(examples, wrong)["box_AP50"] == 0.0


# The training tests run on one xdist worker, in this order: the second loads the executables the
# first compiled from the session's compilation cache (tests/conftest.py).
DEMO_TRAINING = pytest.mark.xdist_group("demo_training")


@DEMO_TRAINING
def test_demo_runs_end_to_end_and_reports_pycocotools_numbers(tmp_path, capsys):
    from detlayers.demo.__main__ import parse_args
    from detlayers.demo.run import run_demo

    assert len(jax.devices()) >= 2  # conftest's forced host devices
    args = parse_args(["--steps", "1", "--devices", "2", "--batch-size", "2", "--eval-images", "6",
                       "--show-images", "2", "--out", str(tmp_path / "pred.png"),
                       "--no-progress"])
    result = run_demo(args)
    assert pathlib.Path(result["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert 0.0 <= result[key] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["box_AP50"] == result["box_AP50"] and saved["devices"] == 2
    out = capsys.readouterr().out
    assert "box  AP" in out and "mask AP" in out and str(tmp_path / "pred.png") in out


def _readme_python_blocks():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_python_examples_run():
    blocks = _readme_python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        code = compile(block, "README.md", "exec")
        if block.startswith("# needs your"):
            continue  # a user's files or objects: compiled (so it stays valid Python), not run
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 - our own README
    # the API tour's claims, checked on its own variables
    tour: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), tour)  # noqa: S102
    np.testing.assert_array_equal(np.asarray(tour["kept"]), [0, 2])
    assert tour["pooled"].shape == (1, 7, 7, 256)
    assert tour["y"].shape == (2, 50, 50, 256) and tour["out"].shape == (1, 32, 32, 64)
    assert tour["masks"].shape == (1, 64, 64) and tour["masks"].dtype == jnp.bool_
    # pasting a full mask into box (10, 10)-(40, 30) covers exactly its 30 x 20 pixels
    assert int(tour["masks"].sum()) == 30 * 20


def _stem_conv_float64(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """detectron2's ResNet stem conv (7x7, stride 2, padding 3, no bias) in float64 NumPy, NHWC."""
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(images.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    b, h, w, _ = images.shape
    out = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
    for i in range(size):
        for j in range(size):
            patch = padded[:, i:i + h:2, j:j + w:2, :]
            out += np.einsum("bhwc,co->bhwo", patch, kernel[i, j].astype(np.float64))
    return out


@DEMO_TRAINING
def test_train_step_synchronizes_batch_norm_statistics_over_devices():
    """One data-parallel step on 2 devices: the stem's running statistics (``SyncBN``) are those
    of the whole global batch, not an average of per-device statistics.

    The step is the demo's own (``train``), with the settings of the end-to-end run above (64x64
    images, 2 devices x 2 images, 1 step: the solver's learning-rate table is a constant of the
    step, sized by the step count), so it loads that run's executables from the test session's
    compilation cache instead of compiling them again."""
    from detlayers.demo.model import build_detector, demo_cfg, model_batch
    from detlayers.demo.train import TrainConfig, init_state, make_mesh, train

    model = build_detector(demo_cfg())
    config = TrainConfig(steps=1, batch_per_device=2, seed=0)
    state = init_state(model, config, num_devices=2)
    kernel = np.asarray(state.params["backbone"]["bottom_up"]["stem"]["conv1"]["kernel"])
    after_step = []
    train(model, CONFIG, config, make_mesh(2), state, progress=False,
          on_step=lambda new_state, metrics: after_step.append((new_state, metrics)))
    assert len(after_step) == 1
    stats, losses = after_step[0][0].batch_stats, after_step[0][1]
    # what train() draws first: seed 0, position 0, as the model sees it (normalised)
    images = model_batch(shapes.train_batch(CONFIG, 0, 0, 4))["images"]

    y = _stem_conv_float64(images, kernel).reshape(-1, kernel.shape[-1])
    momentum = 0.1  # PyTorch's default: r += momentum * (batch - r), from mean 0 and var 1
    new = stats["backbone"]["bottom_up"]["stem"]["conv1"]["norm"]
    np.testing.assert_allclose(new["mean"], momentum * y.mean(0), rtol=1e-4, atol=1e-6)
    # SyncBN (PyTorch's SyncBatchNorm) writes the unbiased variance of the global batch
    np.testing.assert_allclose(new["var"], (1 - momentum) + momentum * y.var(0, ddof=1),
                               rtol=1e-4, atol=1e-6)
    # per-device statistics (what a non-synchronized BN would give) are measurably different
    halves = y.reshape(2, -1, y.shape[-1])
    local_var = (1 - momentum) + momentum * halves.var(1, ddof=1).mean(0)
    assert np.abs(local_var - np.asarray(new["var"])).max() > 1e-3
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "total"}
    assert all(np.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("value", ["0", "-2"])
def test_batch_size_below_one_is_a_usage_error(value, capsys):
    from detlayers.demo.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--batch-size", value])
    assert exit_info.value.code == 2  # argparse's usage error
    assert f"--batch-size: must be >= 1, got {value}" in capsys.readouterr().err


def test_training_without_tqdm_installed_when_progress_is_off():
    # A fresh interpreter where `import tqdm` fails: the demo's modules import, and the training
    # loop runs with progress off (a stand-in step keeps it fast); a bar needs tqdm.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["tqdm"] = None
        sys.modules["tqdm.auto"] = None
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        import detlayers.demo.__main__, detlayers.demo.run, detlayers.demo.run_records
        from detlayers.demo import data as shapes, train as t

        def fake_factory(model, optimizer, mesh):
            def step(params, batch_stats, opt_state, batch, rng):
                return jax.tree.map(lambda p: p + 1.0, params), batch_stats, opt_state, {"loss_cls": jnp.ones(())}
            return step

        t.make_train_step = fake_factory
        mesh = Mesh(np.asarray(jax.devices()[:1]), (t.AXIS,))
        start = t.TrainState({"w": jnp.zeros(2)}, {}, {}, jax.random.key(0))
        config = t.TrainConfig(steps=2, batch_per_device=1)
        out = t.train(None, shapes.ShapesConfig(), config, mesh, start, progress=False)
        print("steps", out.step, float(out.params["w"][0]))
        try:
            t.train(None, shapes.ShapesConfig(), config, mesh, start, progress=True)
        except ImportError as err:
            print("bar needs tqdm:", "tqdm" in str(err))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-3:-1] == ["steps 2 2.0", "bar needs tqdm: True"]
