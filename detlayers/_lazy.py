"""Lazy attribute exports shared by ``detlayers`` and ``detlayers.models`` (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def exports_by_name(names_by_module: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{public name: submodule}`` from ``{submodule: public names}``; a name listed twice is an error."""
    exports: dict[str, str] = {}
    for module_name, names in names_by_module.items():
        for name in names:
            if name in exports:
                raise ValueError(f"{name!r} is exported by both {exports[name]!r} and {module_name!r}")
            exports[name] = module_name
    return exports


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for a package exporting names lazily.

    ``exports`` maps each public name to the submodule of ``package`` that defines it; the
    submodule is imported on first access and the value cached in ``namespace`` (the package's
    ``globals()``), so later lookups skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_name}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
