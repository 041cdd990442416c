"""Test-session setup: 8 forced host devices so multi-device tests (pmap, shard_map) run on CPU.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.

Options that depend on optional plugins are set here rather than in ``addopts`` (which would make
pytest fail when the plugin is missing), so a plain ``pytest`` works with or without them:

* pytest-xdist (in the ``test`` extra): the tests run in parallel (``-n auto``) unless the command
  line chooses ``-n`` itself; ``-p no:xdist`` runs them in one process.
* nbmake (in the ``notebooks`` extra): the notebooks under ``notebooks/`` are executed top to
  bottom (``--nbmake``) so they never rot; without nbmake they are not collected.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    # Runs before xdist's own pytest_cmdline_main, which turns "auto" into a worker count.
    # An xdist worker must not ask for workers of its own (that would fork without end).
    is_worker = hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ
    has_xdist = hasattr(config.option, "numprocesses")
    if not is_worker and has_xdist and config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if hasattr(config.option, "nbmake"):
        config.option.nbmake = True
    return (yield)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Directory of the committed reference outputs (made by tools/fixtures/make_*.py)."""
    return FIXTURES
