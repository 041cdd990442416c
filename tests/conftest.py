"""Test-session setup: 8 forced host devices so multi-device tests (pmap, shard_map) run on CPU.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Directory of the committed reference outputs (made by tools/fixtures/make_*.py)."""
    return FIXTURES
