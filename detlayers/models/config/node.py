"""``CfgNode``: detectron2's config tree (yacs / fvcore semantics), written for detlayers.

A ``CfgNode`` is a mutable mapping whose keys are also attributes (``cfg.MODEL.RPN.NMS_THRESH``), whose
values are nested ``CfgNode`` s or leaves of the types yacs allows (``tuple``, ``list``, ``str``,
``int``, ``float``, ``bool``, ``None``; exact types, so ``numpy.float64`` is rejected). Merges
mutate the node IN PLACE, as detectron2's do:

* ``merge_from_file(path)`` reads a YAML file (``yaml.safe_load``, plus the arithmetic
  ``!!python/object/apply:eval`` values of detectron2's zoo, see ``yaml_loader``), resolves ``_BASE_``
  (a path or a list of paths, relative to the file's folder, recursively; the file's keys override
  its bases', dicts merged key by key) and merges the result;
* ``merge_from_list(["MODEL.X", value, ...])`` (the command-line form);
* ``merge_from_other_cfg(other)``.

Every merged value goes through yacs' decoding and type check: a string is read with
``ast.literal_eval`` when it parses (``"0.5"`` -> ``0.5``, ``"(1, 2)"`` -> ``(1, 2)``; ``"foo"``
stays a string), then its type must be the current value's type, except that a list may replace
a tuple and back (converted to the current type), ``None`` may replace any leaf and any leaf may
replace ``None``. ``int`` does NOT replace ``float`` (yacs 0.1.8 refuses it: write ``1.0``). A key
that is not in the tree raises ``KeyError("Non-existent config key: MODEL.X")`` with the full
dotted key, unless the node was made with ``new_allowed=True``.

Unlike yacs, a merge is all or nothing (it is checked on a copy first, so a failing merge leaves
the node unchanged), and a frozen node (``freeze()``) refuses every change, ``merge_from_list``
and item assignment included. A frozen node is hashable (by content), so a frozen config can be a
field of a Flax module or a static ``jax.jit`` argument; a mutable one is not hashable, like a dict.

yacs' ``CfgNode`` subclasses ``dict``; this one is a ``collections.abc.MutableMapping`` instead
(``dict(cfg)``, ``cfg.items()``, ``in``, ``==`` work; ``isinstance(cfg, dict)`` is False) because
Flax replaces every ``dict`` attribute of a module by a ``FrozenDict``, which would drop the
attribute access that model code reads the config with.
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["CfgNode", "BASE_KEY"]

# The key of a YAML file that names the file(s) it inherits from (detectron2 / fvcore).
BASE_KEY = "_BASE_"

# yacs' leaf types, compared with ``type(value) is t`` (subclasses such as numpy scalars are not leaves).
_LEAF_TYPES = (tuple, list, str, int, float, bool, type(None))
# The keys of this prefix may be added once, even to a frozen node (fvcore's "computed" attributes).
_COMPUTED_PREFIX = "COMPUTED_"
# The state a node keeps in its ``__dict__`` (never a config key).
_DATA = "_data"
_FROZEN = "_frozen"
_NEW_ALLOWED = "_new_allowed"


def _is_leaf(value: Any) -> bool:
    return type(value) in _LEAF_TYPES


def _join(path: Sequence[str], key: Any) -> str:
    return ".".join([*path, str(key)])


class CfgNode(MutableMapping):
    """detectron2's ``CfgNode``: a dict of config keys with attribute access (see the module doc).

    Args:
      init_dict: a (nested) mapping; nested mappings become ``CfgNode`` s, leaves are deep-copied
        and must be of a yacs leaf type (``TypeError`` naming the key otherwise).
      key_list: the node's dotted path from the root, used in error messages only.
      new_allowed: whether merges may add keys this node does not have (yacs' ``new_allowed``).
    """

    def __init__(
        self, init_dict: Mapping[str, Any] | None = None, key_list: Sequence[str] | None = None,
        new_allowed: bool = False,
    ) -> None:
        self.__dict__[_DATA] = {}
        self.__dict__[_FROZEN] = False
        self.__dict__[_NEW_ALLOWED] = bool(new_allowed)
        if init_dict is None:
            return
        if not isinstance(init_dict, Mapping):
            raise TypeError(f"CfgNode: init_dict must be a mapping, got {type(init_dict).__name__}")
        path = list(key_list or [])
        for key, value in init_dict.items():
            sub = [*path, str(key)]
            # Nested mappings (nodes included) become new nodes, as yacs copies its init dict.
            value = type(self)(value, key_list=sub) if isinstance(value, Mapping) else value
            self._data[key] = _to_node_value(value, _join(path, key), sub)

    # ------------------------------------------------------------------ attribute access

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not real attributes; read the data through __dict__ so
        # that a half-built node (during copy or unpickling) raises instead of recursing.
        data = self.__dict__.get(_DATA)
        if data is not None and name in data:
            return data[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            raise AttributeError(f"CfgNode: {name!r} is the node's internal state, not a config key")
        if name.startswith(_COMPUTED_PREFIX):
            # fvcore: insertion-only, allowed on a frozen node, an equal value again is a no-op.
            if name in self:
                if self[name] == value:
                    return
                raise KeyError(f"Computed attribute {name!r} already exists with a different value! "
                               f"old={self[name]!r}, new={value!r}")
            self._data[name] = _to_node_value(value, name, [name])
            return
        self._check_mutable(f"set {name!r}")
        self._data[name] = _to_node_value(value, name, [name])

    def __delattr__(self, name: str) -> None:
        if name not in self:
            raise AttributeError(name)
        del self[name]

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {k for k in self._data if isinstance(k, str)})

    # ------------------------------------------------------------------ mapping (changes refused when frozen)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_mutable(f"set {key!r}")
        self._data[key] = _to_node_value(value, str(key), [str(key)])

    def __delitem__(self, key: str) -> None:
        self._check_mutable(f"delete {key!r}")
        del self._data[key]

    def clear(self) -> None:
        self._check_mutable("clear it")
        self._data.clear()

    def _check_mutable(self, action: str) -> None:
        if self.__dict__[_FROZEN]:
            raise AttributeError(f"CfgNode is frozen: cannot {action} (call defrost() first)")

    # ------------------------------------------------------------------ freezing, copying, hashing

    def freeze(self) -> None:
        """Make this node and every node under it immutable (and hashable)."""
        self._set_frozen(True)

    def defrost(self) -> None:
        """Make this node and every node under it mutable again."""
        self._set_frozen(False)

    def is_frozen(self) -> bool:
        return self.__dict__[_FROZEN]

    def _set_frozen(self, frozen: bool) -> None:
        self.__dict__[_FROZEN] = frozen
        for value in self.values():
            if isinstance(value, CfgNode):
                value._set_frozen(frozen)

    def is_new_allowed(self) -> bool:
        return self.__dict__[_NEW_ALLOWED]

    def set_new_allowed(self, is_new_allowed: bool) -> None:
        """Let merges add new keys to this node and every node under it (yacs)."""
        self.__dict__[_NEW_ALLOWED] = bool(is_new_allowed)
        for value in self.values():
            if isinstance(value, CfgNode):
                value.set_new_allowed(is_new_allowed)

    def clone(self) -> CfgNode:
        """A deep copy (frozen if this node is)."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> CfgNode:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), dict(self.__dict__))

    def __hash__(self) -> int:  # type: ignore[override]
        if not self.__dict__[_FROZEN]:
            raise TypeError("unhashable CfgNode: it is mutable; freeze() it (or a clone()) first")
        return hash(_hashable(self))

    # ------------------------------------------------------------------ merging

    def merge_from_other_cfg(self, cfg_other: Mapping[str, Any]) -> None:
        """Merge ``cfg_other`` (a ``CfgNode`` or mapping) into this node, in place (see module doc)."""
        if not isinstance(cfg_other, Mapping):
            raise TypeError(f"merge_from_other_cfg: needs a CfgNode, got {type(cfg_other).__name__}")
        if BASE_KEY in cfg_other:
            raise ValueError(f"merge_from_other_cfg: the reserved key {BASE_KEY!r} can only be used in files")
        self._check_mutable("merge into it")
        other = cfg_other if isinstance(cfg_other, CfgNode) else CfgNode(cfg_other)
        _merge_tree(other, self.clone(), [])  # raises before anything changes
        _merge_tree(other, self, [])

    def merge_from_list(self, cfg_list: Sequence[Any]) -> None:
        """Merge ``[key, value, key, value, ...]`` into this node, in place (detectron2's
        ``opts`` / command-line overrides). Keys are dotted full keys; string values are decoded
        with ``literal_eval`` when they parse. Raises ``ValueError`` for an odd-length list or a
        type mismatch, ``KeyError`` naming the full key for a key that does not exist."""
        if isinstance(cfg_list, (str, bytes, Mapping)) or not isinstance(cfg_list, Sequence):
            raise TypeError(f"merge_from_list: needs a list [key, value, ...], got {type(cfg_list).__name__}")
        if len(cfg_list) % 2:
            raise ValueError(
                f"merge_from_list: override list has odd length {len(cfg_list)}; it must be key, value pairs"
            )
        pairs = list(zip(cfg_list[0::2], cfg_list[1::2]))
        for key, _ in pairs:
            if not isinstance(key, str):
                raise TypeError(f"merge_from_list: keys must be strings, got {key!r}")
            if key == BASE_KEY:
                raise ValueError(f"merge_from_list: the reserved key {BASE_KEY!r} can only be used in files")
        self._check_mutable("merge into it")
        _merge_pairs(pairs, self.clone())  # raises before anything changes
        _merge_pairs(pairs, self)

    @classmethod
    def load_yaml_with_base(cls, filename: str | os.PathLike) -> dict[str, Any]:
        """The YAML file as a plain dict, its ``_BASE_`` file(s) merged under it (fvcore's rules:
        a base path is relative to the folder of the file naming it unless absolute or ``~``; with a
        list of bases, later ones override earlier ones; the file overrides its bases; nested dicts
        merge key by key, any other value replaces). Raises ``ValueError`` on a base cycle, a
        non-mapping file or a key that is a dict in one file and a value in its base."""
        return _load_yaml_with_base(os.fspath(filename), ())

    def merge_from_file(self, cfg_filename: str | os.PathLike) -> None:
        """Load a detectron2 YAML config (``_BASE_`` resolved) and merge it in place.

        Needs a root config with ``VERSION`` (as ``get_cfg()`` returns). A file without ``VERSION``
        is taken as version 2 unless it has ``MODEL.WEIGHT`` or ``TEST.AUG_ON`` (detectron2's
        guess for a version-1 file); version-1 files (detectron2 upgrades them) are not supported.
        """
        path = os.fspath(cfg_filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"merge_from_file: config file {path!r} does not exist")
        loaded = CfgNode(self.load_yaml_with_base(path))
        latest = self.get("VERSION")
        if latest is None:
            raise ValueError("merge_from_file: needs a root config with a VERSION key (start from get_cfg())")
        version = loaded.get("VERSION")
        if version is None:
            version = 1 if _has_key(loaded, "MODEL.WEIGHT") or _has_key(loaded, "TEST.AUG_ON") else latest
        if not isinstance(version, int) or version > latest:
            raise ValueError(f"merge_from_file: cannot merge a v{version} config into a v{latest} config ({path})")
        if version < latest:
            raise ValueError(
                f"merge_from_file: {path} is a v{version} config; only v{latest} configs are supported "
                "(detectron2 upgrades old ones: load it there and save cfg.dump())"
            )
        self.merge_from_other_cfg(loaded)

    # ------------------------------------------------------------------ output

    def dump(self, **kwargs: Any) -> str:
        """The config as YAML (``yaml.safe_dump``; keys sorted unless ``sort_keys=False``), as
        detectron2 writes ``config.yaml``: tuples come out as lists."""
        import yaml

        return yaml.safe_dump(_to_plain(self, []), **kwargs)

    def __str__(self) -> str:
        return self.dump()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


def _rebuild(cls: type, state: dict[str, Any]) -> CfgNode:
    node = cls.__new__(cls)
    node.__dict__.update(state)
    return node


def _to_node_value(value: Any, key: str, path: list[str]) -> Any:
    """A value as a node stores it: a mapping becomes a ``CfgNode`` (a copy), a leaf is deep-copied."""
    if isinstance(value, CfgNode):
        return value
    if isinstance(value, Mapping):
        return CfgNode(value, key_list=path)
    if not _is_leaf(value):
        raise TypeError(
            f"CfgNode: key {key} has a value of type {type(value).__name__}; valid types are "
            "CfgNode, dict, tuple, list, str, int, float, bool and None"
        )
    return copy.deepcopy(value)


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return frozenset((k, _hashable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _decode(value: Any, key: str) -> Any:
    """yacs' decoding of a merged value: a mapping becomes a node, a string is ``literal_eval``-ed
    when it parses (and stays a string otherwise), anything else is kept."""
    if isinstance(value, Mapping):
        return CfgNode(value, key_list=key.split("."))
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if not (_is_leaf(value) or isinstance(value, CfgNode)):
        raise TypeError(f"Invalid value {value!r} of type {type(value).__name__} for config key: {key}")
    return copy.deepcopy(value)


def _coerce(replacement: Any, original: Any, key: str) -> Any:
    """yacs' type check: ``replacement`` must have ``original``'s type, except list <-> tuple
    (converted to the original's type) and ``None`` on either side of a leaf."""
    new_type, old_type = type(replacement), type(original)
    if new_type is old_type or (isinstance(replacement, CfgNode) and isinstance(original, CfgNode)):
        return replacement
    if (replacement is None and old_type in _LEAF_TYPES) or (original is None and new_type in _LEAF_TYPES):
        return replacement
    if new_type is tuple and old_type is list:
        return list(replacement)
    if new_type is list and old_type is tuple:
        return tuple(replacement)
    raise ValueError(
        f"Type mismatch ({old_type.__name__} vs. {new_type.__name__}) with values ({original!r} vs. "
        f"{replacement!r}) for config key: {key}"
    )


def _merge_tree(source: CfgNode, target: CfgNode, path: list[str]) -> None:
    target._check_mutable(f"merge into {'.'.join(path) or 'the root'}")
    for key, raw in source.items():
        full_key = _join(path, key)
        value = _decode(raw, full_key)
        if key in target:
            value = _coerce(value, target[key], full_key)
            if isinstance(value, CfgNode):
                _merge_tree(value, target[key], [*path, str(key)])
                continue
        elif not target.is_new_allowed():
            raise KeyError(f"Non-existent config key: {full_key}")
        target._data[key] = value


def _merge_pairs(pairs: Iterable[tuple[str, Any]], root: CfgNode) -> None:
    for full_key, raw in pairs:
        *parents, leaf = full_key.split(".")
        node: Any = root
        for part in parents:
            if not isinstance(node, CfgNode) or part not in node:
                raise KeyError(f"Non-existent config key: {full_key}")
            node = node[part]
        if not isinstance(node, CfgNode) or leaf not in node:
            raise KeyError(f"Non-existent config key: {full_key}")
        node._check_mutable(f"set {full_key}")
        value = _coerce(_decode(raw, full_key), node[leaf], full_key)
        if isinstance(value, CfgNode):
            _merge_tree(value, node[leaf], full_key.split("."))
        else:
            node._data[leaf] = value


def _has_key(node: Mapping[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _to_plain(value: Any, path: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v, [*path, str(k)]) for k, v in value.items()}
    if not _is_leaf(value):
        raise TypeError(f"dump: key {'.'.join(path)} has a value of type {type(value).__name__}, not a YAML leaf")
    return value


def _merge_dicts(source: dict[str, Any], target: dict[str, Any], filename: str) -> None:
    """fvcore's ``_BASE_`` merge of plain dicts: nested dicts merge key by key, values replace."""
    for key, value in source.items():
        if isinstance(value, dict) and key in target:
            if not isinstance(target[key], dict):
                raise ValueError(f"{filename}: cannot inherit key {key!r} from base (a value there, a dict here)")
            _merge_dicts(value, target[key], filename)
        else:
            target[key] = value


def _load_yaml_with_base(filename: str, chain: tuple[str, ...]) -> dict[str, Any]:
    from detlayers.models.config.yaml_loader import load_yaml

    real = os.path.realpath(filename)
    if real in chain:
        raise ValueError(f"_BASE_ cycle: {' -> '.join([*chain, real])}")
    if not os.path.isfile(filename):
        where = f" (a _BASE_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {filename!r} does not exist{where}")
    with open(filename, encoding="utf-8") as f:
        cfg = load_yaml(f)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{filename}: a config file must hold a mapping, got {type(cfg).__name__}")
    if BASE_KEY not in cfg:
        return cfg
    bases = cfg.pop(BASE_KEY)
    if isinstance(bases, str):
        bases = [bases]
    elif not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{filename}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        if base.startswith(("https://", "http://")):
            raise ValueError(f"{filename}: {BASE_KEY} {base!r} is a URL; download it and name the local file")
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(filename), base)
        _merge_dicts(_load_yaml_with_base(base, (*chain, real)), merged, filename)
    _merge_dicts(cfg, merged, filename)
    return merged
