"""The API reference builds from the docstrings without a warning or an unresolved reference."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_DOCS = ROOT / "tools" / "build_docs.py"


@pytest.mark.skipif(not BUILD_DOCS.exists(), reason="tools/ is not part of this copy of the tests")
def test_api_reference_builds_without_warnings_or_broken_references():
    pytest.importorskip("pdoc")
    result = subprocess.run(
        [sys.executable, str(BUILD_DOCS), "--check"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
