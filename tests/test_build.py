"""The installed package carries the custom-call libraries its build machine could compile."""

import pathlib
import shutil
import subprocess

import pytest

from detlayers import _nms_library


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_cpu_custom_calls_are_built_and_registered_when_a_compiler_exists():
    # Without this, a broken build would pass silently: every op falls back to pure XLA.
    assert _nms_library.has_target("cpu", "detlayers_nms")
    for target in ("detlayers_batched_nms", "detlayers_nms_rotated", "detlayers_batched_nms_rotated"):
        assert _nms_library.has_target("cpu", target), target


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


def test_libraries_are_looked_for_in_the_three_documented_places(monkeypatch, tmp_path):
    # $DETLAYERS_LIB_DIR first, then _lib/ in every entry of the package path (an editable install
    # has two: the checkout's sources and site-packages' compiled files), then the installed
    # distribution's _lib/. The loader reads the package path from the import spec.
    import detlayers

    override, checkout, site, dist = (tmp_path / d for d in ("override", "checkout", "site", "dist"))
    monkeypatch.setenv(_nms_library.LIB_DIR_ENV, str(override))
    monkeypatch.setattr(detlayers.__spec__, "submodule_search_locations", [str(checkout), str(site)])
    monkeypatch.setattr(_nms_library, "_installed_lib_dir", lambda: dist / "_lib")
    name = "libdetlayers_cpu.so"
    assert _nms_library.library_candidates(name) == [
        override / name, checkout / "_lib" / name, site / "_lib" / name, dist / "_lib" / name
    ]
    # the first existing file wins: here the editable install's compiled copy in site-packages
    (site / "_lib").mkdir(parents=True)
    (site / "_lib" / name).write_bytes(b"")
    assert _nms_library._find(name) == site / "_lib" / name


def test_without_the_variable_the_package_directory_comes_first(monkeypatch):
    import detlayers

    monkeypatch.delenv(_nms_library.LIB_DIR_ENV, raising=False)
    first = _nms_library.library_candidates("libdetlayers_cpu.so")[0]
    assert first == pathlib.Path(detlayers.__file__).parent / "_lib" / "libdetlayers_cpu.so"
