"""The demo's flags: a value out of range is argparse's usage error at start, naming the flag and
the range accepted (no JAX work, no compile)."""

from __future__ import annotations

import pytest

from detlayers.demo import data as shapes
from detlayers.demo.__main__ import parse_args
from detlayers.demo.arg_types import MIN_IMAGE_SIZE

REFUSED = [
    ("--steps", "-3", "must be >= 1, got -3"),
    ("--steps", "0", "must be >= 1, got 0"),
    ("--steps", "2.5", "expected an integer, got '2.5'"),
    ("--eval-images", "-1", "must be >= 0, got -1"),
    ("--show-images", "-1", "must be >= 0, got -1"),
    ("--batch-size", "0", "must be >= 1, got 0"),
    ("--devices", "0", "must be >= 1, got 0"),
    ("--devices", "-2", "must be >= 1, got -2"),
    ("--seed", "-1", "must be >= 0, got -1"),
    ("--lr", "0", "must be a finite number > 0, got 0"),
    ("--lr", "-0.001", "must be a finite number > 0, got -0.001"),
    ("--lr", "nan", "must be a finite number > 0, got nan"),
    ("--lr", "fast", "expected a number, got 'fast'"),
    ("--image-size", "8", "must be a multiple of 8 and >= 48"),
    ("--image-size", "40", "must be a multiple of 8 and >= 48"),
    ("--image-size", "60", "must be a multiple of 8 and >= 48"),
    ("--checkpoint-every", "0", "must be >= 1, got 0"),
    ("--keep-checkpoints", "0", "must be >= 1, got 0"),
]


@pytest.mark.parametrize(("flag", "value", "message"), REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_out_of_range_flag_is_a_usage_error_naming_the_flag_and_range(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2  # argparse's usage error
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_the_smallest_values_of_each_range_are_accepted():
    args = parse_args(["--steps", "1", "--eval-images", "0", "--show-images", "0", "--batch-size", "1",
                       "--devices", "1", "--seed", "0", "--lr", "1e-6", "--image-size", "48",
                       "--checkpoint-every", "1", "--keep-checkpoints", "1"])
    assert (args.steps, args.eval_images, args.show_images, args.batch_size, args.devices, args.seed,
            args.lr, args.image_size, args.checkpoint_every, args.keep_checkpoints) == (
        1, 0, 0, 1, 1, 0, 1e-6, 48, 1, 1)


def test_min_image_size_is_the_smallest_the_shapes_data_can_be_drawn_at():
    # shapes of up to max_size px kept 0.75 x their size from the border: 45 px needed, so 48
    # (a multiple of 8) draws every example and 40 cannot
    assert MIN_IMAGE_SIZE == 48
    config = shapes.ShapesConfig(image_size=MIN_IMAGE_SIZE)
    for index in range(50):
        example = shapes.make_example(config, 0, shapes.TRAIN_SPLIT, index)
        assert len(example.classes) >= 1
    with pytest.raises(ValueError, match="high - low < 0"):
        for index in range(50):
            shapes.make_example(shapes.ShapesConfig(image_size=MIN_IMAGE_SIZE - 8), 0, shapes.TRAIN_SPLIT, index)
