"""Benchmark: every architecture of ``detlayers.models`` end to end vs detectron2, one row each
(``python -m detlayers.bench models``).

One photograph at one moderate size, short side 512: the ``deeplab`` family's 512 x 1024 BGR
crop of scikit-image's ``coffee()`` (``ResizeShortestEdge(512, 1024)`` keeps its size; 512 keeps
the family runnable on a 2-core CPU, and 512 x 1024 is the smallest size with that short side at
which DeepLab's zoo ASPP pooling window, 32 x 64 at res5, fits). For each entry of
:data:`ARCHITECTURES`:

- ours: ``detlayers.models.Predictor(<zoo config function>(), weights)(image)``, the config
  function named after the detectron2 YAML file (``faster_rcnn_R_50_C4_3x.yaml`` ->
  ``faster_rcnn_R_50_C4_3x_config``), with ``INPUT.MIN_SIZE_TEST`` 512 / ``MAX_SIZE_TEST`` 1024;
- theirs (when torch and detectron2 are installed): detectron2's ``DefaultPredictor`` on that
  YAML file (the installed detectron2's ``model_zoo/configs``; ``projects/DeepLab`` from its
  source tree) with the same sizes and the same state dict, in the same process.

Both calls are what a user times: host resize, the network, postprocessing (masks pasted at full
size) and the row's output copied back to NumPy. The weights are the parity tests' synthetic ones
(``detlayers.models.synthetic_weights``, seed 0), calibrated with the ``tests/fixtures`` files the
parity tests use when they are found (a source checkout), so the detections are realistic; without
them a row says "uncalibrated". DeepLab's are uncalibrated, as in the ``deeplab`` family. A line
under each detection row gives the instances each side returned (the two rows time the same work
only if these agree).

The models are built when their row is timed, one architecture at a time (the previous one is
released first): nine sets of weights in both frameworks would not fit beside each other on a small
machine. Adding an architecture is one :class:`Architecture` entry.
"""

from __future__ import annotations

import dataclasses
import gc
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from detlayers.bench import Case
from detlayers.bench import deeplab as _deeplab
from detlayers.bench.end_to_end import (
    coffee_bgr,
    detectron2_default_predictor,
    detectron2_installed,
    detectron2_zoo_config,
    fixture_file,
)

IMAGE_HW = _deeplab.IMAGE_HW  # (512, 1024): short side 512
SEED = 0
MASK_RCNN_CALIBRATION = "mask_rcnn_bn_calibration.npz"
# Zoo config functions of detlayers.models.config without a row, and why.
NOT_BENCHMARKED = {
    "mask_rcnn_R_101_FPN_3x_config": "the R50-FPN Mask R-CNN row's architecture with a deeper ResNet",
    "deeplab_v3_R_103_os16_mg124_poly_90k_bs16_config": "the DeepLabV3+ row without its decoder",
    "panoptic_fpn_R_50_3x_config": "timed by its own family (python -m detlayers.bench panoptic_fpn); "
                                   "no row here yet",
    "rotated_faster_rcnn_R_50_FPN_3x_config": "no row yet (its config is detlayers' YAML, not a detectron2 "
                                              "zoo file; detectron2 builds it from that file)",
}


def benchmark_image() -> np.ndarray:
    """uint8 ``[512, 1024, 3]`` BGR: the photograph of every row."""
    return coffee_bgr(IMAGE_HW)


def _zoo_predictor(arch: Architecture, weights: dict[str, np.ndarray]) -> Any:
    from detlayers.models import Predictor

    cfg = arch.config_function()()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", IMAGE_HW[0], "INPUT.MAX_SIZE_TEST", IMAGE_HW[1]])
    return Predictor(cfg, weights)


def _zoo_detectron2(arch: Architecture, weights: dict[str, np.ndarray], device: str) -> Callable[[np.ndarray], Any]:
    predictor = detectron2_default_predictor(weights, config=arch.config, device=device, min_size=IMAGE_HW[0],
                                             max_size=IMAGE_HW[1])
    output = arch.output

    def run(image: np.ndarray) -> Any:
        instances = predictor(image)["instances"]
        value = getattr(instances, output)
        return getattr(value, "tensor", value).cpu()  # Boxes -> its tensor; the host copy ours makes too

    return run


def _zoo_available(arch: Architecture) -> bool:
    return detectron2_installed() and detectron2_zoo_config(arch.config) is not None


def _deeplab_detectron2(arch: Architecture, weights: dict[str, np.ndarray], device: str) -> Any:
    return _deeplab.detectron2_predictor(weights, device, IMAGE_HW)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One row of the family.

    Attributes:
      label: the row's name, e.g. ``"faster_rcnn R50-C4"``.
      config: the detectron2 config file, a path under detectron2's ``configs/`` (or, for a
        project, under its source tree); its stem names our config function (``-`` read as ``_``,
        plus ``_config``) in :mod:`detlayers.models.config`.
      state_dict: ``(*calibration paths) -> state dict``: the synthetic weights, called with the
        resolved ``calibration`` files, or with none when one is missing (uncalibrated).
      calibration: ``tests/fixtures`` file names the parity tests calibrate these weights with.
      output: the output both predictors return to the host: ``"pred_masks"``, ``"pred_boxes"``
        or ``"sem_seg"``.
      ours / theirs / theirs_available: build our predictor, build detectron2's run function
        (``(arch, weights, device)``), say whether the latter can be built here.
    """

    label: str
    config: str
    state_dict: Callable[..., dict[str, np.ndarray]]
    calibration: tuple[str, ...] = ()
    output: str = "pred_boxes"
    ours: Callable[[Architecture, dict[str, np.ndarray]], Any] = _zoo_predictor
    theirs: Callable[[Architecture, dict[str, np.ndarray], str], Callable[[np.ndarray], Any] | None] = _zoo_detectron2
    theirs_available: Callable[[Architecture], bool] = _zoo_available

    @property
    def config_name(self) -> str:
        """Our zoo config function's name: ``faster_rcnn_R_50_C4_3x_config``."""
        return pathlib.PurePosixPath(self.config).stem.replace("-", "_") + "_config"

    def config_function(self) -> Callable[[], Any]:
        import detlayers.models.config as config

        return getattr(config, self.config_name)

    def weights(self) -> tuple[dict[str, np.ndarray], bool]:
        """The state dict and whether it is calibrated (every calibration file found)."""
        paths = [calibration_path(name) for name in self.calibration]
        if all(p is not None for p in paths):
            return self.state_dict(*paths), True
        return self.state_dict(), False


def calibration_path(name: str) -> pathlib.Path | None:
    """``tests/fixtures/<name>``; the Mask R-CNN file as the ``mask_rcnn`` family finds it."""
    if name == MASK_RCNN_CALIBRATION:
        from detlayers.bench.mask_rcnn import calibration_file

        return calibration_file()
    return fixture_file(name)


def _synthetic(function: str, **kwargs: Any) -> Callable[..., dict[str, np.ndarray]]:
    """``(calibration=None) -> synthetic_weights.<function>(seed=SEED, calibration=..., **kwargs)``."""

    def make(calibration: Any = None) -> dict[str, np.ndarray]:
        from detlayers.models import synthetic_weights

        return getattr(synthetic_weights, function)(seed=SEED, calibration=calibration, **kwargs)

    return make


def _retinanet(frozen_bn: Any = None, head_case: Any = None) -> dict[str, np.ndarray]:
    """RetinaNet's weights as its parity tests make them: the Mask R-CNN FrozenBN statistics and the
    head scales stored in ``retinanet_256.npz``."""
    from detlayers.models.synthetic_weights import retinanet_calibration, retinanet_r50_fpn_state_dict

    if frozen_bn is None:
        return retinanet_r50_fpn_state_dict(seed=SEED)
    with np.load(head_case) as case:
        scales = {k: case[k] for k in case.files if k.startswith("scale.")}
    return retinanet_r50_fpn_state_dict(seed=SEED, calibration=retinanet_calibration(frozen_bn, scales))


_MISC = "Misc/mask_rcnn_R_50_FPN_3x"
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("mask_rcnn R50-FPN", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                 _synthetic("mask_rcnn_r50_fpn_state_dict"), (MASK_RCNN_CALIBRATION,), "pred_masks"),
    Architecture("faster_rcnn R50-FPN", "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
                 _synthetic("faster_rcnn_r50_fpn_state_dict"), (MASK_RCNN_CALIBRATION,)),
    Architecture("faster_rcnn R50-C4", "COCO-Detection/faster_rcnn_R_50_C4_3x.yaml",
                 _synthetic("faster_rcnn_r50_c4_state_dict"), ("faster_rcnn_c4_calibration.npz",)),
    Architecture("faster_rcnn R50-DC5", "COCO-Detection/faster_rcnn_R_50_DC5_3x.yaml",
                 _synthetic("faster_rcnn_r50_dc5_state_dict"), ("faster_rcnn_dc5_calibration.npz",)),
    Architecture("retinanet R50-FPN", "COCO-Detection/retinanet_R_50_FPN_3x.yaml", _retinanet,
                 (MASK_RCNN_CALIBRATION, "retinanet_256.npz")),
    Architecture("mask_rcnn R50-FPN GN", f"{_MISC}_gn.yaml",
                 _synthetic("mask_rcnn_r50_fpn_state_dict", variant=f"{_MISC}_gn"),
                 ("mask_rcnn_gn_calibration.npz",), "pred_masks"),
    Architecture("mask_rcnn R50-FPN dconv c3-c5", f"{_MISC}_dconv_c3-c5.yaml",
                 _synthetic("mask_rcnn_r50_fpn_state_dict", variant=f"{_MISC}_dconv_c3-c5"),
                 ("mask_rcnn_dconv_calibration.npz",), "pred_masks"),
    Architecture("cascade_mask_rcnn R50-FPN", "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
                 _synthetic("cascade_mask_rcnn_r50_fpn_state_dict"), ("cascade_mask_rcnn_calibration.npz",),
                 "pred_masks"),
    Architecture("deeplab_v3_plus R-103", _deeplab.CONFIG, lambda: _deeplab.benchmark_weights(), (), "sem_seg",
                 theirs=_deeplab_detectron2, theirs_available=lambda arch: _deeplab.detectron2_available()),
)


class _Loaded:
    """The predictors of the one architecture being timed: building another releases these first."""

    def __init__(self) -> None:
        self.arch: Architecture | None = None
        self.predictors: tuple[Any, Any] | None = None

    def get(self, arch: Architecture, device: str, with_theirs: bool) -> tuple[Any, Any]:
        if self.arch is not arch:
            self.arch = self.predictors = None
            gc.collect()
            weights, _ = arch.weights()
            ours = arch.ours(arch, weights)
            theirs = arch.theirs(arch, weights, device) if with_theirs else None
            self.arch, self.predictors = arch, (ours, theirs)
        return self.predictors


def case(arch: Architecture, image: np.ndarray, platform: str, loaded: _Loaded, calibrated: bool = True) -> Case:
    """The row of ``arch`` on ``image``; nothing is built until it is timed."""
    device = "cuda" if platform == "gpu" else "cpu"
    with_theirs = arch.theirs_available(arch)
    name = f"{arch.label} {image.shape[0]}x{image.shape[1]} end-to-end"
    if not calibrated:
        name += " uncalibrated"

    last: dict[str, Any] = {}  # each side's latest output, for the summary

    def run_ours() -> Any:
        last["ours"] = loaded.get(arch, device, with_theirs)[0](image)[arch.output]
        return last["ours"]

    def run_theirs() -> Any:
        last["theirs"] = loaded.get(arch, device, with_theirs)[1](image)
        return last["theirs"]

    def instances(ours_s: float, torch_s: float | None) -> dict[str, Any]:
        """How many instances each side returned: the rows time the same work only if they agree
        (about; the two frameworks' float rounding moves a few scores across the threshold)."""
        counts = {"instances (ours)": len(last["ours"])}
        if "theirs" in last:
            counts["instances (detectron2)"] = len(last["theirs"])
        return counts

    return Case("models", name, run_ours, run_theirs if with_theirs else None, warmup=1, min_repeats=3,
                summary=None if arch.output == "sem_seg" else instances)


def cases(platform: str) -> list[Case]:
    image = benchmark_image()
    loaded = _Loaded()
    return [case(arch, image, platform, loaded,
                 calibrated=all(calibration_path(n) is not None for n in arch.calibration))
            for arch in ARCHITECTURES]
