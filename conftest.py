"""Shared pytest set-up for tests/ and benches/: markers map to machine prerequisites (tests/prereq.py)."""

from __future__ import annotations

import pytest

from tests.prereq import require_docker, require_lab

pytest_plugins = ["tests.lab.fixtures"]


@pytest.fixture(autouse=True)
def _marker_prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lab") is not None:
        require_lab()
    if request.node.get_closest_marker("docker") is not None:
        require_docker()
