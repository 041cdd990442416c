"""Test-session setup: 8 forced host devices so multi-device tests (pmap, shard_map) run on CPU,
and one persistent XLA compilation cache shared by the whole run.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.

The compilation cache: a fresh directory per run (so runs stay independent; it is deleted at the
end), named in ``JAX_COMPILATION_CACHE_DIR`` before jax is imported, so the xdist workers and every
subprocess the tests start (fresh-process export, multi-process runs, the demo, the notebooks)
inherit it. A program compiled once is then loaded, not compiled again, by the other worker, by
another ``jax.jit`` of the same computation, or by a subprocess. A cache directory the caller
already set is used as it is.

Options that depend on optional plugins are set here rather than in ``addopts`` (which would make
pytest fail when the plugin is missing), so a plain ``pytest`` works with or without them:

* pytest-xdist (in the ``test`` extra): the tests run in parallel (``-n auto --dist loadgroup``)
  unless the command line chooses ``-n`` or ``--dist`` itself; ``-p no:xdist`` runs them in one
  process. Every module is dealt out whole to one worker: its tests share compiled functions (and
  module fixtures), and two workers running one module would compile each of them twice (measured
  on the NMS modules: a fifth more CPU). Modules with the most expensive fixtures mark their tests
  ``xdist_group(<name>)`` and make those fixtures session-scoped (a worker may run other modules'
  tests between a group's tests, and pytest tears a module-scoped fixture down whenever the next
  test is from another module); those groups go out first, then the modules, largest first, so
  the last work handed out is small. (With pytest 9.2 and pytest-xdist 3.8 the groups only work
  through the hooks below; before them every expensive fixture was built on both workers.)
* nbmake (in the ``notebooks`` extra): the notebooks under ``notebooks/`` are executed top to
  bottom (``--nbmake``) so they never rot; without nbmake they are not collected.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # The first process (the xdist controller, or the only one) creates it; workers inherit it.
    _CACHE_DIR = tempfile.mkdtemp(prefix="detlayers-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
# Cache every program worth a fraction of a second to compile (jax's default is 1 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
if "jax" in sys.modules:  # a plugin imported jax first: it read the environment too early
    sys.modules["jax"].config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    sys.modules["jax"].config.update(
        "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    # Runs before xdist's own pytest_cmdline_main, which turns "auto" into a worker count.
    # An xdist worker must not ask for workers of its own (that would fork without end).
    is_worker = hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ
    has_xdist = hasattr(config.option, "numprocesses")
    if is_worker and getattr(config, "workerinput", {}).get("detlayers_loadgroup"):
        # A worker parses the original command line, not the options changed below, so it would
        # not tag its tests with their group and the controller would deal grouped tests out one
        # by one (each worker then building the group's fixtures): tell it, before it collects.
        config.option.loadgroup = True
    if not is_worker and has_xdist and config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if not is_worker and has_xdist and config.option.dist == "no":
        # Tests are dealt out one by one, except those marked xdist_group(name): each group
        # runs whole on one worker, so its fixtures (a compiled model, a demo run) are built once,
        # not once per worker. The workers put the work in the order it is to go out (below), so
        # the controller must not reorder it by size.
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False
    if hasattr(config.option, "nbmake"):
        config.option.nbmake = True
    return (yield)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker dealing out by group: put each test in its work unit (its
    ``xdist_group``, else its module), order the units as they are to go out (groups, then
    modules; larger first; a unit's tests in their own order), and suffix each test's id with
    ``@<unit>`` (what the controller's LoadGroupScheduling keys on). pytest-xdist writes the suffix
    itself into ``item._nodeid``, which pytest 9.2 no longer reads (ids live in ``item._id``):
    without this, grouped tests were dealt out one by one. A suffix already there is kept. Every
    worker computes the same order from the same collection."""
    if not (hasattr(config, "workerinput") and getattr(config.option, "loadgroup", False)):
        return

    def unit(item: pytest.Item) -> tuple[int, str]:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        return (0, "_".join(groups)) if groups else (1, item.nodeid.split("::")[0])

    units = [unit(item) for item in items]
    sizes: dict[tuple[int, str], int] = {}
    first: dict[tuple[int, str], int] = {}
    for index, u in enumerate(units):
        sizes[u] = sizes.get(u, 0) + 1
        first.setdefault(u, index)
    order = sorted(range(len(items)), key=lambda i: (units[i][0], -sizes[units[i]], first[units[i]], i))
    items[:] = [items[i] for i in order]
    units = [units[i] for i in order]
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9.2
    except ImportError:  # older pytest reads _nodeid
        coerce_node_id = None
    for item, (_, name) in zip(items, units):
        if "@" in item.nodeid:
            continue
        grouped = f"{item.nodeid}@{name}"
        if coerce_node_id is None:
            item._nodeid = grouped
        else:
            item._id = coerce_node_id(grouped)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist's controller, per worker: whether this run deals out by group (see above)."""
    node.workerinput["detlayers_loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    # xdist registers this mark; without xdist (-p no:xdist, or not installed) it must still be known.
    config.addinivalue_line("markers", "xdist_group(name): the marked tests run on one xdist worker")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Directory of the committed reference outputs (made by tools/fixtures/make_*.py)."""
    return FIXTURES
