"""Multi-process runs: 2 processes x 2 CPU devices joined by jax.distributed on localhost.

The reference is an independent float64 NumPy batch norm (forward, backward and running-stat
update written out by hand) over the concatenated real examples of all devices.
"""

import io
import pathlib
import sys

import numpy as np
import pytest
from helpers import load_npz

from detlayers.distributed.launch import launch

HERE = pathlib.Path(__file__).parent
EPS, MOMENTUM = 1e-5, 0.1
CASES = {"equal": [3, 3, 3, 3], "masked": [3, 1, 2, 2], "empty_device": [2, 3, 0, 1],
         "N_masked": [3, 1, 2, 2],
         "N_empty_device": [2, 0, 3, 1]}


# cases whose layer is NaiveSyncBatchNorm: detectron2's biased running variance
BIASED_RUNNING_VAR = {"equal", "N_masked", "N_empty_device"}


def _reference_batch_norm(x, cot, scale, bias, mean0, var0, unbiased=True):
    """Training-mode BN over rows of x[n, ..., C] in float64: output, grads, new running stats."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    g = cot.astype(np.float64).reshape(-1, x.shape[-1])
    n = x.shape[0]
    mu = x.mean(0)
    var = ((x - mu) ** 2).mean(0)
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mu) * inv
    y = xhat * scale + bias
    grad_bias = g.sum(0)
    grad_scale = (g * xhat).sum(0)
    gxhat = g * scale
    grad_x = inv / n * (n * gxhat - gxhat.sum(0) - xhat * (gxhat * xhat).sum(0))
    new_mean = mean0 + MOMENTUM * (mu - mean0)
    new_var = var0 + MOMENTUM * ((var * n / (n - 1) if unbiased else var) - var0)
    return y, grad_x, grad_scale, grad_bias, new_mean, new_var


@pytest.fixture(scope="session")  # not module: see tests/conftest.py (xdist groups)
def sync_bn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "sync_bn.npz"
    log = io.StringIO()
    code = launch([sys.executable, str(HERE / "multiprocess" / "sync_bn_worker.py"), str(out)],
                  2, devices_per_process=2, timeout=240, sink=log)
    assert code == 0, f"multi-process run failed ({code}):\n{log.getvalue()}"
    return load_npz(out)


@pytest.mark.xdist_group("multiprocess_sync_bn")  # one worker, one multi-process run (tests/conftest.py)
@pytest.mark.parametrize("mapping", ["pmap", "shard_map"])
@pytest.mark.parametrize("case", list(CASES))
def test_sync_batch_norm_across_processes_equals_batch_norm_on_real_examples(
        sync_bn_run, case, mapping):
    r = sync_bn_run
    counts = CASES[case]
    real = np.concatenate([r["x"][d, :n] for d, n in enumerate(counts)])
    cot = np.concatenate([r["cot"][d, :n] for d, n in enumerate(counts)])
    y, gx, gs, gb, m, v = _reference_batch_norm(real, cot, r["scale"], r["bias"], r["mean"], r["var"],
                                                unbiased=case not in BIASED_RUNNING_VAR)
    got_y = np.concatenate([r[f"{case}/{mapping}/y"][d, :n] for d, n in enumerate(counts)])
    got_gx = np.concatenate([r[f"{case}/{mapping}/grad_x"][d, :n] for d, n in enumerate(counts)])
    np.testing.assert_allclose(got_y.reshape(y.shape), y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_gx.reshape(gx.shape), gx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r[f"{case}/{mapping}/grad_scale"], gs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r[f"{case}/{mapping}/grad_bias"], gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r[f"{case}/{mapping}/mean"], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r[f"{case}/{mapping}/var"], v, rtol=1e-5, atol=1e-6)


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    script = tmp_path / "fail_one.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['DETLAYERS_PROCESS_ID'] == '1':\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n")
    log = io.StringIO()
    code = launch([sys.executable, str(script)], 3, timeout=60, sink=log)
    assert code == 3
    assert "stopping the others" in log.getvalue()


def test_launcher_prefixes_output_and_passes_process_ids(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("import os\nprint('id', os.environ['DETLAYERS_PROCESS_ID'],"
                      " os.environ['DETLAYERS_NUM_PROCESSES'])\n")
    log = io.StringIO()
    assert launch([sys.executable, str(script)], 2, timeout=60, sink=log) == 0
    lines = sorted(log.getvalue().splitlines())
    assert lines == ["[0] id 0 2", "[1] id 1 2"]


def test_launcher_reports_a_killed_process_with_the_shells_signal_code(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, time\n"
        "if os.environ['DETLAYERS_PROCESS_ID'] == '0':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(120)\n")
    log = io.StringIO()
    assert launch([sys.executable, str(script)], 2, timeout=60, sink=log) == 128 + 9
    assert "process 0 was killed by signal 9; stopping the others" in log.getvalue()
