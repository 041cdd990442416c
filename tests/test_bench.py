"""The benchmark runner: a table row and a JSON row per case, on a tiny family made here."""

import dataclasses
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detlayers.bench as bench
from detlayers.bench.__main__ import main


def _install_family(monkeypatch, name, cases_fn):
    module = types.ModuleType(f"_bench_test_{name}")
    module.cases = cases_fn
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(bench, "FAMILIES", {name: module.__name__})


def _tiny_cases(platform):
    x = jnp.arange(16.0)
    add = jax.jit(lambda: x + 1.0)
    calls = {"torch": 0}

    def fake_torch():
        calls["torch"] += 1
        return None

    return [bench.Case("tiny", f"add one N=16 on {platform}", add, fake_torch),
            bench.Case("tiny", "add one, no counterpart", add, None)]


def test_runner_prints_one_row_per_case_and_writes_json(monkeypatch, tmp_path, capsys):
    _install_family(monkeypatch, "tiny", _tiny_cases)
    out = tmp_path / "rows.json"
    assert main(["tiny", "--json", str(out), "--min-seconds", "0.01"]) == 0
    table = capsys.readouterr().out
    assert f"add one N=16 on {jax.default_backend()}" in table
    assert "add one, no counterpart" in table and "n/a" in table
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == [f"add one N=16 on {jax.default_backend()}",
                                         "add one, no counterpart"]
    first, second = rows
    assert first["family"] == "tiny" and first["ours_ms"] > 0 and first["torch_ms"] > 0
    assert first["ratio"] == pytest.approx(first["ours_ms"] / first["torch_ms"])
    assert second["torch_ms"] is None and second["ratio"] is None
    assert first["device"].startswith(jax.devices()[0].platform)


def test_json_to_stdout_keeps_the_table_on_stderr(monkeypatch, capsys):
    _install_family(monkeypatch, "tiny", _tiny_cases)
    assert main(["--json", "-", "--min-seconds", "0.01"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2
    assert "detlayers ms" in captured.err


def test_a_failing_case_is_reported_and_the_rest_still_run(monkeypatch, capsys):
    def cases(platform):
        def boom():
            raise RuntimeError("broken op")
        return [bench.Case("tiny", "broken", boom), *_tiny_cases(platform)[:1]]

    _install_family(monkeypatch, "tiny", cases)
    assert main(["--min-seconds", "0.01"]) == 1
    table = capsys.readouterr().out
    assert "broken" in table and "RuntimeError: broken op" in table
    assert "add one N=16" in table


def test_unknown_family_is_a_usage_error(monkeypatch):
    _install_family(monkeypatch, "tiny", _tiny_cases)
    with pytest.raises(SystemExit):
        main(["no_such_family"])


def test_time_callable_returns_the_median_of_synchronized_calls():
    seen = []
    t = bench.time_callable(lambda: seen.append(1), lambda _: None, warmup=1, min_repeats=5,
                            min_seconds=0.0)
    assert t >= 0 and len(seen) == 6


def test_a_case_summary_is_printed_under_its_row_and_stored_in_json(monkeypatch, tmp_path, capsys):
    seen = []

    def cases(platform):
        def summary(ours_s, torch_s):
            seen.append((ours_s, torch_s))
            return {"images/s": round(10 / ours_s, 3), "compilations": "3 (1 network, 2 mask paste)"}

        return [dataclasses.replace(_tiny_cases(platform)[0], summary=summary)]

    _install_family(monkeypatch, "tiny", cases)
    out = tmp_path / "rows.json"
    assert main(["tiny", "--json", str(out), "--min-seconds", "0.01"]) == 0
    (row,) = json.loads(out.read_text())
    # called once, with the seconds per call the row reports
    assert seen == [(pytest.approx(row["ours_ms"] / 1e3), pytest.approx(row["torch_ms"] / 1e3))]
    assert row["summary"] == {"images/s": round(10 / seen[0][0], 3), "compilations": "3 (1 network, 2 mask paste)"}
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("add one N=16"))
    assert lines[at + 1] == f"    images/s: {row['summary']['images/s']}; compilations: 3 (1 network, 2 mask paste)"


# ---- predictor_mixed_sizes: the photo stream and the summary (the family itself runs for minutes)


def test_crop_and_resize_keeps_the_centered_window_of_the_aspect_ratio_as_bgr():
    from detlayers.bench.predictor_mixed_sizes import crop_and_resize

    rgb = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    # windows of the target's size: the resize keeps them, so the crop is checked exactly
    np.testing.assert_array_equal(crop_and_resize(rgb, 30, 40), rgb[:, 2:42, ::-1])  # too wide: (45 - 40) // 2
    np.testing.assert_array_equal(crop_and_resize(rgb.transpose(1, 0, 2), 40, 30),
                                  rgb.transpose(1, 0, 2)[2:42, :, ::-1])  # too tall
    # a linear ramp: the 30x30 window upsampled twice (bilinear, pixel centres aligned) averages
    # back to the window over every 2x2 block (within half a source pixel's step at the border)
    y, x, c = np.meshgrid(np.arange(30), np.arange(45), np.arange(3), indexing="ij")
    ramp = (4 * x + 2 * y + 10 * c).astype(np.uint8)
    resized = crop_and_resize(ramp, 60, 60)
    assert resized.shape == (60, 60, 3) and resized.dtype == np.uint8
    np.testing.assert_allclose(resized.reshape(30, 2, 30, 2, 3).mean(axis=(1, 3)), ramp[:, 7:37, ::-1], atol=2.5)


def test_mixed_size_stream_has_one_photo_per_size_from_the_sources_in_turn():
    from detlayers.bench.predictor_mixed_sizes import STREAM_SIZES, crop_and_resize, mixed_size_stream

    assert len(set(STREAM_SIZES)) == len(STREAM_SIZES) == 10
    photos = mixed_size_stream(STREAM_SIZES[:3], ("astronaut", "coffee"))
    assert [p.shape for p in photos] == [(*hw, 3) for hw in STREAM_SIZES[:3]]
    import skimage.data

    np.testing.assert_array_equal(photos[2], crop_and_resize(skimage.data.astronaut(), *STREAM_SIZES[2]))
    np.testing.assert_array_equal(photos[1], crop_and_resize(skimage.data.coffee(), *STREAM_SIZES[1]))


def test_network_inputs_are_detectron2s_resized_sizes_padded_to_32():
    from detlayers.bench.predictor_mixed_sizes import network_inputs

    # 480x640 -> short side 320: 320 x 426.67 -> 320x427 -> 320x448; 640x1024 -> 320x512 (the cap);
    # 1024x683 -> 479.77x320 -> 480x320; 375x500 has 480x640's aspect ratio
    assert network_inputs([(480, 640), (640, 1024), (1024, 683), (375, 500)], 320, 512) == {
        (320, 448), (320, 512), (480, 320)}
    # 300x1200 -> 320x1280, capped at 512 -> 128x512
    assert network_inputs([(300, 1200)], 320, 512) == {(128, 512)}


def test_stream_summary_gives_images_per_second_and_the_ratio():
    from detlayers.bench.predictor_mixed_sizes import stream_summary

    both = stream_summary(10, 2.0, 5.0, (4, 7), 61.234)
    assert both == {"images/s": 5.0, "detectron2 images/s": 2.0, "images/s ratio": 2.5,
                    "compilations": "11 (4 network, 7 mask paste)", "first pass s (compiles included)": 61.23}
    alone = stream_summary(10, 4.0, None, (1, 0), 9.0)
    assert alone["detectron2 images/s"] == "detectron2 not installed" and "images/s ratio" not in alone
    assert alone["images/s"] == 2.5
