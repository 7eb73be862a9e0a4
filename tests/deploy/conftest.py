"""Fixtures for the deploy/ tests: the validation tools (installed by scripts/tools.sh)."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return require_tool("docker-compose")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return require_tool("kubernetes-validate")
