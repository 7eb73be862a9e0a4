"""Fixtures of the migration tests: a brand-new, empty database per test and Alembic on it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from alembic.config import Config
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Engine

from tests.support import services


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A brand-new database with nothing in it (not the migrated template)."""
    if not services.reachable("127.0.0.1", 5432):
        message = "PostgreSQL is not reachable at 127.0.0.1:5432"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    name = services.unique("outbox_mig")
    services.admin_execute(f'CREATE DATABASE "{name}"')
    try:
        yield services.db_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        services.drop_database(name)


@pytest.fixture
def alembic_config(empty_database: str) -> Config:
    config = Config(str(services.ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", empty_database)
    return config


@pytest.fixture
def db_engine(empty_database: str) -> Iterator[Engine]:
    eng = create_engine(empty_database, poolclass=pool.NullPool)
    yield eng
    eng.dispose()
