"""Benchmark: Mask R-CNN R50-FPN inference end to end vs detectron2 (``python -m detlayers.bench mask_rcnn``).

One 800 x 1333 photograph (scikit-image's ``coffee()``, 400 x 600, center-cropped to 360 x 600 and
resized once with PIL bilinear to 800 x 1333, so that ``ResizeShortestEdge(800, 1333)`` keeps the
size and the masks are pasted at 800 x 1333), BGR, through:

- ours: ``detlayers.models.Predictor(mask_rcnn_R_50_FPN_3x_config(), weights)(image)``;
- theirs (when detectron2 is importable): detectron2's ``DefaultPredictor`` on the same config
  (``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` values, ``MODEL.DEVICE`` cpu or cuda)
  with the same weights, in the same process.

Both calls are what a user times: host resize, the network, postprocessing, masks pasted at full
size and copied back to NumPy. The weights are
``detlayers.models.synthetic_weights.mask_rcnn_r50_fpn_state_dict(seed=0)`` with the FrozenBN
statistics of ``tests/fixtures/mask_rcnn_bn_calibration.npz`` when that file is found (a source
checkout, or the path in ``DETLAYERS_MASK_RCNN_CALIBRATION``), so the detections are realistic
(about 100 instances with spread-out scores); without it the row says "uncalibrated".

Mixed sizes. A second row runs a stream of ``MIXED_SIZES`` photos (the same photograph resized with
PIL to typical camera and COCO sizes, both orientations), one image per call, through both
predictors: ours compiles once per padded input size and mask-canvas bucket (during the warm-up),
detectron2 needs no compile. ``images per second = len(MIXED_SIZES) / row time``.

Share of the detlayers ops. The rows ``in it: ...`` time the detlayers ops the model actually calls
(``roi_align``, ``nms``/``batched_nms``, ``paste_masks_in_image``), with the exact arguments and
input values of the benchmarked inference: a second predictor is built with those functions
wrapped to record their static arguments at trace time and their array inputs at run time
(``jax.debug.callback``); each row then replays the recorded calls of one kind in one jitted
function. ``share = row time / end-to-end time`` of our predictor. Replayed standalone, an op
cannot fuse with its neighbours, so the share is an estimate (slightly high, not low).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pathlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from detlayers.bench import Case

# fixture_file and detectron2_default_predictor are also imported from here (the port notebook)
from detlayers.bench.end_to_end import coffee_bgr, detectron2_default_predictor, fixture_file

IMAGE_HW = (800, 1333)
# (height, width) of the mixed-size row's photos: COCO's common sizes and camera aspect ratios.
MIXED_SIZES = ((480, 640), (640, 480), (427, 640), (375, 500), (600, 800), (720, 1280), (1024, 768), (333, 500))
MIN_SIZE, MAX_SIZE = 800, 1333
SEED = 0
CALIBRATION_ENV = "DETLAYERS_MASK_RCNN_CALIBRATION"
# (module, function, row label): the detlayers ops whose time the family reports.
DETLAYERS_OPS = (
    ("detlayers.roi_align", "roi_align", "ROIAlign"),
    ("detlayers.nms", "batched_nms", "NMS"),
    ("detlayers.nms", "nms", "NMS"),
    ("detlayers.mask_ops", "paste_masks_in_image", "paste_masks"),
)


def mixed_size_images() -> list[np.ndarray]:
    """uint8 BGR photos of ``MIXED_SIZES``: :func:`benchmark_image` resized with PIL bilinear."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(benchmark_image()))
    return [np.asarray(image.resize((w, h), Image.BILINEAR)) for h, w in MIXED_SIZES]


def benchmark_image() -> np.ndarray:
    """uint8 [800, 1333, 3] BGR: skimage's coffee() center-cropped to 3:5 and resized with PIL."""
    return coffee_bgr(IMAGE_HW)


def calibration_file() -> pathlib.Path | None:
    """The FrozenBN calibration of the synthetic weights, if this is a source checkout (or set)."""
    env = os.environ.get(CALIBRATION_ENV)
    if env:
        return pathlib.Path(env)
    return fixture_file("mask_rcnn_bn_calibration.npz")


def benchmark_weights() -> tuple[dict[str, np.ndarray], bool]:
    """The synthetic Mask R-CNN R50-FPN state dict (seed ``SEED``) and whether it is calibrated."""
    from detlayers.models.synthetic_weights import mask_rcnn_r50_fpn_state_dict

    calibration = calibration_file()
    return mask_rcnn_r50_fpn_state_dict(seed=SEED, calibration=calibration), calibration is not None


def _our_predictor(weights: dict[str, np.ndarray]) -> Any:
    from detlayers.models import Predictor, mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", MIN_SIZE, "INPUT.MAX_SIZE_TEST", MAX_SIZE])
    return Predictor(cfg, weights)


def _detectron2_predictor(weights: dict[str, np.ndarray], device: str) -> Callable[[np.ndarray], Any] | None:
    try:
        predictor = detectron2_default_predictor(weights, device=device, min_size=MIN_SIZE, max_size=MAX_SIZE)
    except ImportError:
        return None

    def run(image: np.ndarray) -> Any:
        out = predictor(image)["instances"]
        return out.pred_masks.cpu()  # the host copy ours makes too

    return run


@dataclasses.dataclass
class _Recorded:
    """One recorded call of a detlayers op: the function, its argument tree and array inputs."""

    label: str
    function: Callable[..., Any]
    treedef: Any
    static: dict[int, Any]  # leaf index -> static (non-array) value
    arrays: list[np.ndarray]  # the other leaves' run-time values, in leaf order


def _is_array(x: Any) -> bool:
    import jax

    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@contextlib.contextmanager
def _recording(records: list[_Recorded]) -> Iterator[None]:
    """Wrap the detlayers ops (in every loaded detlayers module) to record their calls."""
    import jax

    local = threading.local()
    labels: dict[int, tuple[Callable[..., Any], str]] = {}
    for module_name, name, label in DETLAYERS_OPS:
        function = getattr(importlib.import_module(module_name), name)
        labels[id(function)] = (function, label)

    def wrap(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if getattr(local, "depth", 0):  # an op calling another wrapped op: count the outer call
                return function(*args, **kwargs)
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
            dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
            static = {i: leaf for i, leaf in enumerate(leaves) if i not in dynamic}

            def store(*values: Any) -> None:
                records.append(_Recorded(label, function, treedef, static, [np.asarray(v) for v in values]))

            jax.debug.callback(store, *[leaves[i] for i in dynamic])
            local.depth = 1
            try:
                return function(*args, **kwargs)
            finally:
                local.depth = 0

        return wrapper

    wrappers = {key: wrap(function, label) for key, (function, label) in labels.items()}
    patched: list[tuple[Any, str, Any]] = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "detlayers" or module_name.startswith("detlayers.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in labels and labels[id(value)][0] is value:
                patched.append((module, attr, value))
                setattr(module, attr, wrappers[id(value)])
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def _replay(records: list[_Recorded]) -> Callable[[], Any]:
    """One jitted function running the recorded calls on their recorded inputs."""
    import jax

    def rebuild(record: _Recorded, arrays: list[Any]) -> tuple[tuple, dict]:
        it = iter(arrays)
        leaves = [record.static[i] if i in record.static else next(it) for i in range(record.treedef.num_leaves)]
        return jax.tree_util.tree_unflatten(record.treedef, leaves)

    @jax.jit
    def run(all_arrays: list[list[Any]]) -> list[Any]:
        outs = []
        for record, arrays in zip(records, all_arrays):
            args, kwargs = rebuild(record, arrays)
            outs.append(record.function(*args, **kwargs))
        return outs

    inputs = [[jax.device_put(a) for a in record.arrays] for record in records]
    return lambda: run(inputs)


def _op_cases(weights: dict[str, np.ndarray], image: np.ndarray) -> list[Case]:
    from detlayers.models.registry import load_builtin_parts

    load_builtin_parts()  # load the model's modules before patching them
    records: list[_Recorded] = []
    with _recording(records):
        _our_predictor(weights)(image)  # traced and run with the recording wrappers
    cases = []
    labels = sorted({r.label for r in records}, key=[label for *_, label in DETLAYERS_OPS].index)
    for label in labels:
        subset = [r for r in records if r.label == label]
        cases.append(Case("mask_rcnn", f"  in it: {label} ({len(subset)} call{'s' * (len(subset) > 1)}, replayed)",
                          _replay(subset)))
    if records:
        cases.append(Case("mask_rcnn", f"  in it: all detlayers ops ({len(records)} calls; share = this / end-to-end)",
                          _replay(records)))
    return cases


def cases(platform: str) -> list[Case]:
    weights, calibrated = benchmark_weights()
    image = benchmark_image()
    ours = _our_predictor(weights)
    device = "cuda" if platform == "gpu" else "cpu"
    theirs = _detectron2_predictor(weights, device)
    name = f"mask_rcnn R50-FPN {IMAGE_HW[0]}x{IMAGE_HW[1]} end-to-end (vs detectron2 DefaultPredictor)"
    if not calibrated:
        name += " uncalibrated"

    def run_ours() -> Any:
        return ours(image)["pred_masks"]

    photos = mixed_size_images()
    mixed = (f"mask_rcnn R50-FPN mixed sizes: {len(photos)} photos one at a time "
             f"({', '.join(f'{h}x{w}' for h, w in MIXED_SIZES)}; images/s = {len(photos)} / time)")

    def run_ours_mixed() -> Any:
        return [ours(photo)["pred_masks"] for photo in photos]

    def run_theirs_mixed() -> Any:
        return [theirs(photo) for photo in photos]

    return [Case("mask_rcnn", name, run_ours, None if theirs is None else (lambda: theirs(image))),
            Case("mask_rcnn", mixed, run_ours_mixed, None if theirs is None else run_theirs_mixed, warmup=1,
                 min_repeats=2),
            *_op_cases(weights, image)]
