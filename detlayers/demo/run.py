"""The demo end to end: train, evaluate with pycocotools, write the PNG, print a summary."""

from __future__ import annotations

import argparse
import json
import os
import time

from detlayers.demo import data as shapes


def _png_path(out: str) -> str:
    return out if out.lower().endswith(".png") else os.path.join(out, "predictions.png")


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Runs the demo for parsed ``python -m detlayers.demo`` arguments; returns the numbers.

    The result holds the pycocotools metrics (``box_AP``, ``box_AP50``, ``mask_AP``, ...),
    ``train_seconds``, ``total_seconds``, ``devices``, ``steps``, ``eval_images`` and ``png`` (the
    picture's path); it is also written as ``metrics.json`` beside the picture.
    """
    start = time.perf_counter()
    import jax

    from detlayers import distributed
    from detlayers.demo import run_records as records
    from detlayers.demo.evaluate import coco_ap
    from detlayers.demo.model import DetectorConfig, build_detector, demo_cfg
    from detlayers.demo.train import TrainConfig, detect, make_mesh, train
    from detlayers.demo.visualize import save_predictions_png

    if args.image_size % 8:
        raise ValueError(f"--image-size must be a multiple of 8, got {args.image_size}")
    mesh = make_mesh(args.devices)
    devices = mesh.devices.reshape(-1)
    distributed.check_process_blocks(devices)
    # multi-process: every process trains and checkpoints; only process 0 reports and evaluates
    is_main = jax.process_index() == 0
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    print(f"detlayers demo: {mesh.size} x {kind} ({devices[0].platform}), "
          f"{args.batch_size} images/device/step, {args.steps} steps", flush=True)

    data_config = shapes.ShapesConfig(image_size=args.image_size)
    model = build_detector(demo_cfg(DetectorConfig(image_size=args.image_size,
                                                   max_objects=data_config.max_objects)))
    train_config = TrainConfig(steps=args.steps, batch_per_device=args.batch_size,
                               learning_rate=args.lr, seed=args.seed)
    config = records.run_config(args, mesh.size)
    ckpt = records.open_checkpointer(args)
    try:
        state = None
        if args.resume:
            state = records.restore_state(ckpt, model, train_config, mesh, config)
            print(f"resuming from {ckpt.step_path(state.step)}", flush=True)
        state = train(model, data_config, train_config, mesh, state=state,
                      progress=not args.no_progress and is_main,
                      on_step=records.make_on_step(ckpt, config, args.loss_log, is_main))
        records.finish(ckpt, state, config, args.save_params, is_main)
    finally:
        if ckpt is not None:  # also on errors: the directory's lock is released cleanly
            ckpt.close()
    jax.block_until_ready(state.params)
    train_seconds = time.perf_counter() - start
    if not is_main or args.eval_images == 0:
        print(f"time: {train_seconds:.0f} s training (incl. compilation); no evaluation")
        return dict(train_seconds=train_seconds, devices=mesh.size, steps=args.steps)

    examples = shapes.eval_examples(data_config, args.seed, args.eval_images)
    eval_state, eval_mesh = records.local_view(state, mesh)
    detections = detect(model, eval_state, examples, eval_mesh)
    metrics = coco_ap(examples, detections)
    png = save_predictions_png(_png_path(args.out), examples[:args.show_images],
                               detections[:args.show_images])
    total = time.perf_counter() - start
    print(f"pycocotools on {len(examples)} held-out images:\n"
          f"  box  AP {metrics['box_AP']:.3f}  AP50 {metrics['box_AP50']:.3f}  "
          f"AP75 {metrics['box_AP75']:.3f}\n"
          f"  mask AP {metrics['mask_AP']:.3f}  AP50 {metrics['mask_AP50']:.3f}  "
          f"AP75 {metrics['mask_AP75']:.3f}")
    result = dict(metrics, train_seconds=train_seconds, total_seconds=total,
                  devices=mesh.size, steps=args.steps, eval_images=len(examples), png=png)
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(png)), "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"predictions drawn in {png}; numbers in {metrics_path}")
    print(f"time: {train_seconds:.0f} s training (incl. compilation), {total:.0f} s in all")
    return result
