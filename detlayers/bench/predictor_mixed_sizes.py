"""Benchmark: ``Predictor`` over a stream of photos of mixed sizes vs detectron2's ``DefaultPredictor``
(``python -m detlayers.bench predictor_mixed_sizes``).

The stream: ``STREAM_SIZES``, ten original sizes of photographs (4:3, 3:2 and 16:10 in both
orientations, 333 to 1024 pixels a side), each one of scikit-image's colour photographs
(``STREAM_SOURCES``, taken in turn) center-cropped to the size's aspect ratio and resized with PIL
bilinear, as BGR. Both predictors run Mask R-CNN R50-FPN (``mask_rcnn_R_50_FPN_3x`` values) with
the same synthetic weights as the ``mask_rcnn`` family, at ``INPUT.MIN_SIZE_TEST = 320`` and
``MAX_SIZE_TEST = 512`` (small, so that the family runs in minutes on a CPU), one image per
call, masks pasted at the original size and copied to the host.

Ours compiles during the warm-up pass: the network once per padded input size (detectron2's
padding of the resized image to a multiple of 32; ``STREAM_SIZES`` give ``len(network_inputs())``
of them) and the mask paste once per canvas bucket (the original size rounded up to a multiple of
128 on each side). The row times whole passes after that; its summary line gives images per
second for both (``len(STREAM_SIZES) / pass time``), their ratio, the compilations (counted on
the jitted functions' caches) and the first pass's time, compiles included. detectron2 compiles
nothing; without it installed the row says so and times ours alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detlayers.bench import Case

MIN_SIZE, MAX_SIZE = 320, 512
SIZE_DIVISIBILITY = 32  # FPN's: detectron2 pads the resized image to a multiple of it
# (height, width) of the stream's photos, in stream order.
STREAM_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (600, 800), (1024, 683), (375, 500),
                (500, 333), (640, 1024), (768, 1024))
# scikit-image's colour photographs (shipped with the package, no download), used in turn.
STREAM_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def crop_and_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width, 3]`` BGR: ``rgb`` center-cropped to the aspect ratio ``width /
    height`` (the largest such window) and resized with PIL bilinear."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if w * height > h * width:  # too wide: keep the full height
        crop_w, crop_h = max(1, round(h * width / height)), h
    else:
        crop_w, crop_h = w, max(1, round(w * height / width))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    window = np.ascontiguousarray(rgb[top:top + crop_h, left:left + crop_w])
    resized = np.asarray(Image.fromarray(window).resize((width, height), Image.BILINEAR))
    return np.ascontiguousarray(resized[..., ::-1])


def mixed_size_stream(sizes: Sequence[tuple[int, int]] = STREAM_SIZES,
                      sources: Sequence[str] = STREAM_SOURCES) -> list[np.ndarray]:
    """One BGR photo per size: ``skimage.data.<sources[i % len(sources)]>()`` through
    :func:`crop_and_resize`."""
    import skimage.data

    rgbs = {name: getattr(skimage.data, name)() for name in sources}
    return [crop_and_resize(rgbs[sources[i % len(sources)]], h, w) for i, (h, w) in enumerate(sizes)]


def network_inputs(sizes: Sequence[tuple[int, int]] = STREAM_SIZES, min_size: int = MIN_SIZE,
                   max_size: int = MAX_SIZE) -> set[tuple[int, int]]:
    """The distinct padded network input sizes of ``sizes`` (detectron2's ResizeShortestEdge,
    then padding to a multiple of :data:`SIZE_DIVISIBILITY`): ours compiles the network once each."""
    from detlayers.models.predictor import resize_shortest_edge_shape

    def padded(n: int) -> int:
        return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY

    shapes = (resize_shortest_edge_shape(h, w, min_size, max_size) for h, w in sizes)
    return {(padded(h), padded(w)) for h, w in shapes}


def stream_summary(images: int, ours_s: float, theirs_s: float | None, compiles: tuple[int, int],
                   first_pass_s: float) -> dict[str, Any]:
    """The row's summary: images per second of both (``images / seconds per pass``; "detectron2 not
    installed" without it), ``ratio`` = ours / detectron2's images per second (above 1: ours is
    faster), compilations ``(network, mask paste)`` and the first pass's seconds."""
    summary: dict[str, Any] = {"images/s": round(images / ours_s, 3)}
    if theirs_s is None:
        summary["detectron2 images/s"] = "detectron2 not installed"
    else:
        summary["detectron2 images/s"] = round(images / theirs_s, 3)
        summary["images/s ratio"] = round(theirs_s / ours_s, 3)
    network, paste = compiles
    summary["compilations"] = f"{network + paste} ({network} network, {paste} mask paste)"
    summary["first pass s (compiles included)"] = round(first_pass_s, 2)
    return summary


def _predictors(weights: dict[str, np.ndarray], device: str) -> tuple[Any, Callable[[np.ndarray], Any] | None]:
    from detlayers.bench.end_to_end import detectron2_default_predictor
    from detlayers.models import Predictor, mask_rcnn_R_50_FPN_3x_config

    cfg = mask_rcnn_R_50_FPN_3x_config()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", MIN_SIZE, "INPUT.MAX_SIZE_TEST", MAX_SIZE])
    ours = Predictor(cfg, weights)
    try:
        theirs = detectron2_default_predictor(weights, device=device, min_size=MIN_SIZE, max_size=MAX_SIZE)
    except ImportError:
        return ours, None

    def run_theirs(image: np.ndarray) -> Any:
        return theirs(image)["instances"].pred_masks.cpu()  # the host copy ours makes too

    return ours, run_theirs


def cases(platform: str) -> list[Case]:
    from detlayers.bench.mask_rcnn import benchmark_weights

    weights, calibrated = benchmark_weights()
    ours, theirs = _predictors(weights, "cuda" if platform == "gpu" else "cpu")
    photos = mixed_size_stream()
    caches = (ours._forward, ours._paste)
    compiles_before = [f._cache_size() for f in caches]
    first_pass: list[float] = []

    def run_ours() -> Any:
        start = time.perf_counter()
        masks = [ours(photo)["pred_masks"] for photo in photos]
        if not first_pass:
            first_pass.append(time.perf_counter() - start)
        return masks

    def summary(ours_s: float, theirs_s: float | None) -> dict[str, Any]:
        network, paste = (f._cache_size() - before for f, before in zip(caches, compiles_before))
        return stream_summary(len(photos), ours_s, theirs_s, (network, paste), first_pass[0])

    name = (f"predictor mixed sizes: {len(photos)} photos one at a time, MIN_SIZE_TEST {MIN_SIZE} "
            f"({'vs detectron2 DefaultPredictor' if theirs else 'detectron2 not installed'})")
    if not calibrated:
        name += " uncalibrated"
    run_theirs = None if theirs is None else (lambda: [theirs(photo) for photo in photos])
    return [Case("predictor_mixed_sizes", name, run_ours, run_theirs, warmup=1, min_repeats=2, summary=summary)]
