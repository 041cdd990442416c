"""``python -m detlayers.demo`` out of memory: one clear error line and exit status 5, no hang and
no traceback.

The demo runs in a child process (one device, one step, no evaluation) whose training step (the
R18-FPN Mask R-CNN on 256x256 images, 48 a step) needs far more scratch memory than the cap below
leaves. A hook on ``make_train_step`` compiles the step ahead of time (the jitted call reuses that
compilation), then caps the address space (``RLIMIT_AS``) at what the process already has plus
256 MiB: room for the next prefetched batches (47 MB each) and the step's outputs, not for its
scratch buffer. The cap is relative to the process's own size at the step, so the test does not
depend on how much address space JAX reserves on a machine. XLA's LLVM optimisations are off in
the child (buffer sizes do not depend on them): the two compiles take half the time.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

REPO = pathlib.Path(__file__).parents[1]
FLAGS = ["--steps", "1", "--devices", "1", "--eval-images", "0", "--no-progress",
         "--image-size", "256", "--batch-size", "48"]

_CHILD = """
import resource
import sys

import detlayers.demo.train as train
from detlayers.demo.__main__ import main

make_train_step = train.make_train_step


def capped_make_train_step(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def first_step(*step_args):
        step_fn.lower(*step_args).compile()  # cached: the call below does not compile again
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        limit = vm + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print("address space capped", flush=True)
        return step_fn(*step_args)

    return first_step


train.make_train_step = capped_make_train_step
sys.exit(main({flags!r}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_training_out_of_memory_is_one_clear_line_and_exit_status_5(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    script = textwrap.dedent(_CHILD.format(flags=FLAGS + ["--out", str(tmp_path)]))
    # a hang (reading the outputs of the failed step) ends at the timeout and fails the test
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "address space capped" in result.stdout, output[-3000:]
    assert result.returncode == 5, output[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for part in ("out of memory in training step 1", "48 images of 256x256 a step",
                 "lower --batch-size (now 48) or --image-size (now 256)", "RESOURCE_EXHAUSTED"):
        assert part in errors[0], (part, errors[0])


@pytest.mark.parametrize("raised, converted", [
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 750587216 bytes.\n  at ..."), True),
    (jax.errors.JaxRuntimeError("INTERNAL: Out of memory while compiling"), True),
    (jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes differ"), False),
    (MemoryError("RESOURCE_EXHAUSTED in a Python allocation"), False),  # not XLA's: passes unchanged
])
def test_out_of_memory_as_converts_only_xla_allocation_failures(raised, converted):
    from detlayers._out_of_memory import out_of_memory_as

    class Clear(MemoryError):
        pass

    with pytest.raises(Clear if converted else type(raised)) as info:
        with out_of_memory_as(lambda xla: Clear(f"clear: {xla}")):
            raise raised
    if converted:  # XLA's first line only, chained to the original
        assert str(info.value) == f"clear: {str(raised).splitlines()[0]}" and info.value.__cause__ is raised
    else:
        assert info.value is raised
