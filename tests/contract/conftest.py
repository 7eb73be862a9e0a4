"""Every contract test runs twice: on the in-memory fakes and on PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.contract.backends import Backend, MemoryBackend, PostgresBackend


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
        return
    # Only the PostgreSQL run asks for the real services.
    settings: Settings = request.getfixturevalue("settings")
    engine: Engine = request.getfixturevalue("engine")
    with PostgresBackend.running(settings, engine) as backend:
        yield backend
