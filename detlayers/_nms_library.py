"""Loading of the compiled NMS kernels (``custom_calls/``) and their XLA FFI registration (private).

The build (CMake via scikit-build-core) installs up to two plain shared libraries into
``detlayers/_lib``: ``libdetlayers_cpu.so`` (C++ handlers) and ``libdetlayers_cuda.so`` (CUDA
handlers). They have no Python ABI, so they are opened with :mod:`ctypes`; each exported handler
symbol is wrapped with :func:`jax.ffi.pycapsule` and registered with
:func:`jax.ffi.register_ffi_target` under the platform it runs on ("cpu" or "CUDA").

Search order for each library: the directory named by the environment variable
``DETLAYERS_LIB_DIR`` (if set), then ``_lib/`` in every entry of the ``detlayers`` package path
(its import spec's ``submodule_search_locations``, which ``detlayers.__path__`` is made from: an
editable install keeps the compiled files in site-packages while the sources stay in the
checkout), then the ``_lib/`` of the installed ``detlayers`` distribution (so that
``python -m detlayers.demo`` run from a checkout, which imports the checkout's sources, still finds
the libraries that ``pip install .`` built). A missing or unloadable library is not an error: the
ops that would use it fall back to their pure-XLA implementation, and one :class:`RuntimeWarning`
says so. Neither is a CUDA library
that cannot run here (built with a newer CUDA than the installed driver supports, or without code
for the GPU): when JAX has CUDA devices, the library's own check
(``DetlayersNmsCudaCheckRuntime``) runs before anything is registered. A library that loads but
lacks one of the handler symbols is stale or broken, and that is an error (rebuild it).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import threading
import warnings

import jax

LIB_DIR_ENV = "DETLAYERS_LIB_DIR"

# FFI target name -> exported handler symbol, per library.
_CPU_TARGETS: dict[str, str] = {
    "detlayers_nms": "DetlayersNmsCpu",
    "detlayers_batched_nms": "DetlayersBatchedNmsCpu",
    "detlayers_nms_rotated": "DetlayersNmsRotatedCpu",
    "detlayers_batched_nms_rotated": "DetlayersBatchedNmsRotatedCpu",
}
_CUDA_TARGETS: dict[str, str] = {
    "detlayers_nms": "DetlayersNmsCuda",
    "detlayers_batched_nms": "DetlayersBatchedNmsCuda",
    "detlayers_nms_rotated": "DetlayersNmsRotatedCuda",
    "detlayers_batched_nms_rotated": "DetlayersBatchedNmsRotatedCuda",
}
# Exported by the CUDA library: int DetlayersNmsCudaCheckRuntime(char* message, int size).
_CUDA_CHECK_SYMBOL = "DetlayersNmsCudaCheckRuntime"
_LIBRARIES: dict[str, tuple[str, str, dict[str, str]]] = {
    # key -> (file name, XLA platform name, targets)
    "cpu": ("libdetlayers_cpu.so", "cpu", _CPU_TARGETS),
    "cuda": ("libdetlayers_cuda.so", "CUDA", _CUDA_TARGETS),
}

_lock = threading.Lock()
_warned = False


def library_candidates(file_name: str) -> list[pathlib.Path]:
    """Paths where ``file_name`` is looked for, in order: ``$DETLAYERS_LIB_DIR/file_name`` when
    that variable is set, then ``<entry>/_lib/file_name`` for each entry of the package path
    (``detlayers.__path__``), then the installed distribution's ``detlayers/_lib/file_name``. The
    paths need not exist."""
    dirs: list[pathlib.Path] = []
    override = os.environ.get(LIB_DIR_ENV)
    if override:
        dirs.append(pathlib.Path(override))
    dirs.extend(entry / "_lib" for entry in _package_dirs())
    installed = _installed_lib_dir()
    if installed is not None and installed not in dirs:
        dirs.append(installed)
    return [d / file_name for d in dirs]


def _package_dirs() -> list[pathlib.Path]:
    """The entries of the ``detlayers`` package path: its import spec's
    ``submodule_search_locations`` (the package is imported before any of its modules, so the
    lookup imports nothing), or the directory of this file when the spec lists none."""
    spec = importlib.util.find_spec(__package__)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return [pathlib.Path(__file__).parent]
    return [pathlib.Path(entry) for entry in locations]


def _installed_lib_dir() -> pathlib.Path | None:
    try:
        distribution = importlib.metadata.distribution("detlayers")
    except importlib.metadata.PackageNotFoundError:
        return None
    return pathlib.Path(str(distribution.locate_file("detlayers/_lib")))


def _find(file_name: str) -> pathlib.Path | None:
    for path in library_candidates(file_name):
        if path.is_file():
            return path
    return None


@functools.cache
def _load(key: str) -> frozenset[str]:
    """Opens one library and registers its handlers; returns the registered target names."""
    file_name, platform, targets = _LIBRARIES[key]
    path = _find(file_name)
    if path is None:
        return frozenset()
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as err:  # e.g. built for another architecture
        _warn_once(f"could not load {path}: {err}")
        return frozenset()
    required = list(targets.values()) + ([_CUDA_CHECK_SYMBOL] if key == "cuda" else [])
    missing = [symbol for symbol in required if not hasattr(lib, symbol)]
    if missing:
        raise RuntimeError(
            f"detlayers: {path} does not export {', '.join(missing)}: the library is stale or broken; "
            "rebuild it (pip install .)"
        )
    if key == "cuda" and _jax_has_cuda():
        problem = cuda_runtime_problem(lib)
        if problem:
            _warn_once(f"the CUDA custom calls in {path} cannot run here: {problem}")
            return frozenset()
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform=platform)
    return frozenset(targets)


def _jax_has_cuda() -> bool:
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:  # no CUDA backend in this jaxlib, or no GPU
        return False


def cuda_runtime_problem(lib: ctypes.CDLL) -> str:
    """Why the CUDA library ``lib`` cannot run on this machine's driver and GPUs ("" if it can)."""
    check = getattr(lib, _CUDA_CHECK_SYMBOL)
    check.restype = ctypes.c_int
    check.argtypes = [ctypes.c_char_p, ctypes.c_int]
    message = ctypes.create_string_buffer(512)
    if check(message, len(message)) == 0:
        return ""
    return message.value.decode(errors="replace") or "unknown CUDA error"


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"detlayers: {message}; using the pure-XLA NMS instead", RuntimeWarning, stacklevel=3)


def available_targets(key: str) -> frozenset[str]:
    """FFI targets registered from library ``key`` ("cpu" or "cuda"), loading it on first use."""
    with _lock:
        return _load(key)


def has_target(key: str, target: str) -> bool:
    """True when ``target`` (e.g. ``"detlayers_nms"``) is registered from library ``key`` ("cpu" or
    "cuda"); loads and registers that library on first use. False when it is absent or unloadable."""
    return target in available_targets(key)


def warn_if_missing(target: str) -> None:
    """Warns once per process when no compiled CPU handler exists for ``target``.

    (A CUDA library is only expected where nvcc was found at build time, so its absence is quiet;
    the pure-XLA path is used on GPU then.)
    """
    if not has_target("cpu", target):
        where = ", ".join(str(p.parent) for p in library_candidates(_LIBRARIES["cpu"][0]))
        _warn_once(f"no compiled custom call {target!r} (looked in {where})")
