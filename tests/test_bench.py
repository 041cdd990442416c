"""The benchmark runner: a table row and a JSON row per case, on a tiny family made here."""

import json
import sys
import types

import jax
import jax.numpy as jnp
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
