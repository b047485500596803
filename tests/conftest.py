"""Suite-wide fixtures: the backend parametrization and the set-up hint on collection errors.

Helpers shared by several test modules live in ``tests/helpers/`` (snapshots, lockstep
checks, the family member table, independent implementations, framework twins)."""

from __future__ import annotations

import pytest

from tests.helpers.backend_names import BACKEND_NAMES

#: The README's set-up command: installs every package the suite needs (the ``test`` extra).
SETUP_COMMAND = 'pip install -e ".[test]"'


def pytest_collectreport(report):
    """A module that cannot import what it needs fails collection (never skips); say how to set up."""
    if report.failed:
        report.sections.append(("set-up", f"A missing package? The README's set-up command installs every "
                                          f"package the suite needs: {SETUP_COMMAND}"))


@pytest.fixture(params=BACKEND_NAMES)
def backend(request) -> str:
    """The name of each registered backend in turn."""
    return request.param
