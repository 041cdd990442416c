"""pytest options that depend on optional plugins, so a plain ``pytest`` works with or without them.

* pytest-xdist (in the ``test`` extra): the tests run in parallel (``-n auto``) unless the command
  line chooses ``-n`` itself; ``-p no:xdist`` runs them in one process.
* nbmake (in the ``notebooks`` extra): the notebooks under ``notebooks/`` are executed top to
  bottom (``--nbmake``) so they never rot; without nbmake they are not collected.

Options written in ``addopts`` would instead make pytest fail when the plugin is missing.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    # Runs before xdist's own pytest_cmdline_main, which turns "auto" into a worker count.
    # An xdist worker must not ask for workers of its own (that would fork without end).
    is_worker = hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ
    if not is_worker and hasattr(config.option, "numprocesses") and config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if hasattr(config.option, "nbmake"):
        config.option.nbmake = True
    return (yield)
