"""``python -m detlayers.models.train --config-file X.yaml [--resume] [opts KEY VALUE ...]``:
train a detectron2 config (``GeneralizedRCNN``: Mask R-CNN, Faster R-CNN) on COCO-format data.

detectron2's ``tools/train_net.py`` shape: the config file is read with
``get_cfg().merge_from_file`` and the trailing ``KEY VALUE`` pairs with ``merge_from_list``.
Training data are the ``DATASETS.TRAIN`` names, registered with
:func:`detlayers.models.data.register_coco_instances` by a script that then calls :func:`main`,
or on the command line with ``--coco-dataset NAME JSON IMAGE_ROOT``. ``OUTPUT_DIR`` receives
``config.yaml`` (the merged config), ``metrics.json`` (one JSON line per iteration:
``iteration``, ``total_loss``, the five losses, ``lr``, ``time``, ``data_time``),
``checkpoints/<iteration>/`` every ``SOLVER.CHECKPOINT_PERIOD`` iterations and at the end (orbax,
with digests and a directory lock; ``--resume`` continues from the newest intact one exactly as
the run would have gone on), and ``model_final.pkl`` (detectron2's format, for its
``DetectionCheckpointer``).

``SOLVER.IMS_PER_BATCH`` is split over every device (all processes' in a ``jax.distributed``
run: ``--coordinator``/``--num-processes``/``--process-id`` or ``python -m
detlayers.distributed.launch``); on a CPU-only machine ``--num-devices N`` splits the CPU into
``N`` XLA host devices.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT = 4
EXIT_OUT_OF_MEMORY = 5


def default_argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` for this trainer."""
    from detlayers import distributed

    parser = argparse.ArgumentParser(prog="python -m detlayers.models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (a fresh run otherwise)")
    parser.add_argument("--num-devices", type=int, default=None,
                        help="devices to split SOLVER.IMS_PER_BATCH over (default: all; on CPU, that many "
                             "forced host devices)")
    parser.add_argument("--coco-dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset under NAME (repeatable)")
    parser.add_argument("--max-gt-per-image", type=int, default=100,
                        help="static ground-truth rows per image; an image with more instances is an error")
    parser.add_argument("--bucket", type=int, default=128,
                        help="padded image heights and widths are multiples of this (bounds the compiles)")
    parser.add_argument("--keep-checkpoints", type=int, default=5, help="newest checkpoints kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="'KEY VALUE' pairs merged into the config (merge_from_list)")
    return parser


def setup(args: argparse.Namespace) -> Any:
    """The config: defaults, ``--config-file``, then ``opts``."""
    from detlayers.models.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    return cfg


# ROI heads built for inference only: their modules refuse training (NotImplementedError).
INFERENCE_ONLY_ROI_HEADS = ("CascadeROIHeads", "Res5ROIHeads")


def check_trainable(cfg: Any) -> None:
    """Refuses what this trainer does not train (``ValueError`` naming the key;
    ``NotImplementedError`` for the inference-only ROI heads), before any work."""
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ValueError(f"train: MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}: only GeneralizedRCNN "
                         "(Mask / Faster R-CNN) trains here")
    if cfg.MODEL.ROI_HEADS.NAME in INFERENCE_ONLY_ROI_HEADS:
        raise NotImplementedError(f"train: MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r} is inference only; "
                                  "'StandardROIHeads' trains")
    batch_norms = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
    for key in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        if cfg.MODEL[key].NORM in batch_norms:
            raise ValueError(f"train: MODEL.{key}.NORM {cfg.MODEL[key].NORM!r}: batch-statistics norms in the ROI "
                             "heads do not train yet (their padded ROI slots would enter the statistics); use "
                             "'', 'GN' or 'FrozenBN'")


def run_config(cfg: Any, seed: int, args: argparse.Namespace, num_devices: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run."""
    resolved = cfg.clone()
    resolved.SEED = seed
    return {"config": resolved.dump(), "num_devices": num_devices, "max_gt_per_image": args.max_gt_per_image,
            "bucket": args.bucket}


def _config_difference(saved: dict, now: dict) -> str:
    lines = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) == now.get(key):
            continue
        if key == "config" and isinstance(saved.get(key), str):
            diff = difflib.unified_diff(saved[key].splitlines(), now[key].splitlines(), "checkpoint", "now",
                                        lineterm="", n=0)
            lines.append("config: " + " | ".join(line for line in diff if line[:1] in "+-" and line[:3] not in
                                                  ("+++", "---")))
        else:
            lines.append(f"{key}: {saved.get(key)!r} (checkpoint) vs {now.get(key)!r} (now)")
    return "; ".join(lines)


def _restore(ckpt: Any, state: Any, mesh: Any) -> tuple[Any, dict[str, Any]]:
    """The newest intact checkpoint as a state shaped like ``state``, and its meta."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from detlayers.models.engine.train_loop import TrainState

    replicated = NamedSharding(mesh, P())
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state.arrays())
    tree, meta = ckpt.restore(template)
    rng = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(state.rng))
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"], rng, int(meta["step"])), meta


def process_rows(global_batch: int, mesh: Any) -> slice:
    """The rows of the global batch this process feeds: those of its devices in ``mesh`` (whole
    per-process blocks in process order, :func:`detlayers.distributed.check_process_blocks`)."""
    import jax

    if global_batch % mesh.size:
        raise ValueError(f"train: SOLVER.IMS_PER_BATCH {global_batch} must be a multiple of the {mesh.size} devices")
    per_device = global_batch // mesh.size
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def train(args: argparse.Namespace) -> int:
    """Runs the training ``args`` describe (after ``jax.distributed`` is set up)."""
    import jax

    from detlayers import distributed
    from detlayers.demo.train_checkpoints import CheckpointError, TrainCheckpointer
    from detlayers.models.checkpoint import save_detectron2_weights
    from detlayers.models.data import build_training_batches, register_coco_instances
    from detlayers.models.engine.step import make_mesh
    from detlayers.models.engine.train_loop import init_state, metrics_writer, run_iterations
    from detlayers.models.meta_arch.build import build_model

    for name, json_file, image_root in args.coco_dataset:
        register_coco_instances(name, {}, json_file, image_root)
    cfg = setup(args)
    check_trainable(cfg)
    info = distributed.ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                                   jax.device_count())
    mesh = make_mesh(args.num_devices)
    distributed.check_process_blocks(list(mesh.devices.flat))
    output_dir = cfg.OUTPUT_DIR
    os.makedirs(output_dir, exist_ok=True)
    model = build_model(cfg)
    ckpt = TrainCheckpointer(os.path.join(output_dir, "checkpoints"), every=int(cfg.SOLVER.CHECKPOINT_PERIOD),
                             keep=args.keep_checkpoints, lock=info.is_main)
    try:
        latest = ckpt.latest_step()
        if latest is not None and not args.resume:
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints (newest: iteration {latest}); "
                                  "pass --resume to continue that run, or choose another OUTPUT_DIR")
        seed = int(cfg.SEED)
        # the state's initial values do not matter when a checkpoint replaces them
        state, optimizer = init_state(cfg, model, max(seed, 0))
        if latest is not None:
            state, meta = _restore(ckpt, state, mesh)
            if seed < 0:  # SEED -1: the run drew its seed, which the checkpoint keeps
                seed = int(meta.get("seed", -1))
            config = run_config(cfg, seed, args, mesh.size)
            if meta.get("run") != config:
                raise CheckpointError(
                    f"checkpoint {ckpt.step_path(ckpt.restored_step)} was written by another run configuration: "
                    f"{_config_difference(meta.get('run') or {}, config)}")
        else:
            if seed < 0:  # detectron2's SEED -1: a random seed, recorded in config.yaml and the checkpoints
                seed = int.from_bytes(os.urandom(4), "little") >> 1
                state, optimizer = init_state(cfg, model, seed)
            config = run_config(cfg, seed, args, mesh.size)
        if info.is_main:
            with open(os.path.join(output_dir, "config.yaml"), "w") as f:
                f.write(config["config"])
        backbone = model.backbone
        batches = build_training_batches(cfg, seed=seed, bucket=args.bucket, max_gt=args.max_gt_per_image,
                                         size_divisibility=backbone.size_divisibility)
        rows = process_rows(batches.global_batch, mesh)
        write_metrics = metrics_writer(os.path.join(output_dir, "metrics.json")) if info.is_main else None

        def on_iteration(new_state, record):
            if write_metrics is not None:
                write_metrics(record)
            ckpt.save(new_state.iteration, new_state.arrays(), {"step": new_state.iteration, "seed": seed,
                                                                "run": config})

        stream = batches.stream(state.iteration, rows)
        try:
            state = run_iterations(cfg, model, optimizer, state, stream, mesh, on_iteration=on_iteration,
                                   progress=not args.no_progress and info.is_main)
        finally:
            stream.close()
        ckpt.save(state.iteration, state.arrays(), {"step": state.iteration, "seed": seed, "run": config},
                  force=True)
    finally:
        ckpt.close()
    if info.is_main:
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        save_detectron2_weights(variables, os.path.join(output_dir, "model_final.pkl"), model=model)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (3: non-finite loss, 4: unusable checkpoint or directory,
    5: out of memory)."""
    args = default_argument_parser().parse_args(argv)
    if args.num_devices is not None and args.num_devices < 1:
        raise SystemExit(f"--num-devices must be >= 1, got {args.num_devices}")
    flags = os.environ.get("XLA_FLAGS", "")
    if args.num_devices is not None and _DEVICE_FLAG not in flags:  # read when JAX's CPU backend starts
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={args.num_devices}".strip()

    from detlayers import distributed

    info = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not info.is_main:
        args.no_progress = True

    from detlayers.demo.train_checkpoints import CheckpointError
    from detlayers.models.engine.train_loop import NonFiniteLossError, TrainOutOfMemoryError

    try:
        return train(args)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except TrainOutOfMemoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY


if __name__ == "__main__":
    sys.exit(main())
