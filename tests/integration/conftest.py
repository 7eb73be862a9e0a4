"""Fixtures of the integration tests beyond the shared ones (tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import pgcluster


@pytest.fixture
def second_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster of the shared server's version: its admin URL. Skipped
    (failed under CI) when no server binaries or no user to run them can be had."""
    try:
        with pgcluster.throwaway_cluster() as admin_url:
            yield admin_url
    except pgcluster.ClusterUnavailable as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(error))
        pytest.skip(str(error))
