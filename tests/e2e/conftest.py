"""The Debian releases every e2e box runs, one after the other (pytest -k trixie picks one)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_host as e2e  # noqa: E402


@pytest.fixture(scope="module", params=e2e.RELEASES, ids=lambda r: r.suite)
def release(request):
    return request.param


@pytest.fixture(scope="module")
def plain_box(release):
    """The release booted, nothing installed, for tests that only read the box."""
    e2e.install_host_tools()
    e2e.sweep_stale()
    with e2e.booted_box(release) as b:
        yield b
