"""Loading PyTorch / detectron2 weights into the Flax variables of detlayers modules."""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detlayers._module_trace import trace_init

__all__ = ["load_torch_state_dict", "read_state_dict", "flax_name_to_torch", "torch_state_dict"]

_TRAILING_INDICES = re.compile(r"^(.*?)((?:_\d+)+)$")
# Leaf names: Flax -> PyTorch, per collection.
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STATS_NAMES = {"mean": "running_mean", "var": "running_var", "scale": "weight", "bias": "bias"}
# Entries of a state dict that carry no weights.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def flax_name_to_torch(name: str) -> str:
    """One Flax module name as PyTorch's dotted path: list positions become path components.

    ``convs_0`` -> ``convs.0``, ``convs_4_1`` -> ``convs.4.1`` (an element of a
    ``Sequential`` inside a ``ModuleList``), ``res2_0`` -> ``res2.0``; names without trailing
    ``_<digits>`` (``project``, ``fpn_lateral2``, ``norm``) are unchanged.
    """
    match = _TRAILING_INDICES.match(name)
    if not match or not match.group(1):
        return name
    return match.group(1) + "." + ".".join(match.group(2)[1:].split("_"))


# dtype kinds a weight may have: bool, signed / unsigned integer, floating
_NUMERIC_KINDS = "biuf"


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """``value`` as a NumPy array of a real numeric dtype; anything else is a ``TypeError``
    (object, string, complex arrays are never coerced: casting them to float would give NaN or
    silently drop the imaginary part)."""
    if isinstance(value, np.ndarray):
        array = value
    elif type(value).__module__.startswith("torch"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: widen exactly
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(value, (jax.Array, np.generic, int, float, list, tuple)):
        array = np.asarray(value)
    else:
        raise TypeError(f"load_torch_state_dict: entry {key!r} is a {type(value).__name__}, not an array")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"load_torch_state_dict: entry {key!r} has dtype {array.dtype}, not a real numeric "
            f"dtype (bool, integer or floating); object, string and complex arrays are refused"
        )
    return array


# The globals a detectron2 model-zoo .pkl may name: NumPy array / dtype / scalar reconstruction
# (under both spellings of NumPy's core module: numpy.core before NumPy 2, numpy._core after) and
# OrderedDict; protocol-2 pickles written by Python 3 also name _codecs.encode for bytes (handled
# in find_class). Anything else (os.system, builtins.eval, subprocess, ...) is refused before it
# is called.
def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; only text codecs."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode(encoding, errors)


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, strings, numbers and NumPy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_pickle_globals().get((module, name))
        if allowed is not None:
            return allowed
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


# Bounds on what a .pkl may describe. The pickle memo lets one object be referenced many times,
# so a few KB can describe a list holding the same 1000-element list 1000 times, nested again:
# billions of elements once anything walks or converts it (np.asarray of it allocates them all).
# Every element of a structure without such sharing costs at least one byte of the file, so a
# budget of max(file size, 2**20) elements never refuses an honest file; model-zoo files are a
# dict of a few hundred arrays, nested 2-3 deep.
MAX_PICKLE_DEPTH = 100
MIN_PICKLE_ELEMENT_BUDGET = 1 << 20
_CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(container: Any) -> list[Any]:
    if isinstance(container, dict):
        return [item for pair in container.items() for item in pair]
    return list(container)


def _check_pickle_expansion(data: Any, path: str, file_size: int) -> None:
    """Refuses a structure that nests deeper than :data:`MAX_PICKLE_DEPTH`, refers to itself,
    or expands (shared references counted each time) beyond ``max(file_size, 2**20)`` elements.

    The walk is iterative and visits each container once (a shared one's size is remembered),
    so it is cheap whatever the structure expands to.
    """
    budget = max(file_size, MIN_PICKLE_ELEMENT_BUDGET)
    sizes: dict[int, int] = {}  # id(container) -> elements it expands to, itself included
    on_path: set[int] = set()  # containers entered and not finished: the current nesting
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        obj, finished = stack.pop()
        if not isinstance(obj, _CONTAINERS):
            continue
        key = id(obj)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(child), 1) for child in _children(obj))
            if sizes[key] > budget:
                raise ValueError(
                    f"load_torch_state_dict: {path!r} describes more than {budget} nested elements in "
                    f"{file_size} bytes (one object referenced many times, e.g. a list of the same list, "
                    "which expands when read); refused: a weights file is a dict of arrays")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError(f"load_torch_state_dict: {path!r} holds a {type(obj).__name__} that contains "
                             "itself; refused: a weights file is a dict of arrays")
        on_path.add(key)
        if len(on_path) > MAX_PICKLE_DEPTH:
            raise ValueError(f"load_torch_state_dict: {path!r} nests containers more than {MAX_PICKLE_DEPTH} "
                             "deep; refused: a weights file is a dict of arrays")
        stack.append((obj, True))
        stack.extend((child, False) for child in _children(obj)
                     if isinstance(child, _CONTAINERS) and id(child) not in sizes)


def _read_pickle(path: str) -> Any:
    """A detectron2 model-zoo ``.pkl`` read without running code from it, and without letting
    a small file describe an enormous structure (:func:`_check_pickle_expansion`)."""
    expected = "a pickled dict of NumPy arrays (detectron2 model-zoo .pkl)"
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"load_torch_state_dict: {path!r} is empty; expected {expected}")
    try:
        data = _WeightsUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"load_torch_state_dict: {path!r} refers to {err}, which a weights file does not need; "
            f"refused (reading it could run code). Only {expected} is read"
        ) from None
    except Exception as err:  # truncated, random or foreign bytes: whatever the unpickler says
        raise ValueError(
            f"load_torch_state_dict: {path!r} is not {expected} (it may be truncated or "
            f"corrupt): {type(err).__name__}: {err}"
        ) from err
    _check_pickle_expansion(data, path, len(raw))
    return data


def _read_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"load_torch_state_dict: reading {path!r} needs torch installed") from err
    if os.path.getsize(path) == 0:
        raise ValueError(f"load_torch_state_dict: {path!r} is empty; expected a PyTorch .pth/.pt file (torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"load_torch_state_dict: {path!r} could not be read as a PyTorch .pth/.pt file "
            f"(torch.save, loaded with weights_only=True; it may be truncated, corrupt or hold "
            f"objects other than tensors): {type(err).__name__}: {err}"
        ) from err


def _unwrap(data: Any, source: str) -> Mapping:
    """The weights inside a checkpoint: ``data["model"]``, ``data["state_dict"]`` or ``data``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"load_torch_state_dict: {source} holds a {type(data).__name__}, not a dict of weights")
    for wrapper in ("model", "state_dict"):
        if wrapper not in data:
            continue
        inner = data[wrapper]
        if isinstance(inner, Mapping):
            return inner
        if not _is_array(inner):  # an array is a weight that happens to be named so
            raise TypeError(
                f"load_torch_state_dict: {source}[{wrapper!r}] is a {type(inner).__name__}; expected a dict "
                f"{{parameter name: array}} there (detectron2 checkpoints keep the weights under {wrapper!r})")
    return data


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, jax.Array)) or type(value).__module__.startswith("torch")


def read_state_dict(source: Any) -> dict[str, np.ndarray]:
    """A flat ``{dotted name: numpy array}`` from a dict, a ``.pkl`` or a ``.pth`` file.

    * dict: NumPy arrays or torch tensors, possibly wrapped as ``{"model": ...}`` /
      ``{"state_dict": ...}``.
    * ``.pkl``: detectron2 model-zoo format, a pickled dict with the weights under ``"model"``
      (other keys such as ``"__author__"`` or ``"matching_heuristics"`` are ignored). It is read
      with a restricted unpickler that builds only dicts, lists, tuples, strings, numbers and
      NumPy arrays/dtypes/scalars (and ``OrderedDict``): a file naming any other global (for
      example ``os.system`` through ``__reduce__``) is refused with a ``ValueError`` naming the
      file and the global, before anything is called. A file whose containers nest more than
      100 deep, contain themselves, or expand through shared references beyond
      ``max(file size, 2**20)`` elements (a few-KB "pickle bomb") is refused the same way.
    * ``.pth``/``.pt``: ``torch.load(..., weights_only=True)`` (needs torch), unwrapped the same
      way (detectron2 training checkpoints keep the model under ``"model"``).

    An empty, truncated or unreadable file raises ``ValueError`` naming the path and the format
    expected; a ``"model"``/``"state_dict"`` entry that is not a dict (a list, say) raises
    ``TypeError`` naming the file and what was expected there. Every weight must be a real
    numeric array (bool, integer or floating); object, string or complex entries raise
    ``TypeError`` (never coerced to NaN or their real part).
    torch ``bfloat16`` tensors are widened to float32.

    ``num_batches_tracked`` entries are dropped, and a ``module.`` prefix shared by every key
    (``DistributedDataParallel`` checkpoints) is removed.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".pkl"):
            data = _read_pickle(path)
        elif path.endswith((".pth", ".pt")):
            data = _read_torch(path)
        else:
            raise ValueError(f"load_torch_state_dict: unknown checkpoint format {path!r} (expected .pkl, .pth or .pt)")
        weights = _unwrap(data, path)
    else:
        weights = _unwrap(source, "state_dict")
    flat = {
        str(k): _to_numpy(v, str(k))
        for k, v in weights.items()
        if not str(k).endswith(_IGNORED_SUFFIXES)
    }
    if flat and all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat


_SEQUENTIAL_CHILD = re.compile(r"^layers_(\d+)$")


def _torch_key(collection: str, path: tuple[str, ...], modules: Mapping[tuple[str, ...], nn.Module]) -> str:
    *module_path, leaf = path
    table = _PARAM_NAMES if collection == "params" else _STATS_NAMES
    names = []
    for depth, name in enumerate(module_path):
        child = _SEQUENTIAL_CHILD.match(name)
        if child and isinstance(modules.get(tuple(module_path[:depth])), nn.Sequential):
            names.append(child.group(1))  # flax's nn.Sequential names its children layers_<i>
        else:
            names.append(flax_name_to_torch(name))
    names.append(table.get(leaf, leaf))
    return ".".join(names)


def _is_frozen_bn_stat(collection: str, leaf: str, owner: nn.Module | None) -> bool:
    from detlayers.batch_norm import FrozenBatchNorm2d

    return collection == "batch_stats" and leaf in ("mean", "var") and isinstance(owner, FrozenBatchNorm2d)


def _is_transposed_conv(owner: nn.Module | None) -> bool:
    from detlayers.wrappers import ConvTranspose2d

    return isinstance(owner, (ConvTranspose2d, nn.ConvTranspose))


def _convert_kernel(
    value: np.ndarray, expected: tuple[int, ...], owner: nn.Module | None
) -> np.ndarray | None:
    """A PyTorch weight in the Flax layout of ``expected``, or None if the shapes cannot match."""
    if value.ndim != len(expected):
        return None
    if value.ndim == 2:  # Linear: [out, in] -> [in, out]
        return value.T
    if value.ndim >= 3 and _is_transposed_conv(owner):
        # [in, out/groups, *k] -> [*k, in/groups, out], with the groups taken from the shapes.
        c_in, c_out_per_group, *k = value.shape
        in_per_group = expected[-2]
        if in_per_group <= 0 or c_in % in_per_group:
            return None
        groups = c_in // in_per_group
        grouped = value.reshape(groups, in_per_group, c_out_per_group, *k)
        n = len(k)
        order = tuple(range(3, 3 + n)) + (1, 0, 2)
        return grouped.transpose(order).reshape(*k, in_per_group, groups * c_out_per_group)
    if value.ndim >= 3:  # Conv: [out, in/groups, *k] -> [*k, in/groups, out]
        n = value.ndim - 2
        return value.transpose(tuple(range(2, 2 + n)) + (1, 0))
    return value


def load_torch_state_dict(module: nn.Module, state_dict: Any, *example_args: Any, **example_kwargs: Any) -> dict:
    """Reads PyTorch/detectron2 weights into the Flax variables of ``module``.

    Args:
      module: any detlayers module or model built from them (unbound).
      state_dict: ``{name: array}`` with detectron2's names (NumPy arrays or torch tensors), or a
        path to a detectron2 model-zoo ``.pkl`` or a ``.pth`` file; see :func:`read_state_dict`.
      example_args, example_kwargs: inputs that ``module.init`` accepts (only their shapes and
        dtypes matter: the init is traced abstractly, nothing is computed).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (collections the module has), ready for
      ``module.apply``; arrays take the dtypes ``init`` would give.

    Name mapping (Flax path -> PyTorch key): module names join with ``.``, trailing ``_<n>``
    become list indices (``convs_4_1`` -> ``convs.4.1``, see :func:`flax_name_to_torch`), the
    ``layers_<i>`` children of a ``flax.linen.Sequential`` become ``<i>`` (``torch.nn.Sequential``), and
    leaves map as ``params/kernel`` -> ``weight``, ``params/scale`` -> ``weight``,
    ``params/bias`` -> ``bias``, ``batch_stats/mean`` -> ``running_mean``, ``batch_stats/var``
    -> ``running_var``, and frozen batch norm's ``batch_stats/scale``/``bias`` -> ``weight``/``bias``
    (detectron2 keeps those as buffers too). Any other leaf keeps its name.

    Layouts: convolution weights ``[out, in/groups, kh, kw]`` -> ``[kh, kw, in/groups, out]``;
    transposed convolutions (``ConvTranspose2d``, recognised from the module that owns the
    kernel) ``[in, out/groups, kh, kw]`` -> ``[kh, kw, in/groups, out]`` (see
    ``conv_transpose2d`` in ``detlayers.wrappers``); linear ``[out, in]`` -> ``[in, out]``; vectors
    unchanged. ``num_batches_tracked`` is ignored.

    A :class:`detlayers.FrozenBatchNorm2d` whose ``running_mean`` and ``running_var`` are both
    absent (detectron2's version-1 format, e.g. ImageNet backbones converted from Caffe2, which keep
    only ``weight`` and ``bias``) gets mean 0 and var 1, as detectron2's ``_load_from_state_dict``
    fills them. Where only one of the two is absent the checkpoint is not of that format (a
    state dict carries no version here), so the absent one is reported missing.

    Raises:
      ValueError: listing every missing key (a Flax variable with no entry), unexpected key (an
        entry no variable uses) and mis-shaped key (the checkpoint's shape after the layout
        transpose beside the shape the variable needs), all at once; or a file that cannot be
        read (see :func:`read_state_dict`).
      TypeError: an entry that is not a real numeric array.
    """
    weights = read_state_dict(state_dict)
    shapes, modules = trace_init(module, example_args, example_kwargs)
    shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}

    missing: list[str] = []
    misshaped: list[str] = []
    used: dict[str, str] = {}
    result: dict[str, Any] = {}

    def fill(collection: str, tree: Mapping, path: tuple[str, ...], out: dict) -> None:
        for name, value in tree.items():
            sub = path + (name,)
            if isinstance(value, Mapping):
                out[name] = {}
                fill(collection, value, sub, out[name])
                continue
            key = _torch_key(collection, sub, modules)
            flax_path = "/".join((collection,) + sub)
            if key in used:
                raise ValueError(
                    f"load_torch_state_dict: Flax variables {used[key]!r} and {flax_path!r} both map to {key!r}"
                )
            used[key] = flax_path
            expected = tuple(value.shape)
            if key not in weights:
                module_prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
                version_1 = not any(module_prefix + stat in weights for stat in ("running_mean", "running_var"))
                if version_1 and _is_frozen_bn_stat(collection, name, modules.get(path)):
                    # detectron2's FrozenBatchNorm2d version-1 checkpoints (ImageNet backbones
                    # converted from Caffe2) carry only weight and bias; detectron2 fills
                    # running_mean with zeros and running_var with ones (not 1 - eps)
                    fill_value = 0.0 if name == "mean" else 1.0
                    out[name] = jnp.full(expected, fill_value, dtype=value.dtype)
                    continue
                missing.append(f"{key} (for {flax_path}, shape {expected})")
                continue
            array = weights[key]
            converted = array
            is_kernel = name == "kernel" and collection == "params"
            if is_kernel:
                converted = _convert_kernel(array, expected, modules.get(path))
            if converted is None:
                misshaped.append(
                    f"{key}: checkpoint shape {tuple(array.shape)} (PyTorch layout) has no "
                    f"transpose to the Flax layout of {flax_path}, which needs {expected}"
                )
                continue
            if tuple(converted.shape) != expected:
                misshaped.append(
                    f"{key}: checkpoint shape {tuple(converted.shape)}"
                    + (f" after the layout transpose (PyTorch layout {tuple(array.shape)})" if is_kernel else "")
                    + f", {flax_path} needs {expected}"
                )
                continue
            out[name] = jnp.asarray(np.ascontiguousarray(converted), dtype=value.dtype)

    for collection, tree in shapes.items():
        result[collection] = {}
        fill(collection, tree, (), result[collection])

    unexpected = sorted(set(weights) - set(used))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append("missing keys:\n  " + "\n  ".join(missing))
        if unexpected:
            parts.append(
                "unexpected keys:\n  "
                + "\n  ".join(f"{k} (shape {tuple(weights[k].shape)})" for k in unexpected)
            )
        if misshaped:
            parts.append("mis-shaped keys:\n  " + "\n  ".join(misshaped))
        raise ValueError(
            f"load_torch_state_dict: the state dict does not fit {type(module).__name__}:\n" + "\n".join(parts)
        )
    return result


def _kernel_to_torch(value: np.ndarray, owner: nn.Module | None) -> np.ndarray:
    """A Flax kernel in PyTorch's layout: the inverse of :func:`_convert_kernel`."""
    if value.ndim == 2:  # Linear: [in, out] -> [out, in]
        return value.T
    if value.ndim >= 3 and _is_transposed_conv(owner):
        # [*k, in/groups, out] -> [in, out/groups, *k]
        n = value.ndim - 2
        *k, in_per_group, c_out = value.shape
        groups = int(getattr(owner, "groups", 1) or 1)
        grouped = value.reshape(*k, in_per_group, groups, c_out // groups)
        order = (n + 1, n, n + 2) + tuple(range(n))
        return grouped.transpose(order).reshape(groups * in_per_group, c_out // groups, *k)
    if value.ndim >= 3:  # Conv: [*k, in/groups, out] -> [out, in/groups, *k]
        n = value.ndim - 2
        return value.transpose((n + 1, n) + tuple(range(n)))
    return value


def torch_state_dict(module: nn.Module, variables: Mapping, *example_args: Any, **example_kwargs: Any) -> dict:
    """The PyTorch / detectron2 state dict of ``module``'s ``variables``: the inverse of
    :func:`load_torch_state_dict` (same names, kernels transposed back to PyTorch's layouts).

    Args:
      module: the unbound module the variables belong to.
      variables: ``{"params": ..., "batch_stats": ...}`` (other collections are ignored).
      example_args, example_kwargs: inputs ``module.init`` accepts (traced abstractly, to find
        the module that owns each kernel, e.g. transposed convolutions).

    Returns:
      ``{dotted PyTorch name: np.ndarray}`` in the order of the variable tree: convolutions
      ``[out, in/groups, kh, kw]``, transposed convolutions ``[in, out/groups, kh, kw]``, linear
      ``[out, in]``, norms' ``weight``/``bias``/``running_mean``/``running_var``.

    Raises:
      ValueError: two variables mapping to one name, or a variable tree that is not ``module``'s
        (listing the missing and unexpected variable paths).
    """
    shapes, modules = trace_init(module, example_args, example_kwargs)
    shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
    given = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
    expected_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)}
    given_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(given)}
    if expected_paths != given_paths:
        missing = sorted(expected_paths - given_paths)
        unexpected = sorted(given_paths - expected_paths)
        raise ValueError(
            f"torch_state_dict: the variables are not those of {type(module).__name__}: missing "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}

    def visit(collection: str, tree: Mapping, path: tuple[str, ...]) -> None:
        for name, value in tree.items():
            sub = path + (name,)
            if isinstance(value, Mapping):
                visit(collection, value, sub)
                continue
            key = _torch_key(collection, sub, modules)
            flax_path = "/".join((collection,) + sub)
            if key in origin:
                raise ValueError(
                    f"torch_state_dict: Flax variables {origin[key]!r} and {flax_path!r} both map to {key!r}")
            origin[key] = flax_path
            array = np.asarray(value)
            if name == "kernel" and collection == "params":
                array = _kernel_to_torch(array, modules.get(path))
            out[key] = np.ascontiguousarray(array)

    for collection, tree in given.items():
        visit(collection, tree, ())
    return out
