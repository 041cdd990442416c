"""``python -m detlayers.demo``: train the shapes detector, report COCO AP, draw predictions.

On a CPU-only machine the demo splits the CPU into one XLA host device per core (unless
``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``), so the data-parallel step
and the synchronized batch norm really run over several devices.  The flag must be set before
JAX starts, which is why this module parses its arguments before importing JAX.
"""

from __future__ import annotations

import argparse
import os
import sys

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's flags; a value out of its range is argparse's usage error (exit 2) naming the
    flag and the range accepted."""
    from detlayers.demo.arg_types import image_size, non_negative_int, positive_float, positive_int
    from detlayers.demo.model import DetectorConfig  # no JAX work at import
    from detlayers.demo.train import TrainConfig

    t = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m detlayers.demo", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=t.steps, help="training steps (>= 1)")
    parser.add_argument("--devices", type=positive_int, default=None,
                        help="devices to train on (>= 1), counted over all processes (default: all; "
                             "on CPU one forced host device per core, or --devices split evenly "
                             "over the processes)")
    parser.add_argument("--batch-size", type=positive_int, default=t.batch_per_device,
                        help="images per device per step (>= 1)")
    parser.add_argument("--lr", type=positive_float, default=t.learning_rate, help="peak learning rate (> 0)")
    parser.add_argument("--eval-images", type=non_negative_int, default=160,
                        help="held-out images for AP (0: no evaluation)")
    parser.add_argument("--show-images", type=non_negative_int, default=8, help="test images in the PNG")
    parser.add_argument("--image-size", type=image_size, default=DetectorConfig.image_size,
                        help="square image side (a multiple of 8, >= 48)")
    parser.add_argument("--seed", type=non_negative_int, default=t.seed, help="random seed (>= 0)")
    parser.add_argument("--out", default="demo_out",
                        help="output directory (or a .png path for the picture)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (then tqdm need not be installed)")
    from detlayers import distributed
    from detlayers.demo import run_records

    distributed.add_arguments(parser)
    run_records.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    # read when JAX starts its CPU backend (first use, not import): set it before any JAX work
    if _DEVICE_FLAG not in flags:
        count = args.devices or _cpu_cores()
        processes = args.num_processes or int(os.environ.get("DETLAYERS_NUM_PROCESSES", "1"))
        if args.devices and processes > 1:  # --devices is global: this process's share
            if args.devices % processes:
                raise SystemExit(f"--devices {args.devices} does not split evenly over "
                                 f"{processes} processes")
            count = args.devices // processes
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()

    from detlayers import distributed

    # joins the multi-process runtime (flags, the launcher's environment or a detected cluster)
    # before any other JAX work; a single process otherwise
    info = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not info.is_main:  # process 0 speaks for the run; the others only show their errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        args.no_progress = True

    from detlayers.demo.run import run_demo
    from detlayers.demo.train import DemoOutOfMemoryError, NonFiniteLossError
    from detlayers.demo.train_checkpoints import CheckpointError

    try:
        run_demo(args)
    except NonFiniteLossError as err:  # a diverged run: say so plainly, exit non-zero
        print(f"error: {err}", file=sys.stderr)
        return 3
    except CheckpointError as err:  # directory in use, unusable checkpoint: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 4
    except DemoOutOfMemoryError as err:  # what ran out and what to lower, not XLA's allocator dump
        print(f"error: {err}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
