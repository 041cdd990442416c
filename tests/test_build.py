"""The installed package carries the custom-call libraries its build machine could compile."""

import pathlib
import shutil
import subprocess

import pytest

from detlayers import _ffi


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_cpu_custom_calls_are_built_and_registered_when_a_compiler_exists():
    # Without this, a broken build would pass silently: every op falls back to pure XLA.
    assert _ffi.has_target("cpu", "detlayers_nms")
    for target in ("detlayers_batched_nms", "detlayers_nms_rotated", "detlayers_batched_nms_rotated"):
        assert _ffi.has_target("cpu", target), target


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cmake_cuda_option_is_checked_and_sources_are_explicit(tmp_path):
    # DETLAYERS_CUDA=AUTO|ON|OFF: anything else stops the configuration before any compiler check.
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DDETLAYERS_CUDA=maybe"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DETLAYERS_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in result.stderr
    # Every source is named (a stray file is never compiled in), and the simulator is test-only.
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "GLOB" not in cmake
    assert "nms_cuda_simulator EXCLUDE_FROM_ALL" in cmake
