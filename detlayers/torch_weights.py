"""Loading PyTorch / detectron2 weights into the Flax variables of detlayers modules."""

from __future__ import annotations

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

__all__ = ["load_torch_state_dict", "read_state_dict", "flax_name_to_torch"]

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


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    if isinstance(value, (jax.Array, np.generic, int, float, list, tuple)):
        return np.asarray(value)
    raise TypeError(f"load_torch_state_dict: entry {key!r} is a {type(value).__name__}, not an array")


def _unwrap(data: Any, source: str) -> Mapping:
    """The weights inside a checkpoint: ``data["model"]``, ``data["state_dict"]`` or ``data``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"load_torch_state_dict: {source} holds a {type(data).__name__}, not a dict of weights")
    for wrapper in ("model", "state_dict"):
        if wrapper in data and isinstance(data[wrapper], Mapping):
            return data[wrapper]
    return data


def read_state_dict(source: Any) -> dict[str, np.ndarray]:
    """A flat ``{dotted name: numpy array}`` from a dict, a ``.pkl`` or a ``.pth`` file.

    * dict: NumPy arrays or torch tensors, possibly wrapped as ``{"model": ...}`` /
      ``{"state_dict": ...}``.
    * ``.pkl``: detectron2 model-zoo format, a pickled dict with the weights under ``"model"``
      (other keys such as ``"__author__"`` or ``"matching_heuristics"`` are ignored). Pickles
      can run code when loaded: only read files you trust.
    * ``.pth``/``.pt``: ``torch.load(..., weights_only=True)`` (needs torch), unwrapped the same
      way (detectron2 training checkpoints keep the model under ``"model"``).

    ``num_batches_tracked`` entries are dropped, and a ``module.`` prefix shared by every key
    (``DistributedDataParallel`` checkpoints) is removed.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        elif path.endswith((".pth", ".pt")):
            try:
                import torch
            except ImportError as err:
                raise ImportError(f"load_torch_state_dict: reading {path!r} needs torch installed") from err
            data = torch.load(path, map_location="cpu", weights_only=True)
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

    Raises:
      ValueError: listing every missing key (a Flax variable with no entry), unexpected key (an
        entry no variable uses) and mis-shaped key (with both shapes), all at once.
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
            if key not in weights:
                missing.append(f"{key} (for {flax_path}, shape {tuple(value.shape)})")
                continue
            array = weights[key]
            expected = tuple(value.shape)
            converted = array
            if name == "kernel" and collection == "params":
                converted = _convert_kernel(array, expected, modules.get(path))
            if converted is None or tuple(converted.shape) != expected:
                misshaped.append(
                    f"{key}: checkpoint shape {tuple(array.shape)}, {flax_path} needs {expected}"
                    + (" after the layout transpose" if name == "kernel" else "")
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
