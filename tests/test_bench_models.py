"""The ``models`` benchmark family: one row per architecture of the registry table, built lazily.

The rows themselves build full models (minutes of compilation, and detectron2) and are run by
``python -m detlayers.bench models``; here the table is checked against the zoo config functions of
``detlayers.models.config`` and two toy architectures run through the runner.
"""

import gc
import json
import pathlib
import weakref

import numpy as np
import pytest

import detlayers.bench as bench
from detlayers.bench import models
from detlayers.bench.__main__ import main

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _fixtures_of_this_checkout(monkeypatch):
    """The calibration files are this checkout's fixtures (the installed package has no tests folder)."""
    from detlayers.bench.end_to_end import FIXTURES_ENV

    monkeypatch.setenv(FIXTURES_ENV, str(FIXTURES))


def test_one_row_per_zoo_config_function_and_nothing_built_to_list_them(monkeypatch):
    import detlayers.models.config as config

    zoo = {name for name in config.__all__ if name.endswith("_config") and name != "add_deeplab_config"}
    rows = [arch.config_name for arch in models.ARCHITECTURES]
    assert len(rows) == len(set(rows)) == len({a.label for a in models.ARCHITECTURES})
    # a new zoo config function needs a row (or a reason not to have one)
    assert set(rows) | set(models.NOT_BENCHMARKED) == zoo and not set(rows) & set(models.NOT_BENCHMARKED)
    for arch in models.ARCHITECTURES:
        assert callable(arch.config_function())
    monkeypatch.setattr(models._Loaded, "get", lambda *a: pytest.fail("listing the rows built a model"))
    cases = models.cases("cpu")
    assert [c.name for c in cases] == [f"{a.label} 512x1024 end-to-end" for a in models.ARCHITECTURES]
    assert {c.family for c in cases} == {"models"} and bench.FAMILIES["models"] == "detlayers.bench.models"


def test_every_row_finds_the_calibration_its_parity_tests_use():
    assert ("mask_rcnn_bn_calibration.npz",) == models.ARCHITECTURES[0].calibration
    for arch in models.ARCHITECTURES:
        for name in arch.calibration:
            assert models.calibration_path(name) is not None, (arch.label, name)


def test_the_photograph_has_short_side_512_and_is_the_deeplab_familys():
    """(tests/test_deeplab.py checks that photograph and that the resize keeps its size.)"""
    from detlayers.bench import deeplab

    image = models.benchmark_image()
    assert image.shape == (512, 1024, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, deeplab.benchmark_image())


class _ToyPredictor:
    def __init__(self, weights):
        self.weights = weights

    def __call__(self, image):
        return {"pred_boxes": np.full((2, 4), float(image.mean()) + self.weights["w"].sum(), np.float32)}


def test_rows_build_their_models_once_when_timed_and_release_the_previous(monkeypatch, tmp_path, capsys):
    built, state_dict_args, previous_alive = [], [], []
    refs = {}

    def state_dict(*paths):
        state_dict_args.append(paths)
        return {"w": np.ones(3, np.float32)}

    def ours(arch, weights):
        previous_alive.append([label for label, ref in refs.items() if ref() is not None])
        predictor = _ToyPredictor(weights)
        refs[arch.label] = weakref.ref(predictor)
        built.append(arch.label)
        return predictor

    def theirs(arch, weights, device):
        assert device == "cpu"
        return lambda image: image.reshape(-1)[:1]  # one "instance"

    toy = dict(state_dict=state_dict, ours=ours, theirs=theirs, theirs_available=lambda arch: True)
    calibrated = models.Architecture("toy A", "Misc/toy_a.yaml", calibration=("mask_rcnn_gn_calibration.npz",), **toy)
    missing = models.Architecture("toy B", "Misc/toy_b.yaml", calibration=("no_such_file.npz",), **toy)
    monkeypatch.setattr(models, "ARCHITECTURES", (calibrated, missing))
    monkeypatch.setattr(models, "IMAGE_HW", (8, 12))
    gc.collect()
    out = tmp_path / "rows.json"
    assert main(["models", "--min-seconds", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["toy A 8x12 end-to-end", "toy B 8x12 end-to-end uncalibrated"]
    assert all(r["torch_ms"] is not None and r["ratio"] is not None for r in rows)
    assert built == ["toy A", "toy B"]  # once each, although each row calls its models 8 times
    assert previous_alive == [[], []]  # A's models were released before B's were built
    assert state_dict_args == [(models.fixture_file("mask_rcnn_gn_calibration.npz"),), ()]
    assert "toy B 8x12 end-to-end uncalibrated" in capsys.readouterr().out
    # the summary counts the instances of each side's last output (ours: 2 boxes; theirs: a sum)
    assert rows[0]["summary"] == {"instances (ours)": 2, "instances (detectron2)": 1}


def test_detectron2_rows_return_the_boxes_tensor_on_the_host(monkeypatch):
    class Tensor:
        def __init__(self, value):
            self.value = value

        def cpu(self):
            return self.value

    class Boxes:
        tensor = Tensor("boxes")

    class Instances:
        pred_boxes = Boxes()
        pred_masks = Tensor("masks")

    seen = {}

    def default_predictor(weights, **kwargs):
        seen.update(kwargs)
        return lambda image: {"instances": Instances()}

    monkeypatch.setattr(models, "detectron2_default_predictor", default_predictor)
    faster = next(a for a in models.ARCHITECTURES if a.label == "faster_rcnn R50-C4")
    mask = models.ARCHITECTURES[0]
    assert faster.theirs(faster, {}, "cpu")(None) == "boxes"
    assert seen == dict(config="COCO-Detection/faster_rcnn_R_50_C4_3x.yaml", device="cpu", min_size=512,
                        max_size=1024)
    assert mask.theirs(mask, {}, "cuda")(None) == "masks" and seen["device"] == "cuda"
