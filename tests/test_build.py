"""The installed package carries the custom-call libraries its build machine could compile."""

import shutil

import pytest

from detlayers import _ffi


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_cpu_custom_calls_are_built_and_registered_when_a_compiler_exists():
    # Without this, a broken build would pass silently: every op falls back to pure XLA.
    assert _ffi.has_target("cpu", "detlayers_nms")
    for target in ("detlayers_batched_nms", "detlayers_nms_rotated", "detlayers_batched_nms_rotated"):
        assert _ffi.has_target("cpu", target), target
