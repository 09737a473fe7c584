"""Fixtures for the integration tests: a real dockerd in a network namespace (tests/lab.py).

Session-scoped: the namespaces, the engine and the bb:latest image (about 1 s to build).
Per test: `lab` is reset afterwards (daemons stopped, labelled containers and networks
removed, namespace T back to lo/lan0/lan1 with only the kernel's routes), so tests stay
independent even when one fails half-way.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lab as lablib  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def session_lab():
    yield from lablib.lab_session(lablib.prereq_problem, lablib.make_lab)


@pytest.fixture
def lab(session_lab):
    """The lab, clean before the test and reset after it."""
    yield from lablib.reset_around(session_lab)


@pytest.fixture
def engine(lab):
    return lab.engine
