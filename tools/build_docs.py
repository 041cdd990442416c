"""Build the API reference (HTML, with pdoc) from the docstrings, and fail on any problem.

    python tools/build_docs.py            # writes docs/api/index.html (not committed)
    python tools/build_docs.py -o DIR     # somewhere else
    python tools/build_docs.py --check    # build into a temporary directory, keep nothing

Every public module of ``detlayers`` is documented (names starting with ``_`` are private). The
build fails (exit status 1, one line per problem on stderr) when

* pdoc warns (a module that does not import, an annotation it cannot evaluate, ...), or
  importing detlayers does (other libraries' warnings are printed, not counted);
* a cross-reference in a docstring does not resolve to a documented object: a reST role
  (``:func:`name```, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:`` ...), or a backticked dotted
  name starting with ``detlayers.``. Names resolve as pdoc links them: relative to the class and
  module of the docstring, else as a full dotted path. Roles pointing outside detlayers (``jax``,
  ``ctypes``, ...) are accepted when that module imports;
* a docstring uses markup pdoc renders literally: an unknown role (e.g. Sphinx extensions'
  ``:paper:``) or a ``~`` inside a role.

tests/test_docs.py runs ``--check``, so the test suite (and CI) covers the docs build.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import pkgutil
import re
import sys
import tempfile
import warnings

PACKAGE = "detlayers"
ROOT = pathlib.Path(__file__).resolve().parents[1]

# reST roles pdoc turns into (linked) code; anything else in role syntax is rendered as typed.
_LINK_ROLES = {"mod", "func", "data", "const", "class", "meth", "attr", "exc", "obj"}
_ROLE = re.compile(r"(?<![\w`]):(?:py:)?([a-z]+):`([^`]+)`")
_DOTTED_CODE = re.compile(r"(?<!`)``?(" + PACKAGE + r"(?:\.\w+)+)(?:\(\))?``?(?!`)")


def public_modules() -> list[str]:
    """``detlayers`` and every submodule whose dotted name has no component starting with ``_``."""
    package = importlib.import_module(PACKAGE)
    # The package exports its names lazily (module __getattr__); pdoc reads the package __dict__
    # and would take a name missing there for a submodule (``nms``, ``roi_align`` ... are both).
    for name in package.__all__:
        getattr(package, name)
    names = [PACKAGE]
    errors: list[str] = []
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + ".", onerror=errors.append):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    if errors:
        raise ImportError(f"cannot walk packages: {errors}")
    # Subpackages that export lazily too (detlayers.models): resolve their names the same way.
    for name in names:
        if name != PACKAGE and hasattr(importlib.import_module(name), "__getattr__"):
            module = importlib.import_module(name)
            for exported in getattr(module, "__all__", ()):
                getattr(module, exported)
    return sorted(names)


def _is_private(qualname: str) -> bool:
    return any(part.startswith("_") and not part.endswith("__") for part in qualname.split("."))


def _resolve(target: str, module, namespace: str, all_modules: dict) -> bool:
    """Whether pdoc links ``target``, written in a docstring of ``module`` (class ``namespace``)."""
    target = target.removesuffix("()")
    # Relative to the enclosing class, then to the module (pdoc's qualname_candidates).
    candidates = [f"{namespace}.{target}", target] if namespace else [target]
    for qualname in candidates:
        doc = module.get(qualname)
        if doc is not None and not _is_private(qualname):
            return True
    if target in all_modules:
        return True
    # A full dotted path: the longest documented module prefix, then a member of it.
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = all_modules.get(".".join(parts[:cut]))
        if owner is not None:
            qualname = ".".join(parts[cut:])
            return owner.get(qualname) is not None and not _is_private(qualname)
    return False


def _exists(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _is_external(target: str) -> bool:
    top = target.split(".")[0]
    if top == PACKAGE or top in ("", "self"):
        return False
    try:
        importlib.import_module(top)
    except ImportError:
        return False
    return True


def _docstrings(namespace_doc):
    """(enclosing class qualname or "", fullname, docstring) of the members defined in detlayers."""
    import pdoc.doc

    for member in namespace_doc.members.values():
        if member.is_inherited:
            continue  # imported or inherited: checked where it is defined, if that is ours
        if isinstance(member, pdoc.doc.Class):
            # A class's own docstring resolves names among its members first, as pdoc does.
            yield member.qualname, member.fullname, member.docstring
            yield from _docstrings(member)
        elif member.docstring and getattr(member.obj, "__doc__", None):  # not a base class's text
            yield member.qualname.rpartition(".")[0], member.fullname, member.docstring


def check_references(all_modules: dict) -> list[str]:
    problems = []
    for module in all_modules.values():
        texts = [("", module.fullname, module.docstring)]
        texts += list(_docstrings(module))
        for namespace, where, text in texts:
            for role, target in _ROLE.findall(text):
                if role not in _LINK_ROLES and role != "math":
                    problems.append(f"{where}: :{role}:`{target}` is not a role pdoc renders")
                elif role == "math":
                    continue
                elif target.startswith("~"):
                    problems.append(f"{where}: :{role}:`{target}`: pdoc prints the '~' (drop it)")
                elif not (_is_external(target) or _resolve(target, module, namespace, all_modules)):
                    problems.append(f"{where}: :{role}:`{target}` does not resolve")
            for target in _DOTTED_CODE.findall(text):
                if _is_private(target):  # a pointer for maintainers: it must exist, not be linked
                    if not _exists(target):
                        problems.append(f"{where}: `{target}` does not exist")
                elif not _resolve(target, module, namespace, all_modules):
                    problems.append(f"{where}: `{target}` does not resolve")
    return problems


def build(output_directory: pathlib.Path) -> list[str]:
    """Writes the HTML into ``output_directory``; returns the problems found (empty: success)."""
    import pdoc
    import pdoc.doc
    import pdoc.render

    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = public_modules()
        # "google": the docstrings' Args:/Returns: sections become lists; reST roles still work.
        pdoc.render.configure(docformat="google", show_source=True)
        all_modules = {name: pdoc.doc.Module.from_name(name) for name in names}
        output_directory.mkdir(parents=True, exist_ok=True)
        for module in all_modules.values():
            html = pdoc.render.html_module(module, all_modules)
            out = output_directory / f"{module.fullname.replace('.', '/')}.html"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(html, encoding="utf-8")
        for file_name, text in (("index.html", pdoc.render.html_index(all_modules)),
                                ("search.js", pdoc.render.search_index(all_modules))):
            (output_directory / file_name).write_text(text, encoding="utf-8")
    pdoc_dir = pathlib.Path(pdoc.__file__).parent
    for warning in caught:
        source = pathlib.Path(warning.filename).resolve()
        if pdoc_dir in source.parents or ROOT in source.parents:
            problems.append(f"warning: {warning.message} ({source.name}:{warning.lineno})")
        else:  # another library's (e.g. a deprecation inside jax): not a problem of these docs
            print(f"note: {warning.category.__name__}: {warning.message}", file=sys.stderr)
    problems += check_references(all_modules)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=pathlib.Path, default=ROOT / "docs" / "api")
    parser.add_argument("--check", action="store_true", help="build into a temporary directory")
    args = parser.parse_args(argv)
    # The docs describe this checkout's sources, whatever else is installed.
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            problems = build(pathlib.Path(tmp))
    else:
        problems = build(args.output)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"docs: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    if not args.check:
        print(f"docs: written to {args.output / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
