"""Freezing: batch norms into frozen batch norms (module *and* variables), and optimiser masks.

detectron2 freezes in place (``FrozenBatchNorm2d.convert_frozen_batchnorm(model)``,
``block.freeze()``, ``requires_grad=False``). Flax keeps variables outside modules, so every
function here takes the variables too and returns new ones; nothing is changed in place.

* :func:`convert_frozen_batchnorm` -- ``(module, variables) -> (frozen_module, frozen_variables)``.
* :func:`freeze_module` -- what :meth:`detlayers.CNNBlockBase.freeze` does: the conversion, plus
  stopped gradients into the module's parameters and ``frozen=True``.
* :func:`frozen_class` -- a block class whose parameters receive no gradient (for building
  frozen blocks inside a parent module).
* :func:`trainable_mask`, :func:`prefix_trainable_mask`, :func:`masked_optimizer` -- an optax
  optimiser that leaves frozen parameters bit-for-bit unchanged (zero gradients alone are not
  enough once weight decay or momentum is involved).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import unfreeze

from detlayers._module_trace import trace_init
from detlayers.batch_norm import BatchNorm2d, FrozenBatchNorm2d, NaiveSyncBatchNorm, SyncBatchNorm

__all__ = [
    "convert_frozen_batchnorm",
    "freeze_module",
    "frozen_class",
    "masked_optimizer",
    "prefix_trainable_mask",
    "trainable_mask",
]

# get_norm names whose layer is a (sync) batch norm with running statistics.
BATCH_NORM_NAMES = frozenset({"BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N"})
_BATCH_NORM_TYPES = (BatchNorm2d, NaiveSyncBatchNorm, SyncBatchNorm)
_FLAX_INTERNAL_FIELDS = frozenset({"parent", "name"})


# --------------------------------------------------------------------------------------------
# module side
# --------------------------------------------------------------------------------------------
def _convert_value(field_name: str, value: Any) -> Any:
    if isinstance(value, nn.Module):
        return _convert_module(value)
    if isinstance(value, str) and "norm" in field_name.lower() and value in BATCH_NORM_NAMES:
        return "FrozenBN"
    if isinstance(value, (list, tuple)):
        converted = [_convert_value(field_name, v) for v in value]
        if any(c is not v for c, v in zip(converted, value)):
            return type(value)(converted) if not hasattr(value, "_fields") else type(value)(*converted)
    return value


def _convert_module(module: nn.Module) -> nn.Module:
    if isinstance(module, _BATCH_NORM_TYPES):
        return FrozenBatchNorm2d(module.num_features, eps=module.eps, name=module.name, parent=None)
    updates = {}
    for field in dataclasses.fields(module):
        if field.name in _FLAX_INTERNAL_FIELDS or not field.init:
            continue
        value = getattr(module, field.name)
        converted = _convert_value(field.name, value)
        if converted is not value:
            updates[field.name] = converted
    return module.clone(parent=None, **updates) if updates else module


# --------------------------------------------------------------------------------------------
# variable side
# --------------------------------------------------------------------------------------------
def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _pop(tree: dict, path: tuple[str, ...], leaf: str) -> Any:
    """Removes ``tree[path][leaf]`` and any dicts left empty on the way up; returns the value."""
    node = _get(tree, path)
    if not isinstance(node, dict) or leaf not in node:
        return None
    value = node.pop(leaf)
    for depth in range(len(path), 0, -1):
        parent = _get(tree, path[: depth - 1])
        if parent[path[depth - 1]]:
            break
        del parent[path[depth - 1]]
    return value


def _batch_norm_paths(batch_stats: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths whose ``batch_stats`` entry is exactly a batch norm's ``{mean, var}``."""
    found = []
    leaves = {k for k, v in batch_stats.items() if not isinstance(v, Mapping)}
    if leaves == {"mean", "var"}:
        found.append(prefix)
    for key, value in batch_stats.items():
        if isinstance(value, Mapping):
            found.extend(_batch_norm_paths(value, prefix + (key,)))
    return found


def _convert_variables(variables: Mapping, paths: Iterable[tuple[str, ...]]) -> dict:
    new = _to_dict(unfreeze(variables) if not isinstance(variables, dict) else variables)
    new.setdefault("params", {})
    for path in paths:
        stats = _get(new["batch_stats"], path)
        mean, var = stats["mean"], stats["var"]
        scale = _pop(new["params"], path, "scale")
        bias = _pop(new["params"], path, "bias")
        channels = mean.shape[-1]
        stats["scale"] = jnp.ones((channels,), jnp.float32) if scale is None else scale
        stats["bias"] = jnp.zeros((channels,), jnp.float32) if bias is None else bias
        stats["mean"], stats["var"] = mean, var
    if not new["params"] and "params" not in variables:
        del new["params"]
    return new


def _module_paths_of(module: nn.Module, predicate: Callable[[nn.Module], bool], args, kwargs) -> set:
    """Scope paths (tuples of names) of every submodule satisfying ``predicate`` that runs during
    ``module.init(*args, **kwargs)``; traced abstractly (``jax.eval_shape``), nothing is computed."""
    _, modules = trace_init(module, args, kwargs)
    return {path for path, submodule in modules.items() if predicate(submodule)}


def _structure(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), _to_dict(tree))


def convert_frozen_batchnorm(
    module: nn.Module, variables: Mapping, *example_args: Any, **example_kwargs: Any
) -> tuple[nn.Module, dict]:
    """Turns a model's batch norms into :class:`detlayers.FrozenBatchNorm2d`, keeping its outputs.

    Module: walks the dataclass fields of ``module`` recursively (submodules given as fields,
    lists/tuples of them); a field whose name contains ``"norm"`` and holds a batch-norm name
    (``"BN"``, ``"SyncBN"``, ``"nnSyncBN"``, ``"naiveSyncBN"``, ``"naiveSyncBN_N"``) becomes
    ``"FrozenBN"``, and a :class:`detlayers.BatchNorm2d` / :class:`detlayers.NaiveSyncBatchNorm` /
    :class:`detlayers.SyncBatchNorm`
    instance becomes ``FrozenBatchNorm2d(num_features, eps)``. Batch norms created inside a
    ``compact`` method without a field cannot be reached: pass them in through a field. Norm
    factories given as callables and :class:`detlayers.CycleBatchNormList` are not converted;
    pass example inputs for models that contain one, so the mismatch is reported instead of the
    structural walk below silently moving the cycle list's statistics.

    Variables: at every path where ``batch_stats`` holds exactly ``{mean, var}`` (a batch norm
    with running statistics), ``params/{scale, bias}`` (ones/zeros when the norm had no affine)
    move next to them, giving FrozenBN's ``batch_stats/{scale, bias, mean, var}``. Other
    collections are copied unchanged. The inputs are not modified.

    Result: ``frozen_module.apply(frozen_variables, x)`` equals ``module.apply(variables, x)``
    with ``train=False`` (FrozenBN computes the same ``(x - mean) / sqrt(var + eps) * scale +
    bias``), and in training nothing normalises with batch statistics or updates them.

    ``example_args``/``example_kwargs`` (optional): inputs for ``init``. When given, the
    conversion is exact instead of structural -- only the variables of the batch-norm
    submodules that actually run are moved -- and the result is checked against the frozen
    module's own variable tree (a ``ValueError`` lists any difference).
    """
    frozen_module = _convert_module(module)
    batch_stats = variables.get("batch_stats", {}) if isinstance(variables, Mapping) else {}
    if example_args or example_kwargs:
        paths = _module_paths_of(
            module, lambda m: isinstance(m, _BATCH_NORM_TYPES), example_args, example_kwargs
        )
        paths = {p for p in paths if isinstance(_get(batch_stats, p), Mapping) and "mean" in _get(batch_stats, p)}
    else:
        paths = set(_batch_norm_paths(batch_stats))
    frozen_variables = _convert_variables(variables, sorted(paths))
    if example_args or example_kwargs:
        expected = jax.eval_shape(lambda r: frozen_module.init(r, *example_args, **example_kwargs), jax.random.key(0))
        have = {k: v for k, v in _structure(frozen_variables).items() if k in ("params", "batch_stats")}
        want = {k: v for k, v in _structure(expected).items() if k in ("params", "batch_stats")}
        if have != want:
            raise ValueError(
                "convert_frozen_batchnorm: the converted variables do not match the frozen module "
                f"(are some batch norms created without a field?).\n converted: {have}\n expected: {want}"
            )
    return frozen_module, frozen_variables


# --------------------------------------------------------------------------------------------
# stopping gradients
# --------------------------------------------------------------------------------------------
def _stop_gradient_tree(tree: Any) -> Any:
    return jax.tree.map(jax.lax.stop_gradient, tree)


@functools.cache
def frozen_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose ``params`` (its own and its submodules') receive no gradient.

    Outside ``init``, ``__call__`` runs under ``flax.linen.map_variables`` with
    ``jax.lax.stop_gradient`` on the ``params`` collection; other collections (``batch_stats``)
    pass through unchanged and stay mutable. The variable tree is unchanged (same names and
    shapes), so variables of a ``cls`` instance work with the frozen class and vice versa, and
    ``isinstance(frozen_class(C)(...), C)`` holds. Cached per class; applying it to a frozen
    class returns that class.
    """
    if getattr(cls, "_detlayers_frozen_class", False):
        return cls

    def call_with_stopped_params(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return cls.__call__(module, *args, **kwargs)

    # init=False: the lifted call only reads params, so it works under apply with any mutable
    # collections; during init the plain call creates the params (no gradient is taken there).
    stopped_call = nn.map_variables(call_with_stopped_params, "params", trans_in_fn=_stop_gradient_tree)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_initializing():
            return cls.__call__(self, *args, **kwargs)
        return stopped_call(self, *args, **kwargs)

    frozen = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} with gradients into its parameters stopped (detlayers.freeze.frozen_class).",
            "_detlayers_frozen_class": True,
        },
    )
    return frozen


def freeze_module(module: nn.Module, variables: Mapping) -> tuple[nn.Module, dict]:
    """:meth:`detlayers.CNNBlockBase.freeze`: BN -> FrozenBN (module and variables), parameters
    without gradient, ``frozen=True``. Returns ``(frozen_module, frozen_variables)``."""
    converted, frozen_variables = convert_frozen_batchnorm(module, variables)
    kwargs = {
        f.name: getattr(converted, f.name)
        for f in dataclasses.fields(converted)
        if f.init and f.name not in _FLAX_INTERNAL_FIELDS
    }
    if "frozen" in kwargs:
        kwargs["frozen"] = True
    frozen = frozen_class(type(converted))(**kwargs, name=converted.name, parent=None)
    return frozen, frozen_variables


# --------------------------------------------------------------------------------------------
# optimiser masks
# --------------------------------------------------------------------------------------------
def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def _mask_from_prefixes(params: Any, frozen_prefixes: Iterable[tuple[str, ...]],
                        matches: Callable[[str, str], bool]) -> Any:
    """False where the parameter path starts with a prefix (``matches(prefix_part, name)``
    comparing whole components), True elsewhere."""
    prefixes = [tuple(p) for p in frozen_prefixes]

    def trainable(path, _leaf) -> bool:
        names = _path_names(path)
        return not any(len(names) >= len(p) and all(map(matches, p, names)) for p in prefixes)

    return jax.tree_util.tree_map_with_path(trainable, _to_dict(params))


def _same_name(part: str, name: str) -> bool:
    return part == name


def _name_or_list_element(part: str, name: str) -> bool:
    """``name`` is ``part`` or an element of the list ``part`` (Flax names those ``part_0``,
    ``part_1``, ``part_4_1``: detectron2's ``part.0``, ``part.1``, ``part.4.1``)."""
    return name == part or (name.startswith(part + "_") and _LIST_SUFFIX.fullmatch(name[len(part):]) is not None)


_LIST_SUFFIX = re.compile(r"(?:_\d+)+")


def _check_every_prefix_matches(params: Mapping, prefixes: Sequence[tuple[str, ...]]) -> None:
    """A prefix that matches nothing would silently leave everything trainable: refuse it."""
    for prefix in prefixes:
        level: list[Mapping] = [params]
        for depth, part in enumerate(prefix):
            found = [node[name] for node in level for name in node
                     if _name_or_list_element(part, name)]
            if not found:
                names = sorted({name for node in level for name in node})
                where = "/".join(prefix[:depth]) or "the top level"
                raise ValueError(
                    f"prefix_trainable_mask: frozen prefix {'/'.join(prefix)!r} matches no parameter: "
                    f"{where} has no {part!r} (names there: {', '.join(names) or 'none'})")
            level = [node for node in found if isinstance(node, Mapping)]
            if depth < len(prefix) - 1 and not level:
                raise ValueError(f"prefix_trainable_mask: frozen prefix {'/'.join(prefix)!r} goes below a "
                                 f"parameter ({'/'.join(prefix[:depth + 1])} is an array)")


def prefix_trainable_mask(params: Any, frozen_prefixes: Sequence[str | Sequence[str]]) -> Any:
    """Bool tree over ``params``: False under any of ``frozen_prefixes``, True elsewhere.

    A prefix is a ``"/"``-separated Flax path (``"backbone/stem"``) or a tuple of names; this is
    detectron2's ``freeze_at`` expressed on variable paths. Each component matches a whole name:
    ``"res2"`` matches ``res2`` and the elements of a list ``res2`` (Flax names them ``res2_0``,
    ``res2_1``, ...; detectron2's ``res2.0``, ``res2.1``), never ``res20`` or ``res2a``. So
    ``["backbone/stem", "backbone/res2"]`` freezes the stem and every block of stage ``res2``, as
    detectron2's ``FREEZE_AT = 2`` does. A prefix that matches no parameter raises ``ValueError``
    naming it and the names that are there (it would silently freeze nothing).
    """
    prefixes = [tuple(p.split("/")) if isinstance(p, str) else tuple(p) for p in frozen_prefixes]
    tree = _to_dict(params)
    _check_every_prefix_matches(tree, prefixes)
    return _mask_from_prefixes(tree, prefixes, _name_or_list_element)


def trainable_mask(module: nn.Module, params: Any, *example_args: Any, **example_kwargs: Any) -> Any:
    """Bool tree over ``params``: False for parameters inside any submodule with ``frozen=True``
    (e.g. blocks returned by :meth:`detlayers.CNNBlockBase.freeze`), True elsewhere.

    The frozen submodules are found by tracing ``module.init(*example_args, **example_kwargs)``
    abstractly (no computation).
    """
    paths = _module_paths_of(module, lambda m: getattr(m, "frozen", False) is True, example_args, example_kwargs)
    return _mask_from_prefixes(params, paths, _same_name)  # exact module scope paths


def masked_optimizer(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """``tx`` on parameters where ``trainable`` is True; zero updates (``optax.set_to_zero``)
    elsewhere, so frozen parameters never change -- also under weight decay or momentum.

    ``trainable`` is a bool tree with the structure of the parameters (from
    :func:`trainable_mask` or :func:`prefix_trainable_mask`).
    """
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
