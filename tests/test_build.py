"""The build compiles exactly the custom-call sources it names, and the installed package carries them."""

import pathlib
import shutil
import subprocess

import pytest

from detlayers import _nms_library

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_cpu_custom_calls_are_built_and_registered_when_a_compiler_exists():
    # Without this, a broken build would pass silently: every op falls back to pure XLA.
    assert _nms_library.has_target("cpu", "detlayers_nms")
    for target in ("detlayers_batched_nms", "detlayers_nms_rotated", "detlayers_batched_nms_rotated"):
        assert _nms_library.has_target("cpu", target), target


def _configure(source: pathlib.Path, build: pathlib.Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build), "-G", "Unix Makefiles", *options],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cmake_refuses_an_unknown_cuda_option(tmp_path):
    # DETLAYERS_CUDA=AUTO|ON|OFF: anything else stops the configuration before any compiler check.
    result = _configure(ROOT, tmp_path, "-DDETLAYERS_CUDA=maybe")
    assert result.returncode != 0
    assert "DETLAYERS_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in result.stderr


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("make") is None, reason="cmake/make not on PATH")
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
def test_default_build_compiles_only_the_named_sources(tmp_path):
    # A copy of the build inputs with a stray source beside the real ones: the default target must compile
    # the CPU library from nms_cpu.cc alone (no globbing picks up the stray file) and must not build the
    # test-only CUDA simulator.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "CMakeLists.txt", source)
    shutil.copytree(ROOT / "custom_calls", source / "custom_calls")
    shutil.copytree(ROOT / "tests" / "cpp", source / "tests" / "cpp")
    (source / "custom_calls" / "stray_kernel.cc").write_text("#error a stray source was compiled\n")
    build = tmp_path / "build"
    configured = _configure(source, build, "-DDETLAYERS_CUDA=OFF")
    assert configured.returncode == 0, configured.stderr
    dry_run = subprocess.run(["make", "-n", "-C", str(build)], capture_output=True, text=True, timeout=120)
    assert dry_run.returncode == 0, dry_run.stderr
    compiled = {pathlib.Path(word).name for line in dry_run.stdout.splitlines() if " -c " in line
                for word in line.split() if word.endswith((".cc", ".cu", ".cpp"))}
    assert compiled == {"nms_cpu.cc"}
    assert "nms_cuda_simulator" not in dry_run.stdout
    # The simulator is still a target one can ask for by name.
    targets = subprocess.run(["make", "-C", str(build), "help"], capture_output=True, text=True, timeout=60)
    assert "nms_cuda_simulator" in targets.stdout


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
