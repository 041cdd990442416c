#!/usr/bin/env bash
# Everything the CUDA NMS kernels need checked on a real GPU, as one command (run from the
# repository root on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc, compute-sanitizer) and a
# CUDA build of jaxlib in the active Python environment, e.g. pip install "jax[cuda13]"):
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check_out)
#
# Steps, each logged to OUT_DIR; the script stops at the first failure:
#  1. build and install with the CUDA kernels required (-Ccmake.define.DETLAYERS_CUDA=ON);
#  2. the loader's driver/device check, then the NMS tests on the GPU (every fixture through the
#     CUDA custom call), plus the simulator test;
#  3. the same NMS tests with XLA command buffers (CUDA graphs) covering custom calls, since the
#     handlers are declared command-buffer compatible;
#  4. compute-sanitizer memcheck, racecheck, synccheck and initcheck on a small script that runs
#     all four NMS variants (vmapped, N across tile boundaries, several K);
#  5. the benchmark table (python -m detlayers.bench nms) as JSON, to be copied to BENCHMARKS.md.
set -euo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python}
log() { echo "gpu_check: $*"; }

log "1/5 build and install (DETLAYERS_CUDA=ON)"
"$py" -m pip install ".[test]" -Ccmake.define.DETLAYERS_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=native \
  >"$out/install.log" 2>&1 || { tail -50 "$out/install.log"; exit 1; }

log "2/5 runtime check and NMS tests on the GPU"
"$py" - <<'PY' | tee "$out/runtime_check.txt"
import ctypes, jax
from detlayers import _nms_library
path = next(p for p in _nms_library.library_candidates("libdetlayers_cuda.so") if p.is_file())
problem = _nms_library.cuda_runtime_problem(ctypes.CDLL(str(path)))
print("devices:", jax.devices())
print("cuda library:", path, "| runtime check:", problem or "ok")
assert jax.devices()[0].platform == "gpu", "JAX sees no GPU"
assert not problem, problem
assert _nms_library.has_target("cuda", "detlayers_nms_rotated")
PY
"$py" -m pytest tests/test_nms.py tests/test_cuda_simulation.py -q -p no:cacheprovider -o addopts="" -n 4 \
  2>&1 | tee "$out/pytest.log"

log "3/5 NMS tests with command buffers (CUDA graphs) for custom calls"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
  "$py" -m pytest tests/test_nms.py -q -p no:cacheprovider -o addopts="" -n 4 -k "torchvision or detectron2 or vmap" \
  2>&1 | tee "$out/pytest_command_buffers.log"

log "4/5 compute-sanitizer"
cat >"$out/sanitize_nms.py" <<'PY'
import jax, jax.numpy as jnp, numpy as np
import detlayers as L
rng = np.random.default_rng(0)
for n in (1, 63, 64, 65, 129, 1000):
    xy = rng.uniform(0, 200, (4, n, 2)).astype(np.float32)
    wh = rng.uniform(1, 60, (4, n, 2)).astype(np.float32)
    axis = np.concatenate([xy, xy + wh], -1)
    rotated = np.concatenate([xy + wh / 2, wh, rng.uniform(-180, 180, (4, n, 1)).astype(np.float32)], -1)
    scores = rng.random((4, n)).astype(np.float32)
    idxs = rng.integers(0, 3, (4, n)).astype(np.int32)
    for k in (None, max(n // 3, 1)):
        for fn, boxes, extra in ((L.nms, axis, ()), (L.batched_nms, axis, (idxs,)),
                                 (L.nms_rotated, rotated, ()), (L.batched_nms_rotated, rotated, (idxs,))):
            run = jax.jit(jax.vmap(lambda b, s, *e: fn(b, s, *e, 0.5, max_output_size=k)))
            jax.block_until_ready(run(boxes, scores, *extra))
print("ok")
PY
for tool in memcheck racecheck synccheck initcheck; do
  log "  compute-sanitizer --tool $tool"
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    --kernel-name kns=nms_ "$py" "$out/sanitize_nms.py" >"$out/sanitizer_$tool.log" 2>&1 \
    || { tail -40 "$out/sanitizer_$tool.log"; exit 1; }
  tail -3 "$out/sanitizer_$tool.log"
done

log "5/5 benchmark"
"$py" -m detlayers.bench nms --json "$out/bench_nms.json" 2>&1 | tee "$out/bench_nms.txt"
log "done: results in $out"
